//! The real script service, called through the real transport (mutual TLS, HTTP/2,
//! gRPC on 127.0.0.1). Every wait is bounded by a timeout; nothing sleeps to
//! synchronise (scripts sleep inside themselves, and the abandonment test lets a
//! period of time pass because that period *is* the scenario).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use octo_agent::scripts::{ScriptOptions, ScriptServiceImpl};
use octo_agent::AgentContext;
use octo_comms::{Connection, Endpoint, H2Channel, ServerComms, TentacleComms};
use octo_proto::exit_codes::*;
use octo_proto::v1::script_service_client::ScriptServiceClient;
use octo_proto::v1::script_service_server::{ScriptService, ScriptServiceServer};
use octo_proto::v1::*;
use octo_testkit as kit;
use octo_tls::TrustStore;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);

/// A tentacle serving the real script service, and a server connected to it.
struct Tentacle {
    conn: Connection,
    home: PathBuf,
    _server: ServerComms,
    _guards: (kit::Guard, kit::Guard),
}

impl Tentacle {
    async fn new(opts: ScriptOptions) -> (Self, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let t = Self::at(tmp.path(), opts).await;
        (t, tmp)
    }

    /// A tentacle whose home is `root/home` (another instance may have used it).
    async fn at(root: &Path, opts: ScriptOptions) -> Self {
        kit::init_tracing();
        let ctx = context(root);
        let home = ctx.home.clone();
        let svc = ScriptServiceImpl::with_options(ctx, opts);
        let routes = tonic::service::Routes::new(ScriptServiceServer::new(svc));
        let (server_id, tentacle_id) = (kit::identity("server"), kit::identity("tentacle"));
        let trust = TrustStore::new([server_id.thumbprint()], kit::hint("tentacle"));
        let comms = TentacleComms::new(tentacle_id.clone(), trust, routes, "Test");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move { comms.run_listening(listener, stop).await });
        let (server, _, server_guard) = kit::server(server_id, &[]).await;
        let ep =
            Endpoint::listening(&format!("https://{addr}/"), tentacle_id.thumbprint()).unwrap();
        let conn = timeout(T, server.connect(&ep)).await.unwrap().unwrap();
        Self {
            conn,
            home,
            _server: server,
            _guards: (kit::Guard(token), server_guard),
        }
    }

    fn client(&self) -> ScriptServiceClient<H2Channel> {
        self.conn.scripts()
    }

    fn work_dir(&self, ticket: &str) -> PathBuf {
        self.home.join("Work").join(ticket)
    }

    async fn start(&self, req: StartScriptRequest) -> ScriptStatus {
        timeout(T, self.client().start_script(req))
            .await
            .unwrap()
            .unwrap()
            .into_inner()
    }

    async fn status(&self, ticket: &str, since: u64) -> ScriptStatus {
        timeout(
            T,
            self.client().get_status(ScriptStatusRequest {
                ticket: ticket.into(),
                since_sequence: since,
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }

    async fn stream(&self, ticket: &str, since: u64) -> tonic::Streaming<ScriptEvent> {
        timeout(
            T,
            self.client().stream_logs(ScriptStatusRequest {
                ticket: ticket.into(),
                since_sequence: since,
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }

    /// Streams the log from `since` to the end: the lines and the final status.
    async fn finish(&self, ticket: &str, since: u64) -> (Vec<LogLine>, ScriptStatus) {
        let mut s = self.stream(ticket, since).await;
        timeout(T, drain(&mut s)).await.unwrap()
    }

    async fn cancel(&self, ticket: &str) -> ScriptStatus {
        timeout(
            T,
            self.client().cancel_script(CancelScriptRequest {
                ticket: ticket.into(),
                since_sequence: 0,
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }

    async fn complete(&self, ticket: &str, since: u64) -> ScriptStatus {
        timeout(
            T,
            self.client().complete_script(CompleteScriptRequest {
                ticket: ticket.into(),
                since_sequence: since,
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
    }
}

/// Even when a test fails midway (its runtime, and with it the supervisor, gone),
/// no process started by its scripts outlives it: they all carry its TentacleHome.
impl Drop for Tentacle {
    fn drop(&mut self) {
        let mut cookie = b"TentacleHome=".to_vec();
        cookie.extend_from_slice(self.home.as_os_str().as_encoded_bytes());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if env.split(|b| *b == 0).any(|e| e == cookie.as_slice()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn context(root: &Path) -> AgentContext {
    AgentContext {
        instance_name: "Test".into(),
        home: root.join("home"),
        applications: root.join("apps"),
    }
}

fn bash(ticket: &str, body: &str) -> StartScriptRequest {
    StartScriptRequest {
        ticket: ticket.into(),
        script_body: body.into(),
        syntax: ScriptSyntax::Bash as i32,
        ..Default::default()
    }
}

fn full(ticket: &str, body: &str) -> StartScriptRequest {
    StartScriptRequest {
        isolation: IsolationLevel::Full as i32,
        ..bash(ticket, body)
    }
}

/// Reads events to the end of the stream.
async fn drain(s: &mut tonic::Streaming<ScriptEvent>) -> (Vec<LogLine>, ScriptStatus) {
    let mut lines = Vec::new();
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            script_event::Event::Log(l) => lines.push(l),
            script_event::Event::Completed(c) => {
                assert!(s.message().await.unwrap().is_none(), "completed is last");
                return (lines, c);
            }
        }
    }
    panic!("stream ended without a completed event; lines: {lines:?}");
}

/// Reads log events until one satisfies `pred`; returns the lines read.
async fn until(
    s: &mut tonic::Streaming<ScriptEvent>,
    pred: impl Fn(&LogLine) -> bool,
) -> Vec<LogLine> {
    let mut lines = Vec::new();
    let found = timeout(T, async {
        while let Some(ev) = s.message().await.unwrap() {
            match ev.event.unwrap() {
                script_event::Event::Log(l) => {
                    let hit = pred(&l);
                    lines.push(l);
                    if hit {
                        return true;
                    }
                }
                script_event::Event::Completed(c) => panic!("completed early: {c:?}"),
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(found, "stream ended; lines: {lines:?}");
    lines
}

fn texts(lines: &[LogLine], stream: LogStream) -> Vec<&str> {
    lines
        .iter()
        .filter(|l| l.stream == stream as i32)
        .map(|l| l.text.as_str())
        .collect()
}

fn assert_sequences(lines: &[LogLine], from: u64) {
    let seqs: Vec<u64> = lines.iter().map(|l| l.sequence).collect();
    let want: Vec<u64> = (from..from + lines.len() as u64).collect();
    assert_eq!(seqs, want);
}

fn service_text(lines: &[LogLine]) -> String {
    texts(lines, LogStream::Service).join("\n")
}

/// A live process: present in /proc and not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s[s.rfind(')').unwrap() + 1..].trim_start().chars().next();
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// Script fragment: wait (bounded, 20 s) until file `$1` exists.
fn wait_for_file(path: &str) -> String {
    format!("for i in $(seq 1 1000); do [ -e \"{path}\" ] && break; sleep 0.02; done; [ -e \"{path}\" ] || exit 99")
}

#[tokio::test]
async fn exit_codes_output_order_and_wait_ms() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;

    // `true` with wait_ms: complete in one round trip.
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            ..bash("true", "true")
        })
        .await;
    assert_eq!(s.state, ScriptState::Complete as i32);
    assert_eq!(s.exit_code, 0);

    // Exit 3, with stdout and stderr lines in order per stream, one sequence counter.
    let body = "echo out1\necho err1 >&2\necho out2\necho err2 >&2\nprintf 'crlf\\r\\nno-newline'\nexit 3\n";
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            ..bash("three", body)
        })
        .await;
    assert_eq!(s.state, ScriptState::Complete as i32);
    assert_eq!(s.exit_code, 3);
    assert_sequences(&s.logs, 0);
    assert_eq!(s.next_sequence, 6);
    assert!(!s.more_logs);
    assert_eq!(
        texts(&s.logs, LogStream::Stdout),
        vec!["out1", "out2", "crlf", "no-newline"]
    );
    assert_eq!(texts(&s.logs, LogStream::Stderr), vec!["err1", "err2"]);
    assert!(s
        .logs
        .iter()
        .all(|l| l.timestamp_unix_ms > 1_600_000_000_000));

    // Killed by a signal: 128 + signal.
    for (ticket, sig, code) in [("term", "TERM", 143), ("kill", "KILL", 137)] {
        let s = t
            .start(StartScriptRequest {
                wait_ms: 10_000,
                ..bash(ticket, &format!("kill -{sig} $$"))
            })
            .await;
        assert_eq!(
            (s.state, s.exit_code),
            (ScriptState::Complete as i32, code),
            "{s:?}"
        );
    }

    // sh syntax too.
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            syntax: ScriptSyntax::Sh as i32,
            ..bash("sh", "echo from-sh; exit 4")
        })
        .await;
    assert_eq!(s.exit_code, 4);
    assert_eq!(texts(&s.logs, LogStream::Stdout), vec!["from-sh"]);
}

#[tokio::test]
async fn environment_arguments_files_and_python() {
    let (t, tmp) = Tentacle::new(ScriptOptions::default()).await;
    let body = r#"
echo "home=$TentacleHome"
echo "apps=$TentacleApplications"
echo "instance=$TentacleInstanceName"
echo "version=$TentacleVersion"
echo "ticket=$TentacleScriptTicket"
echo "custom=$CUSTOM_VAR"
echo "pwd=$(pwd)"
echo "args=$#:$1|$2"
echo "file=$(cat sub/data.txt)"
read -r line || echo "stdin=eof"
"#;
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            arguments: vec!["a b".into(), "c".into()],
            environment: [("CUSTOM_VAR".to_string(), "xyz".to_string())].into(),
            files: vec![ScriptFile {
                name: "./sub/data.txt".into(),
                contents: b"payload".to_vec(),
            }],
            ..bash("env", body)
        })
        .await;
    assert_eq!(s.exit_code, 0, "{s:?}");
    let out = texts(&s.logs, LogStream::Stdout);
    let ctx = context(tmp.path());
    let want = [
        format!("home={}", ctx.home.display()),
        format!("apps={}", ctx.applications.display()),
        "instance=Test".to_string(),
        format!("version={}", octo_agent::VERSION),
        "ticket=env".to_string(),
        "custom=xyz".to_string(),
        format!("pwd={}", t.work_dir("env").display()),
        "args=2:a b|c".to_string(),
        "file=payload".to_string(),
        "stdin=eof".to_string(),
    ];
    assert_eq!(out, want.iter().map(String::as_str).collect::<Vec<_>>());

    // Python 3, with arguments and the environment.
    let py = "import os, sys\nprint('py', sys.argv[1:], os.environ['TentacleScriptTicket'])\nsys.stderr.write('warn\\n')\nsys.exit(5)\n";
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            syntax: ScriptSyntax::Python3 as i32,
            arguments: vec!["x".into()],
            ..bash("py", py)
        })
        .await;
    assert_eq!(s.exit_code, 5, "{s:?}");
    assert_eq!(texts(&s.logs, LogStream::Stdout), vec!["py ['x'] py"]);
    assert_eq!(texts(&s.logs, LogStream::Stderr), vec!["warn"]);

    // PowerShell where pwsh is not installed (an empty PATH makes sure of it).
    let empty = tmp.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            syntax: ScriptSyntax::Powershell as i32,
            environment: [("PATH".to_string(), empty.display().to_string())].into(),
            ..bash("ps", "Write-Output hi")
        })
        .await;
    assert_eq!(
        (s.state, s.exit_code),
        (ScriptState::Complete as i32, COULD_NOT_START)
    );
    assert!(
        service_text(&s.logs).contains("pwsh is not installed"),
        "{:?}",
        s.logs
    );
}

#[tokio::test]
async fn streaming_is_live_and_resumes_from_a_sequence() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let body = format!("echo first\n{}\necho second\n", wait_for_file("go"));
    let s = t.start(bash("live", &body)).await;
    assert_ne!(s.state, ScriptState::Complete as i32);
    let mut stream = t.stream("live", 0).await;
    // The first line arrives while the script is still blocked on the file.
    let first = until(&mut stream, |l| l.text == "first").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].sequence, 0);
    assert_eq!(t.status("live", 0).await.state, ScriptState::Running as i32);
    std::fs::write(t.work_dir("live").join("go"), b"").unwrap();
    let (rest, done) = timeout(T, drain(&mut stream)).await.unwrap();
    assert_eq!(
        rest.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        vec!["second"]
    );
    assert_eq!(rest[0].sequence, 1);
    assert_eq!((done.exit_code, done.next_sequence), (0, 2));
    assert!(done.logs.is_empty());

    // Lines since N, by status and by stream.
    let s = t.status("live", 1).await;
    assert_eq!(s.logs.len(), 1);
    assert_eq!((s.logs[0].sequence, s.logs[0].text.as_str()), (1, "second"));
    assert_eq!(s.next_sequence, 2);
    let (lines, done) = t.finish("live", 1).await;
    assert_eq!(lines.len(), 1);
    assert_eq!(done.next_sequence, 2);
    let (lines, done) = t.finish("live", 2).await;
    assert!(lines.is_empty());
    assert_eq!(done.state, ScriptState::Complete as i32);
}

