//! NAT and dead paths, in Linux network namespaces the tests create and remove
//! ([`octo_testkit::netns::NatLab`]): the real `octopus server run` in the
//! "server" namespace, real `tentacle run` agents in the private network behind
//! a masquerading router, registered with the real `tentacle register-with`
//! (through the NAT), tasks driven with the real `octopus` CLI in the server's
//! namespace.
//!
//! - a polling tentacle behind the NAT, which the server cannot dial, receives
//!   tasks;
//! - the path is cut silently (packets dropped at the router) mid-task until both
//!   sides have declared the connection dead (HTTP/2 keepalive), then restored:
//!   the tentacle reconnects and the task finishes with every line exactly once;
//! - a listening tentacle behind the NAT is reported Unavailable by a health
//!   check, promptly, with "timed out" (its private address) or "refused" (the
//!   router's public address), never a hang.
//!
//! Skipped, with a message, only where the OS refuses namespaces. Every wait is
//! bounded and waits for an event (a line a process prints); the length of the
//! cut is decided by what the processes report, not by a sleep.
#![allow(clippy::unwrap_used, clippy::print_stderr)]
// `Proc` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use octo_testkit::netns::NatLab;
use serde_json::Value;

/// Bound on a single wait.
const T: Duration = Duration::from_secs(60);
const API_PORT: u16 = 8080;
const COMMS_PORT: u16 = 10943;
const LISTEN_PORT: u16 = 10933;

/// Builds (once) and returns the `tentacle` binary of this workspace (with the
/// profile of this test).
fn tentacle_bin() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        // target/<profile>/deps/nat-<hash>
        let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The same build as tests/deploy.rs asks for, so whichever test runs
        // second finds everything built.
        cmd.args([
            "build",
            "-q",
            "-p",
            "octo-tentacle",
            "--bin",
            "tentacle",
            "-p",
            "octo-calamari",
            "--bin",
            "calamari",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building tentacle failed");
        let bin = dir.join("tentacle");
        assert!(bin.is_file(), "{bin:?}");
        bin
    })
}

/// Removes proxy variables: everything here is reached directly.
fn no_proxy(cmd: &mut Command) -> &mut Command {
    for v in [
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

/// A line a child printed, or the end of one of its streams.
enum Line {
    Out(String),
    Err(String),
    Eof,
}

/// A child process whose stdout and stderr lines arrive on a channel (and are
/// kept for failure messages); killed when dropped.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<Line>,
    seen: Arc<Mutex<Vec<String>>>,
    open_streams: usize,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = no_proxy(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        fn pump<R: Read + Send + 'static>(
            r: R,
            tx: mpsc::Sender<Line>,
            seen: Arc<Mutex<Vec<String>>>,
            wrap: fn(String) -> Line,
        ) {
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    seen.lock().unwrap().push(l.clone());
                    let _ = tx.send(wrap(l));
                }
                let _ = tx.send(Line::Eof);
            });
        }
        pump(
            child.stdout.take().unwrap(),
            tx.clone(),
            seen.clone(),
            Line::Out,
        );
        pump(child.stderr.take().unwrap(), tx, seen.clone(), Line::Err);
        Proc {
            name: name.to_string(),
            child,
            lines: rx,
            seen,
            open_streams: 2,
        }
    }

    fn output(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for a line (stdout or stderr) that `pred` accepts.
    fn expect(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Out(l) | Line::Err(l)) if pred(&l) => return l,
                Ok(Line::Eof) => self.open_streams -= 1,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line {what} within {within:?}; its output:\n{}",
                    self.name,
                    self.output()
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{}: ended ({:?}) before printing a line {what}; its output:\n{}",
                    self.name,
                    self.child.try_wait(),
                    self.output()
                ),
            }
        }
    }

    /// Waits (bounded) for the child to close its output and exit; returns its
    /// status and stdout lines.
    fn finish(&mut self, within: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while self.open_streams > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(Line::Out(l)) => out.push(l),
                Ok(Line::Err(_)) => {}
                Ok(Line::Eof) | Err(RecvTimeoutError::Disconnected) => self.open_streams -= 1,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: still running after {within:?}; its output:\n{}",
                    self.name,
                    self.output()
                ),
            }
        }
        (self.child.wait().unwrap(), out)
    }
}

