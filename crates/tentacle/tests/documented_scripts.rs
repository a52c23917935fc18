//! The original Tentacle's documented Linux automation scripts, run as written
//! (`tests/documented/`, see its README) with this `tentacle` binary against a
//! real server (in this process), then the documented uninstall.
//!
//! Each script ends with `Tentacle service --install --start`. systemd does not
//! manage the units here (they are written to a temporary folder through
//! `TENTACLE_SYSTEMD_DIR`, and CI machines run no systemd), so that line writes
//! the unit and then fails saying systemd cannot start it and to use
//! `tentacle run`; **the test falls back to `tentacle run`**, as a person would,
//! and checks the machine is healthy. The listening scripts listen on the
//! documented port 10933, so the scripts run one after the other.
#![allow(clippy::unwrap_used)]
// Children are killed and waited for by `Agent`'s Drop.
#![allow(clippy::zombie_processes)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_tentacle");
/// The binary path the documented scripts use.
const DOCUMENTED_BIN: &str = "/opt/octopus/tentacle/Tentacle";
/// Bound on one script and on each wait.
const T: Duration = Duration::from_secs(90);

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/documented")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What one script run printed.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// One script's world: its registry, unit folder, paths, host name, and the
/// tentacle binary it runs.
struct World {
    dir: tempfile::TempDir,
    host: String,
    bin: &'static str,
}

