//! `octopus server run` as a real process: first start, the data-directory lock,
//! and the API's authentication, validation and machine rules.
#![allow(clippy::unwrap_used)]
// `Server` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

struct Server {
    child: Child,
    api: String,
    thumbprint: String,
    printed_key: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &std::path::Path) -> Server {
    start_with(data, &[])
}

fn start_with(data: &std::path::Path, extra: &[&str]) -> Server {
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
        .args(extra)
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
    let mut printed_key = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server ready line");
        if let Some(k) = line.trim().strip_prefix("API-") {
            printed_key = Some(format!("API-{k}"));
        }
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            let api = format!("http://{}", rest.split("/api").next().unwrap());
            let thumbprint = line.rsplit(' ').next().unwrap().to_string();
            return Server {
                child,
                api,
                thumbprint,
                printed_key,
            };
        }
    }
}

async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(k) = key {
        req = req.header("X-Octopus-ApiKey", k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn tp(n: u8) -> String {
    octo_tls::Thumbprint::of_der(&[n]).to_string()
}

#[tokio::test]
async fn first_start_lock_auth_and_machines() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = start(&data);

    // The admin key: printed once, and alone on one line in a 0600 file.
    let key_file = data.join("admin-api-key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(key.lines().count(), 1);
    let key = key.trim().to_string();
    assert_eq!(server.printed_key.as_deref(), Some(key.as_str()));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The key is not stored in the database in clear.
    // (WAL mode: recent writes are in octopus.db-wal, so read every database file.)
    let mut db = Vec::new();
    for e in std::fs::read_dir(&data).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("octopus.db") {
            db.extend(std::fs::read(e.path()).unwrap());
        }
    }
    assert!(
        db.windows(5).any(|w| w == b"admin"),
        "the check reads the database"
    );
    assert!(!db.windows(key.len()).any(|w| w == key.as_bytes()));

    // show-thumbprint agrees with the running server.
    let out = Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args([
            "server",
            "show-thumbprint",
            "--data",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        server.thumbprint
    );

    // A second server on the same data directory is refused, naming it.
    let out = Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args([
            "server",
            "run",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another octopus server") && err.contains(data.to_str().unwrap()),
        "{err}"
    );

    // Authentication: nothing without a valid key, and nothing leaked.
    let api = &server.api;
    for k in [None, Some("API-WRONG")] {
        let (status, body) = call(
            reqwest::Method::GET,
            &format!("{api}/api/environments"),
            k,
            None,
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(
            body.as_object().unwrap().keys().collect::<Vec<_>>(),
            vec!["error"]
        );
    }
    let k = Some(key.as_str());
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{api}/api/environments"),
        k,
        None,
    )
    .await;
    assert_eq!((status, body), (200, json!([])));

    // Malformed JSON: 400 naming the field.
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/environments"),
        k,
        Some(json!({"nam": "x"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nam"), "{body}");

    // Environments.
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{api}/api/environments"),
        k,
        Some(json!({"name": "Production"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(
        reqwest::Method::POST,
        &format!("{api}/api/environments"),
        k,
        Some(json!({"name": "production"})),
    )
    .await;
    assert_eq!(status, 409);

    // Machines: add a listening one; a second with the same thumbprint is refused.
    let web = json!({"name": "web1", "comms_style": "TentaclePassive", "uri": "https://web1.example:10933/", "thumbprint": tp(1), "environments": ["Production"], "roles": ["web"]});
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/machines"),
        k,
        Some(web),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "Unknown");
    let clone = json!({"name": "web2", "comms_style": "TentaclePassive", "uri": "https://web2.example:10933/", "thumbprint": tp(1), "environments": ["Production"]});
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/machines"),
        k,
        Some(clone),
    )
    .await;
    assert_eq!(status, 409);
    assert!(
        body["error"].as_str().unwrap().contains("web1")
            && body["error"].as_str().unwrap().contains("cloned"),
        "{body}"
    );
    let bad = json!({"name": "x", "comms_style": "TentaclePassive", "uri": "https://x:1/", "thumbprint": "nope", "environments": ["Production"]});
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/machines"),
        k,
        Some(bad),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("thumbprint"),
        "{body}"
    );
    let missing_env = json!({"name": "y", "comms_style": "TentacleActive", "uri": "poll://y/", "thumbprint": tp(2), "environments": ["Nope"]});
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/machines"),
        k,
        Some(missing_env),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = call(
        reqwest::Method::GET,
        &format!("{api}/api/machines?role=web"),
        k,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 1);
    let (status, _) = call(
        reqwest::Method::DELETE,
        &format!("{api}/api/environments/Production"),
        k,
        None,
    )
    .await;
    assert_eq!(status, 422, "an environment in use is not deleted");
    let (status, _) = call(
        reqwest::Method::DELETE,
        &format!("{api}/api/machines/web1"),
        k,
        None,
    )
    .await;
    assert_eq!(status, 204);

    // API keys: create (shown once), use, revoke.
    let (status, body) = call(
        reqwest::Method::POST,
        &format!("{api}/api/api-keys"),
        k,
        Some(json!({"purpose": "ci"})),
    )
    .await;
    assert_eq!(status, 201);
    let new_key = body["api_key"].as_str().unwrap().to_string();
    let id = body["key"]["id"].as_i64().unwrap();
    let (status, _) = call(
        reqwest::Method::GET,
        &format!("{api}/api/server"),
        Some(&new_key),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        reqwest::Method::DELETE,
        &format!("{api}/api/api-keys/{id}"),
        k,
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        reqwest::Method::GET,
        &format!("{api}/api/server"),
        Some(&new_key),
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Graceful stop on SIGTERM.
    let mut server = server;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let s = server.child.wait().unwrap();
        std::mem::forget(server);
        s
    })
    .await
    .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs `octopus server run --data DATA ARGS` expecting a refusal: answers its
/// stderr. A server that starts instead is killed and the test fails.
fn refused_start(data: &std::path::Path, extra: &[&str]) -> String {
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
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut err);
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut out);
        let _ = tx.send((child.wait().unwrap(), out, err));
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok((status, out, err)) => {
            assert!(!status.success(), "the server started: {out}{err}");
            assert!(!out.contains("First start"), "{out}");
            err
        }
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("the server did not refuse to start within 60 s");
        }
    }
}

#[test]
fn a_database_file_that_is_not_ours_is_never_taken_for_a_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // What an earlier server left: its admin key, which must survive.
    let key_file = data.join("admin-api-key");
    std::fs::write(&key_file, "API-EARLIER\n").unwrap();
    let db = data.join("octopus.db");
    let db_shown = db.to_str().unwrap().to_string();

    // Empty (a full disk, a careless `> octopus.db`).
    std::fs::write(&db, b"").unwrap();
    let err = refused_start(&data, &[]);
    assert!(
        err.contains(&db_shown)
            && err.contains("is empty")
            && err.contains("restore it from a backup"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "left as it was");

    // Not a database at all.
    std::fs::write(&db, b"definitely not SQLite ".repeat(300)).unwrap();
    let err = refused_start(&data, &[]);
    assert!(
        err.contains(&db_shown) && err.contains("not a database") && err.contains("restore"),
        "{err}"
    );
    // The message says it once, not twice.
    assert_eq!(err.matches(&db_shown).count(), 1, "{err}");

    // Not a file.
    std::fs::remove_file(&db).unwrap();
    std::fs::create_dir(&db).unwrap();
    let err = refused_start(&data, &[]);
    assert!(
        err.contains(&db_shown) && err.contains("not a file"),
        "{err}"
    );
    std::fs::remove_dir(&db).unwrap();

    // Unreadable (not for root, whom modes do not stop).
    if !nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&db, b"SQLite format 3\0").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o000)).unwrap();
        let err = refused_start(&data, &[]);
        assert!(
            err.contains(&db_shown)
                && err.contains("for reading and writing")
                && err.contains("Permission denied"),
            "{err}"
        );
        std::fs::remove_file(&db).unwrap();
    }

    // The earlier admin key was never replaced.
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), "API-EARLIER\n");

    // A log limit of nothing is refused, naming the option.
    let err = refused_start(&data, &["--max-log-mib-per-step", "0"]);
    assert!(err.contains("--max-log-mib-per-step"), "{err}");

    // With no database file at all, this is a first start.
    std::fs::remove_file(&key_file).unwrap();
    let server = start(&data);
    assert!(server.printed_key.is_some(), "a first start prints the key");
}

