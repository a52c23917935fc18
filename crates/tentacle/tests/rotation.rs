//! `tentacle rotate-certificate` against a real server (in this process) and real
//! tentacle processes, listening and polling: a script running meanwhile
//! succeeds, the server accepts both certificates until the tentacle presents the
//! new one and then forgets the old, a health check afterwards sees the new one,
//! and both steps are in the server's audit log.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

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
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "tentacle {args:?}: {o}{e}");
        o
    }
    fn thumbprint(&self, instance: &str) -> String {
        self.ok(&["show-thumbprint", "--instance", instance])
            .trim()
            .to_string()
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How many of a task's log lines are `text` on standard output.
fn lines(log: &Value, text: &str) -> usize {
    log.as_array()
        .unwrap()
        .iter()
        .filter(|l| l["stream"] == "stdout" && l["text"] == text)
        .count()
}

/// Starts `tentacle run`; returns it and its "started" log line.
fn run_agent(env: &Env, instance: &str) -> (Agent, String) {
    let mut child = env
        .cmd(&["run", "--instance", instance])
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
    let agent = Agent(child);
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the agent starts");
        if line.contains("started:") {
            // Keep draining its log so the pipe never fills.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return (agent, line);
        }
    }
}

struct Api {
    url: String,
    key: String,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .header("X-Octopus-ApiKey", &self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn task(&self, path: &str, body: Value) -> String {
        let (status, task) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!(status == 201 || status == 200, "{status} {task}");
        task["task"]["id"].as_str().unwrap().to_string()
    }

    /// Waits for a task to finish; its state and error.
    async fn finished(&self, id: &str) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let (_, task) = self
                .call(reqwest::Method::GET, &format!("/api/tasks/{id}"), None)
                .await;
            let state = task["task"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !matches!(state.as_str(), "Queued" | "Executing" | "Cancelling") {
                return task;
            }
            if Instant::now() >= deadline {
                let log = self.log(id).await;
                panic!("task {id} still {state}: {task}\nits log: {log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A task's log lines (a JSON array).
    async fn log(&self, id: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("/api/tasks/{id}/log"), None)
            .await
            .1
    }

    /// Follows a task's live log (its server-sent events) until `n` lines of
    /// standard output are `text` (bounded).
    async fn until_logged(&self, id: &str, text: &str, n: usize) {
        let mut resp = reqwest::Client::new()
            .get(format!("{}/api/tasks/{id}/log/stream", self.url))
            .header("X-Octopus-ApiKey", &self.key)
            .send()
            .await
            .unwrap();
        let line = serde_json::to_string(&json!({ "text": text })).unwrap();
        let line = line.trim_start_matches('{').trim_end_matches('}');
        let mut seen = String::new();
        let found = tokio::time::timeout(T, async {
            while seen.matches(line).count() < n {
                match resp.chunk().await.unwrap() {
                    Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                    None => return false,
                }
            }
            true
        })
        .await;
        assert!(
            matches!(found, Ok(true)),
            "{n} lines '{text}' not logged (stream ended or {T:?} passed): {seen}"
        );
    }

    async fn machine(&self, name: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("/api/machines/{name}"), None)
            .await
            .1
    }
}

async fn server(env: &Env) -> (RunningServer, Api) {
    let server = start(&RunArgs {
        data: env.dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let api = Api {
        url: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().unwrap(),
    };
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/api/environments",
            Some(json!({"name": "Test"})),
        )
        .await;
    assert_eq!(status, 201);
    (server, api)
}

/// One tentacle of each kind, registered and running.
async fn tentacles(env: &Env, api: &Api) -> Vec<Agent> {
    // Listening, on a port of its own (it keeps it across restarts).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    env.ok(&["create-instance", "--instance", "L"]);
    env.ok(&["new-certificate", "--instance", "L"]);
    env.ok(&[
        "configure",
        "--instance",
        "L",
        "--port",
        &port,
        "--listen-ip",
        "127.0.0.1",
    ]);
    let register = |instance: &str, name: &str, extra: &[&str]| {
        let mut args = vec![
            "register-with",
            "--instance",
            instance,
            "--server",
            &api.url,
            "--api-key",
            &api.key,
            "--environment",
            "Test",
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        env.ok(&args);
    };
    register(
        "L",
        "rot-listen",
        &[
            "--public-hostname",
            "127.0.0.1",
            "--tentacle-comms-port",
            &port,
        ],
    );
    env.ok(&["create-instance", "--instance", "P"]);
    env.ok(&["new-certificate", "--instance", "P"]);
    env.ok(&["configure", "--instance", "P", "--no-listen"]);
    register("P", "rot-poll", &["--comms-style", "TentacleActive"]);
    let (listening, _) = run_agent(env, "L");
    let (polling, _) = run_agent(env, "P");
    healthy(api).await;
    vec![listening, polling]
}

/// Waits until a health check of every machine in Test succeeds.
async fn healthy(api: &Api) {
    let deadline = Instant::now() + T;
    loop {
        let id = api
            .task("/api/tasks/health", json!({"environment": "Test"}))
            .await;
        let task = api.finished(&id).await;
        if task["task"]["state"] == "Success" {
            break;
        }
        assert!(Instant::now() < deadline, "never healthy: {task}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tentacles_rotate_their_certificates_without_registering_again() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let (_server, api) = server(&env).await;
    let _agents = tentacles(&env, &api).await;
    let old = [env.thumbprint("L"), env.thumbprint("P")];

    // A script runs on both throughout the rotations.
    let script = api
        .task(
            "/api/tasks/script",
            json!({"environment": "Test", "script": "echo started; sleep 6; echo finished"}),
        )
        .await;

    for (instance, machine, old) in [("L", "rot-listen", &old[0]), ("P", "rot-poll", &old[1])] {
        let out = env.ok(&["rotate-certificate", "--instance", instance, "--wait", "50"]);
        assert!(out.contains("Switched"), "{out}");
        let new = env.thumbprint(instance);
        assert_ne!(&new, old);
        assert!(out.contains(&new) && out.contains(old.as_str()), "{out}");
        let shown: Value = serde_json::from_str(&env.ok(&[
            "show-thumbprint",
            "--instance",
            instance,
            "--format",
            "json",
        ]))
        .unwrap();
        assert_eq!(shown["thumbprint"], new.as_str(), "{shown}");
        assert_eq!(
            shown["rotation"]["previous_thumbprint"],
            old.as_str(),
            "{shown}"
        );
        assert_eq!(shown["rotation"]["switched"], true, "{shown}");
        // The server accepted it before the switch: recorded beside the old one
        // (or already taken as the machine's own, if the tentacle reconnected).
        let m = api.machine(machine).await;
        assert!(
            m["next_thumbprint"] == new.as_str() || m["thumbprint"] == new.as_str(),
            "{m}"
        );
    }

    let task = api.finished(&script).await;
    assert_eq!(
        task["task"]["state"], "Success",
        "the script during the rotations: {task}"
    );
    let log = api.log(&script).await;
    let finished = lines(&log, "finished");
    assert_eq!(finished, 2, "both scripts ran to their end: {log}");

    // A health check afterwards: both reached with their new certificates, and
    // the server forgot the old ones.
    let health = api
        .task("/api/tasks/health", json!({"environment": "Test"}))
        .await;
    let task = api.finished(&health).await;
    assert_eq!(task["task"]["state"], "Success", "{task}");
    let log = api.log(&health).await;
    for instance in ["L", "P"] {
        let new = env.thumbprint(instance);
        assert!(
            log.to_string().contains(&format!("certificate {new}")),
            "the health check shows {instance}'s new certificate: {log}"
        );
    }
    for (instance, machine) in [("L", "rot-listen"), ("P", "rot-poll")] {
        let new = env.thumbprint(instance);
        let deadline = Instant::now() + T;
        loop {
            let m = api.machine(machine).await;
            if m["thumbprint"] == new.as_str() && m["next_thumbprint"].is_null() {
                break;
            }
            assert!(Instant::now() < deadline, "not promoted: {m}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_, audit) = api.call(reqwest::Method::GET, "/api/audit", None).await;
    let text = audit.to_string();
    for machine in ["rot-listen", "rot-poll"] {
        let events = audit
            .as_array()
            .or_else(|| audit["items"].as_array())
            .map(|a| {
                a.iter()
                    .filter(|e| e["object"] == machine && e["action"] == "Rotate certificate")
                    .count()
            })
            .unwrap_or_default();
        assert!(
            events >= 2,
            "offer and completion of {machine} audited: {text}"
        );
    }
}

/// Stops `tentacle run` as a service manager does (SIGTERM), bounded.
fn stop_agent(agent: Agent) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.0.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // Its exit, waited for on a thread of its own (bounded here).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut agent = agent;
        let _ = tx.send(agent.0.wait().map(|s| s.to_string()));
    });
    let status = rx.recv_timeout(T).expect("the agent did not stop");
    status.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_follows_its_tentacle_through_a_rotation_and_a_restart() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let (_server, api) = server(&env).await;
    let agents = tentacles(&env, &api).await;
    let script = api
        .task(
            "/api/tasks/script",
            json!({"environment": "Test", "script": "echo started; sleep 60; echo finished"}),
        )
        .await;
    api.until_logged(&script, "started", 2).await;

    // Both rotate, then restart (an upgrade, a reboot): each comes back with
    // only its new certificate, while its step is still following the script.
    for instance in ["L", "P"] {
        let out = env.ok(&["rotate-certificate", "--instance", instance, "--wait", "50"]);
        assert!(out.contains("Switched"), "{out}");
    }
    for agent in agents {
        stop_agent(agent);
    }
    let _l = run_agent(&env, "L");
    let _p = run_agent(&env, "P");

    // Each step reaches its tentacle as it is now registered, and learns how
    // the script ended there (the restart ended it): neither refuses the new
    // certificate (listening) nor waits for the old one (polling).
    let task = api.finished(&script).await;
    let log = api.log(&script).await;
    let text = log.to_string();
    assert_eq!(task["task"]["state"], "Failed", "{task}\n{text}");
    for step in task["steps"].as_array().unwrap() {
        assert_eq!(
            step["exit_code"],
            octo_proto::exit_codes::TENTACLE_RESTARTED,
            "{step}\n{text}"
        );
    }
    for (instance, machine) in [("L", "rot-listen"), ("P", "rot-poll")] {
        let new = env.thumbprint(instance);
        assert!(
            text.contains(&format!(
                "{machine}: its registration changed since the step read it"
            )) && text.contains(&new),
            "{machine} reached with {new}: {text}"
        );
    }
    assert!(!text.contains("presented"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_rotates_its_certificate_and_names_who_did_not_learn_it() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let (server, api) = server(&env).await;
    let agents = tentacles(&env, &api).await;
    // A third tentacle, registered but not running: it cannot learn anything.
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/api/environments",
            Some(json!({"name": "Other"})),
        )
        .await;
    assert_eq!(status, 201);
    env.ok(&["create-instance", "--instance", "Q"]);
    env.ok(&["new-certificate", "--instance", "Q"]);
    env.ok(&[
        "register-with",
        "--instance",
        "Q",
        "--server",
        &api.url,
        "--api-key",
        &api.key,
        "--environment",
        "Other",
        "--name",
        "rot-off",
        "--public-hostname",
        "127.0.0.1",
        "--tentacle-comms-port",
        "9",
    ]);
    let old = server.thumbprint.to_string();

    let (status, report) = api
        .call(
            reqwest::Method::POST,
            "/api/server/rotate-certificate",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    let new = report["thumbprint"].as_str().unwrap().to_string();
    assert_eq!(report["previous_thumbprint"], old.as_str());
    assert_ne!(new, old);
    let by_name = |name: &str| {
        report["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .clone()
    };
    for name in ["rot-listen", "rot-poll"] {
        assert_eq!(by_name(name)["learned"], true, "{report}");
    }
    let off = by_name("rot-off");
    assert_eq!(off["learned"], false, "{report}");
    assert!(
        off["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("tentacle configure --trust {new}")),
        "{off}"
    );
    let (_, info) = api.call(reqwest::Method::GET, "/api/server", None).await;
    assert_eq!(info["thumbprint"], new.as_str());
    let data = env.dir.path().join("server");
    let stored =
        octo_tls::Identity::load(&data.join("server.crt"), &data.join("server.key")).unwrap();
    assert_eq!(stored.thumbprint().to_string(), new);
    assert!(!data.join("server-next.pem").exists());

    // The tentacles learned it in their configuration: restarted, they reach
    // (and are reached by) the server presenting only the new certificate.
    let shown = env.ok(&["show-configuration", "--instance", "P", "--format", "json"]);
    assert!(shown.contains(&new), "{shown}");
    drop(agents);
    let _l = run_agent(&env, "L");
    let _p = run_agent(&env, "P");
    healthy(&api).await;

    let (_, audit) = api.call(reqwest::Method::GET, "/api/audit", None).await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "Rotate certificate"
                && e["kind"] == "Server"
                && e["details"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("not: rot-off")),
        "{audit}"
    );
}
