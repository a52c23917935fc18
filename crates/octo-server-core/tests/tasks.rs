//! The task engine and its API, end to end: a server started in-process, real
//! tentacle services (capabilities and scripts from `octo-agent`) over the real
//! transport on 127.0.0.1, one listening and one polling. Every wait is bounded
//! by a timeout and waits for an event (mostly the task's server-sent events);
//! nothing sleeps to synchronise (scripts sleep inside themselves).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::AgentContext;
use octo_comms::{Backoff, PollingTarget, TentacleComms};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::script_service_server::{ScriptService, ScriptServiceServer};
use octo_proto::v1::{
    script_event, CancelScriptRequest, CompleteScriptRequest, RunScriptRequest, ScriptEvent,
    ScriptStatus, ScriptStatusRequest, StartScriptRequest,
};
use octo_server_core::{start, RunArgs, RunningServer};
use octo_testkit as kit;
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

/// Bound on any single wait.
const T: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------------------
// The server and its API.

struct Server {
    running: Option<RunningServer>,
    data: PathBuf,
    base: String,
    key: String,
    http: reqwest::Client,
    comms_port: u16,
    thumbprint: Thumbprint,
    max_log_mib: u64,
    _tmp: tempfile::TempDir,
}

async fn start_with(data: &Path, comms_port: u16, base: RunArgs) -> RunningServer {
    timeout(
        T,
        start(&RunArgs {
            data: data.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            comms_listen_port: comms_port,
            comms_listen_address: "127.0.0.1".into(),
            ..base
        }),
    )
    .await
    .unwrap()
    .unwrap()
}

impl Server {
    async fn new() -> Self {
        Self::with(RunArgs::default()).await
    }

    /// A server that stores at most `max_log_mib` of each step's output.
    async fn with_log_limit(max_log_mib: u64) -> Self {
        Self::with(RunArgs {
            max_log_mib_per_step: max_log_mib,
            ..RunArgs::default()
        })
        .await
    }

    /// A server with `args`' options (its addresses and data are the test's).
    async fn with(args: RunArgs) -> Self {
        kit::init_tracing();
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let max_log_mib = args.max_log_mib_per_step;
        let running = start_with(&data, 0, args).await;
        let s = Server {
            base: format!("http://{}", running.api_addr),
            key: running.admin_api_key.clone().unwrap(),
            comms_port: running.comms_port,
            thumbprint: running.thumbprint,
            running: Some(running),
            data,
            http: reqwest::Client::new(),
            max_log_mib,
            _tmp: tmp,
        };
        let (status, body) = s.post("/api/environments", json!({ "name": "Test" })).await;
        assert_eq!(status, 201, "{body}");
        s
    }

    /// Stops the server and starts it again on the same data and comms port.
    async fn restart(&mut self) {
        let running = self.running.take().unwrap();
        timeout(T, running.stop()).await.unwrap();
        let args = RunArgs {
            max_log_mib_per_step: self.max_log_mib,
            ..RunArgs::default()
        };
        let running = start_with(&self.data, self.comms_port, args).await;
        assert_eq!(running.comms_port, self.comms_port);
        assert_eq!(running.thumbprint, self.thumbprint);
        assert!(running.admin_api_key.is_none());
        self.base = format!("http://{}", running.api_addr);
        self.running = Some(running);
    }

    /// A listening tentacle named `lis`, registered; with its machine's id.
    async fn lis(&self) -> (Tentacle, i64) {
        let lis = Tentacle::listening("lis", self.thumbprint).await;
        let id = self
            .add_listening("lis", lis.addr.unwrap(), lis.thumbprint())
            .await;
        (lis, id)
    }

    /// POSTs `body` to `path` with this `Accept`; the answer, unread.
    async fn post_accepting(&self, path: &str, accept: &str, body: Value) -> reqwest::Response {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("X-Octopus-ApiKey", &self.key)
            .header("Accept", accept)
            .json(&body);
        timeout(T, req.send()).await.unwrap().unwrap()
    }

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

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }

    async fn add_machine(&self, body: Value) -> i64 {
        let (status, m) = self.post("/api/machines", body).await;
        assert_eq!(status, 201, "{m}");
        m["id"].as_i64().unwrap()
    }

    async fn add_listening(&self, name: &str, addr: SocketAddr, thumbprint: Thumbprint) -> i64 {
        self.add_machine(json!({
            "name": name,
            "comms_style": "TentaclePassive",
            "uri": format!("https://{addr}/"),
            "thumbprint": thumbprint.to_string(),
            "environments": ["Test"],
            "roles": ["web"],
        }))
        .await
    }

    async fn add_polling(&self, name: &str, subscription: &str, thumbprint: Thumbprint) -> i64 {
        self.add_machine(json!({
            "name": name,
            "comms_style": "TentacleActive",
            "uri": format!("poll://{subscription}/"),
            "thumbprint": thumbprint.to_string(),
            "environments": ["Test"],
            "roles": ["web"],
        }))
        .await
    }

    /// Creates a task; returns its id.
    async fn create(&self, path: &str, body: Value) -> String {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 201, "{v}");
        assert!(v["steps"].is_array(), "{v}");
        v["task"]["id"].as_str().unwrap().to_string()
    }

    async fn script(&self, script: &str, machines: &[&str]) -> String {
        self.create(
            "/api/tasks/script",
            json!({ "script": script, "machines": machines }),
        )
        .await
    }

    async fn events(&self, task_id: &str, after: i64) -> Events {
        let req = self
            .http
            .get(format!(
                "{}/api/tasks/{task_id}/log/stream?after={after}",
                self.base
            ))
            .header("X-Octopus-ApiKey", &self.key);
        let resp = timeout(T, req.send()).await.unwrap().unwrap();
        Events::of(resp, 200)
    }

    /// Waits for the task to end (through its event stream); returns `{"task","steps"}`.
    async fn wait_end(&self, task_id: &str) -> Value {
        let mut events = self.events(task_id, 0).await;
        events.until(|e, _| e == "end").await.1
    }

    /// The whole log.
    async fn log(&self, task_id: &str) -> Vec<Value> {
        let (status, v) = self
            .get(&format!("/api/tasks/{task_id}/log?limit=10000"))
            .await;
        assert_eq!(status, 200, "{v}");
        v.as_array().unwrap().clone()
    }

    async fn machine(&self, name: &str) -> Value {
        let (status, v) = self.get(&format!("/api/machines/{name}")).await;
        assert_eq!(status, 200, "{v}");
        v
    }
}

/// A server-sent event stream, parsed.
struct Events {
    resp: reqwest::Response,
    buf: String,
}

impl Events {
    /// The events of `resp`, which must be `status` and `text/event-stream`.
    fn of(resp: reqwest::Response, status: u16) -> Self {
        assert_eq!(resp.status(), status);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Events {
            resp,
            buf: String::new(),
        }
    }

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
    async fn until(&mut self, mut pred: impl FnMut(&str, &Value) -> bool) -> (String, Value) {
        timeout(T, async {
            loop {
                let (name, data) = self.next().await.expect("event stream ended early");
                if pred(&name, &data) {
                    return (name, data);
                }
            }
        })
        .await
        .expect("expected event did not arrive in time")
    }

    /// Reads until a log line whose text is `text`.
    async fn until_line(&mut self, text: &str) -> Value {
        self.until(|e, d| e == "log" && d["text"] == text).await.1
    }
}

// ---------------------------------------------------------------------------
// Tentacles with the real services.