#[tokio::test]
async fn start_is_idempotent_on_the_ticket() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let body = format!(
        "echo run >> \"$TentacleHome/runs\"\n{}\n",
        wait_for_file("go")
    );
    let a = t.start(bash("once", &body)).await;
    // The same ticket again (even with another body) returns the same script.
    let b = t.start(bash("once", "echo other; exit 9")).await;
    assert_ne!(b.state, ScriptState::Complete as i32);
    assert_eq!(a.ticket, b.ticket);
    std::fs::write(t.work_dir("once").join("go"), b"").unwrap();
    let (_, done) = t.finish("once", 0).await;
    assert_eq!(done.exit_code, 0);
    let c = t
        .start(StartScriptRequest {
            wait_ms: 1000,
            ..bash("once", "exit 9")
        })
        .await;
    assert_eq!(c.exit_code, 0);
    let runs = std::fs::read_to_string(t.home.join("runs")).unwrap();
    assert_eq!(runs, "run\n");
}

#[tokio::test]
async fn long_lines_are_split_and_binary_output_is_harmless() {
    let (t, _tmp) = Tentacle::new(ScriptOptions {
        max_line_bytes: 1000,
        ..ScriptOptions::default()
    })
    .await;
    let body = "head -c 2500 /dev/zero | tr '\\0' 'x'; echo\n\
                printf 'bin\\xff\\xfe\\x00\\x80end\\n'\n\
                head -c 200000 /dev/urandom\n\
                head -c 50000 /dev/urandom >&2\n\
                echo\necho done\n";
    let s = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            ..bash("long", body)
        })
        .await;
    assert_eq!((s.state, s.exit_code), (ScriptState::Complete as i32, 0));
    let (lines, _) = t.finish("long", 0).await;
    assert_sequences(&lines, 0);
    let out = texts(&lines, LogStream::Stdout);
    assert_eq!(
        out[..3],
        ["x".repeat(1000), "x".repeat(1000), "x".repeat(500)]
    );
    assert!(
        out[3].starts_with("bin") && out[3].ends_with("end"),
        "{:?}",
        out[3]
    );
    assert!(out[3].contains('\u{FFFD}'));
    assert_eq!(out.last(), Some(&"done"));
    assert!(lines.iter().all(|l| l.text.len() <= 3000));
}

