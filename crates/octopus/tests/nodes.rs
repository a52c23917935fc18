//! Server nodes, with real `octopus server run` processes: two nodes on one
//! PostgreSQL database (a database of its own in this test process's
//! throwaway cluster), listed, drained and undrained with the real CLI, and
//! pinged as a load balancer would; a second node on SQLite is refused.
//! Every wait is bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{run, tp, Run, BIN};
use serde_json::Value;

/// Longest wait for a state the nodes reach by themselves (heartbeats are 5 s apart).
const SETTLE: Duration = Duration::from_secs(60);

/// An `octopus server run` process, killed when dropped.
struct Node {
    child: Child,
    api: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line of a server on loopback with free ports, data in `data`.
fn server(data: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["server", "run", "--data", data.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--comms-listen-port", "0"])
        .args(["--comms-listen-address", "127.0.0.1"])
        .args(extra)
        .env_remove("OCTOPUS_DATABASE_URL")
        .stdin(Stdio::null());
    cmd
}

/// Starts a server; waits (bounded) for its ready line.
fn start(data: &Path, extra: &[&str]) -> Node {
    let mut child = server(data, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let api = loop {
        let line = rx.recv_timeout(SETTLE).expect("the server's ready line");
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            break format!("http://{}", rest.split("/api").next().unwrap());
        }
    };
    Node { child, api }
}

/// Runs a server that must refuse to start: its exit code and stderr (bounded).
fn refused(data: &Path, extra: &[&str]) -> (i32, String) {
    let mut child = server(data, extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not refuse to start within {SETTLE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `octopus --server API --api-key KEY ARGS`.
fn cli(api: &str, key: &str, args: &[&str]) -> Run {
    let mut all = vec!["--server", api, "--api-key", key];
    all.extend_from_slice(args);
    run(&[], &all, None)
}

/// `GET url` without credentials: status and body (bounded).
fn get(url: &str) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    })
}

/// `GET /api/nodes/ping`, as a load balancer asks: status and body.
fn ping(api: &str) -> (u16, Value) {
    get(&format!("{api}/api/nodes/ping"))
}

/// The nodes, by `octopus node list --output json`.
fn nodes(api: &str, key: &str) -> Vec<Value> {
    let v = cli(api, key, &["--output", "json", "node", "list"])
        .ok()
        .json();
    v.as_array().unwrap().clone()
}

fn node<'a>(all: &'a [Value], name: &str) -> &'a Value {
    all.iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {all:?}"))
}

