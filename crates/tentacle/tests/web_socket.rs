//! End to end over WebSocket: a real server (in this process) with its
//! WebSocket port on, a real nginx relaying TCP to it (TLS stays end to end),
//! and the real `tentacle` binary registered with `register-with
//! --server-web-socket` and run with `tentacle run`; the server's task engine
//! health-checks it and runs a script on it. Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use octo_server_core::{start, RunArgs};
use octo_testkit as kit;
use octo_testkit::nginx::Nginx;
use serde_json::{json, Value};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(40);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
        c.args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .env("RUST_LOG", "info");
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tentacle {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(!out.status.success(), "tentacle {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// The agent; killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tentacle run`; returns it and its "started:" line.
fn run_agent(env: &Env) -> (Agent, String) {
    let mut child = env
        .cmd(&["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    match rx.recv_timeout(T) {
        Ok(l) if l.contains("started:") => (Agent(child), l),
        other => panic!("agent did not start: {other:?}"),
    }
}

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

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// Creates a task and waits (through its event stream) until it ends.
    async fn run_task(&self, path: &str, body: Value) -> (String, Value) {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 201, "{v}");
        let id = v["task"]["id"].as_str().unwrap().to_string();
        let mut resp = timeout(
            T,
            self.http
                .get(format!("{}/api/tasks/{id}/log/stream", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        let mut buf = String::new();
        let end = timeout(T, async {
            loop {
                if let Some(i) = buf.find("\n\n") {
                    let block: String = buf.drain(..i + 2).collect();
                    if block.lines().any(|l| l.trim() == "event: end") {
                        let data: String = block
                            .lines()
                            .filter_map(|l| l.strip_prefix("data:"))
                            .map(str::trim)
                            .collect();
                        return serde_json::from_str::<Value>(&data).unwrap();
                    }
                    continue;
                }
                let chunk = resp.chunk().await.unwrap().expect("stream ended early");
                buf.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        })
        .await
        .expect("task did not end in time");
        (id, end)
    }
}

/// `curl -k` (no client certificate) over TLS; returns status and body.
fn curl(url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-k", "-sS", "--max-time", "20", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl is installed by scripts/test.sh");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_tentacle_over_wss_through_nginx_is_health_checked_and_runs_scripts() {
    kit::init_tracing();
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let server = start(&RunArgs {
        data: env.dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        web_socket_listen_port: Some(0),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let ws_port = server.web_socket_port.unwrap();
    let api = Api {
        base: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().unwrap(),
        http: reqwest::Client::new(),
    };
    let (status, v) = api.post("/api/environments", json!({"name": "Test"})).await;
    assert_eq!(status, 201, "{v}");
    let (_, info) = api.get("/api/server").await;
    assert_eq!(info["web_socket_port"], ws_port, "{info}");
    assert_eq!(info["web_socket_path"], "/tentacle", "{info}");
    // nginx relays TCP to the WebSocket port; it never sees inside TLS.
    let nginx = Nginx::pass_through(format!("127.0.0.1:{ws_port}").parse().unwrap());
    let url = format!("wss://localhost:{}/tentacle", nginx.addr().port());

    env.ok(&["create-instance"]);
    env.ok(&["new-certificate"]);
    env.ok(&["configure", "--no-listen"]);
    let register = |extra: &[&str]| {
        let mut args = vec![
            "register-with",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "--environment",
            "Test",
            "--name",
            "wss-tentacle",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let tp = server.thumbprint.to_string();
    // Listening with a WebSocket URL makes no sense: refused with the fix.
    let args = register(&["--server-web-socket", &url, "--server-thumbprint", &tp]);
    let err = env.fails(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("--comms-style TentacleActive"), "{err}");
    let args = register(&[
        "--comms-style",
        "TentacleActive",
        "--server-web-socket",
        &url,
        "--server-thumbprint",
        &tp,
    ]);
    let out = env.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains(&format!("it will poll {url}")), "{out}");

    let (_agent, started) = run_agent(&env);
    assert!(started.contains(&url), "{started}");
    let (_, end) = api
        .run_task("/api/tasks/health", json!({"machines": ["wss-tentacle"]}))
        .await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let (_, m) = api.get("/api/machines/wss-tentacle").await;
    assert_eq!(m["status"], "Healthy", "{m}");
    let (id, end) = api
        .run_task(
            "/api/tasks/script",
            json!({"script": "echo hello over wss", "machines": ["wss-tentacle"]}),
        )
        .await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let (_, log) = api.get(&format!("/api/tasks/{id}/log?limit=1000")).await;
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|l| l["text"] == "hello over wss"),
        "{log}"
    );
    let ws_addr = format!("127.0.0.1:{ws_port}").parse().unwrap();
    assert!(nginx.upstreams().contains(&ws_addr), "{}", nginx.output());

    // The same TLS port serves the API and, to browsers, the page.
    let ws_base = format!("https://127.0.0.1:{ws_port}");
    let (status, body) = tokio::task::spawn_blocking({
        let u = format!("{ws_base}/api");
        move || curl(&u)
    })
    .await
    .unwrap();
    assert_eq!(status, "200", "{body}");
    assert!(serde_json::from_str::<Value>(&body).is_ok(), "{body}");
    let (status, body) = tokio::task::spawn_blocking(move || curl(&format!("{ws_base}/")))
        .await
        .unwrap();
    // The whole HTTP app answers on this port (the real binary adds the
    // portal at `/`); without it, other paths answer the API's JSON 404.
    assert_eq!(status, "404", "{body}");
    assert!(body.contains("/api/server"), "{body}");
    server.stop().await;
}