#[tokio::test]
async fn many_lines_page_and_a_vanished_stream_blocks_nothing() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    t.start(bash("many", "seq 0 49999")).await;
    // A consumer that reads one event and goes away.
    let mut s = t.stream("many", 0).await;
    until(&mut s, |_| true).await;
    drop(s);
    let (_, done) = t.finish("many", 49_990).await;
    assert_eq!((done.exit_code, done.next_sequence), (0, 50_000));
    // Paging through GetStatus: bounded replies with more_logs, each line once.
    let mut since = 0;
    let mut n = 0;
    let mut replies = 0;
    loop {
        let s = t.status("many", since).await;
        replies += 1;
        assert!(s.logs.len() <= 10_000);
        for l in &s.logs {
            assert_eq!(l.sequence, n);
            assert_eq!(l.text, n.to_string());
            n += 1;
        }
        since = s.next_sequence;
        if !s.more_logs {
            break;
        }
    }
    assert_eq!(n, 50_000);
    assert!(replies >= 5);
}

#[tokio::test]
async fn cancel_kills_the_whole_tree_including_detached_grandchildren() {
    let (t, _tmp) = Tentacle::new(ScriptOptions {
        cancel_grace: Duration::from_millis(500),
        ..ScriptOptions::default()
    })
    .await;
    let body = r#"
echo $$ > main.pid
setsid sh -c 'echo $$ > detached.pid; exec sleep 1000' &
( trap '' TERM; echo $BASHPID > stubborn.pid; while true; do sleep 0.1; done ) &
for i in $(seq 1 500); do [ -s detached.pid ] && [ -s stubborn.pid ] && break; sleep 0.02; done
echo ready
sleep 1000
"#;
    t.start(bash("tree", body)).await;
    let mut s = t.stream("tree", 0).await;
    until(&mut s, |l| l.text == "ready").await;
    let dir = t.work_dir("tree");
    let pids = ["main.pid", "detached.pid", "stubborn.pid"].map(|f| read_pid(&dir.join(f)));
    assert!(pids.iter().all(|p| alive(*p)));

    let began = Instant::now();
    let c = t.cancel("tree").await;
    assert_eq!(c.ticket, "tree");
    let (lines, done) = timeout(T, drain(&mut s)).await.unwrap();
    assert_eq!(
        (done.state, done.exit_code),
        (ScriptState::Complete as i32, CANCELLED)
    );
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "{:?}",
        began.elapsed()
    );
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived the cancel");
    }
    let service = service_text(&lines);
    assert!(service.contains("SIGTERM"), "{service}");
    assert!(service.contains("SIGKILL"), "{service}");
    // Cancel is idempotent.
    let again = t.cancel("tree").await;
    assert_eq!(again.exit_code, CANCELLED);
}

