//! What the security tests share: a server started in-process on 127.0.0.1,
//! an HTTP client per caller (API key or session key), and helpers that make
//! users, teams, grants, machines and packages through the API itself.
//!
//! Every request is bounded by [`T`]; nothing sleeps to synchronise.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use octo_server_core::{start, RunArgs, RunningServer};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::timeout;

/// Bound on any single wait.
pub const T: Duration = Duration::from_secs(60);

/// A started server and its first administrator.
pub struct Server {
    pub running: Option<RunningServer>,
    pub data: PathBuf,
    pub base: String,
    /// The first administrator (user `admin`, no password, one API key).
    pub admin: Api,
    _tmp: tempfile::TempDir,
}

impl Server {
    /// A new server on 127.0.0.1 with free ports and a fresh data directory.
    pub async fn start() -> Server {
        octo_testkit::init_tracing();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let running = timeout(T, start(&RunArgs::loopback(&data)))
            .await
            .unwrap()
            .unwrap();
        let base = format!("http://{}", running.api_addr);
        let admin = Api::new(&base, running.admin_api_key.clone());
        Server {
            running: Some(running),
            data,
            base,
            admin,
            _tmp: tmp,
        }
    }

    /// Stops the server (bounded).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            timeout(T, r.stop()).await.unwrap();
        }
    }

    /// A client without credentials.
    pub fn anonymous(&self) -> Api {
        Api::new(&self.base, None)
    }

    /// A client whose connections leave from `local` (e.g. 127.0.0.2), without credentials.
    pub fn anonymous_from(&self, local: IpAddr) -> Api {
        Api {
            base: self.base.clone(),
            key: None,
            http: reqwest::Client::builder()
                .local_address(local)
                .build()
                .unwrap(),
        }
    }

    /// Creates a user (by the admin) with a password.
    pub async fn create_user(&self, username: &str, password: Option<&str>) -> Value {
        let body = match password {
            Some(p) => json!({ "username": username, "password": p }),
            None => json!({ "username": username }),
        };
        self.admin.post("/api/users", body).await.expect(201)
    }

    /// Creates a System administrator (as the admin) with a password.
    pub async fn create_user_admin(&self, username: &str, password: &str) -> Value {
        self.admin
            .post(
                "/api/users",
                json!({ "username": username, "password": password, "is_admin": true }),
            )
            .await
            .expect(201)
    }

    /// Creates a user with a password and logs them in; their client uses the session key.
    pub async fn user(&self, username: &str, password: &str) -> Api {
        self.create_user(username, Some(password)).await;
        self.login(username, password).await
    }

    /// Logs a user in; their client uses the session key.
    pub async fn login(&self, username: &str, password: &str) -> Api {
        let r = self
            .anonymous()
            .post(
                "/api/users/login",
                json!({ "username": username, "password": password }),
            )
            .await
            .expect(200);
        self.anonymous().with_key(r["api_key"].as_str().unwrap())
    }

    /// A team in `space` (None: outside any space) with `members`, holding
    /// `role` in that space (or in every space, for a team outside any space),
    /// narrowed to `environments`. Returns the grant.
    pub async fn team_with_role(
        &self,
        space: Option<&str>,
        team: &str,
        members: &[&str],
        role: &str,
        environments: &[&str],
    ) -> Value {
        let prefix = space_prefix(space);
        self.admin
            .post(
                &format!("{prefix}/teams"),
                json!({ "name": team, "system": space.is_none() }),
            )
            .await
            .expect(201);
        for m in members {
            self.admin
                .post(
                    &format!("{prefix}/teams/{team}/members"),
                    json!({ "username": m }),
                )
                .await
                .expect(200);
        }
        self.admin
            .post(
                &format!("{prefix}/teams/{team}/grants"),
                json!({
                    "role": role,
                    "environments": environments,
                    "all_spaces": space.is_none(),
                }),
            )
            .await
            .expect(201)
    }

    /// Creates an environment (as the admin) in `space` (None: Default).
    pub async fn environment(&self, space: Option<&str>, name: &str) {
        self.admin
            .post(
                &format!("{}/environments", space_prefix(space)),
                json!({ "name": name }),
            )
            .await
            .expect(201);
    }

    /// Adds a listening machine (as the admin) that nothing answers for:
    /// https://127.0.0.1:1/ and a random thumbprint.
    pub async fn machine(
        &self,
        space: Option<&str>,
        name: &str,
        environments: &[&str],
        roles: &[&str],
    ) -> Value {
        self.admin
            .post(
                &format!("{}/machines", space_prefix(space)),
                listening(name, environments, roles),
            )
            .await
            .expect(201)
    }

    /// Adds a polling machine (as the admin) that never connects: tasks on it
    /// stay running until canceled.
    pub async fn polling_machine(
        &self,
        space: Option<&str>,
        name: &str,
        environments: &[&str],
    ) -> Value {
        self.admin
            .post(
                &format!("{}/machines", space_prefix(space)),
                json!({
                    "name": name,
                    "comms_style": "TentacleActive",
                    "uri": format!("poll://{}/", &thumbprint()[..20]),
                    "thumbprint": thumbprint(),
                    "environments": environments,
                }),
            )
            .await
            .expect(201)
    }

    /// Pushes a (tiny, gzip-headed) package as the admin.
    pub async fn package(&self, space: Option<&str>, id: &str, version: &str) -> Value {
        self.admin
            .push(space, id, version, format!("{id} {version}").as_bytes())
            .await
            .expect(201)
    }

    /// Every task of the space (as the admin), newest first.
    pub async fn task_ids(&self, space: Option<&str>) -> Vec<String> {
        let tasks = self
            .admin
            .get(&format!("{}/tasks?limit=1000", space_prefix(space)))
            .await
            .expect(200);
        tasks
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// `/api` or `/api/spaces/NAME`.
pub fn space_prefix(space: Option<&str>) -> String {
    match space {
        Some(s) => format!("/api/spaces/{s}"),
        None => "/api".to_string(),
    }
}

/// A random 64-hex thumbprint.
pub fn thumbprint() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The body that adds a listening machine nothing answers for.
pub fn listening(name: &str, environments: &[&str], roles: &[&str]) -> Value {
    json!({
        "name": name,
        "comms_style": "TentaclePassive",
        "uri": "https://127.0.0.1:1/",
        "thumbprint": thumbprint(),
        "environments": environments,
        "roles": roles,
    })
}

/// A client of the API, with or without a key.
#[derive(Clone, Debug)]
pub struct Api {
    pub base: String,
    pub key: Option<String>,
    pub http: reqwest::Client,
}

/// An answer: status, JSON body (or the text as a JSON string), headers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: HeaderMap,
}