/// The NAT lab with a server in its server namespace.
struct Lab {
    // Fields drop in order: processes first, then the namespaces, then files.
    procs: Vec<Proc>,
    server: Proc,
    key: String,
    thumbprint: String,
    nat: NatLab,
    dir: tempfile::TempDir,
}

/// The API as seen from the server's namespace and from behind the NAT.
fn api_url() -> String {
    format!("http://{}:{API_PORT}", NatLab::SERVER_IP)
}

impl Lab {
    /// None (with a message) when the OS refuses namespaces.
    fn start() -> Option<Lab> {
        let tentacle = tentacle_bin();
        assert!(tentacle.is_file());
        let nat = match NatLab::create() {
            Ok(n) => n,
            Err(refused) => {
                eprintln!("SKIPPED: {refused}");
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("server");
        let mut cmd = nat.server.command(env!("CARGO_BIN_EXE_octopus"));
        cmd.args(["server", "run", "--data"])
            .arg(&data)
            .args([
                "--listen",
                &format!("{}:{API_PORT}", NatLab::SERVER_IP),
                "--comms-listen-port",
                &COMMS_PORT.to_string(),
                "--comms-listen-address",
                "0.0.0.0",
            ])
            .env("RUST_LOG", "info");
        let mut server = Proc::spawn("octopus server", &mut cmd);
        let ready = server.expect("'Octopus server ready'", T, |l| {
            l.starts_with("Octopus server ready:")
        });
        let thumbprint = ready.rsplit(' ').next().unwrap().to_string();
        let key = std::fs::read_to_string(data.join("admin-api-key"))
            .unwrap()
            .trim()
            .to_string();
        let lab = Lab {
            procs: Vec::new(),
            server,
            key,
            thumbprint,
            nat,
            dir,
        };
        lab.octopus_ok(&["environment", "create", "Test"]);
        Some(lab)
    }

    /// `octopus ARGS` in the server's namespace (bounded).
    fn octopus(&self, args: &[&str]) -> (ExitStatus, Vec<String>, String) {
        let mut p = self.spawn_octopus(args);
        let (status, out) = p.finish(T * 2);
        let all = p.output();
        (status, out, all)
    }

    fn spawn_octopus(&self, args: &[&str]) -> Proc {
        let mut cmd = self.nat.server.command(env!("CARGO_BIN_EXE_octopus"));
        cmd.args(args)
            .env("OCTOPUS_URL", api_url())
            .env("OCTOPUS_API_KEY", &self.key);
        Proc::spawn(&format!("octopus {}", args.join(" ")), &mut cmd)
    }

    fn octopus_ok(&self, args: &[&str]) -> Vec<String> {
        let (status, out, all) = self.octopus(args);
        assert!(
            status.success(),
            "octopus {args:?} failed ({status}):\n{all}"
        );
        out
    }

    fn tentacle_dir(&self) -> PathBuf {
        self.dir.path().join("tentacles")
    }

    /// `tentacle ARGS` behind the NAT; must succeed.
    fn tentacle_ok(&self, args: &[&str]) {
        let mut cmd = self.nat.inside.command(tentacle_bin());
        cmd.args(args)
            .env("TENTACLE_CONFIG_DIR", self.tentacle_dir());
        let mut p = Proc::spawn(&format!("tentacle {}", args.join(" ")), &mut cmd);
        let (status, _) = p.finish(T);
        assert!(
            status.success(),
            "tentacle {args:?} failed ({status}):\n{}",
            p.output()
        );
    }

    /// Creates, configures and registers instance `name` behind the NAT.
    /// `polling`: polls the server; else listens on LISTEN_PORT and registers
    /// its private address.
    fn register(&self, name: &str, polling: bool) {
        self.tentacle_ok(&["create-instance", "--instance", name]);
        self.tentacle_ok(&["new-certificate", "--instance", name]);
        let port = LISTEN_PORT.to_string();
        let mut configure = vec!["configure", "--instance", name];
        if polling {
            configure.push("--no-listen");
        } else {
            configure.extend(["--port", &port, "--listen-ip", "0.0.0.0"]);
        }
        self.tentacle_ok(&configure);
        let server = api_url();
        let comms = format!("{}:{COMMS_PORT}", NatLab::SERVER_IP);
        let mut reg = vec![
            "register-with",
            "--instance",
            name,
            "--name",
            name,
            "--server",
            &server,
            "--api-key",
            &self.key,
            "--environment",
            "Test",
            "--role",
            "web",
            "--server-thumbprint",
            &self.thumbprint,
        ];
        if polling {
            reg.extend([
                "--comms-style",
                "TentacleActive",
                "--server-comms-address",
                &comms,
            ]);
        } else {
            reg.extend(["--public-hostname", NatLab::INSIDE_IP]);
        }
        self.tentacle_ok(&reg);
    }

    /// Starts `tentacle run --instance NAME` behind the NAT; returns its index
    /// in `procs` once it has started.
    fn run_tentacle(&mut self, name: &str) -> usize {
        let mut cmd = self.nat.inside.command(tentacle_bin());
        cmd.args(["run", "--instance", name])
            .env("TENTACLE_CONFIG_DIR", self.tentacle_dir())
            .env("RUST_LOG", "info,octo_comms=debug");
        let mut p = Proc::spawn(&format!("tentacle run {name}"), &mut cmd);
        p.expect("'started:'", T, |l| l.contains("started:"));
        self.procs.push(p);
        self.procs.len() - 1
    }

    /// Waits for the server to log that a polling tentacle connected.
    fn await_polling_connected(&mut self) {
        self.server.expect("'polling tentacle connected'", T, |l| {
            l.contains("polling tentacle connected")
        });
    }

    fn machine(&self, name: &str) -> Value {
        let out = self.octopus_ok(&["--output", "json", "machine", "show", name]);
        serde_json::from_str(&out.join("\n")).unwrap()
    }
}

/// The stdout texts of a task-following command's JSON lines (one log line each).
fn stdout_texts(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["stream"] == "stdout")
        .map(|v| v["text"].as_str().unwrap().to_string())
        .collect()
}

/// The final `{"task", "steps"}` of a task-following command.
fn final_task(lines: &[String]) -> Value {
    let last = lines.last().map(String::as_str).unwrap_or("null");
    let v: Value = serde_json::from_str(last).unwrap_or(Value::Null);
    assert!(
        v["task"].is_object(),
        "no final task in:\n{}",
        lines.join("\n")
    );
    v
}

#[test]
fn polling_tentacle_behind_nat_receives_tasks() {
    let Some(mut lab) = Lab::start() else { return };
    lab.register("pol", true);
    lab.run_tentacle("pol");
    lab.await_polling_connected();

    let (status, out, all) = lab.octopus(&[
        "--output",
        "json",
        "run-script",
        "--machine",
        "pol",
        "--script",
        "echo \"hello from $(hostname -I | tr -d ' ')\"",
    ]);
    assert!(status.success(), "{all}");
    assert_eq!(final_task(&out)["task"]["state"], "Success", "{all}");
    // The script ran behind the NAT, on the private address.
    assert_eq!(
        stdout_texts(&out),
        vec![format!("hello from {}", NatLab::INSIDE_IP)],
        "{all}"
    );
    // And the server saw the connection come from the router's public address.
    let server_log = lab.server.output();
    assert!(
        server_log.contains(&format!(
            "polling tentacle connected from {}:",
            NatLab::ROUTER_OUTSIDE_IP
        )),
        "{server_log}"
    );
}

#[test]
fn dead_path_mid_task_then_restored_loses_and_repeats_no_line() {
    let Some(mut lab) = Lab::start() else { return };
    lab.register("pol", true);
    let agent = lab.run_tentacle("pol");
    lab.await_polling_connected();

    const LINES: usize = 80;
    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.5; done");
    let mut run = lab.spawn_octopus(&[
        "--output",
        "json",
        "run-script",
        "--machine",
        "pol",
        "--script",
        &script,
    ]);
    run.expect("'line 5'", T, |l| l.contains("\"line 5\""));

    // Cut: packets vanish at the router, both ways. Wait until both ends have
    // given the connection up (HTTP/2 PING unanswered): the cut outlasts the
    // keepalive timeout by construction.
    let cut_at = Instant::now();
    lab.nat.cut();
    lab.server
        .expect("'polling tentacle disconnected'", T, |l| {
            l.contains("polling tentacle disconnected")
        });
    lab.procs[agent].expect("about its polling connection ending", T, |l| {
        l.contains("reconnecting to") || l.contains("polling connection to")
    });
    let cut_for = cut_at.elapsed();
    lab.nat.restore();
    eprintln!("path cut for {cut_for:?}");
    // A silent path is noticed by keepalive only (10 s PING interval + 10 s
    // timeout), never at once as a refused or reset connection would be.
    assert!(
        cut_for >= Duration::from_secs(10),
        "the connection was given up after {cut_for:?}, before any keepalive could expire"
    );

    // The tentacle dials again through the NAT; the task goes on and ends.
    lab.await_polling_connected();
    let (status, out) = run.finish(T * 2);
    let all = run.output();
    assert!(status.success(), "{all}");
    assert_eq!(final_task(&out)["task"]["state"], "Success", "{all}");
    let id = final_task(&out)["task"]["id"].as_str().unwrap().to_string();

    // The stored log: every line once, in order.
    let log = lab.octopus_ok(&["--output", "json", "task", "log", &id]);
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout_texts(&log), expected, "{}", log.join("\n"));
    // What the follower printed live: also once each, in order.
    let printed: Vec<String> = all.lines().map(str::to_string).collect();
    assert_eq!(stdout_texts(&printed), expected, "{all}");
}