#[tokio::test]
async fn a_background_process_holding_stdout_does_not_hang_completion() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let body = r#"
sleep 1000 &
echo $! > group.pid
setsid sh -c 'echo $$ > detached.pid; exec sleep 1000' &
for i in $(seq 1 500); do [ -s detached.pid ] && break; sleep 0.02; done
echo done
"#;
    let began = Instant::now();
    t.start(bash("bg", body)).await;
    let (lines, done) = t.finish("bg", 0).await;
    assert_eq!(done.exit_code, 0);
    assert!(began.elapsed() < Duration::from_secs(8));
    assert_eq!(texts(&lines, LogStream::Stdout), vec!["done"]);
    let service = service_text(&lines);
    assert!(service.contains("still holds its output open"), "{service}");
    let dir = t.work_dir("bg");
    // Left in the process group: killed. Detached with setsid: left running, by design.
    assert!(!alive(read_pid(&dir.join("group.pid"))));
    let detached = read_pid(&dir.join("detached.pid"));
    assert!(alive(detached));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(detached),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test]
async fn full_isolation_never_overlaps_and_none_does() {
    let (t, tmp) = Tentacle::new(ScriptOptions::default()).await;
    let shared = tmp.path().join("markers");
    let body = r#"echo "start $1" >> "$2"; sleep 0.15; echo "end $1" >> "$2""#;
    let names = ["f1", "f2", "f3", "f4"];
    for n in names {
        t.start(StartScriptRequest {
            arguments: vec![n.into(), shared.display().to_string()],
            ..full(n, body)
        })
        .await;
    }
    let results = futures_util::future::join_all(names.map(|n| t.finish(n, 0))).await;
    assert!(results.iter().all(|(_, s)| s.exit_code == 0));
    let markers = std::fs::read_to_string(&shared).unwrap();
    let lines: Vec<&str> = markers.lines().collect();
    assert_eq!(lines.len(), 8);
    for pair in lines.chunks(2) {
        let who = pair[0].strip_prefix("start ").unwrap();
        assert_eq!(pair[1], format!("end {who}"), "interleaved: {markers}");
    }

    // NONE scripts run at the same time: each waits for the other's marker.
    let dir = tmp.path().join("none");
    std::fs::create_dir_all(&dir).unwrap();
    let body = format!("touch \"$1/$2\"\n{}\n", wait_for_file("$1/$3"));
    for (me, other) in [("n1", "n2"), ("n2", "n1")] {
        t.start(StartScriptRequest {
            isolation: IsolationLevel::None as i32,
            arguments: vec![dir.display().to_string(), me.into(), other.into()],
            ..bash(me, &body)
        })
        .await;
    }
    for n in ["n1", "n2"] {
        let (_, s) = t.finish(n, 0).await;
        assert_eq!(s.exit_code, 0, "{n} never saw the other running");
    }
}