impl Reply {
    /// The body, after checking the status.
    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(self.status, status, "unexpected answer: {}", self.body);
        self.body
    }

    /// The error message of an error answer.
    pub fn error(&self) -> String {
        self.body["error"].as_str().unwrap_or_default().to_string()
    }
}

/// A request body.
#[derive(Debug, Clone)]
pub enum Body {
    None,
    Json(Value),
    Bytes(Vec<u8>),
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> Api {
        Api {
            base: base.to_string(),
            key,
            http: reqwest::Client::new(),
        }
    }

    /// The same server and connection source, with this key.
    pub fn with_key(&self, key: &str) -> Api {
        Api {
            key: Some(key.to_string()),
            ..self.clone()
        }
    }

    fn request(&self, method: Method, path: &str, body: Body) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header("X-Octopus-ApiKey", k);
        }
        match body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Bytes(b) => req
                .header("content-type", "application/octet-stream")
                .body(b),
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn call(&self, method: Method, path: &str, body: Body) -> Reply {
        let resp = timeout(T, self.request(method.clone(), path, body).send())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = timeout(T, resp.text()).await.unwrap().unwrap();
        Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        }
    }

    /// Sends a request and reads only the status and headers (for streams), and
    /// the body of an error.
    pub async fn head_only(&self, method: Method, path: &str) -> Reply {
        let resp = timeout(T, self.request(method.clone(), path, Body::None).send())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer in time"))
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // An error answer is short and complete: read it.
        let body = if status >= 300 {
            let text = timeout(T, resp.text()).await.unwrap().unwrap();
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        } else {
            Value::Null
        };
        Reply {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call(Method::GET, path, Body::None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Body::Json(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Body::Json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.call(Method::DELETE, path, Body::None).await
    }

    /// Pushes bytes as package `id` `version` in `space` (None: Default): a
    /// tar.gz holding them as one file.
    pub async fn push(&self, space: Option<&str>, id: &str, version: &str, bytes: &[u8]) -> Reply {
        let file = tar_gz(bytes);
        self.call(
            Method::POST,
            &format!(
                "{}/packages?package_id={id}&version={version}",
                space_prefix(space)
            ),
            Body::Bytes(file),
        )
        .await
    }

    /// Creates an API key for the caller; returns (key, id).
    pub async fn new_key(&self, purpose: &str) -> (String, i64) {
        let v = self
            .post("/api/api-keys", json!({ "purpose": purpose }))
            .await
            .expect(201);
        (
            v["api_key"].as_str().unwrap().to_string(),
            v["key"]["id"].as_i64().unwrap(),
        )
    }

    /// Starts a script task; the whole answer.
    pub async fn script(&self, space: Option<&str>, body: Value) -> Reply {
        self.post(&format!("{}/tasks/script", space_prefix(space)), body)
            .await
    }
}

/// A tar.gz package holding `content` as `content.txt`.
pub fn tar_gz(content: &[u8]) -> Vec<u8> {
    tar_gz_files(&[("content.txt", content, 0o644)])
}

/// A tar.gz package holding these files (path, content, mode).
pub fn tar_gz_files(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (path, content, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_path(path).unwrap();
        header.set_size(content.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        builder.append(&header, *content).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}