#[test]
fn listening_tentacle_behind_nat_is_unavailable_not_hung() {
    let Some(mut lab) = Lab::start() else { return };
    lab.register("lis", false);
    lab.run_tentacle("lis");
    // The same port on the router's public address: nothing forwarded there.
    let other = octo_testkit::identity("elsewhere").thumbprint().to_string();
    let public = format!("https://{}:{LISTEN_PORT}/", NatLab::ROUTER_OUTSIDE_IP);
    lab.octopus_ok(&[
        "machine",
        "add-listening",
        "--name",
        "lis-public",
        "--url",
        &public,
        "--thumbprint",
        &other,
        "--environment",
        "Test",
    ]);

    let started = Instant::now();
    let (status, out, all) = lab.octopus(&["--output", "json", "health-check"]);
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "{all}");
    assert_eq!(final_task(&out)["task"]["state"], "Failed", "{all}");
    // Bounded by the dial timeout (10 s), far below the policy's 60 s.
    assert!(took < Duration::from_secs(30), "health check took {took:?}");

    eprintln!("health check took {took:?}");
    let private = lab.machine("lis");
    assert_eq!(private["status"], "Unavailable", "{private}");
    let reason = private["status_reason"].as_str().unwrap();
    eprintln!("lis: {reason}");
    assert!(
        reason.contains(&format!("{}:{LISTEN_PORT}", NatLab::INSIDE_IP))
            && reason.contains("timed out"),
        "{reason}"
    );
    let public = lab.machine("lis-public");
    assert_eq!(public["status"], "Unavailable", "{public}");
    let reason = public["status_reason"].as_str().unwrap();
    eprintln!("lis-public: {reason}");
    assert!(
        reason.contains(&format!("{}:{LISTEN_PORT}", NatLab::ROUTER_OUTSIDE_IP))
            && reason.contains("refused"),
        "{reason}"
    );
}