struct Tentacle {
    identity: Identity,
    ctx: AgentContext,
    scripts: ScriptServiceImpl,
    server: Thumbprint,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    addr: Option<SocketAddr>,
    _home: tempfile::TempDir,
}

impl Drop for Tentacle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn context(name: &str) -> (AgentContext, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = AgentContext {
        instance_name: name.to_string(),
        home: tmp.path().join("home"),
        applications: tmp.path().join("apps"),
    };
    std::fs::create_dir_all(&ctx.home).unwrap();
    std::fs::create_dir_all(&ctx.applications).unwrap();
    (ctx, tmp)
}

fn comms(
    identity: &Identity,
    server: Thumbprint,
    ctx: &AgentContext,
    scripts: &ScriptServiceImpl,
) -> TentacleComms {
    comms_with(identity, server, ctx, scripts.clone())
}

fn comms_with(
    identity: &Identity,
    server: Thumbprint,
    ctx: &AgentContext,
    scripts: impl ScriptService,
) -> TentacleComms {
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(ScriptServiceServer::new(scripts));
    TentacleComms::new(
        identity.clone(),
        TrustStore::new([server], kit::hint("tentacle")),
        routes,
        &ctx.instance_name,
    )
}

impl Tentacle {
    async fn listening(name: &str, server: Thumbprint) -> Self {
        let (ctx, home) = context(name);
        let identity = kit::identity(name);
        let scripts = ScriptServiceImpl::new(ctx.clone());
        let mut t = Tentacle {
            identity,
            ctx,
            scripts,
            server,
            token: CancellationToken::new(),
            handle: tokio::spawn(async {}),
            addr: None,
            _home: home,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        t.serve(listener);
        t
    }

    /// Serves on `listener` with a fresh `TentacleComms` over the same services.
    fn serve(&mut self, listener: TcpListener) {
        self.addr = Some(listener.local_addr().unwrap());
        let c = comms(&self.identity, self.server, &self.ctx, &self.scripts);
        self.token = CancellationToken::new();
        let token = self.token.clone();
        self.handle = tokio::spawn(async move {
            let _ = c.run_listening(listener, token).await;
        });
    }

    /// Stops listening (and drops its connections); the scripts keep running.
    async fn stop(&mut self) {
        self.token.cancel();
        timeout(T, &mut self.handle).await.unwrap().unwrap();
    }

    fn polling(name: &str, server: Thumbprint, comms_port: u16, subscription: &str) -> Self {
        let (ctx, home) = context(name);
        let identity = kit::identity(name);
        let scripts = ScriptServiceImpl::new(ctx.clone());
        let c = comms(&identity, server, &ctx, &scripts);
        let token = CancellationToken::new();
        let target = PollingTarget {
            address: format!("127.0.0.1:{comms_port}"),
            subscription_id: subscription.to_string(),
        };
        // Short backoff so it is back quickly after a server restart.
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let t = token.clone();
        let handle = tokio::spawn(async move {
            let _ = c.run_polling(target, 1, backoff, t).await;
        });
        Tentacle {
            identity,
            ctx,
            scripts,
            server,
            token,
            handle,
            addr: None,
            _home: home,
        }
    }

    fn thumbprint(&self) -> Thumbprint {
        self.identity.thumbprint()
    }
}

/// The real script service with faults a test can turn on: CompleteScript
/// waits until `open` is set (counting the calls in `completes`, their
/// arrival times in `completes_at`, and those the real service answered in
/// `answered`); with
/// `withhold` the log stream keeps back every line with that text (as a stream
/// cut before its end would), so its `completed` event says more is due; and
/// with `legacy` RunScript is refused as a tentacle of contract version 1
/// would. `calls` names the script calls made, in order.
#[derive(Clone)]
struct Gated {
    inner: ScriptServiceImpl,
    open: watch::Sender<bool>,
    completes: watch::Sender<u32>,
    /// When each CompleteScript arrived, in milliseconds since the epoch.
    completes_at: std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
    answered: watch::Sender<u32>,
    withhold: Option<&'static str>,
    legacy: bool,
    calls: watch::Sender<Vec<&'static str>>,
}

impl Gated {
    fn called(&self, what: &'static str) {
        self.calls.send_modify(|c| c.push(what));
    }

    /// The script calls made so far.
    fn calls(&self) -> Vec<&'static str> {
        self.calls.borrow().clone()
    }

    /// `events` less the withheld lines.
    fn filtered(
        &self,
        events: Pin<Box<dyn Stream<Item = Result<ScriptEvent, tonic::Status>> + Send>>,
    ) -> GatedEvents {
        let Some(withheld) = self.withhold else {
            return events;
        };
        Box::pin(events.filter_map(move |ev| match ev {
            Ok(ScriptEvent {
                event: Some(script_event::Event::Log(line)),
            }) if line.text == withheld => None,
            Ok(ScriptEvent {
                event: Some(script_event::Event::Completed(mut status)),
            }) => {
                status.logs.retain(|l| l.text != withheld);
                Some(Ok(ScriptEvent {
                    event: Some(script_event::Event::Completed(status)),
                }))
            }
            other => Some(other),
        }))
    }
}

type GatedEvents = Pin<Box<dyn Stream<Item = Result<ScriptEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ScriptService for Gated {
    async fn start_script(
        &self,
        r: tonic::Request<StartScriptRequest>,
    ) -> Result<tonic::Response<ScriptStatus>, tonic::Status> {
        self.called("StartScript");
        self.inner.start_script(r).await
    }

    async fn get_status(
        &self,
        r: tonic::Request<ScriptStatusRequest>,
    ) -> Result<tonic::Response<ScriptStatus>, tonic::Status> {
        self.inner.get_status(r).await
    }

    type RunScriptStream = GatedEvents;

    async fn run_script(
        &self,
        r: tonic::Request<RunScriptRequest>,
    ) -> Result<tonic::Response<GatedEvents>, tonic::Status> {
        self.called("RunScript");
        if self.legacy {
            return Err(tonic::Status::unimplemented("RunScript"));
        }
        let events = self.inner.run_script(r).await?.into_inner();
        Ok(tonic::Response::new(self.filtered(events)))
    }

    type StreamLogsStream = GatedEvents;

    async fn stream_logs(
        &self,
        r: tonic::Request<ScriptStatusRequest>,
    ) -> Result<tonic::Response<GatedEvents>, tonic::Status> {
        self.called("StreamLogs");
        let events = self.inner.stream_logs(r).await?.into_inner();
        Ok(tonic::Response::new(self.filtered(events)))
    }

    async fn cancel_script(
        &self,
        r: tonic::Request<CancelScriptRequest>,
    ) -> Result<tonic::Response<ScriptStatus>, tonic::Status> {
        self.inner.cancel_script(r).await
    }

    async fn complete_script(
        &self,
        r: tonic::Request<CompleteScriptRequest>,
    ) -> Result<tonic::Response<ScriptStatus>, tonic::Status> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        self.completes_at
            .lock()
            .unwrap()
            .push(i64::try_from(now.as_millis()).unwrap());
        self.completes.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|o| *o).await;
        let reply = self.inner.complete_script(r).await;
        self.answered.send_modify(|n| *n += 1);
        reply
    }
}

impl Tentacle {
    /// A listening tentacle whose script service is `Gated` (closed).
    async fn gated(
        name: &str,
        server: Thumbprint,
        withhold: Option<&'static str>,
    ) -> (Self, Gated) {
        Self::gated_as(name, server, withhold, false).await
    }

