//! Tentacle upgrades from the server, with real tentacle processes: an older
//! tentacle (`tentacle-old-for-tests`, version 0.0.1, copied to a folder of
//! its own as `Tentacle`), listening and polling, against a real server (in
//! this process) carrying this build's `tentacle`.
//!
//! - the health check warns "Tentacle upgrade available (0.0.1 -> V)";
//! - a running script holds the upgrade: bounded, then the task fails naming
//!   the script's ticket, and nothing changed;
//! - the upgrade replaces both binaries (the old one kept as
//!   `Tentacle.previous`), the listening one re-executes in place (same
//!   process, its listening socket handed over open), both come back
//!   reporting V, and scripts run again;
//! - a "new" binary that passes the tentacle's checks but exits at once does
//!   not come back: the guard puts the old binary back and starts it, and the
//!   task fails saying so.
#![allow(clippy::unwrap_used, clippy::print_stderr)]
// Children are killed and waited for by `Agent`'s Drop.
#![allow(clippy::zombie_processes)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(180);
const NEW: &str = env!("CARGO_PKG_VERSION");

struct Lab {
    dir: tempfile::TempDir,
    server: RunningServer,
}

impl Lab {
    async fn start(carried: &Path) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let server = start(&RunArgs {
            data: dir.path().join("server"),
            listen: "127.0.0.1:0".parse().unwrap(),
            comms_listen_port: 0,
            comms_listen_address: "127.0.0.1".into(),
            tentacle: Some(carried.to_path_buf()),
            ..RunArgs::default()
        })
        .await
        .unwrap();
        let lab = Lab { dir, server };
        let (s, v) = lab
            .api(
                reqwest::Method::POST,
                "/api/environments",
                Some(json!({"name": "Test"})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        lab
    }

    fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Runs this build's `tentacle` (configuration commands).
    fn tentacle(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_tentacle"))
            .args(args)
            .env("TENTACLE_CONFIG_DIR", self.etc())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "tentacle {args:?}: {text}");
        text
    }

    async fn api(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("http://{}{path}", self.server.api_addr))
            .header(
                "X-Octopus-ApiKey",
                self.server.admin_api_key.as_deref().unwrap(),
            );
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Registers instance `name` (listening on `port`, or polling) and starts
    /// it from a copy of the old tentacle in a folder of its own.
    fn old_agent(&self, name: &str, listening_port: Option<u16>) -> Agent {
        let url = format!("http://{}", self.server.api_addr);
        let key = self.server.admin_api_key.clone().unwrap();
        self.tentacle(&["create-instance", "--instance", name]);
        self.tentacle(&["new-certificate", "--instance", name]);
        let mut reg = vec![
            "register-with".to_string(),
            "--instance".into(),
            name.into(),
            "--server".into(),
            url,
            "--api-key".into(),
            key,
            "--environment".into(),
            "Test".into(),
            "--name".into(),
            name.into(),
            "--server-thumbprint".into(),
            self.server.thumbprint.to_string(),
        ];
        match listening_port {
            Some(port) => {
                self.tentacle(&[
                    "configure",
                    "--instance",
                    name,
                    "--port",
                    &port.to_string(),
                    "--listen-ip",
                    "127.0.0.1",
                ]);
                reg.extend([
                    "--public-hostname".into(),
                    "127.0.0.1".into(),
                    "--tentacle-comms-port".into(),
                    port.to_string(),
                ]);
            }
            None => {
                // Not listening: otherwise every polling tentacle holds port
                // 10933, and two tests running at once collide there.
                self.tentacle(&["configure", "--instance", name, "--no-listen"]);
                reg.extend(["--comms-style".into(), "TentacleActive".into()]);
            }
        }
        let reg: Vec<&str> = reg.iter().map(String::as_str).collect();
        self.tentacle(&reg);
        let bin_dir = self.dir.path().join(format!("opt-{name}"));
        std::fs::create_dir_all(&bin_dir).unwrap();
        let binary = bin_dir.join("Tentacle");
        std::fs::copy(env!("CARGO_BIN_EXE_tentacle-old-for-tests"), &binary).unwrap();
        let out = self.dir.path().join(format!("{name}.out"));
        let child = Command::new(&binary)
            .args(["run", "--instance", name])
            .env("TENTACLE_CONFIG_DIR", self.etc())
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        if let Some(port) = listening_port {
            octo_testkit::wait_for_listener(port, T, name);
        }
        Agent {
            child,
            binary,
            out,
            home: self.home_of(name),
        }
    }

