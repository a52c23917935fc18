//! One `tentacle run` process polling several servers at once (over TCP and
//! over WebSocket, directly and through a real nginx routing by SNI), each
//! server running scripts on it; servers added and removed while it runs.
//! Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use octo_comms::{Connection, Endpoint, ServerComms, ServerCommsOptions, WebSocketListenerOptions};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::Value;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(30);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let env = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        env.ok(&["create-instance"]);
        env.ok(&["new-certificate"]);
        env.ok(&["configure", "--no-listen"]);
        env
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
    fn thumbprint(&self) -> Thumbprint {
        self.ok(&["show-thumbprint"]).trim().parse().unwrap()
    }
    fn config(&self) -> Value {
        serde_json::from_str(&self.ok(&["show-configuration", "--format", "json"])).unwrap()
    }
}

/// A running agent; killed when dropped.
struct Agent {
    child: Child,
    started: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(env: &Env) -> Self {
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
        let started = wait_line(&rx, &["started:"]);
        Agent {
            child,
            started,
            lines: rx,
        }
    }

    /// Waits (bounded) for a logged line containing every needle.
    fn wait_for(&self, needles: &[&str]) -> String {
        wait_line(&self.lines, needles)
    }
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needles: &[&str]) -> String {
    let deadline = std::time::Instant::now() + T;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if needles.iter().all(|n| l.contains(n)) => return l,
            Ok(l) => seen.push(l),
            Err(e) => panic!(
                "no line with {needles:?} ({e}); the agent logged:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// A server with a WebSocket port (and its TCP polling port) trusting `tentacle`.
async fn ws_server(
    identity: Identity,
    tentacle: Thumbprint,
) -> (ServerComms, SocketAddr, kit::Guard) {
    let trust = TrustStore::new([tentacle], kit::hint("server"));
    let comms = ServerComms::new(identity, trust, ServerCommsOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = kit::Guard(tokio_util::sync::CancellationToken::new());
    let (c, t) = (comms.clone(), guard.0.clone());
    tokio::spawn(async move {
        c.run_web_socket_listener(listener, WebSocketListenerOptions::default(), t)
            .await
    });
    (comms, addr, guard)
}

/// Runs `body` on the tentacle through `conn`; returns exit code and lines.
async fn run_script(conn: &Connection, ticket: &str, body: &str) -> (i32, Vec<String>) {
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
    let mut lines: Vec<String> = started.logs.into_iter().map(|l| l.text).collect();
    let mut stream = conn
        .scripts()
        .stream_logs(ScriptStatusRequest {
            ticket: ticket.into(),
            since_sequence: lines.len() as u64,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(l) => lines.push(l.text),
            script_event::Event::Completed(status) => return (status.exit_code, lines),
        }
    }
    panic!("log stream ended without a final status");
}

/// Connects to the tentacle's subscription and runs a script naming `who`.
async fn script_from(
    server: &ServerComms,
    sub: &str,
    tentacle: Thumbprint,
    who: &str,
) -> Connection {
    let ep = Endpoint::polling(sub, tentacle).unwrap();
    let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
    let (code, lines) = timeout(
        T,
        run_script(&conn, &format!("{sub}-{who}"), &format!("echo hello {who}")),
    )
    .await
    .unwrap();
    assert_eq!(code, 0, "{lines:?}");
    assert!(lines.contains(&format!("hello {who}")), "{lines:?}");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_polls_several_servers_added_and_removed_while_it_runs() {
    kit::init_tracing();
    let env = Env::new();
    let tp = env.thumbprint();
    let (s1_id, s2_id, s3_id) = (
        kit::identity("server 1"),
        kit::identity("server 2"),
        kit::identity("server 3"),
    );
    // Server 1 over TCP, server 2 over WebSocket.
    let (s1, s1_addr, _g1) = kit::server(s1_id.clone(), &[tp]).await;
    let (s2, s2_addr, _g2) = ws_server(s2_id.clone(), tp).await;
    env.ok(&[
        "poll-server",
        "--server-comms-address",
        &s1_addr.to_string(),
        "--server-thumbprint",
        &s1_id.thumbprint().to_string(),
        "--subscription-id",
        "multi-1",
    ]);
    let out = env.ok(&[
        "poll-server",
        "--server-web-socket",
        &format!("wss://{s2_addr}/tentacle"),
        "--server-thumbprint",
        &s2_id.thumbprint().to_string(),
        "--subscription-id",
        "multi-2",
    ]);
    assert!(out.contains("also polls 1 other server"), "{out}");
    let servers = env.config()["polling_servers"].as_array().unwrap().clone();
    assert_eq!(servers.len(), 2, "{servers:?}");
    assert_eq!(servers[1]["address"], format!("wss://{s2_addr}/tentacle"));

    let agent = Agent::start(&env);
    for want in ["poll://multi-1/", "poll://multi-2/", "wss://"] {
        assert!(agent.started.contains(want), "{}", agent.started);
    }
    // Each server runs scripts on the one tentacle.
    let _c1 = script_from(&s1, "multi-1", tp, "one").await;
    let c2 = script_from(&s2, "multi-2", tp, "two").await;

    // A third server added while the agent runs is polled within seconds.
    let (s3, s3_addr, _g3) = kit::server(s3_id.clone(), &[tp]).await;
    env.ok(&[
        "poll-server",
        "--server-comms-address",
        &s3_addr.to_string(),
        "--server-thumbprint",
        &s3_id.thumbprint().to_string(),
        "--subscription-id",
        "multi-3",
    ]);
    agent.wait_for(&["now polling", "poll://multi-3/"]);
    let _c3 = script_from(&s3, "multi-3", tp, "three").await;

    // Removing server 1 closes its connection; the others keep working.
    let out = env.ok(&[
        "poll-server",
        "--remove",
        "--server-comms-address",
        &s1_addr.to_string(),
    ]);
    assert!(out.contains("no longer polls"), "{out}");
    agent.wait_for(&["no longer polling", "poll://multi-1/"]);
    assert!(
        s1.polling().wait_until(|r| r.is_empty(), T).await,
        "server 1 still has a connection"
    );
    assert!(!c2.is_closed(), "server 2's connection survived");
    let (code, lines) = timeout(T, run_script(&c2, "after-removal", "echo still here"))
        .await
        .unwrap();
    assert_eq!((code, lines), (0, vec!["still here".to_string()]));
    let _c3 = script_from(&s3, "multi-3", tp, "three-again").await;
    let servers = env.config()["polling_servers"].as_array().unwrap().clone();
    assert_eq!(servers.len(), 2, "{servers:?}");
    // Removing an address it does not poll names what it does poll.
    let out = env
        .cmd(&[
            "poll-server",
            "--remove",
            "--server-comms-address",
            &s1_addr.to_string(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("it polls wss://"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_reaches_two_servers_by_name_through_an_nginx_sni_router() {
    use octo_testkit::nginx::Nginx;
    kit::init_tracing();
    let env = Env::new();
    let tp = env.thumbprint();
    let (a_id, b_id) = (kit::identity("server alpha"), kit::identity("server beta"));
    let (a, a_addr, _ga) = kit::server(a_id.clone(), &[tp]).await;
    let (b, b_addr, _gb) = kit::server(b_id.clone(), &[tp]).await;
    let nginx = Nginx::sni_router(&[("alpha.test", a_addr), ("beta.test", b_addr)], None);
    // Both names on one port; not in DNS, so the agent dials nginx and sends
    // the name as SNI. Each entry pins its server's thumbprint: a wrong route
    // would be refused both ways.
    for (name, id, sub) in [
        ("alpha.test", &a_id, "sni-a"),
        ("beta.test", &b_id, "sni-b"),
    ] {
        let out = env.ok(&[
            "poll-server",
            "--server-comms-address",
            &format!("https://{name}:443"),
            "--connect-to",
            &nginx.addr().to_string(),
            "--server-thumbprint",
            &id.thumbprint().to_string(),
            "--subscription-id",
            sub,
        ]);
        assert!(
            out.contains(&format!(
                "will poll {name}:443, dialled at {}",
                nginx.addr()
            )),
            "{out}"
        );
    }
    let cfg = env.config();
    assert_eq!(cfg["polling_servers"][0]["address"], "alpha.test:443");
    assert_eq!(
        cfg["polling_servers"][0]["connect_to"],
        nginx.addr().to_string()
    );
    let agent = Agent::start(&env);
    assert!(
        agent.started.contains(&format!(
            "alpha.test:443 as poll://sni-a/ (1 connection(s), dialled at {})",
            nginx.addr()
        )),
        "{}",
        agent.started
    );
    let _ca = script_from(&a, "sni-a", tp, "alpha").await;
    let _cb = script_from(&b, "sni-b", tp, "beta").await;
    assert_eq!((a.polling().len(), b.polling().len()), (1, 1));
    let upstreams = nginx.upstreams();
    assert!(
        upstreams.contains(&a_addr) && upstreams.contains(&b_addr),
        "{}",
        nginx.output()
    );
}

#[test]
fn poll_server_checks_web_socket_urls_and_connect_to() {
    let env = Env::new();
    let tp = Thumbprint::of_der(b"server").to_string();
    let fails = |args: &[&str]| {
        let out = env.cmd(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = fails(&[
        "poll-server",
        "--server-web-socket",
        "ws://h/x",
        "--server-thumbprint",
        &tp,
    ]);
    assert!(err.contains("plain ws:// is not supported"), "{err}");
    let err = fails(&[
        "poll-server",
        "--server-comms-address",
        "wss://h/x",
        "--server-thumbprint",
        &tp,
    ]);
    assert!(err.contains("--server-web-socket"), "{err}");
    let err = fails(&[
        "poll-server",
        "--server-comms-address",
        "h:1",
        "--server-web-socket",
        "wss://h/x",
        "--server-thumbprint",
        &tp,
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(&[
        "poll-server",
        "--server-comms-address",
        "h:1",
        "--connect-to",
        "nowhere",
        "--server-thumbprint",
        &tp,
    ]);
    assert!(
        err.contains("--connect-to 'nowhere' is not HOST:PORT"),
        "{err}"
    );
    // Defaults: port 443 and path /tentacle; the entry is replaced, not doubled.
    for _ in 0..2 {
        env.ok(&[
            "poll-server",
            "--server-web-socket",
            "wss://octopus.example",
            "--server-thumbprint",
            &tp,
        ]);
    }
    let servers = env.config()["polling_servers"].as_array().unwrap().clone();
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["address"], "wss://octopus.example:443/tentacle");
    env.ok(&[
        "poll-server",
        "--remove",
        "--server-web-socket",
        "wss://octopus.example:443/tentacle",
    ]);
    assert!(env.config()["polling_servers"].is_null());
}
