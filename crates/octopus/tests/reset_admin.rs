//! `octopus server reset-admin` against a running `octopus server run` (the
//! real binary, on loopback): with the first admin disabled, out of the
//! administrators' team and without a key, the command prints a key that
//! works as a System administrator at once, and the audit log records it.
#![allow(clippy::unwrap_used)]
// `Server` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::timeout;

/// Bound on any single wait.
const T: Duration = Duration::from_secs(60);

struct Server {
    child: Child,
    api: String,
    key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `octopus server run` on free loopback ports; returns once it says it
/// is ready, with the first admin key it printed.
fn start(data: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args([
            "server",
            "run",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut key = None;
    loop {
        let line = rx.recv_timeout(T).expect("server ready line");
        if let Some(k) = line.trim().strip_prefix("API-") {
            key = Some(format!("API-{k}"));
        }
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            let api = format!("http://{}", rest.split("/api").next().unwrap());
            return Server {
                child,
                api,
                key: key.expect("the first start prints the admin key"),
            };
        }
    }
}

async fn call(
    server: &Server,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let method: reqwest::Method = method.parse().unwrap();
    let mut req = reqwest::Client::new()
        .request(method, format!("{}{path}", server.api))
        .header("X-Octopus-ApiKey", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = timeout(T, req.send()).await.unwrap().unwrap();
    let status = resp.status().as_u16();
    let text = timeout(T, resp.text()).await.unwrap().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn reset_admin_recovers_a_locked_out_administrator_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data);
    let admin = server.key.clone();

    // A second administrator, with a password.
    let (status, body) = call(
        &server,
        "POST",
        "/api/users",
        &admin,
        Some(json!({ "username": "bob", "password": "bob-password", "is_admin": true })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let login = reqwest::Client::new()
        .post(format!("{}/api/users/login", server.api))
        .json(&json!({ "username": "bob", "password": "bob-password" }))
        .send();
    let login: Value = timeout(T, timeout(T, login).await.unwrap().unwrap().json())
        .await
        .unwrap()
        .unwrap();
    let bob = login["api_key"].as_str().unwrap().to_string();

    // Bob takes away everything that lets the first admin in: their
    // membership of the administrators, their key, and their account.
    let (status, keys) = call(&server, "GET", "/api/api-keys?all=true", &bob, None).await;
    assert_eq!(status, 200, "{keys}");
    let admin_keys: Vec<i64> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["purpose"].as_str().unwrap().contains("first start"))
        .map(|k| k["id"].as_i64().unwrap())
        .collect();
    assert_eq!(admin_keys.len(), 1, "{keys}");
    let (status, body) = call(
        &server,
        "DELETE",
        "/api/teams/Octopus%20Administrators/members/admin",
        &bob,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &server,
        "DELETE",
        &format!("/api/api-keys/{}", admin_keys[0]),
        &bob,
        None,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = call(&server, "POST", "/api/users/admin/disable", &bob, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        call(&server, "GET", "/api/users/me", &admin, None).await.0,
        401
    );
    let (_, user) = call(&server, "GET", "/api/users/admin", &bob, None).await;
    assert_eq!(
        (user["is_admin"].as_bool(), user["disabled"].as_bool()),
        (Some(false), Some(true)),
        "{user}"
    );

    // Recovery, from the data directory, while the server runs.
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_octopus"));
    cmd.args(["server", "reset-admin", "--data", data.to_str().unwrap()])
        .kill_on_drop(true);
    let out = timeout(T, cmd.output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("API-"))
        .collect();
    assert_eq!(keys.len(), 1, "one key, printed once: {stdout}");
    let key = keys[0].to_string();

    // The key works at once, as an enabled System administrator.
    let (status, me) = call(&server, "GET", "/api/users/me", &key, None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["user"]["username"], "admin");
    assert_eq!(me["user"]["is_admin"], true, "{me}");
    assert_eq!(me["user"]["disabled"], false, "{me}");
    let (status, body) = call(&server, "GET", "/api/users", &key, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &server,
        "POST",
        "/api/spaces",
        &key,
        Some(json!({ "name": "After recovery" })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The revoked key stays revoked.
    assert_eq!(
        call(&server, "GET", "/api/users/me", &admin, None).await.0,
        401
    );

    // The audit log records the recovery, as done locally, without the key.
    let (status, events) = call(
        &server,
        "GET",
        "/api/audit?user=admin&limit=1000",
        &bob,
        None,
    )
    .await;
    assert_eq!(status, 200, "{events}");
    let recovered: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["source"].as_str().unwrap().contains("reset-admin"))
        .collect();
    assert_eq!(recovered.len(), 1, "{events:#}");
    let e = recovered[0];
    assert_eq!(e["username"], "admin");
    assert_eq!(e["kind"], "api key");
    assert_eq!(e["action"], "created");
    assert!(e["space"].is_null(), "{e}");
    assert!(
        e["details"].as_str().unwrap().contains("administrator"),
        "{e}"
    );
    assert!(
        !events.to_string().contains(&key),
        "the key is in the audit log"
    );

    // The data directory's secrets kept their modes.
    use std::os::unix::fs::PermissionsExt;
    for f in ["octopus.db", "admin-api-key", "master-key", "server.key"] {
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(format!("{mode:o}"), "600", "{f}");
    }
}