    fn home_of(&self, name: &str) -> PathBuf {
        let cfg: Value = serde_json::from_str(&self.tentacle(&[
            "show-configuration",
            "--instance",
            name,
            "--format",
            "json",
        ]))
        .unwrap();
        PathBuf::from(cfg["tentacle"]["home"].as_str().unwrap())
    }

    /// Starts a task; returns its id.
    async fn task(&self, path: &str, body: Value) -> String {
        let (s, v) = self.api(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(s, 201, "{path}: {v}");
        v["task"]["id"].as_str().unwrap().to_string()
    }

    /// Waits (bounded) for the task's end; returns its state, error and log.
    async fn finished(&self, id: &str) -> (String, String, String) {
        let deadline = Instant::now() + T;
        loop {
            let (_, v) = self
                .api(reqwest::Method::GET, &format!("/api/tasks/{id}"), None)
                .await;
            let state = v["task"]["state"].as_str().unwrap_or("").to_string();
            if matches!(state.as_str(), "Success" | "Failed" | "Canceled") {
                let error = v["task"]["error"].as_str().unwrap_or("").to_string();
                return (state, error, self.log(id).await);
            }
            assert!(
                Instant::now() < deadline,
                "task {id} did not end: {v}\n{}",
                self.log(id).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn log(&self, id: &str) -> String {
        let (_, v) = self
            .api(
                reqwest::Method::GET,
                &format!("/api/tasks/{id}/log?limit=10000"),
                None,
            )
            .await;
        v.as_array()
            .map(|lines| {
                lines
                    .iter()
                    .map(|l| l["text"].as_str().unwrap_or("").to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    async fn machine(&self, name: &str) -> Value {
        self.api(reqwest::Method::GET, &format!("/api/machines/{name}"), None)
            .await
            .1
    }
}

struct Agent {
    child: Child,
    binary: PathBuf,
    out: PathBuf,
    home: PathBuf,
}

impl Agent {
    fn output(&self) -> String {
        format!(
            "{}{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(self.out.with_extension("err")).unwrap_or_default()
        )
    }

    fn previous(&self) -> PathBuf {
        PathBuf::from(format!("{}.previous", self.binary.display()))
    }

    fn record(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.home.join("Upgrade/state.json")).unwrap_or_default(),
        )
        .unwrap_or(Value::Null)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The inode of the socket listening on 127.0.0.1:`port` (`/proc/net/tcp`),
/// which names the socket itself: a socket bound again gets another.
fn listening_socket(port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")).then(|| f[9].to_string())
    })
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_and_polling_tentacles_upgrade_and_come_back_at_the_new_version() {
    let lab = Lab::start(Path::new(env!("CARGO_BIN_EXE_tentacle"))).await;
    let (_, info) = lab.api(reqwest::Method::GET, "/api/server", None).await;
    assert_eq!(info["tentacle_version"], NEW, "{info}");
    let listen_port = free_port();
    let (listening, polling) = tokio::task::block_in_place(|| {
        (
            lab.old_agent("up-listen", Some(listen_port)),
            lab.old_agent("up-poll", None),
        )
    });
    let old = bytes(&listening.binary);
    let socket = listening_socket(listen_port).expect("the old tentacle listens");

    // The health check: healthy, with the warning.
    let id = lab
        .task(
            "/api/tasks/health",
            json!({ "machines": ["up-listen", "up-poll"] }),
        )
        .await;
    let (state, error, log) = lab.finished(&id).await;
    assert_eq!(state, "Success", "{error}\n{log}\n{}", listening.output());
    let warning = format!("Tentacle upgrade available (0.0.1 -> {NEW})");
    for name in ["up-listen", "up-poll"] {
        let m = lab.machine(name).await;
        assert_eq!(m["status"], "Healthy", "{m}");
        assert_eq!(m["tentacle_version"], "0.0.1", "{m}");
        assert!(
            m["status_reason"].as_str().unwrap().contains(&warning),
            "{m}"
        );
    }
    assert!(log.contains(&warning), "{log}");

    // A running script holds the upgrade; bounded, then the task fails naming it.
    let marker = lab.dir.path().join("script-started");
    let script = lab
        .task(
            "/api/tasks/script",
            json!({
                "machines": ["up-listen"],
                "script": format!("touch '{}'; sleep 120", marker.display()),
            }),
        )
        .await;
    let deadline = Instant::now() + T;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the script did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = lab
        .task(
            "/api/tasks/tentacle-upgrade",
            json!({ "machines": ["up-listen"], "wait_for_scripts_s": 1 }),
        )
        .await;
    let (state, error, log) = lab.finished(&id).await;
    assert_eq!(state, "Failed", "{log}");
    assert!(
        log.contains("the tentacle refused the upgrade: script ticket")
            && log.contains("still running after 1 s"),
        "{error}\n{log}"
    );
    assert_eq!(bytes(&listening.binary), old, "nothing changed");
    assert!(!listening.previous().exists());
    let (s, v) = lab
        .api(
            reqwest::Method::POST,
            &format!("/api/tasks/{script}/cancel"),
            None,
        )
        .await;
    assert!(s == 200 || s == 202, "{s} {v}");
    lab.finished(&script).await;

    // The upgrade.
    let id = lab
        .task(
            "/api/tasks/tentacle-upgrade",
            json!({ "machines": ["up-listen", "up-poll"] }),
        )
        .await;
    let (state, error, log) = lab.finished(&id).await;
    assert_eq!(
        state,
        "Success",
        "{error}\n{log}\n--- listening\n{}\n--- polling\n{}",
        listening.output(),
        polling.output()
    );
    assert!(log.contains("SHA-256 verified"), "{log}");
    // How soon each came back (BENCHMARKS.md quotes it).
    for line in log
        .lines()
        .filter(|l| l.contains("answered from its new process"))
    {
        eprintln!("{line}");
    }
    assert_eq!(
        log.matches("the tentacle answered from its new process")
            .count(),
        2,
        "{log}"
    );
    assert!(
        log.contains(&format!("upgraded from 0.0.1 to {NEW}")),
        "{log}"
    );
    let new = bytes(Path::new(env!("CARGO_BIN_EXE_tentacle")));
    for agent in [&listening, &polling] {
        assert_eq!(bytes(&agent.binary), new);
        assert_eq!(bytes(&agent.previous()), old);
        assert_eq!(agent.record()["phase"], "Confirmed", "{}", agent.record());
    }
    for name in ["up-listen", "up-poll"] {
        let m = lab.machine(name).await;
        assert_eq!(m["tentacle_version"], NEW, "{m}");
        assert_eq!(m["status"], "Healthy", "{m}");
        assert!(
            !m["status_reason"]
                .as_str()
                .unwrap()
                .contains("upgrade available"),
            "{m}"
        );
    }
    // Re-executed in place: the process the test started is the new tentacle.
    let mut listening = listening;
    assert!(
        listening.child.try_wait().unwrap().is_none(),
        "{}",
        listening.output()
    );
    let exe = std::fs::read_link(format!("/proc/{}/exe", listening.child.id())).unwrap();
    assert_eq!(exe, listening.binary);
    // Its listening socket was handed over, not closed and bound again: a
    // server dialling during the restart waited in its queue.
    assert_eq!(
        listening_socket(listen_port).as_deref(),
        Some(socket.as_str()),
        "{}",
        listening.output()
    );
    assert!(
        listening
            .output()
            .contains("(a socket passed to it, open across restarts)"),
        "{}",
        listening.output()
    );

    // Scripts run again on both.
    let id = lab
        .task(
            "/api/tasks/script",
            json!({ "machines": ["up-listen", "up-poll"], "script": "echo after-upgrade" }),
        )
        .await;
    let (state, error, log) = lab.finished(&id).await;
    assert_eq!(state, "Success", "{error}\n{log}");
    assert_eq!(log.matches("after-upgrade").count(), 2, "{log}");

    // Nothing to do a second time.
    let id = lab
        .task(
            "/api/tasks/tentacle-upgrade",
            json!({ "machines": ["up-listen"] }),
        )
        .await;
    let (state, _, log) = lab.finished(&id).await;
    assert_eq!(state, "Success", "{log}");
    assert!(
        log.contains("is the server's version; nothing to do"),
        "{log}"
    );
    drop((listening, polling));
    lab.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_tentacle_that_does_not_come_back_is_rolled_back_and_the_task_fails() {
    // The "new" binary answers `version` like a tentacle 99.0.0, so both the
    // server and the tentacle accept it, but exits at once when run.
    let fake_dir = tempfile::tempdir().unwrap();
    let fake = fake_dir.path().join("tentacle");
    std::fs::write(
        &fake,
        "#!/bin/sh\nif [ \"$1\" = version ]; then echo '{\"version\":\"99.0.0\"}'; exit 0; fi\necho 'this tentacle does not start' >&2\nexit 3\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lab = Lab::start(&fake).await;
    let mut agent = tokio::task::block_in_place(|| lab.old_agent("bad-listen", Some(free_port())));
    let old = bytes(&agent.binary);
    let id = lab
        .task(
            "/api/tasks/tentacle-upgrade",
            json!({ "machines": ["bad-listen"], "confirm_within_s": 5 }),
        )
        .await;
    let (state, error, log) = lab.finished(&id).await;
    let record = agent.record();
    assert_eq!(state, "Failed", "{log}\n{}", agent.output());
    assert!(
        log.contains("the tentacle came back as 0.0.1, not 99.0.0")
            && log.contains("ended before the server confirmed version 99.0.0")
            && log.contains("the guard put the previous binary (0.0.1) back"),
        "{error}\n{log}\n{record}\n{}",
        agent.output()
    );
    assert!(
        error.contains("1 of 1 machines failed: bad-listen"),
        "{error}"
    );
    assert_eq!(bytes(&agent.binary), old, "the old binary is back");
    assert_eq!(record["phase"], "Restored", "{record}");
    // The process the test started ran the fake and ended; the guard started
    // the old tentacle again, and it answers.
    let deadline = Instant::now() + T;
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restored = i32::try_from(record["pid"].as_u64().unwrap()).unwrap();
    let m = lab.machine("bad-listen").await;
    assert_eq!(m["tentacle_version"], "0.0.1", "{m}");
    let id = lab
        .task("/api/tasks/health", json!({ "machines": ["bad-listen"] }))
        .await;
    let (state, _, log) = lab.finished(&id).await;
    assert_eq!(state, "Success", "{log}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restored),
        nix::sys::signal::Signal::SIGKILL,
    );
    lab.server.stop().await;
}

/// The id of the task that a health check's log says it started.
fn started_by(log: &str) -> Option<String> {
    let at = log.find("Started task ")? + "Started task ".len();
    log[at..].split_whitespace().next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_upgrades_the_tentacles_whose_machine_policy_says_always() {
    let lab = Lab::start(Path::new(env!("CARGO_BIN_EXE_tentacle"))).await;
    let (s, v) = lab
        .api(
            reqwest::Method::POST,
            "/api/machine-policies",
            Some(json!({"name": "Keep up", "tentacle_update": "Always"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    // auto-a (listening) and auto-b (polling) keep up to date; manual stays
    // on the default policy (Manual).
    let (auto_a, auto_b, manual) = tokio::task::block_in_place(|| {
        (
            lab.old_agent("auto-a", Some(free_port())),
            lab.old_agent("auto-b", None),
            lab.old_agent("manual", Some(free_port())),
        )
    });
    for name in ["auto-a", "auto-b"] {
        let (s, v) = lab
            .api(
                reqwest::Method::PUT,
                &format!("/api/machines/{name}"),
                Some(json!({"policy": "Keep up"})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }

    // auto-a is already being upgraded by hand (held by a running script).
    let marker = lab.dir.path().join("script-started");
    let script = lab
        .task(
            "/api/tasks/script",
            json!({
                "machines": ["auto-a"],
                "script": format!("touch '{}'; sleep 120", marker.display()),
            }),
        )
        .await;
    let deadline = Instant::now() + T;
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the script did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_hand = lab
        .task(
            "/api/tasks/tentacle-upgrade",
            json!({ "machines": ["auto-a"], "wait_for_scripts_s": 120 }),
        )
        .await;

    // The health check starts one upgrade task, for auto-b only: auto-a has
    // an unfinished one, manual's policy says Manual.
    let all = json!({ "machines": ["auto-a", "auto-b", "manual"] });
    let health = lab.task("/api/tasks/health", all.clone()).await;
    let (state, error, log) = lab.finished(&health).await;
    assert_eq!(state, "Success", "{error}\n{log}");
    assert_eq!(log.matches("Started task ").count(), 1, "{log}");
    let auto = started_by(&log).unwrap();
    assert!(
        log.contains(&format!(
            "Started task {auto} to upgrade the tentacle to {NEW} on machine auto-b (their machine policy keeps tentacles up to date)"
        )),
        "{log}"
    );
    let (_, v) = lab
        .api(reqwest::Method::GET, &format!("/api/tasks/{auto}"), None)
        .await;
    assert_eq!(v["task"]["kind"], "TentacleUpgrade", "{v}");
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["machine_name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["auto-b"], "{v}");

    // Let the upgrade by hand go on; both upgrades succeed.
    let (s, v) = lab
        .api(
            reqwest::Method::POST,
            &format!("/api/tasks/{script}/cancel"),
            None,
        )
        .await;
    assert!(s == 200 || s == 202, "{s} {v}");
    for id in [&auto, &by_hand] {
        let (state, error, log) = lab.finished(id).await;
        assert_eq!(
            state,
            "Success",
            "{id}: {error}\n{log}\n--- auto-a\n{}\n--- auto-b\n{}",
            auto_a.output(),
            auto_b.output()
        );
    }
    for (name, version) in [("auto-a", NEW), ("auto-b", NEW), ("manual", "0.0.1")] {
        let m = lab.machine(name).await;
        assert_eq!(m["tentacle_version"], version, "{m}");
    }
    assert_eq!(
        bytes(&manual.binary),
        bytes(Path::new(env!("CARGO_BIN_EXE_tentacle-old-for-tests")))
    );

    // The audit log says the system started it, after which health check.
    let (_, audit) = lab
        .api(reqwest::Method::GET, "/api/audit?limit=100", None)
        .await;
    let event = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["object"] == auto.as_str())
        .unwrap_or_else(|| panic!("no audit event for {auto}: {audit}"));
    assert_eq!(event["username"], "system", "{event}");
    assert_eq!(event["action"], "started", "{event}");
    assert_eq!(
        event["source"],
        format!("health check {health}").as_str(),
        "{event}"
    );

    // Checked again: nothing older under Always, so no task; manual still warns.
    let again = lab.task("/api/tasks/health", all).await;
    let (state, error, log) = lab.finished(&again).await;
    assert_eq!(state, "Success", "{error}\n{log}");
    assert!(!log.contains("Started task"), "{log}");
    assert!(
        log.contains(&format!("Tentacle upgrade available (0.0.1 -> {NEW})")),
        "{log}"
    );
    drop((auto_a, auto_b, manual));
    lab.server.stop().await;
}
