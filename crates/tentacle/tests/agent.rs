//! `tentacle run` as a real process, reached by a test server over real sockets.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use octo_comms::Endpoint;
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::Thumbprint;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(30);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
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
    /// An instance with a certificate, listening on 127.0.0.1:`port` and
    /// trusting the returned server identity.
    fn listening(&self, port: u16) -> octo_tls::Identity {
        self.ok(&["create-instance"]);
        self.ok(&["new-certificate"]);
        let server_id = kit::identity("server");
        self.ok(&[
            "configure",
            "--port",
            &port.to_string(),
            "--listen-ip",
            "127.0.0.1",
            "--trust",
            &server_id.thumbprint().to_string(),
        ]);
        server_id
    }
    fn thumbprint(&self) -> Thumbprint {
        self.ok(&["show-thumbprint"]).trim().parse().unwrap()
    }
}

/// A running agent; killed when dropped. `started` is its "started: ..." log line.
struct Agent {
    child: Child,
    started: String,
    rest: std::sync::mpsc::Receiver<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env: &Env) -> Agent {
    start_command(env.cmd(&["run"]))
}

/// Starts `tentacle run` as `cmd` says and waits for its "started" line.
fn start_command(mut cmd: Command) -> Agent {
    let mut child = cmd
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
    let deadline = std::time::Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("started:") => {
                return Agent {
                    child,
                    started: l,
                    rest: rx,
                }
            }
            Ok(_) => {}
            Err(e) => panic!("agent did not start: {e}; exit: {:?}", child.try_wait()),
        }
    }
}

fn listening_addr(started: &str) -> String {
    let i = started.find("listening on ").unwrap() + "listening on ".len();
    started[i..].split(';').next().unwrap().trim().to_string()
}

/// A test server as `server_id`, connected to the listening agent of `env`
/// at `addr`.
async fn dial(
    env: &Env,
    server_id: &octo_tls::Identity,
    addr: &str,
) -> (
    octo_comms::ServerComms,
    Endpoint,
    octo_comms::Connection,
    kit::Guard,
) {
    let (server, _, guard) = kit::server(server_id.clone(), &[]).await;
    let ep = Endpoint::listening(&format!("https://{addr}/"), env.thumbprint()).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    (server, ep, conn, guard)
}

async fn run_script(conn: &octo_comms::Connection, ticket: &str, body: &str) -> ScriptStatus {
    let started = conn
        .scripts()
        .start_script(StartScriptRequest {
            ticket: ticket.into(),
            script_body: body.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut logs = started.logs;
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: ticket.into(),
            since_sequence: logs.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(l) => logs.push(l),
            script_event::Event::Completed(mut status) => {
                status.logs = logs;
                return status;
            }
        }
    }
    panic!("log stream ended without a final status");
}

#[tokio::test]
async fn listening_agent_runs_scripts_and_drops_a_server_whose_trust_is_removed() {
    kit::init_tracing();
    let env = Env::new();
    let server_id = env.listening(0);
    let agent = start(&env);
    let addr = listening_addr(&agent.started);
    let (server, ep, conn, _g) = dial(&env, &server_id, &addr.to_string()).await;

    let status = timeout(
        T,
        run_script(
            &conn,
            "hello",
            "echo hello from $TentacleInstanceName; exit 7",
        ),
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 7);
    assert!(
        status.logs.iter().any(|l| l.text == "hello from Tentacle"),
        "{:?}",
        status.logs
    );
    let caps = conn
        .capabilities()
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.instance_name, "Tentacle");

    // Trust removed while running: the live connection is dropped.
    env.ok(&[
        "configure",
        "--remove-trust",
        &server_id.thumbprint().to_string(),
    ]);
    timeout(T, conn.closed())
        .await
        .expect("connection dropped after trust removal");
    let err = timeout(T, server.connect(&ep)).await.unwrap().unwrap_err();
    assert!(
        matches!(err, octo_comms::CommsError::RejectedByPeer { .. }),
        "{err}"
    );
    // The agent logged the refusal with the fix.
    let mut refused = None;
    while let Ok(l) = agent.rest.recv_timeout(T) {
        if l.contains("refused connection") {
            refused = Some(l);
            break;
        }
    }
    let refused = refused.expect("refusal logged");
    assert!(
        refused.contains(&server_id.thumbprint().to_string())
            && refused.contains("tentacle configure --instance Tentacle --trust"),
        "{refused}"
    );
}