    /// Like [`Tentacle::gated`]; with `legacy`, RunScript is refused.
    async fn gated_as(
        name: &str,
        server: Thumbprint,
        withhold: Option<&'static str>,
        legacy: bool,
    ) -> (Self, Gated) {
        let mut t = Tentacle::listening(name, server).await;
        t.stop().await;
        let gated = Gated {
            inner: t.scripts.clone(),
            open: watch::Sender::new(false),
            completes: watch::Sender::new(0),
            completes_at: std::sync::Arc::default(),
            answered: watch::Sender::new(0),
            withhold,
            legacy,
            calls: watch::Sender::new(Vec::new()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        t.addr = Some(listener.local_addr().unwrap());
        let c = comms_with(&t.identity, t.server, &t.ctx, gated.clone());
        t.token = CancellationToken::new();
        let token = t.token.clone();
        t.handle = tokio::spawn(async move {
            let _ = c.run_listening(listener, token).await;
        });
        (t, gated)
    }

    /// Names in the tentacle's work folder (scripts' folders, and folders
    /// moved aside to be deleted).
    fn work_entries(&self) -> Vec<String> {
        std::fs::read_dir(self.ctx.home.join("Work"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A server with a listening tentacle "lis" and a polling tentacle "pol".
async fn two_machines() -> (Server, Tentacle, Tentacle, i64, i64) {
    two_machines_on(Server::new().await).await
}

async fn two_machines_on(server: Server) -> (Server, Tentacle, Tentacle, i64, i64) {
    let (lis, lis_id) = server.lis().await;
    let pol_identity_holder =
        Tentacle::polling("pol", server.thumbprint, server.comms_port, "sub-pol");
    let pol_id = server
        .add_polling("pol", "sub-pol", pol_identity_holder.thumbprint())
        .await;
    (server, lis, pol_identity_holder, lis_id, pol_id)
}

/// Stdout lines of one machine, in log order, and checks their sequences increase.
fn stdout_of(log: &[Value], machine_id: i64) -> Vec<String> {
    let lines: Vec<&Value> = log
        .iter()
        .filter(|l| l["machine_id"] == machine_id && l["stream"] == "stdout")
        .collect();
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

fn numbered(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("line {i}")).collect()
}

/// A FIFO in `dir` that a script blocks on until [`release_fifo`] writes it.
fn fifo_in(dir: &Path, name: &str) -> PathBuf {
    let fifo = dir.join(name);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    fifo
}

/// Writes `bytes` to a FIFO made by [`fifo_in`]; opening it waits for its
/// reader, the script (bounded).
async fn release_fifo(fifo: PathBuf, bytes: &'static [u8]) {
    timeout(
        T,
        tokio::task::spawn_blocking(move || std::fs::write(&fifo, bytes)),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
}

fn server_text(log: &[Value]) -> String {
    log.iter()
        .filter(|l| l["stream"] == "server")
        .map(|l| l["text"].as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// Health checks.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_of_both_kinds_is_healthy() {
    let (server, _lis, _pol, _, _) = two_machines().await;
    let id = server.create("/api/tasks/health", json!({})).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert_eq!(end["task"]["kind"], "Health");
    assert_eq!(end["steps"].as_array().unwrap().len(), 2);
    for name in ["lis", "pol"] {
        let m = server.machine(name).await;
        assert_eq!(m["status"], "Healthy", "{m}");
        assert_eq!(m["tentacle_version"], octo_agent::VERSION, "{m}");
        assert!(m["last_health_at"].is_i64(), "{m}");
    }
    let log = server_text(&server.log(&id).await);
    assert!(log.contains("lis: Healthy"), "{log}");
    assert!(log.contains("pol: Healthy"), "{log}");

    // Selecting by machine name and by environment.
    let id = server
        .create("/api/tasks/health", json!({ "machines": ["pol"] }))
        .await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert_eq!(end["steps"][0]["machine_name"], "pol");
    let (status, v) = server
        .post("/api/tasks/health", json!({ "environment": "Nope" }))
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("environment 'Nope' does not exist"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_of_a_stopped_tentacle_says_refused() {
    let server = Server::new().await;
    let mut lis = Tentacle::listening("lis", server.thumbprint).await;
    server
        .add_listening("lis", lis.addr.unwrap(), lis.thumbprint())
        .await;
    lis.stop().await;
    let id = server.create("/api/tasks/health", json!({})).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Failed", "{end}");
    let error = end["task"]["error"].as_str().unwrap();
    assert!(
        error.contains("1 of 1 machines unavailable: lis"),
        "{error}"
    );
    let m = server.machine("lis").await;
    assert_eq!(m["status"], "Unavailable", "{m}");
    let reason = m["status_reason"].as_str().unwrap();
    assert!(reason.contains("refused"), "{reason}");
    assert!(
        end["steps"][0]["error"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{end}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_of_an_untrusted_tentacle_names_both_thumbprints() {
    let server = Server::new().await;
    let lis = Tentacle::listening("lis", server.thumbprint).await;
    let wrong = kit::identity("someone else").thumbprint();
    server.add_listening("lis", lis.addr.unwrap(), wrong).await;
    let id = server.create("/api/tasks/health", json!({})).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Failed", "{end}");
    let m = server.machine("lis").await;
    assert_eq!(m["status"], "Unavailable", "{m}");
    let reason = m["status_reason"].as_str().unwrap();
    assert!(reason.contains(&lis.thumbprint().to_string()), "{reason}");
    assert!(reason.contains(&wrong.to_string()), "{reason}");
}

// ---------------------------------------------------------------------------
// Scripts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_on_two_machines_logs_every_line_in_order() {
    let (server, _lis, _pol, lis_id, pol_id) = two_machines().await;
    let script = "for i in $(seq 1 300); do echo \"line $i\"; done; echo oops >&2";
    let (status, created) = server
        .post(
            "/api/tasks/script",
            json!({ "script": script, "environment": "Test", "role": "web" }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["task"]["kind"], "Script");
    assert_eq!(created["task"]["arguments"]["syntax"], "bash");
    assert_eq!(created["task"]["arguments"]["isolation"], "full");
    assert_eq!(created["steps"].as_array().unwrap().len(), 2);
    let id = created["task"]["id"].as_str().unwrap().to_string();

    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    for step in end["steps"].as_array().unwrap() {
        assert_eq!(step["state"], "Success", "{step}");
        assert_eq!(step["exit_code"], 0, "{step}");
        assert_eq!(step["next_sequence"], 301, "{step}");
    }
    let log = server.log(&id).await;
    for m in [lis_id, pol_id] {
        assert_eq!(stdout_of(&log, m), numbered(300));
        let stderr: Vec<&Value> = log
            .iter()
            .filter(|l| l["machine_id"] == m && l["stream"] == "stderr")
            .collect();
        assert_eq!(stderr.len(), 1);
        assert_eq!(stderr[0]["text"], "oops");
    }
    let text = server_text(&log);
    assert!(text.contains("Task started"), "{text}");
    assert!(text.contains("Task finished: Success"), "{text}");

    // Paging through the log.
    let (_, first) = server.get(&format!("/api/tasks/{id}/log?limit=5")).await;
    let first = first.as_array().unwrap().clone();
    assert_eq!(first.len(), 5);
    let after = first[4]["id"].as_i64().unwrap();
    let (_, next) = server
        .get(&format!("/api/tasks/{id}/log?after={after}&limit=3"))
        .await;
    assert_eq!(next[0]["id"], log[5]["id"]);
    assert_eq!(next.as_array().unwrap().len(), 3);

    // The task, the list, 404s.
    let (status, v) = server.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(v["task"]["state"], "Success");
    let (status, v) = server.get("/api/tasks?limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(v[0]["id"], id.as_str());
    let (status, v) = server.get("/api/tasks/ServerTasks-999").await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = server.get("/api/tasks/ServerTasks-999/log").await;
    assert_eq!(status, 404);
}

/// The last step's end is stored with the task's (one call): every step is
/// final in the end event, each step's last line comes before "Task
/// finished", which is the log's last line, and no step ends after the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_steps_end_is_stored_before_the_tasks_end() {
    let (server, _lis, _pol, _, _) = two_machines().await;
    for script in ["echo hi", "echo hi; exit 4"] {
        let id = server.script(script, &["lis", "pol"]).await;
        let end = server.wait_end(&id).await;
        let task_end = end["task"]["completed_at"].as_i64().unwrap();
        let steps = end["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2);
        for step in steps {
            let state = step["state"].as_str().unwrap();
            assert!(matches!(state, "Success" | "Failed"), "{step}");
            assert!(
                step["completed_at"].as_i64().unwrap() <= task_end,
                "{step} {end}"
            );
        }
        let log = server.log(&id).await;
        let texts: Vec<&str> = log.iter().map(|l| l["text"].as_str().unwrap()).collect();
        let last = *texts.last().unwrap();
        assert!(last.starts_with("Task finished"), "{texts:?}");
        for machine in ["lis", "pol"] {
            let finished = texts
                .iter()
                .position(|t| t.starts_with(&format!("{machine}: the script finished")))
                .unwrap_or_else(|| panic!("no finished line of {machine}: {texts:?}"));
            assert!(finished < texts.len() - 1, "{texts:?}");
        }
        let (_, stored) = server.get(&format!("/api/tasks/{id}")).await;
        assert_eq!(
            stored["steps"], end["steps"],
            "the end event shows the steps as stored"
        );
        assert_eq!(stored["task"]["state"], end["task"]["state"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_machine_fails_the_task() {
    let (server, _lis, _pol, lis_id, pol_id) = two_machines().await;
    let script = "echo hello; if [ \"$TentacleInstanceName\" = pol ]; then exit 3; fi";
    let id = server.script(script, &["lis", "pol"]).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Failed", "{end}");
    let error = end["task"]["error"].as_str().unwrap();
    assert!(error.contains("1 of 2 machines failed"), "{error}");
    for step in end["steps"].as_array().unwrap() {
        if step["machine_id"] == pol_id {
            assert_eq!(step["state"], "Failed");
            assert_eq!(step["exit_code"], 3);
            assert_eq!(step["error"], "exit code 3");
        } else {
            assert_eq!(step["machine_id"], lis_id);
            assert_eq!(step["state"], "Success");
        }
    }
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, pol_id), ["hello"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_machine_selected_says_why() {
    let server = Server::new().await;
    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({ "script": "true", "environment": "Test" }),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.starts_with("no machine matches: environment 'Test' (0 machines exist)"),
        "{error}"
    );

    let (_lis, _) = server.lis().await;
    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({ "script": "true", "environment": "Test", "role": "db" }),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(
        error.starts_with("no machine matches: environment 'Test', role 'db' (1 machine exists)"),
        "{error}"
    );
    assert!(error.contains("no machine has role 'db'"), "{error}");

    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({ "script": "true", "machines": ["lis", "ghost"] }),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("'ghost'"), "{v}");

    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({ "script": "true", "syntax": "cobol", "machines": ["lis"] }),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = server.get("/api/tasks").await;
    assert_eq!(status, 200);
    assert_eq!(v, json!([]), "no task was created");
}

/// A server with one listening machine `lis`, and a script for it that says
/// `before`, then waits for the returned flag file to exist, then says `after`:
/// it cannot finish until the test has seen its first line live.
async fn gated_script() -> (Server, Tentacle, i64, std::path::PathBuf, String) {
    let server = Server::new().await;
    let (lis, lis_id) = server.lis().await;
    let flag = lis._home.path().join("go");
    let script = format!(
        "echo before; while [ ! -e '{}' ]; do sleep 0.05; done; echo after",
        flag.display()
    );
    (server, lis, lis_id, flag, script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_delivers_lines_live_and_ends() {
    let (server, _lis, lis_id, flag, script) = gated_script().await;
    let id = server.script(&script, &["lis"]).await;
    let mut events = server.events(&id, 0).await;
    let (name, first) = events.until(|_, _| true).await;
    assert_eq!(name, "task", "{first}");
    let line = events.until_line("before").await;
    assert_eq!(line["machine_id"], lis_id);
    assert_eq!(line["stream"], "stdout");
    std::fs::write(&flag, b"").unwrap();
    events.until_line("after").await;
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert!(
        timeout(T, events.next()).await.unwrap().is_none(),
        "the stream ends after `end`"
    );

    // A stream opened after the end replays the lines after `after`, then ends.
    let log = server.log(&id).await;
    let after = log[0]["id"].as_i64().unwrap();
    let mut events = server.events(&id, after).await;
    let mut replayed = Vec::new();
    loop {
        let (name, data) = timeout(T, events.next()).await.unwrap().unwrap();
        match name.as_str() {
            "log" => replayed.push(data["id"].as_i64().unwrap()),
            "end" => break,
            _ => {}
        }
    }
    let expected: Vec<i64> = log[1..].iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert_eq!(replayed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_posted_for_its_events_is_followed_in_the_answer_that_created_it() {
    let (server, _lis, _, flag, script) = gated_script().await;
    let post = |accept: &'static str, body: Value| {
        server.post_accepting("/api/tasks/script", accept, body)
    };
    // A refused request is still an error in JSON that names the field.
    let resp = post(
        "text/event-stream",
        json!({ "script": " ", "machines": ["lis"] }),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("script"), "{err}");

    let body = json!({ "script": script, "machines": ["lis"] });
    let resp = post("application/json;q=0.5, text/event-stream", body).await;
    let mut events = Events::of(resp, 201);
    // First the task as created: its id and its machine's step, not started.
    let (name, created) = timeout(T, events.next()).await.unwrap().unwrap();
    assert_eq!(name, "task", "{created}");
    let id = created["task"]["id"].as_str().unwrap().to_string();
    assert_eq!(created["steps"][0]["machine_name"], "lis", "{created}");
    assert_eq!(created["steps"][0]["state"], "Queued", "{created}");
    assert_eq!(created["task"]["state"], "Queued", "{created}");
    // Then live: the script waits until its first line was seen here.
    let mut seen = Vec::new();
    let mut record = |e: &str, d: &Value| {
        if e == "log" {
            seen.push(d["id"].as_i64().unwrap());
        }
    };
    let (_, before) = events
        .until(|e, d| {
            record(e, d);
            e == "log" && d["text"] == "before"
        })
        .await;
    assert_eq!(before["task_id"], id.as_str());
    std::fs::write(&flag, b"").unwrap();
    let (_, end) = events
        .until(|e, d| {
            record(e, d);
            e == "end"
        })
        .await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert!(
        timeout(T, events.next()).await.unwrap().is_none(),
        "the stream ends after `end`"
    );
    // Every stored line came, once, in order.
    let stored: Vec<i64> = server
        .log(&id)
        .await
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, stored);

    // Without event-stream in `Accept`, the answer is the task as JSON.
    let body = json!({ "script": "true", "machines": ["lis"] });
    let resp = post("application/json", body).await;
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    let other = v["task"]["id"].as_str().unwrap();
    assert_eq!(server.wait_end(other).await["task"]["state"], "Success");
}

/// Every task-creating route answers with the task's events when asked: the
/// deployment tool's upgrade too, which shares the creation path of scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_upgrade_posted_for_its_events_is_followed_in_its_answer() {
    let tools = tempfile::tempdir().unwrap();
    let tool = tools.path().join("calamari");
    std::fs::write(&tool, "#!/bin/sh\necho 9.9.9\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let server = Server::with(RunArgs {
        calamari: Some(tool),
        ..RunArgs::default()
    })
    .await;
    let (_lis, _) = server.lis().await;
    let body = json!({ "machines": ["lis"] });
    let resp = server
        .post_accepting("/api/tasks/upgrade", "text/event-stream", body)
        .await;
    let mut events = Events::of(resp, 201);
    let (name, created) = timeout(T, events.next()).await.unwrap().unwrap();
    assert_eq!(name, "task", "{created}");
    assert_eq!(created["task"]["kind"], "Upgrade", "{created}");
    assert_eq!(created["steps"][0]["machine_name"], "lis", "{created}");
    let id = created["task"]["id"].as_str().unwrap().to_string();
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["id"], id.as_str(), "{end}");
    let state = end["task"]["state"].as_str().unwrap();
    assert!(["Success", "Failed"].contains(&state), "{end}");
    assert_eq!(server.wait_end(&id).await["task"]["state"], state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_naming_several_machines_gets_each_once_and_names_the_first_it_cannot_run_on() {
    let (server, _lis, _pol, lis_id, pol_id) = two_machines().await;
    // Names in any case, one twice: each machine once.
    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({"script": "echo hi", "machines": ["POL", "lis", "pol"]}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let mut ids: Vec<i64> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["machine_id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    let mut both = vec![lis_id, pol_id];
    both.sort_unstable();
    assert_eq!(ids, both, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    assert_eq!(server.wait_end(&id).await["task"]["state"], "Success");

    // The first name it cannot run on is the one the answer names; nothing
    // is queued.
    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({"script": "echo hi", "machines": ["lis", "nope", "ghost"]}),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v.to_string().contains("machine 'nope' does not exist"),
        "{v}"
    );
    let (status, m) = server
        .send(
            server
                .http
                .put(format!("{}/api/machines/pol", server.base))
                .json(&json!({"disabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{m}");
    let (status, v) = server
        .post(
            "/api/tasks/script",
            json!({"script": "echo hi", "machines": ["lis", "Pol", "nope"]}),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(v.to_string().contains("machine 'pol' is disabled"), "{v}");
    let (_, tasks) = server.get("/api/tasks").await;
    assert_eq!(
        tasks.as_array().unwrap().len(),
        1,
        "only the first: {tasks}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_long_script() {
    let (server, _lis, _pol, _, _) = two_machines().await;
    let id = server
        .script("echo started; sleep 300", &["lis", "pol"])
        .await;
    let mut events = server.events(&id, 0).await;
    let mut started = 0;
    events
        .until(|e, d| {
            if e == "log" && d["text"] == "started" {
                started += 1;
            }
            started == 2
        })
        .await;
    let began = std::time::Instant::now();
    let (status, v) = server
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["task"]["cancel_requested"], true, "{v}");
    let (_, end) = events.until(|e, _| e == "end").await;
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(end["task"]["state"], "Canceled", "{end}");
    for step in end["steps"].as_array().unwrap() {
        assert_eq!(step["state"], "Canceled", "{step}");
        assert_eq!(
            step["exit_code"],
            octo_proto::exit_codes::CANCELLED,
            "{step}"
        );
    }
    let (status, _) = server
        .post("/api/tasks/ServerTasks-999/cancel", json!({}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_resumes_without_losing_or_repeating_lines() {
    let server = Server::new().await;
    let mut lis = Tentacle::listening("lis", server.thumbprint).await;
    let addr = lis.addr.unwrap();
    let lis_id = server.add_listening("lis", addr, lis.thumbprint()).await;
    // Long enough to outlast the tentacle's graceful drain (5 s) after the cut.
    let n = 160;
    let script = format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.05; done");
    let id = server.script(&script, &["lis"]).await;
    let mut events = server.events(&id, 0).await;
    events.until_line("line 10").await;

    // Stop the listener (dropping its connections) and serve the same script
    // service again on the same port: the script keeps running.
    lis.stop().await;
    lis.serve(TcpListener::bind(addr).await.unwrap());

    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, lis_id), numbered(n));
    let text = server_text(&log);
    assert!(text.contains("connection to lis lost"), "{text}");
    assert!(text.contains("resuming"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_step_reaches_its_machine_where_it_is_registered_again() {
    let server = Server::new().await;
    let lis = Tentacle::listening("lis", server.thumbprint).await;
    // Registered where nothing listens: the step cannot reach it, and retries.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let lis_id = server.add_listening("lis", nowhere, lis.thumbprint()).await;
    let id = server.script("echo reached", &["lis"]).await;
    let mut events = server.events(&id, 0).await;
    events
        .until(|e, d| {
            e == "log"
                && d["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("cannot reach lis"))
        })
        .await;

    // Registered again where it listens (`tentacle register-with --force`):
    // the next attempt goes there, not to the address the step started with.
    let addr = lis.addr.unwrap();
    let (status, m) = server
        .post(
            "/api/machines",
            json!({
                "name": "lis",
                "comms_style": "TentaclePassive",
                "uri": format!("https://{addr}/"),
                "thumbprint": lis.thumbprint().to_string(),
                "environments": ["Test"],
                "force": true,
            }),
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {m}");
    assert_eq!(m["id"], lis_id, "replaced in place: {m}");

    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, lis_id), ["reached"]);
    let text = server_text(&log);
    assert!(
        text.contains(&format!(
            "lis: its registration changed since the step read it: reaching it at https://{addr}/"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_resumes_the_task() {
    let mut server = Server::new().await;
    let pol = Tentacle::polling("pol", server.thumbprint, server.comms_port, "sub-pol");
    let pol_id = server.add_polling("pol", "sub-pol", pol.thumbprint()).await;
    let n = 100;
    let script = format!("for i in $(seq 1 {n}); do echo \"line $i\"; sleep 0.05; done");
    let id = server.script(&script, &["pol"]).await;
    {
        let mut events = server.events(&id, 0).await;
        events.until_line("line 10").await;
    }
    server.restart().await;

    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, pol_id), numbered(n));
    let text = server_text(&log);
    assert!(text.contains("Resuming task"), "{text}");
    drop(pol);
}

/// A step's first line ("starting the script") is stored with the script's
/// first lines or its end, and shows while a silent script runs: here the
/// script reads a FIFO the test writes once it has seen that line, then
/// prints. The line comes first, stamped no later than the script's own lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_first_line_shows_while_a_silent_script_runs_and_comes_first() {
    let (server, lis, _pol, lis_id, _) = two_machines().await;
    let fifo = fifo_in(&lis.ctx.home, "go");
    let script = format!("read -r word < '{}'; echo \"$word\"", fifo.display());
    let id = server.script(&script, &["lis"]).await;
    let mut events = server.events(&id, 0).await;
    let (_, first) = events
        .until(|e, d| e == "log" && d["text"].as_str().unwrap().contains("starting the script"))
        .await;
    release_fifo(fifo, b"after\n").await;
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    let at = |text: &str| {
        log.iter()
            .position(|l| l["text"].as_str().unwrap().contains(text))
    };
    let (starting, after, finished) = (
        at("starting the script").unwrap(),
        at("after").unwrap(),
        at("the script finished").unwrap(),
    );
    assert!(starting < after && after < finished, "{log:#?}");
    assert_eq!(log[starting]["id"], first["id"]);
    let stamp = |i: usize| log[i]["timestamp"].as_i64().unwrap();
    assert!(stamp(starting) <= stamp(after), "{log:#?}");
    assert_eq!(stdout_of(&log, lis_id), ["after"]);

    // A script that ends at once: its first line, its output, its end, in order.
    let id = server.script("echo quick", &["lis"]).await;
    server.wait_end(&id).await;
    let texts: Vec<String> = server
        .log(&id)
        .await
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect();
    let mine: Vec<&String> = texts.iter().filter(|t| !t.starts_with("Task ")).collect();
    assert_eq!(mine.len(), 3, "{texts:#?}");
    assert!(
        mine[0].starts_with("lis: starting the script"),
        "{texts:#?}"
    );
    assert_eq!(mine[1], "quick");
    assert!(
        mine[2].starts_with("lis: the script finished (Success"),
        "{texts:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_the_script_started_never_starts_it() {
    let server = Server::new().await;
    // A polling machine that never connects: the step waits for it.
    let absent = kit::identity("absent").thumbprint();
    server.add_polling("absent", "sub-absent", absent).await;
    let id = server.script("echo should not run", &["absent"]).await;
    let mut events = server.events(&id, 0).await;
    events
        .until(|e, d| e == "log" && d["text"].as_str().unwrap().contains("starting the script"))
        .await;
    let (status, _) = server
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 202);
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Canceled", "{end}");
    assert_eq!(end["steps"][0]["state"], "Canceled", "{end}");
    assert!(end["steps"][0]["exit_code"].is_null(), "{end}");
    let text = server_text(&server.log(&id).await);
    assert!(
        text.contains("canceled before the script started"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// The node's task cap.

/// A node runs at most its task cap at once: a second task waits, Queued,
/// saying why in its log, while the node's record shows one running task and
/// step; it starts when the first ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_beyond_the_cap_wait_queued_until_one_ends() {
    let server = Server::with(RunArgs {
        task_cap: 1,
        ..RunArgs::default()
    })
    .await;
    let (_lis, _) = server.lis().await;
    let gate = server.data.with_file_name("gate");
    let script = format!(
        "echo first; for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.1; done; echo done",
        gate.display()
    );
    let first = server.script(&script, &["lis"]).await;
    server.events(&first, 0).await.until_line("first").await;
    let second = server.script("echo second", &["lis"]).await;
    let mut events = server.events(&second, 0).await;
    events
        .until(|e, d| {
            e == "log"
                && d["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("this node runs its cap of 1 tasks"))
        })
        .await;
    let (_, t) = server.get(&format!("/api/tasks/{second}")).await;
    assert_eq!(t["task"]["state"], "Queued", "{t}");
    // The next heartbeat records what runs (5 s apart): one task, one step.
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, nodes) = server.get("/api/nodes").await;
        assert_eq!(status, 200, "{nodes}");
        let node = &nodes[0];
        assert_eq!(node["task_cap"], 1, "{nodes}");
        if node["running_tasks"] == 1 && node["running_steps"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{nodes}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    std::fs::write(&gate, "").unwrap();
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let (_, t) = server.get(&format!("/api/tasks/{first}")).await;
    assert_eq!(t["task"]["state"], "Success", "{t}");
}

// ---------------------------------------------------------------------------
// How many steps run at once.

/// Fails (exit 3) if another step holds the lock directory `$D/lock` while
/// this one does: steps that never overlap all succeed.
const ALONE: &str = "mkdir \"$D/lock\" || { echo overlap; exit 3; }; sleep 0.3; rmdir \"$D/lock\"";

/// Succeeds only when both machines' steps run at the same time: each leaves a
/// mark and waits (bounded, 30 s) to see the other's.
const TOGETHER: &str = "mktemp -p \"$D\" mark.XXXXXX >/dev/null; for _ in $(seq 300); do [ \"$(ls \"$D\" | grep -c '^mark')\" -ge 2 ] && exit 0; sleep 0.1; done; echo alone; exit 4";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_steps_of_a_task_is_kept_and_checked() {
    let (server, _lis, _pol, _, _) = two_machines().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // The default (20) lets both machines run together...
    let id = server
        .create(
            "/api/tasks/script",
            json!({ "script": TOGETHER, "environment": "Test", "variables": { "D": d } }),
        )
        .await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    // ...and 1 runs them one after the other.
    let (status, created) = server
        .post(
            "/api/tasks/script",
            json!({ "script": ALONE, "environment": "Test", "variables": { "D": d }, "max_parallel_steps": 1 }),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["task"]["arguments"]["max_parallel_steps"], 1);
    let id = created["task"]["id"].as_str().unwrap().to_string();
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert_eq!(end["steps"].as_array().unwrap().len(), 2);
    // Health checks and deployments take it too; nonsense is refused naming the field.
    let id = server
        .create(
            "/api/tasks/health",
            json!({ "environment": "Test", "max_parallel_steps": 1 }),
        )
        .await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    for bad in [json!(0), json!(10001), json!(-1), json!("two")] {
        for path in ["/api/tasks/script", "/api/tasks/health"] {
            let (status, v) = server
                .post(
                    path,
                    json!({ "script": "true", "environment": "Test", "max_parallel_steps": bad })
                        .as_object()
                        .unwrap()
                        .iter()
                        .filter(|(k, _)| path.ends_with("script") || k.as_str() != "script")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<serde_json::Map<_, _>>()
                        .into(),
                )
                .await;
            assert_eq!(status, 400, "{path} {bad}: {v}");
            assert!(
                v.to_string().contains("max_parallel_steps"),
                "{path} {bad}: {v}"
            );
        }
    }
}

/// A new task whose only step waits for the node's one slot still says
/// "Task started" at once (stored alone when no step takes it with its
/// start), and that line stays the task's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_for_a_node_slot_says_it_started_first() {
    let server = Server::with(RunArgs {
        max_running_steps: 1,
        ..RunArgs::default()
    })
    .await;
    let (server, lis, _pol, _, _) = two_machines_on(server).await;
    // The first task holds the slot until the test writes to the FIFO.
    let fifo = fifo_in(&lis.ctx.home, "hold");
    let a = server
        .script(&format!("read -r word < '{}'", fifo.display()), &["lis"])
        .await;
    server
        .events(&a, 0)
        .await
        .until(|e, d| e == "log" && d["text"].as_str().unwrap().contains("starting the script"))
        .await;
    let b = server.script("echo b", &["pol"]).await;
    let mut events = server.events(&b, 0).await;
    let (_, first) = events.until(|e, _| e == "log").await;
    assert!(
        first["text"].as_str().unwrap().starts_with("Task started"),
        "{first}"
    );
    let (_, now) = server.get(&format!("/api/tasks/{b}")).await;
    assert_eq!(now["task"]["state"], "Executing", "{now}");
    assert_eq!(
        now["steps"][0]["state"], "Queued",
        "waits for the slot: {now}"
    );
    release_fifo(fifo, b"go\n").await;
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&b).await;
    let texts: Vec<&str> = log.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert!(texts[0].starts_with("Task started"), "{texts:?}");
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.starts_with("Task started"))
            .count(),
        1
    );
    assert!(
        texts.last().unwrap().starts_with("Task finished"),
        "{texts:?}"
    );
    assert_eq!(server.wait_end(&a).await["task"]["state"], "Success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_running_steps_bounds_every_task_of_the_node_together() {
    let server = Server::with(RunArgs {
        max_running_steps: 1,
        ..RunArgs::default()
    })
    .await;
    let (server, _lis, _pol, _, _) = two_machines_on(server).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    // Two tasks, one machine each, started together: with one slot on the
    // node, their steps never overlap (each script fails if they do).
    let a = server
        .create(
            "/api/tasks/script",
            json!({ "script": ALONE, "machines": ["lis"], "variables": { "D": d } }),
        )
        .await;
    let b = server
        .create(
            "/api/tasks/script",
            json!({ "script": ALONE, "machines": ["pol"], "variables": { "D": d } }),
        )
        .await;
    for id in [a, b] {
        let end = server.wait_end(&id).await;
        assert_eq!(end["task"]["state"], "Success", "{end}");
    }
}

// ---------------------------------------------------------------------------
// Hardening: bounded logs, deleted machines.

/// Bytes of the database files (the database and its WAL).
/// A script whose every line came with the stream's `completed` event: the
/// task ends without waiting for the tentacle's cleanup (CompleteScript, held
/// here), which still reaches the tentacle and frees the work folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_ends_without_waiting_for_a_cleanup_that_brings_nothing() {
    let server = Server::new().await;
    let (lis, gated) = Tentacle::gated("gate", server.thumbprint, None).await;
    server
        .add_listening("gate", lis.addr.unwrap(), lis.thumbprint())
        .await;
    let id = server.script("echo one; echo two", &["gate"]).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert_eq!(
        stdout_of(&log, end["steps"][0]["machine_id"].as_i64().unwrap()),
        ["one", "two"]
    );
    // The task ended with CompleteScript called and still held.
    let mut completes = gated.completes.subscribe();
    timeout(T, completes.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    assert!(!*gated.open.borrow());
    let ticket = end["steps"][0]["ticket"].as_str().unwrap().to_string();
    assert_eq!(
        lis.work_entries(),
        std::slice::from_ref(&ticket),
        "the script's folder is there until the cleanup"
    );
    gated.open.send_replace(true);
    // Once answered, the script's folder is gone (moved aside, its files
    // deleted in the background) and its ticket free.
    let mut answered = gated.answered.subscribe();
    timeout(T, answered.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !lis.work_entries().contains(&ticket),
        "{:?}",
        lis.work_entries()
    );
    assert_eq!(*gated.completes.borrow(), 1);
    // Started and streamed in one call (the tentacle speaks contract version 2).
    assert_eq!(gated.calls(), ["RunScript"]);
}

/// A cleanup that brings nothing is housekeeping: it goes to the tentacle
/// [`octo_engine::CLEANUP_DEFER`] after the step's end is stored, so that it
/// does not take the cores the task's end needs on its way to the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanup_that_brings_nothing_goes_after_the_tasks_end() {
    let server = Server::new().await;
    let (lis, gated) = Tentacle::gated("gate", server.thumbprint, None).await;
    gated.open.send_replace(true);
    server
        .add_listening("gate", lis.addr.unwrap(), lis.thumbprint())
        .await;
    let id = server.script("echo one", &["gate"]).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let ended = end["steps"][0]["completed_at"].as_i64().unwrap();
    let mut answered = gated.answered.subscribe();
    timeout(T, answered.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    let arrived = gated.completes_at.lock().unwrap().clone();
    let defer = i64::try_from(octo_engine::CLEANUP_DEFER.as_millis()).unwrap();
    // Both clocks are this machine's, in whole milliseconds.
    assert!(
        arrived.len() == 1 && arrived[0] - ended >= defer - 1,
        "CompleteScript at {arrived:?}, the step's end stored at {ended}: less than {defer} ms apart"
    );
    let ticket = end["steps"][0]["ticket"].as_str().unwrap();
    assert!(
        !lis.work_entries().iter().any(|e| e == ticket),
        "{:?}",
        lis.work_entries()
    );
}

/// The tentacle's cleanup (CompleteScript, which frees the script's ticket)
/// goes only once the step's end is stored: a server restarted before that
/// resumes the step and must find its script there, ended, not start it
/// again. Here the database is locked (as a stalled disk would hold it) while
/// the script ends: no CompleteScript reaches the tentacle until the lock is
/// gone and the end stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tentacle_cleanup_waits_until_the_steps_end_is_stored() {
    use sqlx::{Connection, Executor};
    let server = Server::new().await;
    let (lis, gated) = Tentacle::gated("gate", server.thumbprint, None).await;
    gated.open.send_replace(true);
    let machine = server
        .add_listening("gate", lis.addr.unwrap(), lis.thumbprint())
        .await;
    let fifo = fifo_in(&lis.ctx.home, "hold");
    // Silent: nothing of the script's is stored before its end.
    let script = format!("read -r l < {}", fifo.display());
    let id = server.script(&script, &["gate"]).await;
    // The step's first line is stored (its start, before it): every write
    // before the script's end is done.
    let mut stream = server.events(&id, 0).await;
    stream
        .until(|e, d| e == "log" && d["text"].as_str().unwrap().contains("starting the script"))
        .await;
    let (_, task) = server.get(&format!("/api/tasks/{id}")).await;
    let ticket = task["steps"][0]["ticket"].as_str().unwrap().to_string();

    // Every write to the database waits (up to its busy timeout, 5 s) from now.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.data.join("octopus.db"))
        .busy_timeout(T);
    let mut lock = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    lock.execute("BEGIN IMMEDIATE").await.unwrap();
    release_fifo(fifo, b"go\n").await;
    // The tentacle has the script's end, and so has the server's stream.
    let mut events = gated
        .inner
        .stream_logs(tonic::Request::new(ScriptStatusRequest {
            ticket: ticket.clone(),
            since_sequence: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    let completed = timeout(T, async {
        while let Some(ev) = events.next().await {
            if let Some(script_event::Event::Completed(status)) = ev.unwrap().event {
                return status;
            }
        }
        panic!("the stream ended without the script's end");
    })
    .await
    .unwrap();
    assert_eq!(completed.exit_code, 0, "{completed:?}");
    // With the end not stored, nothing frees the ticket.
    let mut completes = gated.completes.subscribe();
    let early = timeout(Duration::from_millis(500), completes.wait_for(|n| *n > 0))
        .await
        .is_ok();
    assert!(
        !early,
        "CompleteScript reached the tentacle before the step's end was stored"
    );
    lock.execute("ROLLBACK").await.unwrap();
    drop(lock);
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert!(stdout_of(&log, machine).is_empty());
    assert!(
        server_text(&log).contains("the script finished (Success, exit code 0)"),
        "{log:#?}"
    );
    timeout(T, completes.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gated.calls(), ["RunScript"]);
}

/// A tentacle that does not know RunScript (as one of contract version 1,
/// though this one said 2 in its Hello): the step starts the script and
/// streams its log apart, and the task's log is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tentacle_without_run_script_is_started_and_streamed_apart() {
    let server = Server::new().await;
    let (lis, gated) = Tentacle::gated_as("old", server.thumbprint, None, true).await;
    gated.open.send_replace(true);
    let machine = server
        .add_listening("old", lis.addr.unwrap(), lis.thumbprint())
        .await;
    let id = server
        .script("echo one; echo two >&2; echo three", &["old"])
        .await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert_eq!(gated.calls(), ["RunScript", "StartScript", "StreamLogs"]);
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, machine), ["one", "three"]);
    let texts: Vec<&str> = log.iter().filter_map(|l| l["text"].as_str()).collect();
    assert!(texts.contains(&"two"), "{texts:?}");
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.contains("starting the script"))
            .count(),
        1,
        "{texts:?}"
    );
    assert!(
        texts.first().unwrap().starts_with("Task started"),
        "{texts:?}"
    );
    assert!(
        texts.last().unwrap().starts_with("Task finished"),
        "{texts:?}"
    );
}

/// A stream that ended its log early (lines still due when `completed` came):
/// the task waits for CompleteScript, stores the lines it brings, and only
/// then ends, with them before "Task finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_waits_for_a_cleanup_that_brings_the_logs_rest() {
    let server = Server::new().await;
    let (lis, gated) = Tentacle::gated("gate", server.thumbprint, Some("tail")).await;
    let machine = server
        .add_listening("gate", lis.addr.unwrap(), lis.thumbprint())
        .await;
    let id = server
        .script("echo one; echo tail; echo tail", &["gate"])
        .await;
    let mut completes = gated.completes.subscribe();
    timeout(T, completes.wait_for(|n| *n == 1))
        .await
        .unwrap()
        .unwrap();
    // Held: the task has not ended, and its log has no "tail" yet.
    let (_, task) = server.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(task["task"]["state"], "Executing", "{task}");
    assert_eq!(stdout_of(&server.log(&id).await, machine), ["one"]);
    gated.open.send_replace(true);
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = server.log(&id).await;
    assert_eq!(stdout_of(&log, machine), ["one", "tail", "tail"]);
    let finished = log
        .iter()
        .position(|l| {
            l["text"]
                .as_str()
                .unwrap_or("")
                .starts_with("Task finished")
        })
        .unwrap();
    let last_tail = log.iter().rposition(|l| l["text"] == "tail").unwrap();
    assert!(last_tail < finished, "{log:#?}");
}

fn database_bytes(data: &Path) -> u64 {
    ["octopus.db", "octopus.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steps_stored_log_is_bounded_and_the_script_runs_on() {
    const LINE: usize = 199;
    const LINES: usize = 15_000;
    let server = Server::with_log_limit(1).await;
    let (lis, lis_id) = server.lis().await;
    let marker = lis._home.path().join("ran-on");
    let before = database_bytes(&server.data);
    // About 2.8 MiB of output, then proof that the script went on.
    let script = format!(
        "line=$(head -c {LINE} /dev/zero | tr '\\0' x); yes \"$line\" | head -n {LINES}; touch '{}'",
        marker.display()
    );
    let id = server.script(&script, &["lis"]).await;
    let end = server.wait_end(&id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    assert_eq!(end["steps"][0]["exit_code"], 0, "{end}");
    assert_eq!(end["steps"][0]["next_sequence"], LINES, "{end}");
    assert!(marker.exists(), "the script ran to its end");

    // 1 MiB of lines stored, the rest counted.
    let stored = (1024 * 1024) / LINE;
    let log = server.log(&id).await;
    let lines = stdout_of(&log, lis_id);
    assert_eq!(lines.len(), stored);
    assert!(lines.iter().all(|l| l.len() == LINE));
    let text = server_text(&log);
    assert_eq!(
        text.matches("this step's log reached its limit of 1.0 MiB (--max-log-mib-per-step)")
            .count(),
        1,
        "{text}"
    );
    let dropped = LINES - stored;
    let summary = format!(
        "lis: {dropped} lines ({:.1} MiB) of output past this step's log limit of 1.0 MiB were dropped, not stored",
        (dropped * LINE) as f64 / (1024.0 * 1024.0)
    );
    assert_eq!(
        text.matches(&summary).count(),
        1,
        "wanted {summary:?} in {text}"
    );
    let after = database_bytes(&server.data);
    eprintln!(
        "log limit 1 MiB: {LINES} lines of {LINE} bytes printed ({:.1} MiB), {stored} stored, {dropped} dropped; database {before} -> {after} bytes",
        (LINES * LINE) as f64 / (1024.0 * 1024.0)
    );
}

/// The task's steps, by machine name.
async fn steps_of(server: &Server, task_id: &str) -> std::collections::HashMap<String, Value> {
    let (status, v) = server.get(&format!("/api/tasks/{task_id}")).await;
    assert_eq!(status, 200, "{v}");
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["machine_name"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_machine_cancels_its_running_steps_and_says_why() {
    let (server, _lis, _pol, _, _) = two_machines().await;
    let id = server
        .script("echo started; sleep 300", &["lis", "pol"])
        .await;
    let mut events = server.events(&id, 0).await;
    let mut started = 0;
    events
        .until(|e, d| {
            if e == "log" && d["text"] == "started" {
                started += 1;
            }
            started == 2
        })
        .await;

    // Listening, then polling: each is canceled on its machine at once (the
    // cancel exit code is the tentacle's), the other goes on.
    for (gone, other) in [("lis", Some("pol")), ("pol", None)] {
        let began = std::time::Instant::now();
        let (status, v) = server.delete(&format!("/api/machines/{gone}")).await;
        assert_eq!(status, 204, "{v}");
        let took = began.elapsed();
        let steps = steps_of(&server, &id).await;
        let step = &steps[gone];
        assert_eq!(step["state"], "Canceled", "{step}");
        assert_eq!(
            step["exit_code"],
            octo_proto::exit_codes::CANCELLED,
            "{step}"
        );
        assert!(
            step["error"]
                .as_str()
                .unwrap()
                .contains(&format!("machine {gone} was deleted by admin")),
            "{step}"
        );
        if let Some(other) = other {
            assert_eq!(steps[other]["state"], "Executing", "{}", steps[other]);
        }
        let text = server_text(&server.log(&id).await);
        assert!(
            text.contains(&format!(
                "{gone}: canceling: machine {gone} was deleted by admin"
            )),
            "{text}"
        );
        eprintln!("deleting {gone} with a running script took {took:?}");
    }
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Failed", "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unreachable_machine_records_its_step_canceled_anyway() {
    let server = Server::new().await;
    let mut gone = Tentacle::listening("gone", server.thumbprint).await;
    server
        .add_listening("gone", gone.addr.unwrap(), gone.thumbprint())
        .await;
    let id = server.script("echo started; sleep 300", &["gone"]).await;
    let mut events = server.events(&id, 0).await;
    events.until_line("started").await;
    // The machine stops answering; its script runs on.
    gone.stop().await;
    let began = std::time::Instant::now();
    let (status, v) = server.delete("/api/machines/gone").await;
    assert_eq!(status, 204, "{v}");
    let took = began.elapsed();
    assert!(took < Duration::from_secs(20), "{took:?}");
    let steps = steps_of(&server, &id).await;
    let step = &steps["gone"];
    assert_eq!(step["state"], "Canceled", "{step}");
    assert!(step["exit_code"].is_null(), "{step}");
    let error = step["error"].as_str().unwrap();
    assert!(
        error.contains("machine gone was deleted by admin")
            && error.contains("the script may still be running on gone"),
        "{error}"
    );
    let (_, end) = events.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Failed", "{end}");
    eprintln!("deleting an unreachable machine with a running script took {took:?}");
}