#[tokio::test]
async fn a_waiting_full_script_blocks_later_none_scripts() {
    let (t, tmp) = Tentacle::new(ScriptOptions::default()).await;
    let order = tmp.path().join("order");
    let go = tmp.path().join("go");
    let reader = format!(
        "echo running\n{}\necho \"$1\" >> \"{}\"\n",
        wait_for_file(&go.display().to_string()),
        order.display()
    );
    let none = |ticket: &str| StartScriptRequest {
        isolation: IsolationLevel::None as i32,
        arguments: vec![ticket.into()],
        ..bash(ticket, &reader)
    };
    t.start(none("r1")).await;
    let mut r1 = t.stream("r1", 0).await;
    until(&mut r1, |l| l.text == "running").await;
    t.start(StartScriptRequest {
        arguments: vec!["w".into()],
        ..full("w", &format!("echo \"$1\" >> \"{}\"", order.display()))
    })
    .await;
    let mut w = t.stream("w", 0).await;
    let waiting = until(&mut w, |l| l.stream == LogStream::Service as i32).await;
    assert_eq!(
        waiting.last().unwrap().text,
        "waiting for the isolation mutex 'default' held by ticket r1"
    );
    // A reader arriving after the waiting writer waits too, though only readers hold.
    t.start(none("r2")).await;
    let mut r2 = t.stream("r2", 0).await;
    until(&mut r2, |l| {
        l.text.starts_with("waiting for the isolation mutex")
    })
    .await;
    assert_eq!(t.status("r2", 0).await.state, ScriptState::Pending as i32);
    std::fs::write(&go, b"").unwrap();
    for s in [&mut r1, &mut w, &mut r2] {
        let (_, done) = timeout(T, drain(s)).await.unwrap();
        assert_eq!(done.exit_code, 0);
    }
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "r1\nw\nr2\n");
}

