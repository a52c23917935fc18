//! Real `octopus server run` processes driven over the API, for tests that
//! kill, restart or cluster them: [`ServerProcess`], [`Api`] and its
//! server-sent [`Events`].
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::files::FileServiceImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::AgentContext;
use octo_comms::TentacleComms;
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::file_service_server::FileServiceServer;
use octo_proto::v1::script_service_server::ScriptServiceServer;
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::{json, Value};
use tokio::time::timeout;

/// Bound on any single wait.
pub const T: Duration = Duration::from_secs(40);

/// `octopus server run` as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    pub thumbprint: Thumbprint,
    /// What it printed on stdout up to its ready line (the last).
    pub lines: Vec<String>,
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
    pub fn start(data: &Path, comms_port: u16) -> Self {
        Self::start_with(data, comms_port, &[])
    }

    /// [`ServerProcess::start`] with more arguments (`--database-url ...`).
    pub fn start_with(data: &Path, comms_port: u16, extra: &[&str]) -> Self {
        Self::try_start_with(data, comms_port, extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`ServerProcess::start_with`], or why the server did not start (it
    /// exited before its ready line, e.g. its port was taken meanwhile; the
    /// end of its log says).
    pub fn try_start_with(data: &Path, comms_port: u16, extra: &[&str]) -> Result<Self, String> {
        Self::try_start_via(&[], data, comms_port, extra)
    }

    /// [`ServerProcess::try_start_with`] through `wrapper`, a program that
    /// execs the server after setting something up (`prlimit --nofile=...`):
    /// the child is still the server's process.
    pub fn try_start_via(
        wrapper: &[&str],
        data: &Path,
        comms_port: u16,
        extra: &[&str],
    ) -> Result<Self, String> {
        Self::launch(wrapper, "127.0.0.1:0", Vec::new(), data, comms_port, extra)
    }

    /// [`ServerProcess::try_start_with`] on `sockets`, passed as systemd
    /// passes a socket unit's (file descriptors from 3, `LISTEN_FDS`, and
    /// `LISTEN_PID` set to the server's process id); the API listens on
    /// `listen` (`--listen`), which may name one of them.
    pub fn try_start_on(
        sockets: &[&std::net::TcpListener],
        listen: &str,
        data: &Path,
        comms_port: u16,
        extra: &[&str],
    ) -> Result<Self, String> {
        let fds = sockets
            .iter()
            .zip(3..)
            .map(|(s, child_fd)| command_fds::FdMapping {
                parent_fd: std::os::fd::OwnedFd::from(s.try_clone().unwrap()),
                child_fd,
            })
            .collect();
        let count = format!("LISTEN_FDS={}", sockets.len());
        // `$$` is the shell's process id, which `exec` hands to the server.
        let wrapper = ["sh", "-c", r#"LISTEN_PID=$$ exec env "$0" "$@""#, &count];
        Self::launch(&wrapper, listen, fds, data, comms_port, extra)
    }

    fn launch(
        wrapper: &[&str],
        listen: &str,
        fds: Vec<command_fds::FdMapping>,
        data: &Path,
        comms_port: u16,
        extra: &[&str],
    ) -> Result<Self, String> {
        use command_fds::CommandFdExt;
        let server = env!("CARGO_BIN_EXE_octopus");
        let (program, before) = match wrapper.split_first() {
            Some((program, rest)) => (*program, [rest, &[server]].concat()),
            None => (server, Vec::new()),
        };
        let mut command = Command::new(program);
        command
            .args(before)
            .args([
                "server",
                "run",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                listen,
                "--comms-listen-port",
                &comms_port.to_string(),
                "--comms-listen-address",
                "127.0.0.1",
            ])
            .args(extra)
            .env_remove("OCTOPUS_DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Self::stderr_file(data));
        command.fd_mappings(fds).unwrap();
        let mut child = command.spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut lines = Vec::new();
        loop {
            let line = match rx.recv_timeout(T) {
                Ok(line) => line,
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait();
                    let log =
                        std::fs::read_to_string(data.with_extension("stderr")).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(format!(
                        "the server printed no ready line in time ({e}; {status:?}); its log ends: {tail:?}"
                    ));
                }
            };
            lines.push(line.clone());
            if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
                let base = format!("http://{}", rest.split("/api").next().unwrap());
                let thumbprint = line.rsplit(' ').next().unwrap().parse().unwrap();
                assert!(
                    line.contains(&format!("comms port {comms_port},")),
                    "{line}"
                );
                return Ok(ServerProcess {
                    child,
                    base,
                    thumbprint,
                    lines,
                    _stdout: reader,
                });
            }
        }
    }

    /// Where the server's stderr (its log) goes: `DATA.stderr` beside the
    /// data directory, for a failed test's reader.
    fn stderr_file(data: &Path) -> Stdio {
        let path = data.with_extension("stderr");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_or_else(|_| Stdio::null(), Stdio::from)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
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
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
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

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// The whole log.
    pub async fn log(&self, task_id: &str) -> Vec<Value> {
        let (status, v) = self
            .get(&format!("/api/tasks/{task_id}/log?limit=10000"))
            .await;
        assert_eq!(status, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    pub async fn events(&self, task_id: &str) -> Events {
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
pub struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    /// The next event (name, JSON data); None when the stream ended.
    pub async fn next(&mut self) -> Option<(String, Value)> {
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
    pub async fn until(&mut self, mut pred: impl FnMut(&str, &Value) -> bool) -> Value {
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
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn stdout_lines(log: &[Value]) -> Vec<String> {
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

/// A tentacle with the real agent services (capabilities, scripts, files) in
/// this process, its home under `dir` (`dir/home`), trusting `server`: poll
/// with [`TentacleComms::run_polling`].
pub fn in_process_tentacle(dir: &Path, identity: &Identity, server: Thumbprint) -> TentacleComms {
    let ctx = AgentContext {
        instance_name: "pol".into(),
        home: dir.join("home"),
        applications: dir.join("apps"),
    };
    std::fs::create_dir_all(&ctx.home).unwrap();
    std::fs::create_dir_all(&ctx.applications).unwrap();
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(ScriptServiceServer::new(ScriptServiceImpl::new(
                ctx.clone(),
            )))
            .add_service(
                FileServiceServer::new(FileServiceImpl::new(ctx))
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
            );
    TentacleComms::new(
        identity.clone(),
        TrustStore::new([server], octo_testkit::hint("tentacle")),
        routes,
        "pol",
    )
}

/// The admin's client of `server`, whose first start wrote the key in `data`.
pub fn admin_api(server: &ServerProcess, data: &Path) -> Api {
    let key = std::fs::read_to_string(data.join("admin-api-key")).unwrap();
    Api {
        base: server.base.clone(),
        key: key.trim().to_string(),
        http: reqwest::Client::new(),
    }
}

/// `comms` polling `127.0.0.1:comms_port` as subscription `sub-pol`,
/// reconnecting quickly (50-300 ms), until `token` is cancelled.
pub fn poll_as_pol(
    comms: TentacleComms,
    comms_port: u16,
    token: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let target = octo_comms::PollingTarget {
        address: format!("127.0.0.1:{comms_port}"),
        subscription_id: "sub-pol".into(),
    };
    let backoff = octo_comms::Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
    tokio::spawn(async move {
        let _ = comms.run_polling(target, 1, backoff, token).await;
    })
}

/// Starts a script task on machine `pol` through `api`: the task's id.
pub async fn script_on_pol(api: &Api, script: &str) -> String {
    let (status, v) = api
        .post(
            "/api/tasks/script",
            json!({ "script": script, "machines": ["pol"] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["task"]["id"].as_str().unwrap().to_string()
}

/// Registers polling machine `pol` (subscription `sub-pol`, presenting
/// `identity`) in a new environment `Test`.
pub async fn register_pol(api: &Api, identity: &Identity) {
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
}