#[test]
fn a_second_server_cannot_open_the_same_database_from_another_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    let mut server = start(&first);
    let db = first.join("octopus.db");
    let url = format!("sqlite://{}", db.display());
    let err = refused_start(&second, &["--database-url", &url]);
    assert!(
        err.contains("another octopus server")
            && err.contains(&format!("pid {}", server.child.id()))
            && err.contains(db.to_str().unwrap()),
        "{err}"
    );
    // Nor through a symbolic link to it under another name.
    let links = dir.path().join("links");
    std::fs::create_dir_all(&links).unwrap();
    let link = links.join("another-name.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    let err = refused_start(
        &dir.path().join("third"),
        &["--database-url", &format!("sqlite://{}", link.display())],
    );
    assert!(
        err.contains("another octopus server")
            && err.contains(&format!("pid {}", server.child.id())),
        "{err}"
    );
    // The first server is undisturbed.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = std::fs::read_to_string(first.join("admin-api-key")).unwrap();
    let (status, _) = rt.block_on(call(
        reqwest::Method::GET,
        &format!("{}/api/machines", server.api),
        Some(key.trim()),
        None,
    ));
    assert_eq!(status, 200);
    // Once it is gone (even killed), the database is free again (with the
    // master key its secrets need).
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    std::fs::copy(first.join("master-key"), second.join("master-key")).unwrap();
    let second_server = start_with(&second, &["--database-url", &url]);
    assert!(
        second_server.printed_key.is_none(),
        "the database is not new"
    );
}