#[tokio::test]
async fn mutex_timeout_cancel_while_pending_and_named_mutexes() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let holder = format!("echo holding\n{}\n", wait_for_file("go"));
    t.start(full("holder", &holder)).await;
    let mut h = t.stream("holder", 0).await;
    until(&mut h, |l| l.text == "holding").await;

    // Gives up after the mutex timeout.
    t.start(StartScriptRequest {
        mutex_timeout_ms: 300,
        ..full("late", "echo never")
    })
    .await;
    let (lines, done) = t.finish("late", 0).await;
    assert_eq!(done.exit_code, MUTEX_TIMEOUT);
    assert!(texts(&lines, LogStream::Stdout).is_empty());
    let service = service_text(&lines);
    assert!(
        service.contains("waiting for the isolation mutex 'default' held by ticket holder"),
        "{service}"
    );
    assert!(service.contains("gave up waiting"), "{service}");

    // Cancelled while pending: leaves the queue at once.
    t.start(full("queued", "echo never")).await;
    let mut q = t.stream("queued", 0).await;
    until(&mut q, |l| l.text.starts_with("waiting for")).await;
    t.cancel("queued").await;
    let (_, done) = timeout(T, drain(&mut q)).await.unwrap();
    assert_eq!(done.exit_code, CANCELLED);

    // Another mutex name is independent.
    let s = t
        .start(StartScriptRequest {
            mutex_name: "other".into(),
            wait_ms: 10_000,
            ..full("elsewhere", "echo ran")
        })
        .await;
    assert_eq!(
        (s.exit_code, texts(&s.logs, LogStream::Stdout)),
        (0, vec!["ran"])
    );

    std::fs::write(t.work_dir("holder").join("go"), b"").unwrap();
    let (_, done) = timeout(T, drain(&mut h)).await.unwrap();
    assert_eq!(done.exit_code, 0);
}

