//! A server process killed with SIGKILL in the middle of a script task and
//! started again on the same data directory (and comms port) resumes the task:
//! no log line is lost or repeated.
//!
//! The server is the real `octopus server run` binary; the tentacle is a polling
//! `TentacleComms` with the real `octo-agent` services in this process. Every
//! wait is bounded and waits for an event (a stdout line, a server-sent event);
//! nothing sleeps to synchronise (the script sleeps inside itself).
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::AgentContext;
use octo_comms::{Backoff, PollingTarget, TentacleComms};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::script_service_server::ScriptServiceServer;
use octo_testkit as kit;
use octo_tls::{Thumbprint, TrustStore};
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on any single wait.
const T: Duration = Duration::from_secs(40);
/// Lines the script prints.
const LINES: usize = 40;

/// `octopus server run` as a child process.
struct ServerProcess {
    child: Child,
    base: String,
    thumbprint: Thumbprint,
    /// Keeps draining the child's stdout (so it never blocks on a full pipe).
    _stdout: std::thread::JoinHandle<()>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    fn start(data: &Path, comms_port: u16) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_octopus"))
            .args([
                "server",
                "run",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--comms-listen-port",
                &comms_port.to_string(),
                "--comms-listen-address",
                "127.0.0.1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        loop {
            let line = rx
                .recv_timeout(T)
                .expect("the server printed no ready line in time");
            if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
                let base = format!("http://{}", rest.split("/api").next().unwrap());
                let thumbprint = line.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(
                    line.contains(&format!("comms port {comms_port},")),
                    "{line}"
                );
                return ServerProcess {
                    child,
                    base,
                    thumbprint,
                    _stdout: reader,
                };
            }
        }
    }

    /// SIGKILL: no shutdown code runs.
    fn kill9(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status:?}");
    }
}

/// An API client for one server process.
struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = timeout(T, req.header("X-Octopus-ApiKey", &self.key).send())
            .await
            .unwrap()
            .unwrap();
        let status = resp.status().as_u16();
        let text = timeout(T, resp.text()).await.unwrap().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// The whole log.
    async fn log(&self, task_id: &str) -> Vec<Value> {
        let (status, v) = self
            .get(&format!("/api/tasks/{task_id}/log?limit=10000"))
            .await;
        assert_eq!(status, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    async fn events(&self, task_id: &str) -> Events {
        let req = self
            .http
            .get(format!(
                "{}/api/tasks/{task_id}/log/stream?after=0",
                self.base
            ))
            .header("X-Octopus-ApiKey", &self.key);
        let resp = timeout(T, req.send()).await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        Events {
            resp,
            buf: String::new(),
        }
    }
}

/// A server-sent event stream, parsed.
struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    /// The next event (name, JSON data); None when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut name = "message".to_string();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Reads events until one matches (bounded); panics if the stream ends first.
    async fn until(&mut self, mut pred: impl FnMut(&str, &Value) -> bool) -> Value {
        timeout(T, async {
            loop {
                let (name, data) = self.next().await.expect("event stream ended early");
                if pred(&name, &data) {
                    return data;
                }
            }
        })
        .await
        .expect("expected event did not arrive in time")
    }
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stdout_lines(log: &[Value]) -> Vec<String> {
    let lines: Vec<&Value> = log.iter().filter(|l| l["stream"] == "stdout").collect();
    let seqs: Vec<i64> = lines
        .iter()
        .map(|l| l["sequence"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "sequences {seqs:?}");
    lines
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_task_and_restart_resumes_without_losing_or_repeating_lines() {
    kit::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let comms_port = free_port();
    let server = ServerProcess::start(&data, comms_port);
    let key = std::fs::read_to_string(data.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    let mut api = Api {
        base: server.base.clone(),
        key,
        http: reqwest::Client::new(),
    };

    // A polling tentacle with the real services, in this process.
    let ctx = AgentContext {
        instance_name: "pol".into(),
        home: tmp.path().join("home"),
        applications: tmp.path().join("apps"),
    };
    std::fs::create_dir_all(&ctx.home).unwrap();
    std::fs::create_dir_all(&ctx.applications).unwrap();
    let identity = kit::identity("pol");
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(ScriptServiceServer::new(ScriptServiceImpl::new(
                ctx.clone(),
            )));
    let comms = TentacleComms::new(
        identity.clone(),
        TrustStore::new([server.thumbprint], kit::hint("tentacle")),
        routes,
        "pol",
    );
    let token = CancellationToken::new();
    let polling = tokio::spawn({
        let target = PollingTarget {
            address: format!("127.0.0.1:{comms_port}"),
            subscription_id: "sub-pol".into(),
        };
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let t = token.clone();
        async move {
            let _ = comms.run_polling(target, 1, backoff, t).await;
        }
    });

    let (status, v) = api
        .post("/api/environments", json!({ "name": "Test" }))
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = api
        .post(
            "/api/machines",
            json!({
                "name": "pol",
                "comms_style": "TentacleActive",
                "uri": "poll://sub-pol/",
                "thumbprint": identity.thumbprint().to_string(),
                "environments": ["Test"],
                "roles": ["web"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done");
    let (status, v) = api
        .post(
            "/api/tasks/script",
            json!({ "script": script, "machines": ["pol"] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();

    // Lines are stored before they are published: once "line 5" is seen, the
    // stored log holds at least five of the script's lines.
    {
        let mut events = api.events(&id).await;
        events
            .until(|e, d| e == "log" && d["text"] == "line 5")
            .await;
    }
    let stored = stdout_lines(&api.log(&id).await);
    assert!(stored.len() >= 5, "{stored:?}");
    assert!(
        stored.len() < LINES,
        "the script ended before the kill: {stored:?}"
    );

    server.kill9();
    let server = ServerProcess::start(&data, comms_port);
    api.base = server.base.clone();

    let end = api.events(&id).await.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let (status, task) = api.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["task"]["state"], "Success", "{task}");

    let log = api.log(&id).await;
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout_lines(&log), expected);
    // The restarted server resumed the task (rather than the script having ended
    // before the kill).
    let server_lines: Vec<&str> = log
        .iter()
        .filter(|l| l["stream"] == "server")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(
        server_lines.iter().any(|l| l.contains("Resuming task")),
        "{server_lines:?}"
    );

    token.cancel();
    timeout(T, polling).await.unwrap().unwrap();
    drop(server);
}
