//! What the portal's tests share: a real server (the library, on loopback,
//! with the portal), users made through the API, and a browser-like HTTP
//! client (cookies kept, redirects not followed) that signs in through the
//! login form and reads the CSRF token from pages. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use octo_server_core::{start_with, RunArgs, RunningServer};
use serde_json::{json, Value};

/// Bound on any one request.
pub const T: Duration = Duration::from_secs(60);

/// A server with the portal, and its first administrator's API key.
pub struct Portal {
    pub server: RunningServer,
    pub base: String,
    pub key: String,
    pub dir: tempfile::TempDir,
}

impl Portal {
    pub async fn start() -> Portal {
        Self::start_configured(|_, _| {}).await
    }

    /// A server whose arguments `configure` adjusts (given its temporary directory).
    pub async fn start_configured(
        configure: impl FnOnce(&mut RunArgs, &std::path::Path),
    ) -> Portal {
        let dir = tempfile::tempdir().unwrap();
        let mut args = RunArgs::loopback(&dir.path().join("data"));
        configure(&mut args, dir.path());
        let server = tokio::time::timeout(T, start_with(&args, octo_portal::router))
            .await
            .unwrap()
            .unwrap();
        Portal {
            base: format!("http://{}", server.api_addr),
            key: server.admin_api_key.clone().unwrap(),
            server,
            dir,
        }
    }

    /// Calls the API as the first administrator.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let http = reqwest::Client::new();
        let mut req = http
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("X-Octopus-ApiKey", &self.key)
            .timeout(T);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A user with a password, holding `role` in the Default space through a
    /// team of their own (no role: `None`).
    pub async fn user(&self, name: &str, role: Option<&str>) -> String {
        let password = format!("{name}-password-1");
        let (status, body) = self
            .api(
                "POST",
                "/api/users",
                Some(json!({ "username": name, "password": password })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        if let Some(role) = role {
            let team = format!("{name}-team");
            let (s, b) = self
                .api("POST", "/api/teams", Some(json!({ "name": team })))
                .await;
            assert_eq!(s, 201, "{b}");
            let (s, b) = self
                .api(
                    "POST",
                    &format!("/api/teams/{team}/members"),
                    Some(json!({ "username": name })),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            let (s, b) = self
                .api(
                    "POST",
                    &format!("/api/teams/{team}/grants"),
                    Some(json!({ "role": role })),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        }
        password
    }

    /// A browser-like client signed in as `name`.
    pub async fn browser(&self, name: &str, password: &str) -> Browser {
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(T)
            .build()
            .unwrap();
        let b = Browser {
            http,
            base: self.base.clone(),
        };
        let page = b.get("/login").await;
        assert_eq!(page.status, 200);
        let token = page.input("token").unwrap();
        let resp = b
            .post_form(
                "/login",
                &[
                    ("username", name),
                    ("password", password),
                    ("next", "/"),
                    ("token", &token),
                ],
            )
            .await;
        assert_eq!(resp.status, 303, "signing in as {name}: {}", resp.body);
        b
    }
}

/// A page as the client got it.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

impl Page {
    /// The value of the first `<input name="NAME" value="...">` (or of the
    /// `csrf-token` meta), unescaped of the few entities askama writes.
    pub fn input(&self, name: &str) -> Option<String> {
        let needle = format!("name=\"{name}\" value=\"");
        let start = self.body.find(&needle)? + needle.len();
        let end = self.body[start..].find('"')? + start;
        Some(unescape(&self.body[start..end]))
    }

    /// The page's CSRF token.
    pub fn csrf(&self) -> String {
        let needle = "<meta name=\"csrf-token\" content=\"";
        let start = self.body.find(needle).unwrap() + needle.len();
        let end = self.body[start..].find('"').unwrap() + start;
        self.body[start..end].to_string()
    }
}

fn unescape(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&#47;", "/")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Cookies kept, redirects not followed.
pub struct Browser {
    pub http: reqwest::Client,
    pub base: String,
}

impl Browser {
    async fn page(resp: reqwest::Response) -> Page {
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Page {
            status,
            location,
            body: resp.text().await.unwrap_or_default(),
        }
    }

    pub async fn get(&self, path: &str) -> Page {
        Self::page(
            self.http
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Posts a form as is (add the `csrf` field yourself, or leave it out to
    /// see the refusal).
    pub async fn post_form(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        Self::page(
            self.http
                .post(format!("{}{path}", self.base))
                .form(fields)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    /// Gets `page` for its CSRF token, then posts the form with it.
    pub async fn submit(&self, page: &str, action: &str, fields: &[(&str, &str)]) -> Page {
        let token = self.get(page).await.csrf();
        let mut all: Vec<(&str, &str)> = fields.to_vec();
        all.push(("csrf", &token));
        self.post_form(action, &all).await
    }
}