/// Polls `check` (bounded by [`SETTLE`]) until it gives a value.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {SETTLE:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_second_node_on_sqlite_is_refused_with_a_pointer_to_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("a");
    let _a = start(&first, &[]);
    let db = format!("sqlite://{}", first.join("octopus.db").display());
    let (code, err) = refused(&dir.path().join("b"), &["--database-url", &db]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("SQLite serves one node only") && err.contains("--database-url postgres://"),
        "{err}"
    );
    // Names are checked before anything starts.
    let (code, err) = refused(&dir.path().join("c"), &["--node-name", "two words"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--node-name must be"), "{err}");
    // So is the (hidden) health-check scan interval.
    for bad in ["5", "3600001", "soon"] {
        let (code, err) = refused(&dir.path().join("d"), &["--health-scan-interval-ms", bad]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--health-scan-interval-ms"), "{bad}: {err}");
    }
}

#[test]
fn nodes_on_postgresql_heartbeat_drain_and_answer_ping() {
    let url = octo_testkit::postgres::shared().create_database();
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let a = start(
        &da,
        &[
            "--database-url",
            &url,
            "--node-name",
            "node-a",
            "--task-cap",
            "3",
        ],
    );
    let key = std::fs::read_to_string(da.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    // A second node without the first's master key is refused, saying what to copy.
    let (code, err) = refused(&db, &["--database-url", &url, "--node-name", "node-b"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("master-key, server.crt and server.key"),
        "{err}"
    );
    std::fs::create_dir_all(&db).unwrap();
    for f in ["master-key", "server.crt", "server.key"] {
        std::fs::copy(da.join(f), db.join(f)).unwrap();
    }
    let b = start(&db, &["--database-url", &url, "--node-name", "node-b"]);
    // Node b shares the first node's users, so it made no admin of its own.
    assert!(!db.join("admin-api-key").exists());

    // Both run; either lists both.
    for api in [&a.api, &b.api] {
        let all = nodes(api, &key);
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(node(&all, "node-a")["state"], "Running");
        assert_eq!(node(&all, "node-a")["task_cap"], 3);
        assert_eq!(node(&all, "node-b")["task_cap"], 20);
    }
    let table = cli(&a.api, &key, &["node", "list"]).ok().stdout;
    let header = table.lines().next().unwrap();
    for col in [
        "NAME",
        "STATE",
        "LAST SEEN (UTC)",
        "TASK CAP",
        "RUNNING TASKS",
        "RUNNING STEPS",
    ] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("node-b") && l.contains("Running")),
        "{table}"
    );
    assert_eq!(ping(&a.api).0, 200);
    let (status, body) = ping(&b.api);
    assert_eq!((status, body["name"].as_str()), (200, Some("node-b")));

    // Drained through node a, node b answers 418 at once and says Draining.
    let out = cli(&a.api, &key, &["node", "drain", "node-b"]).ok().stdout;
    assert!(out.contains("Node node-b is draining"), "{out}");
    assert_eq!(ping(&b.api).0, 418);
    assert_eq!(ping(&a.api).0, 200);
    assert_eq!(node(&nodes(&b.api, &key), "node-b")["state"], "Draining");

    // A task submitted to the draining node is left to a node that is not:
    // node a takes it at once (told through the database), and says so.
    cli(&a.api, &key, &["environment", "create", "Test"]).ok();
    cli(
        &a.api,
        &key,
        &[
            "machine",
            "add-listening",
            "--name",
            "gone",
            "--url",
            "https://127.0.0.1:1",
            "--thumbprint",
            &tp(7),
            "--environment",
            "Test",
        ],
    )
    .ok();
    let health = |api: &str| {
        cli(
            api,
            &key,
            &["health-check", "--machine", "gone", "--no-wait"],
        )
        .ok()
        .stdout
        .trim()
        .to_string()
    };
    let finished = |id: &str| {
        let t = cli(&a.api, &key, &["--output", "json", "task", "show", id])
            .ok()
            .json();
        (t["task"]["state"] != "Queued" && t["task"]["state"] != "Executing").then_some(())
    };
    let id = health(&b.api);
    let log = eventually("node a takes the task node b left", || {
        let log = cli(&b.api, &key, &["task", "log", &id]).ok().stdout;
        log.contains("Task finished").then_some(log)
    });
    assert!(
        log.contains("node node-b is draining; another node takes the task"),
        "{log}"
    );
    assert!(log.contains("Node node-a takes the task"), "{log}");

    // With every node draining, a task waits, queued, saying why.
    cli(&b.api, &key, &["node", "drain", "node-a"]).ok();
    let id = health(&b.api);
    let waiting = eventually("the queued task's log says it waits", || {
        let log = cli(&b.api, &key, &["task", "log", &id]).ok().stdout;
        log.contains("is draining").then_some(log)
    });
    assert!(!waiting.contains("Task started"), "{waiting}");
    let task = cli(&a.api, &key, &["--output", "json", "task", "show", &id])
        .ok()
        .json();
    assert_eq!(task["task"]["state"], "Queued", "{task}");

    // Undrained, node b takes the waiting task and finishes it; then drain
    // --wait returns once a heartbeat shows it runs nothing.
    let out = cli(&a.api, &key, &["node", "undrain", "NODE-B"])
        .ok()
        .stdout;
    assert!(out.contains("Node node-b takes tasks again"), "{out}");
    assert_eq!(ping(&b.api).0, 200);
    eventually("the task ran on node b after undrain", || finished(&id));
    let log = cli(&b.api, &key, &["task", "log", &id]).ok().stdout;
    assert!(log.contains("Node node-b takes the task"), "{log}");
    cli(&b.api, &key, &["node", "undrain", "node-a"]).ok();
    let out = cli(
        &a.api,
        &key,
        &["node", "drain", "node-b", "--wait", "--timeout", "120"],
    )
    .ok()
    .stdout;
    assert!(out.contains("Node node-b is drained"), "{out}");
    let b_now = node(&nodes(&a.api, &key), "node-b").clone();
    assert_eq!(
        (
            b_now["running_tasks"].as_i64(),
            b_now["running_steps"].as_i64()
        ),
        (Some(0), Some(0))
    );

    // Unknown nodes and callers without a key are refused.
    let err = cli(&a.api, &key, &["node", "drain", "node-z"]).error();
    assert!(err.contains("no node is named 'node-z'"), "{err}");
    assert_eq!(get(&format!("{}/api/nodes", a.api)).0, 401);
    // The drains are in the audit log.
    let audit = cli(&a.api, &key, &["audit", "list"]).ok().stdout;
    assert!(
        audit.contains("drained") && audit.contains("undrained"),
        "{audit}"
    );
}
