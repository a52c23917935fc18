//! `tentacle register-with` against a real server (in this process).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use octo_server_core::{start, RunArgs, RunningServer};
use octo_tls::Thumbprint;
use serde_json::{json, Value};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tentacle"))
            .args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .output()
            .unwrap()
    }
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.cmd(args);
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "tentacle {args:?}: {o}{e}");
        (o, e)
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(!out.status.success(), "tentacle {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
    fn config(&self, instance: &str) -> Value {
        serde_json::from_str(
            &self
                .ok(&[
                    "show-configuration",
                    "--instance",
                    instance,
                    "--format",
                    "json",
                ])
                .0,
        )
        .unwrap()
    }
}

async fn api(method: reqwest::Method, url: String, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("X-Octopus-ApiKey", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A server on loopback (with its TLS API port when `web_socket` is given) and an
/// environment "Test".
async fn server_with_test_environment(env: &Env, web_socket: Option<u16>) -> RunningServer {
    let server = start(&RunArgs {
        data: env.dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        web_socket_listen_port: web_socket,
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let (status, _) = api(
        reqwest::Method::POST,
        format!("http://{}/api/environments", server.api_addr),
        server.admin_api_key.as_deref().unwrap(),
        Some(json!({"name": "Test"})),
    )
    .await;
    assert_eq!(status, 201);
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_listening_and_polling_tentacles() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let server = server_with_test_environment(&env, None).await;
    let key = server.admin_api_key.clone().unwrap();
    let url = format!("http://{}", server.api_addr);

    // Listening.
    env.ok(&["create-instance", "--instance", "L"]);
    env.ok(&["new-certificate", "--instance", "L"]);
    let ltp = env
        .ok(&["show-thumbprint", "--instance", "L"])
        .0
        .trim()
        .to_string();
    let reg = [
        "register-with",
        "--instance",
        "L",
        "--server",
        &url,
        "--api-key",
        &key,
        "--environment",
        "Test",
        "--role",
        "web",
        "--name",
        "t-listen",
        "--public-hostname",
        "127.0.0.1",
        "--tentacle-comms-port",
        "10999",
    ];
    let (out, err) = env.ok(&reg);
    assert!(out.contains("Registered 't-listen'"), "{out}");
    assert!(
        err.contains("identity is not verified"),
        "plain HTTP without a thumbprint warns: {err}"
    );
    let cfg = env.config("L");
    assert_eq!(
        cfg["trusted_servers"][0]["thumbprint"],
        server.thumbprint.to_string()
    );
    let (status, m) = api(
        reqwest::Method::GET,
        format!("{url}/api/machines/t-listen"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(m["kind"], "Listening");
    assert_eq!(m["uri"], "https://127.0.0.1:10999/");
    assert_eq!(m["thumbprint"], ltp);
    assert_eq!(m["roles"], json!(["web"]));

    // Again without --force: refused; with --force: replaced.
    let err = env.fails(&reg);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    let mut forced = reg.to_vec();
    forced.push("--force");
    env.ok(&forced);

    // A wrong key, and a server thumbprint that does not match, are refused.
    let err = env.fails(&[
        "register-with",
        "--instance",
        "L",
        "--server",
        &url,
        "--api-key",
        "API-NOPE",
        "--environment",
        "Test",
    ]);
    assert!(err.contains("refused the API key"), "{err}");
    let wrong = Thumbprint::of_der(b"wrong").to_string();
    let err = env.fails(&[
        "register-with",
        "--instance",
        "L",
        "--server",
        &url,
        "--apiKey",
        &key,
        "--env",
        "Test",
        "--name",
        "t-listen",
        "--force",
        "--server-thumbprint",
        &wrong,
    ]);
    assert!(
        err.contains(&format!(
            "presented thumbprint {} but {wrong} was expected",
            server.thumbprint
        )),
        "{err}"
    );
    // Unreachable server: says so.
    let err = env.fails(&[
        "register-with",
        "--instance",
        "L",
        "--server",
        "http://127.0.0.1:1",
        "--api-key",
        &key,
        "--environment",
        "Test",
    ]);
    assert!(err.contains("cannot reach the server"), "{err}");

    // Polling.
    env.ok(&["create-instance", "--instance", "P"]);
    env.ok(&["new-certificate", "--instance", "P"]);
    let (out, _) = env.ok(&[
        "register-with",
        "--instance",
        "P",
        "--server",
        &url,
        "--api-key",
        &key,
        "--environment",
        "Test",
        "--name",
        "t-poll",
        "--comms-style",
        "TentacleActive",
        "--server-thumbprint",
        &server.thumbprint.to_string(),
    ]);
    assert!(out.contains("as polling tentacle poll://"), "{out}");
    let cfg = env.config("P");
    let poll = &cfg["polling_servers"][0];
    assert_eq!(poll["address"], format!("127.0.0.1:{}", server.comms_port));
    assert_eq!(poll["thumbprint"], server.thumbprint.to_string());
    let (_, m) = api(
        reqwest::Method::GET,
        format!("{url}/api/machines/t-poll"),
        &key,
        None,
    )
    .await;
    assert_eq!(m["kind"], "Polling");
    assert_eq!(
        m["uri"],
        format!("poll://{}/", poll["subscription_id"].as_str().unwrap())
    );
    // Registering again keeps the same subscription.
    env.ok(&[
        "register-with",
        "--instance",
        "P",
        "--server",
        &url,
        "--api-key",
        &key,
        "--environment",
        "Test",
        "--name",
        "t-poll",
        "--comms-style",
        "TentacleActive",
        "--force",
    ]);
    assert_eq!(
        env.config("P")["polling_servers"][0]["subscription_id"],
        poll["subscription_id"]
    );
    assert_eq!(
        env.config("P")["polling_servers"].as_array().unwrap().len(),
        1
    );

    // Username and password: a user registers; the session key is revoked after.
    let (status, _) = api(
        reqwest::Method::POST,
        format!("{url}/api/users"),
        &key,
        Some(json!({"username": "ops", "password": "correct horse", "is_admin": true})),
    )
    .await;
    assert_eq!(status, 201);
    env.ok(&["create-instance", "--instance", "U"]);
    env.ok(&["new-certificate", "--instance", "U"]);
    let err = env.fails(&[
        "register-with",
        "--instance",
        "U",
        "--server",
        &url,
        "--username",
        "ops",
        "--password",
        "wrong pass",
        "--environment",
        "Test",
        "--name",
        "t-user",
    ]);
    assert!(err.contains("refused the login of 'ops'"), "{err}");
    let (out, _) = env.ok(&[
        "register-with",
        "--instance",
        "U",
        "--server",
        &url,
        "--username",
        "ops",
        "--password",
        "correct horse",
        "--environment",
        "Test",
        "--name",
        "t-user",
        "--public-hostname",
        "127.0.0.1",
    ]);
    assert!(out.contains("Registered 't-user'"), "{out}");
    let (_, keys) = api(
        reqwest::Method::GET,
        format!("{url}/api/api-keys"),
        &key,
        None,
    )
    .await;
    let sessions: Vec<&Value> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["purpose"].as_str().unwrap().starts_with("session of ops"))
        .collect();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        sessions[0]["revoked"], true,
        "the login's session key is revoked after use"
    );
    // The password is not stored in clear.
    // (WAL mode: recent writes are in octopus.db-wal, so read every database file.)
    let mut db = Vec::new();
    for e in std::fs::read_dir(env.dir.path().join("server"))
        .unwrap()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("octopus.db") {
            db.extend(std::fs::read(e.path()).unwrap());
        }
    }
    assert!(
        db.windows(5).any(|w| w == b"admin"),
        "the check reads the database"
    );
    assert!(!db.windows(13).any(|w| w == b"correct horse"));

    // A worker: no environment, a pool.
    env.ok(&["create-instance", "--instance", "W"]);
    env.ok(&["new-certificate", "--instance", "W"]);
    let err = env.fails(&[
        "register-worker",
        "--instance",
        "W",
        "--server",
        &url,
        "--api-key",
        &key,
    ]);
    assert!(err.contains("--worker-pool"), "{err}");
    env.ok(&[
        "register-worker",
        "--instance",
        "W",
        "--server",
        &url,
        "--api-key",
        &key,
        "--worker-pool",
        "Builders",
        "--name",
        "w1",
        "--public-hostname",
        "127.0.0.1",
    ]);
    let (_, m) = api(
        reqwest::Method::GET,
        format!("{url}/api/machines/w1"),
        &key,
        None,
    )
    .await;
    assert_eq!(m["worker_pool"], "Builders");
    assert_eq!(m["environments"], json!([]));
    // A target without an environment is refused before calling the server.
    let err = env.fails(&[
        "register-with",
        "--instance",
        "W",
        "--server",
        &url,
        "--api-key",
        &key,
    ]);
    assert!(err.contains("--environment is required"), "{err}");

    // Deregister: the machine goes, and the tentacle stops trusting the server.
    let (out, _) = env.ok(&[
        "deregister-from",
        "--instance",
        "L",
        "--server",
        &url,
        "--api-key",
        &key,
    ]);
    assert!(out.contains("Removed t-listen"), "{out}");
    let (status, _) = api(
        reqwest::Method::GET,
        format!("{url}/api/machines/t-listen"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 404);
    assert!(env
        .config("L")
        .get("trusted_servers")
        .is_none_or(|t| t.as_array().is_some_and(|a| a.is_empty())));
    let (out, _) = env.ok(&[
        "deregister-from",
        "--instance",
        "P",
        "--server",
        &url,
        "--api-key",
        &key,
    ]);
    assert!(out.contains("Removed t-poll"), "{out}");
    assert!(env
        .config("P")
        .get("polling_servers")
        .is_none_or(|t| t.as_array().is_some_and(|a| a.is_empty())));

    server.stop().await;
}

/// Registration and deregistration over the server's TLS port: the server is
/// pinned during the handshake, a wrong pin sends nothing, and deregistration
/// only talks to a server this tentacle already trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_deregister_over_https_with_the_server_pinned() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let server = server_with_test_environment(&env, Some(0)).await;
    let key = server.admin_api_key.clone().unwrap();
    let http = format!("http://{}", server.api_addr);
    let https = format!("https://127.0.0.1:{}", server.web_socket_port.unwrap());
    env.ok(&["create-instance"]);
    env.ok(&["new-certificate"]);
    let right = server.thumbprint.to_string();
    let wrong = Thumbprint::of_der(b"some other server").to_string();
    let register = |pin: &str| {
        vec![
            "register-with".to_string(),
            "--server".into(),
            https.clone(),
            "--api-key".into(),
            key.clone(),
            "--environment".into(),
            "Test".into(),
            "--name".into(),
            "t-https".into(),
            "--public-hostname".into(),
            "127.0.0.1".into(),
            "--server-thumbprint".into(),
            pin.into(),
        ]
    };

    // A wrong pin: refused in the handshake, naming both thumbprints; the server
    // never got the request and this tentacle trusts nothing.
    let wrong_args = register(&wrong);
    let err = env.fails(&wrong_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        err.contains(&right) && err.contains(&wrong) && err.contains("nothing was sent"),
        "{err}"
    );
    let (status, _) = api(
        reqwest::Method::GET,
        format!("{http}/api/machines/t-https"),
        &key,
        None,
    )
    .await;
    assert_eq!(
        status, 404,
        "a refused handshake must not register anything"
    );
    let trusted = env.config("Tentacle")["trusted_servers"].clone();
    assert!(trusted.as_array().is_none_or(Vec::is_empty), "{trusted}");

    // The right pin: registered, and no warning about an unverified identity.
    let right_args = register(&right);
    let (out, err) = env.ok(&right_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains("Registered 't-https'"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(
        env.config("Tentacle")["trusted_servers"][0]["thumbprint"],
        right
    );
    let (status, m) = api(
        reqwest::Method::GET,
        format!("{http}/api/machines/t-https"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["uri"], "https://127.0.0.1:10933/");

    // Deregistration over https pins the servers this tentacle trusts.
    let (out, _) = env.ok(&["deregister-from", "--server", &https, "--api-key", &key]);
    assert!(out.contains("Removed t-https"), "{out}");
    let (status, _) = api(
        reqwest::Method::GET,
        format!("{http}/api/machines/t-https"),
        &key,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let trusted = env.config("Tentacle")["trusted_servers"].clone();
    assert!(trusted.as_array().is_none_or(Vec::is_empty), "{trusted}");
}
