//! A server with the portal (in this process, from the library) and real
//! tentacles (`tentacle run` processes of this workspace): `web-1` listening
//! and `web-2` polling, registered with the real `tentacle register-with`, and
//! on request more listening tentacles that are set up but not registered
//! (for the portal's Discover flow). The real `calamari` is pushed to them.
#![allow(dead_code, clippy::unwrap_used, clippy::zombie_processes)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use octo_server_core::{start_with, RunArgs, RunningServer};
use serde_json::{json, Value};

/// Bound on any one request or start.
pub const T: Duration = Duration::from_secs(120);

/// Builds (once) the `tentacle` and `calamari` binaries of this workspace.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>-<hash>
        let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
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
        assert!(
            cmd.status().unwrap().success(),
            "building tentacle and calamari failed"
        );
        let bins = (dir.join("tentacle"), dir.join("calamari"));
        assert!(bins.0.is_file() && bins.1.is_file(), "{bins:?}");
        bins
    })
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The server, its tentacles and an administrator who signs in with a password.
pub struct Lab {
    pub server: RunningServer,
    /// `http://127.0.0.1:PORT` (API and portal).
    pub base: String,
    pub key: String,
    pub admin: (String, String),
    tdir: PathBuf,
    agents: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Lab {
    /// A server with the environment `Test`, the administrator `alice`, and
    /// two running tentacles registered in `Test` with role `web`.
    pub async fn new() -> Lab {
        let (_, calamari) = binaries().clone();
        let dir = tempfile::tempdir().unwrap();
        let args = RunArgs {
            calamari: Some(calamari),
            ..RunArgs::loopback(&dir.path().join("server"))
        };
        let server = tokio::time::timeout(T, start_with(&args, octo_portal::router))
            .await
            .unwrap()
            .unwrap();
        let mut lab = Lab {
            base: format!("http://{}", server.api_addr),
            key: server.admin_api_key.clone().unwrap(),
            admin: ("alice".into(), "alice-password-1".into()),
            tdir: dir.path().join("tentacles"),
            agents: Vec::new(),
            server,
            dir,
        };
        let (s, b) = lab
            .api("POST", "/api/environments", Some(json!({"name": "Test"})))
            .await;
        assert_eq!(s, 201, "{b}");
        let (user, password) = lab.admin.clone();
        lab.user(&user, &password, None).await;
        let (s, b) = lab
            .api(
                "POST",
                "/api/teams/Octopus%20Administrators/members",
                Some(json!({"username": user})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        lab.tentacle("web-1", true, true);
        lab.tentacle("web-2", false, true);
        lab
    }

    /// Calls the API as the first administrator.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method.parse().unwrap(), format!("{}{path}", self.base))
            .header("X-Octopus-ApiKey", &self.key)
            .timeout(T);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A user with a password; with `role`, a team of their own holding it
    /// in the Default space.
    pub async fn user(&self, name: &str, password: &str, role: Option<&str>) {
        let (s, b) = self
            .api(
                "POST",
                "/api/users",
                Some(json!({"username": name, "password": password})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        if let Some(role) = role {
            let team = format!("{name}-team");
            let (s, b) = self
                .api("POST", "/api/teams", Some(json!({"name": team})))
                .await;
            assert_eq!(s, 201, "{b}");
            let (s, b) = self
                .api(
                    "POST",
                    &format!("/api/teams/{team}/members"),
                    Some(json!({"username": name})),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            let (s, b) = self
                .api(
                    "POST",
                    &format!("/api/teams/{team}/grants"),
                    Some(json!({"role": role})),
                )
                .await;
            assert_eq!(s, 201, "{b}");
        }
    }

    fn tent(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&binaries().0);
        c.args(args).env("TENTACLE_CONFIG_DIR", &self.tdir);
        c
    }

    /// Sets up and runs a tentacle instance `name` (listening on a free
    /// loopback port, or polling); with `register`, registers it in `Test`
    /// with role `web`, else only trusts this server. Returns the listening
    /// port (0 for polling) and its thumbprint.
    pub fn tentacle(&mut self, name: &str, listening: bool, register: bool) -> (u16, String) {
        let port = if listening { free_port() } else { 0 };
        let port_text = port.to_string();
        run_ok(&mut self.tent(&["create-instance", "--instance", name]));
        run_ok(&mut self.tent(&["new-certificate", "--instance", name]));
        let mut cfg = vec!["configure", "--instance", name];
        if listening {
            cfg.extend(["--port", port_text.as_str(), "--listen-ip", "127.0.0.1"]);
        } else {
            cfg.push("--no-listen");
        }
        run_ok(&mut self.tent(&cfg));
        let stp = self.server.thumbprint.to_string();
        if register {
            let comms = format!("127.0.0.1:{}", self.server.comms_port);
            let mut reg = vec![
                "register-with",
                "--instance",
                name,
                "--name",
                name,
                "--server",
                self.base.as_str(),
                "--api-key",
                self.key.as_str(),
                "--environment",
                "Test",
                "--role",
                "web",
                "--server-thumbprint",
                stp.as_str(),
            ];
            if listening {
                reg.extend(["--public-hostname", "127.0.0.1"]);
            } else {
                reg.extend([
                    "--comms-style",
                    "TentacleActive",
                    "--server-comms-address",
                    comms.as_str(),
                ]);
            }
            run_ok(&mut self.tent(&reg));
        } else {
            run_ok(&mut self.tent(&["configure", "--instance", name, "--trust", &stp]));
        }
        let thumbprint = run_ok(&mut self.tent(&["show-thumbprint", "--instance", name]))
            .split_whitespace()
            .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
            .unwrap()
            .to_string();
        self.run_agent(name);
        if listening {
            octo_testkit::wait_for_listener(port, Duration::from_secs(60), name);
        }
        (port, thumbprint)
    }

    /// Starts `tentacle run` for an instance already set up.
    pub fn run_agent(&mut self, name: &str) {
        let log = std::fs::File::create(self.tdir.join(format!("{name}.out"))).unwrap();
        let child = self
            .tent(&["run", "--instance", name])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push(child);
    }

    /// Runs shell commands as a person would paste them: `tentacle` on the
    /// PATH, the lab's tentacle configuration. Panics unless they succeed.
    pub fn shell(&self, script: &str) -> String {
        let bin_dir = binaries().0.parent().unwrap().to_path_buf();
        let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .unwrap();
        run_ok(
            Command::new("sh")
                .arg("-ec")
                .arg(script)
                .env("PATH", path)
                .env("TENTACLE_CONFIG_DIR", &self.tdir),
        )
    }

    /// Checks the health of every machine; returns the finished task.
    pub async fn health_check(&self) -> Value {
        let (s, b) = self.api("POST", "/api/tasks/health", Some(json!({}))).await;
        assert_eq!(s, 201, "{b}");
        self.wait_task(b["task"]["id"].as_str().unwrap()).await
    }

    /// Waits (bounded) until the task is final; returns its view.
    pub async fn wait_task(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + T;
        loop {
            let (_, v) = self.api("GET", &format!("/api/tasks/{id}"), None).await;
            let state = v["task"]["state"].as_str().unwrap_or("").to_string();
            if ["Success", "Failed", "Canceled"].contains(&state.as_str()) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {id} still {state} after {T:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