#[tokio::test]
async fn an_abandoned_pending_script_is_cancelled_a_running_one_is_not() {
    let after = Duration::from_millis(300);
    let (t, _tmp) = Tentacle::new(ScriptOptions {
        abandoned_after: after,
        ..ScriptOptions::default()
    })
    .await;
    t.start(full(
        "running",
        &format!("echo holding\n{}\n", wait_for_file("go")),
    ))
    .await;
    let mut r = t.stream("running", 0).await;
    until(&mut r, |l| l.text == "holding").await;
    drop(r);
    let pending = t.start(full("orphan", "echo never")).await;
    assert_eq!(pending.state, ScriptState::Pending as i32);
    // Nobody asks about either script for longer than the abandonment period. (This
    // sleep is the scenario itself, not synchronisation: the rule is judged on
    // elapsed time alone.)
    tokio::time::sleep(after * 3).await;
    let (lines, done) = t.finish("orphan", 0).await;
    assert_eq!(done.exit_code, CANCELLED);
    assert!(service_text(&lines).contains("presumed gone"), "{lines:?}");
    // The running one was left alone and finishes normally.
    assert_eq!(
        t.status("running", 0).await.state,
        ScriptState::Running as i32
    );
    std::fs::write(t.work_dir("running").join("go"), b"").unwrap();
    let (_, done) = t.finish("running", 0).await;
    assert_eq!(done.exit_code, 0);
}