/// `tentacle run` with `listener` passed as a service manager passes it
/// (`LISTEN_FDS`; the descriptor left open across the exec).
fn run_on_passed(env: &Env, listener: &std::net::TcpListener) -> Command {
    use std::os::fd::AsRawFd;
    nix::fcntl::fcntl(
        listener,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let mut cmd = env.cmd(&["run"]);
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDS_FIRST_FD", listener.as_raw_fd().to_string())
        .env("LISTEN_FDNAMES", "tentacle");
    cmd
}

#[tokio::test]
async fn listening_agent_serves_on_a_socket_passed_to_it() {
    kit::init_tracing();
    let env = Env::new();
    // This test keeps its copy of the socket open: an agent that bound the
    // port itself would find it in use.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let server_id = env.listening(addr.port());
    // A connection made before the agent runs waits in the socket's queue.
    let early = std::net::TcpStream::connect(addr).unwrap();
    let agent = start_command(run_on_passed(&env, &socket));
    assert!(
        agent.started.contains(&format!(
            "listening on {addr} (a socket passed to it, open across restarts)"
        )),
        "{}",
        agent.started
    );
    let (_server, _, conn, _g) = dial(&env, &server_id, &addr.to_string()).await;
    // Neither the variables nor the socket reach the scripts.
    let status = timeout(
        T,
        run_script(
            &conn,
            "passed",
            "env | grep -c '^LISTEN_' || true; for f in /proc/$$/fd/*; do readlink \"$f\"; done | grep -c '^socket:' || true",
        ),
    )
    .await
    .unwrap();
    assert_eq!(status.exit_code, 0, "{:?}", status.logs);
    let out: Vec<&str> = status.logs.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(out, ["0", "0"], "{:?}", status.logs);
    // The early connection was accepted by the agent (a TLS handshake that
    // never comes): it is not refused or reset.
    early.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let read = std::io::Read::read(&mut &early, &mut buf);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{read:?}"
    );
    // A stop is graceful on listening connections too.
    stop_with_a_script_running(agent, &conn).await;

    // A socket on another address than the configuration's is refused,
    // naming both and the fix.
    let wide = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = wide.local_addr().unwrap().port();
    env.ok(&["configure", "--port", &port.to_string()]);
    let out = run_on_passed(&env, &wide).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("passed a socket listening on 0.0.0.0:{port}"))
            && err
                .contains("tentacle configure --instance Tentacle --listen-ip` asks for 127.0.0.1"),
        "{err}"
    );
    // A socket on a port the instance does not listen on is an error too.
    drop(wide);
    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = run_on_passed(&env, &stray).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "passed sockets on {} that no option of this program listens on (listening on 127.0.0.1:{port})",
            stray.local_addr().unwrap()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn polling_agent_reaches_the_server_and_stops_on_sigterm() {
    kit::init_tracing();
    let env = Env::new();
    env.ok(&["create-instance"]);
    env.ok(&["new-certificate"]);
    let server_id = kit::identity("server");
    let tentacle_tp = env.thumbprint();
    let (server, paddr, _g) = kit::server(server_id.clone(), &[tentacle_tp]).await;
    // With a listener for its events the server keeps a `WatchRotation`
    // stream open on every connection, as a real server does.
    let mut events = server.events();
    env.ok(&["configure", "--no-listen"]);
    env.ok(&[
        "poll-server",
        "--server-comms-address",
        &paddr.to_string(),
        "--server-thumbprint",
        &server_id.thumbprint().to_string(),
        "--subscription-id",
        "agent-sub",
    ]);
    let agent = start(&env);
    assert!(
        agent.started.contains("poll://agent-sub/"),
        "{}",
        agent.started
    );
    let ep = Endpoint::polling("agent-sub", tentacle_tp).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    let connected = timeout(T, events.recv()).await.unwrap().unwrap();
    assert!(
        matches!(connected, octo_comms::CommsEvent::Connected { .. }),
        "{connected:?}"
    );
    let status = timeout(T, run_script(&conn, "p1", "echo $TentacleHome >&2; pwd"))
        .await
        .unwrap();
    assert_eq!(status.exit_code, 0);
    // stdout and stderr are separate pipes: order across them is not defined.
    let home = PathBuf::from(
        &status
            .logs
            .iter()
            .find(|l| l.stream == LogStream::Stderr as i32)
            .unwrap()
            .text,
    );
    // The agent also logs to a rolling file under HOME/Logs.
    let logs: Vec<_> = std::fs::read_dir(home.join("Logs"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        logs.iter()
            .any(|e| e.file_name().to_string_lossy().starts_with("tentacle")),
        "{logs:?}"
    );
    assert!(
        status
            .logs
            .iter()
            .any(|l| l.text == home.join("Work/p1").to_string_lossy()),
        "{:?}",
        status.logs
    );

    stop_with_a_script_running(agent, &conn).await;
}

/// Stops `agent` (SIGTERM) while a script runs on it, started and followed
/// over `conn` as the server does (RunScript): the script's log stream ends
/// with the graceful close, saying to read on later, the server's rotation
/// watch ends too, so nothing is cut after the close's 5 s grace, and the
/// agent exits 0. The script is left alone (this test then kills it).
async fn stop_with_a_script_running(mut agent: Agent, conn: &octo_comms::Connection) {
    let mut stream = conn
        .scripts()
        .run_script(RunScriptRequest {
            start: Some(StartScriptRequest {
                ticket: "long".into(),
                script_body: "echo $$; exec sleep 30".into(),
                ..Default::default()
            }),
            since_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = timeout(T, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(script_event::Event::Log(pid)) = &first.event else {
        panic!("{first:?}");
    };
    let script = nix::unistd::Pid::from_raw(pid.text.parse().unwrap());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (code, rest) = timeout(
        T,
        tokio::task::spawn_blocking(move || {
            let code = agent.child.wait().unwrap();
            // Every line, up to the end of its stderr.
            let mut lines = Vec::new();
            while let Ok(l) = agent.rest.recv_timeout(T) {
                lines.push(l);
            }
            (code, lines)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let rest = rest.join("\n");
    let ended = timeout(T, stream.message()).await.unwrap();
    nix::sys::signal::kill(script, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(code.success(), "{code:?}\n{rest}");
    let ended = ended.unwrap_err();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(
        ended
            .message()
            .contains("the tentacle is stopping; read the script's log again"),
        "{ended:?}\n{rest}"
    );
    timeout(T, conn.closed())
        .await
        .expect("connection closed when the agent stopped");
    assert!(!rest.contains("still in flight"), "{rest}");
}

#[tokio::test]
async fn polling_agent_goes_through_the_configured_proxy() {
    use octo_testkit::tinyproxy::{Tinyproxy, TinyproxyOptions};
    kit::init_tracing();
    let proxy = Tinyproxy::start(&TinyproxyOptions {
        basic_auth: Some(("octo".into(), "pr0xy-pw".into())),
        ..Default::default()
    });
    let env = Env::new();
    env.ok(&["create-instance"]);
    env.ok(&["new-certificate"]);
    let server_id = kit::identity("server");
    let tentacle_tp = env.thumbprint();
    let (server, paddr, _g) = kit::server(server_id.clone(), &[tentacle_tp]).await;
    env.ok(&["configure", "--no-listen"]);
    env.ok(&[
        "poll-server",
        "--server-comms-address",
        &paddr.to_string(),
        "--server-thumbprint",
        &server_id.thumbprint().to_string(),
        "--subscription-id",
        "proxied",
    ]);
    env.ok(&[
        "polling-proxy",
        "--proxy-enable",
        "true",
        "--proxy-host",
        "127.0.0.1",
        "--proxy-port",
        &proxy.addr().port().to_string(),
        "--proxy-username",
        "octo",
        "--proxy-password",
        "pr0xy-pw",
    ]);
    let agent = start(&env);
    assert!(
        agent.started.contains(&format!(
            "polling proxy: http://octo@{} (password set)",
            proxy.addr()
        )),
        "{}",
        agent.started
    );
    let ep = Endpoint::polling("proxied", tentacle_tp).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    let status = timeout(T, run_script(&conn, "px1", "echo via proxy"))
        .await
        .unwrap();
    assert_eq!(status.exit_code, 0);
    assert!(status.logs.iter().any(|l| l.text == "via proxy"));
    // It came through the proxy, which saw only CONNECT.
    let requests = proxy.requests();
    assert!(
        !requests.is_empty()
            && requests
                .iter()
                .all(|r| r == &format!("CONNECT {paddr} HTTP/1.1")),
        "{}",
        proxy.log()
    );
    // The password is never logged.
    let logged: Vec<String> = agent.rest.try_iter().collect();
    assert!(!agent.started.contains("pr0xy-pw"));
    assert!(logged.iter().all(|l| !l.contains("pr0xy-pw")), "{logged:?}");
}

#[test]
fn run_refuses_a_port_in_use_and_a_missing_certificate() {
    let env = Env::new();
    env.ok(&["create-instance"]);
    let out = env.cmd(&["run"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tentacle new-certificate --instance Tentacle"),
        "{err}"
    );

    env.ok(&["new-certificate"]);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    env.ok(&["configure", "--port", &port, "--listen-ip", "127.0.0.1"]);
    let out = env.cmd(&["run"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("port {port} on 127.0.0.1 is already in use"))
            && err.contains("--port N"),
        "{err}"
    );
}