impl World {
    fn new(host: &str, bin: &'static str) -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
            host: host.into(),
            bin,
        }
    }

    fn config_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("etc/octopus/default/tentacle-default.config")
    }

    fn units(&self) -> PathBuf {
        self.dir.path().join("systemd")
    }

    fn env(&self, c: &mut Command) {
        c.env("TENTACLE_CONFIG_DIR", self.dir.path().join("registry"))
            .env("TENTACLE_SYSTEMD_DIR", self.units())
            .env("HOSTNAME", &self.host)
            .env_remove("RUST_LOG")
            .env_remove("OCTOPUS_API_KEY");
    }

    /// Runs the fixture with the documented binary path replaced and the
    /// variables set, under `set -e` (bounded by [`T`]).
    fn script(&self, name: &str, server: &RunningServer) -> Ran {
        let apps = self.dir.path().join("home/Octopus/Applications/");
        let vars = format!(
            "set -eo pipefail\n\
             serverUrl=\"http://{api}\"\n\
             thumbprint=\"{tp}\"\n\
             apiKey=\"{key}\"\n\
             serverCommsPort={comms}\n\
             spaceName=\"Default\"\n\
             name=$HOSTNAME\n\
             environment=\"Test\"\n\
             role=\"web server\"\n\
             workerPool=\"Default Worker Pool\"\n\
             configFilePath=\"{config}\"\n\
             applicationPath=\"{apps}\"\n",
            api = server.api_addr,
            tp = server.thumbprint,
            key = server.admin_api_key.as_deref().unwrap(),
            comms = server.comms_port,
            config = self.config_file().display(),
            apps = apps.display(),
        );
        // Verbatim with the installed package; else with this build's binary.
        let body = fixture(name).replace(DOCUMENTED_BIN, self.bin);
        assert!(
            self.bin == DOCUMENTED_BIN || !body.contains("/opt/octopus"),
            "{body}"
        );
        let mut c = Command::new("bash");
        c.arg("-c").arg(format!("{vars}{body}"));
        self.env(&mut c);
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(T) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("{name} did not finish within {T:?}");
            }
        };
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `tentacle run` for the default instance (what the service would run).
    fn run_agent(&self) -> Agent {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut c = Command::new(self.bin);
        c.arg("run");
        self.env(&mut c);
        Agent(c.stdout(Stdio::null()).stderr(log).spawn().unwrap())
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn api(
    server: &RunningServer,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://{}{path}", server.api_addr))
        .header("X-Octopus-ApiKey", server.admin_api_key.as_deref().unwrap());
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs a health check of one machine and waits (bounded) for its end.
async fn health(server: &RunningServer, machine: &str) -> Value {
    let (s, v) = api(
        server,
        reqwest::Method::POST,
        "/api/tasks/health",
        Some(json!({ "machines": [machine] })),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + T;
    loop {
        let (_, v) = api(
            server,
            reqwest::Method::GET,
            &format!("/api/tasks/{id}"),
            None,
        )
        .await;
        if ["Success", "Failed", "Canceled"].contains(&v["task"]["state"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "health check {id} unfinished: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one documented script and the documented uninstall; checks what the
/// server and the instance look like at each point.
async fn script_as_written(
    server: &RunningServer,
    fixture_name: &str,
    host: &str,
    bin: &'static str,
) {
    let world = World::new(host, bin);
    let ran = tokio::task::block_in_place(|| world.script(fixture_name, server));
    // Every line but the last succeeded; the last (`service --install --start`)
    // wrote the unit and says systemd cannot start it here.
    let unit = world.units().join("tentacle-tentacle.service");
    assert_eq!(ran.code, 1, "{fixture_name}: {ran:#?}");
    assert!(
        ran.stderr.contains("systemd is not running")
            && ran.stderr.contains("tentacle run --instance Tentacle"),
        "{fixture_name}: {ran:#?}"
    );
    assert!(
        ran.stdout.contains(&format!("Wrote {}", unit.display())) && unit.is_file(),
        "{fixture_name}: {ran:#?}"
    );
    assert!(
        ran.stdout.contains(&format!("Registered '{host}'")),
        "{fixture_name}: {ran:#?}"
    );
    assert!(
        world.config_file().is_file(),
        "the documented --config path"
    );

    // The machine as the server sees it: the role with its space kept whole.
    let (s, m) = api(
        server,
        reqwest::Method::GET,
        &format!("/api/machines/{host}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{m}");
    if fixture_name.contains("worker") {
        assert_eq!(m["worker_pool"], "Default Worker Pool", "{m}");
    } else {
        assert_eq!(m["environments"], json!(["Test"]), "{m}");
        assert_eq!(m["roles"], json!(["web server"]), "{m}");
    }
    let polling = fixture_name.starts_with("polling");
    assert_eq!(
        m["kind"],
        if polling { "Polling" } else { "Listening" },
        "{m}"
    );
    if !polling {
        assert!(m["uri"].as_str().unwrap().ends_with(":10933/"), "{m}");
    }

    // systemd cannot start the service here: fall back to `tentacle run`.
    let agent = world.run_agent();
    if !polling {
        // The agent is up once it accepts on the documented port (the server
        // waits for a polling tentacle by itself).
        let deadline = Instant::now() + T;
        while std::net::TcpStream::connect("127.0.0.1:10933").is_err() {
            assert!(
                Instant::now() < deadline,
                "agent not listening: {}",
                world.agent_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let checked = health(server, host).await;
    assert_eq!(
        checked["task"]["state"],
        "Success",
        "{fixture_name}: {checked}\nagent log:\n{}",
        world.agent_log()
    );
    drop(agent);

    // The documented uninstall, as written.
    let gone = tokio::task::block_in_place(|| world.script("uninstall.sh", server));
    assert_eq!(gone.code, 0, "{fixture_name} uninstall: {gone:#?}");
    assert!(
        gone.stdout.contains("nothing to stop")
            && gone.stdout.contains(&format!("Removed {}", unit.display())),
        "{gone:#?}"
    );
    assert!(!unit.exists());
    assert!(
        gone.stdout.contains("Deleted instance 'Tentacle'"),
        "{gone:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_scripts_run_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&RunArgs {
        data: dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let (s, v) = api(
        &server,
        reqwest::Method::POST,
        "/api/environments",
        Some(json!({"name": "Test"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    if std::net::TcpListener::bind("0.0.0.0:10933").is_err() {
        panic!("port 10933 is in use on this machine; the documented listening scripts listen on it (stop what uses it, e.g. a tentacle service, and run the test again)");
    }
    for (fixture_name, host) in [
        ("listening-target.sh", "doc-listening-target"),
        ("polling-target.sh", "doc-polling-target"),
        ("listening-worker.sh", "doc-listening-worker"),
        (
            "listening-worker-archive.sh",
            "doc-listening-worker-archive",
        ),
        ("polling-worker.sh", "doc-polling-worker"),
    ] {
        script_as_written(&server, fixture_name, host, BIN).await;
    }
}

/// The documented listening script and uninstall, verbatim, with the binary of
/// the installed Debian package (`scripts/test-package.sh` installs it and runs
/// this test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the octopus-tentacle package installed: scripts/test-package.sh runs it"]
async fn installed_package_runs_the_documented_listening_script() {
    assert!(
        Path::new(DOCUMENTED_BIN).is_file(),
        "{DOCUMENTED_BIN} is missing: install the package (scripts/test-package.sh)"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = start(&RunArgs {
        data: dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let (s, v) = api(
        &server,
        reqwest::Method::POST,
        "/api/environments",
        Some(json!({"name": "Test"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    script_as_written(
        &server,
        "listening-target.sh",
        "pkg-listening-target",
        DOCUMENTED_BIN,
    )
    .await;
}