#[tokio::test]
async fn unknown_tickets_and_bad_requests() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let unknown = |s: &ScriptStatus| {
        assert_eq!(
            (s.state, s.exit_code),
            (ScriptState::Complete as i32, UNKNOWN_TICKET)
        );
    };
    unknown(&t.status("nope", 0).await);
    unknown(&t.cancel("nope").await);
    unknown(&t.complete("nope", 0).await);
    let (lines, done) = t.finish("nope", 0).await;
    assert!(lines.is_empty());
    unknown(&done);

    for bad in ["", "..", "a/b", "has space", &"x".repeat(129)] {
        let e = t
            .client()
            .start_script(bash(bad, "true"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(
            e.message().contains("[A-Za-z0-9._-]{1,128}"),
            "{}",
            e.message()
        );
    }
    for name in ["/etc/passwd", "../escape", "a/../../escape", "state.json"] {
        let req = StartScriptRequest {
            files: vec![ScriptFile {
                name: name.into(),
                contents: b"x".to_vec(),
            }],
            ..bash("files", "true")
        };
        let e = t.client().start_script(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}");
        assert!(e.message().contains("invalid file name"), "{}", e.message());
    }
    assert!(!t.home.join("escape").exists());
    let e = t
        .client()
        .start_script(StartScriptRequest {
            syntax: 42,
            ..bash("syntax", "true")
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Rejected requests leave no ticket behind.
    unknown(&t.status("files", 0).await);
}

#[tokio::test]
async fn complete_returns_the_log_and_removes_the_work_directory() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    t.start(bash(
        "job",
        &format!("echo one\n{}\necho two\n", wait_for_file("go")),
    ))
    .await;
    let mut s = t.stream("job", 0).await;
    until(&mut s, |l| l.text == "one").await;
    // Still running: CompleteScript only reports.
    let c = t.complete("job", 0).await;
    assert_eq!(c.state, ScriptState::Running as i32);
    let dir = t.work_dir("job");
    assert!(dir.join("state.json").exists());
    std::fs::write(dir.join("go"), b"").unwrap();
    timeout(T, drain(&mut s)).await.unwrap();
    let c = t.complete("job", 1).await;
    assert_eq!((c.state, c.exit_code), (ScriptState::Complete as i32, 0));
    assert_eq!(
        c.logs.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        vec!["two"]
    );
    assert!(!dir.exists());
    assert_eq!(t.status("job", 0).await.exit_code, UNKNOWN_TICKET);
    // The ticket may be used again.
    let again = t
        .start(StartScriptRequest {
            wait_ms: 10_000,
            ..bash("job", "echo fresh")
        })
        .await;
    assert_eq!(
        texts(&again.logs, LogStream::Stdout),
        vec!["fresh"],
        "{again:?}"
    );
}

/// Instance A runs on its own runtime, which is then shut down while a script runs:
/// as if the tentacle process had stopped. Instance B, on the same home, recovers.
#[tokio::test]
async fn restart_marks_running_scripts_and_keeps_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let ctx = context(&root);
    let pid = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pid = rt.block_on(async {
            let a = ScriptServiceImpl::new(ctx.clone());
            let done = a
                .start_script(tonic::Request::new(StartScriptRequest {
                    wait_ms: 10_000,
                    ..bash("finished", "echo finished\nexit 7")
                }))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(done.exit_code, 7);
            a.start_script(tonic::Request::new(bash(
                "interrupted",
                "echo $$ > main.pid\necho before\nsleep 1000\n",
            )))
            .await
            .unwrap();
            let mut s = a
                .stream_logs(tonic::Request::new(ScriptStatusRequest {
                    ticket: "interrupted".into(),
                    since_sequence: 0,
                }))
                .await
                .unwrap()
                .into_inner();
            use futures_util::StreamExt;
            let first = timeout(T, s.next()).await.unwrap().unwrap().unwrap();
            assert!(
                matches!(first.event, Some(script_event::Event::Log(ref l)) if l.text == "before")
            );
            read_pid(&ctx.work_root().join("interrupted").join("main.pid"))
        });
        drop(rt); // the tentacle "stops": every task of instance A is gone
        pid
    })
    .join()
    .unwrap();
    assert!(alive(pid), "the script outlives its tentacle");
    let state =
        std::fs::read_to_string(context(&root).work_root().join("interrupted/state.json")).unwrap();
    assert!(state.contains("\"running\""), "{state}");
    // A completed script's directory moved aside for deletion, which the
    // stop interrupted: the next start deletes it.
    let aside = context(&root).work_root().join("collected~3");
    std::fs::create_dir_all(aside.join("sub")).unwrap();
    std::fs::write(aside.join("sub/output.log"), b"x").unwrap();

    let b = Tentacle::at(&root, ScriptOptions::default()).await;
    assert!(!aside.exists(), "{} is left", aside.display());
    let s = b.status("interrupted", 0).await;
    assert_eq!(
        (s.state, s.exit_code),
        (ScriptState::Complete as i32, TENTACLE_RESTARTED)
    );
    assert_eq!(s.logs[0].text, "before");
    assert_eq!(s.logs[0].sequence, 0);
    assert!(service_text(&s.logs).contains("restarted"), "{:?}", s.logs);
    assert!(
        !alive(pid),
        "the leftover script process is killed on recovery"
    );
    // Idempotent across the restart: the ticket is known, nothing runs again.
    let again = b.start(bash("interrupted", "echo again")).await;
    assert_eq!(again.exit_code, TENTACLE_RESTARTED);
    // A script that had completed keeps its exit code and log.
    let f = b.status("finished", 0).await;
    assert_eq!(
        (f.exit_code, texts(&f.logs, LogStream::Stdout)),
        (7, vec!["finished"])
    );
    let (lines, done) = b.finish("finished", 0).await;
    assert_eq!((lines.len(), done.exit_code, done.next_sequence), (1, 7, 1));

    // Retention: an instance keeping completed work directories for zero time removes
    // them as it starts.
    let c = Tentacle::at(
        &root,
        ScriptOptions {
            retention: Duration::ZERO,
            ..ScriptOptions::default()
        },
    )
    .await;
    assert_eq!(c.status("finished", 0).await.exit_code, UNKNOWN_TICKET);
    assert!(!c.work_dir("finished").exists());
    assert!(!c.work_dir("interrupted").exists());
}

/// A small tmpfs mounted at a path until dropped (the test runs as root, as
/// the test command does).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs at {} failed (this test needs root, as ./scripts/test.sh runs): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_named_with_where_and_how_much_is_free() {
    let (t, _tmp) = Tentacle::new(ScriptOptions::default()).await;
    let work = t.home.join("Work");
    let _mount = Tmpfs::mount(&work, "64k");
    // Fill it: the script's files cannot be written.
    let filler = vec![0u8; 256 * 1024];
    let _ = std::fs::write(work.join("filler"), &filler);
    let mut req = bash("full-disk", "echo never");
    req.files = vec![ScriptFile {
        name: "big.bin".into(),
        contents: vec![1u8; 128 * 1024],
    }];
    t.start(req).await;
    let (lines, status) = t.finish("full-disk", 0).await;
    assert_eq!(status.exit_code, COULD_NOT_START, "{status:?}");
    let text = service_text(&lines);
    assert!(text.contains("no space left on the device"), "{text}");
    assert!(text.contains("free in"), "{text}");
    assert!(text.contains(&work.display().to_string()), "{text}");
    assert!(!text.contains("shell"), "{text}");
}
