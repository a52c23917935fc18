//! A cluster of real `octopus server run` nodes on one PostgreSQL database (a
//! database of its own in the test process's throwaway cluster), each with
//! its own data directory and nothing shared but the database and the master
//! key and comms certificate a cluster's nodes share; real nginx balancers
//! (`stream`, round robin) in front of their comms ports and API ports. And
//! what the cluster tests do with it: follow a task's events, find the node a
//! polling tentacle is connected to, run real tentacle and calamari binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::zombie_processes)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use octo_comms::{Backoff, PollingTarget, TentacleComms};
use octo_testkit::nginx::Nginx;
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::live::{free_port, Api, ServerProcess};

/// Bound on a wait that includes a node going offline (no heartbeat for 30 s,
/// then the next scan of a surviving node, 5 s apart).
pub const TAKEOVER: Duration = Duration::from_secs(120);

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

pub fn api_addr(p: &ServerProcess) -> SocketAddr {
    p.base.trim_start_matches("http://").parse().unwrap()
}

/// Several nodes on one database, and the balancers in front of them.
pub struct Cluster {
    /// The database URL every node uses.
    pub url: String,
    /// Holds every node's data directory (`<name>`, log in `<name>.stderr`)
    /// and whatever else the test puts there.
    pub tmp: tempfile::TempDir,
    pub names: Vec<String>,
    pub comms_ports: Vec<u16>,
    /// None once killed.
    pub nodes: Vec<Option<ServerProcess>>,
    pub comms_lb: Nginx,
    pub api_lb: Nginx,
    /// The first admin's API key (made by the first node).
    pub key: String,
}

impl Cluster {
    /// `n` nodes `node-a`, `node-b`, ... on a new database, each started with
    /// `extra` arguments too, behind balancers.
    pub fn start(n: usize, extra: &[&str]) -> Self {
        let url = octo_testkit::postgres::shared().create_database();
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..n)
            .map(|i| format!("node-{}", char::from(b'a' + u8::try_from(i).unwrap())))
            .collect();
        let dirs: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
        let mut comms_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            if i > 0 {
                // Nodes share the comms certificate and the master key.
                std::fs::create_dir_all(&dirs[i]).unwrap();
                for f in ["master-key", "server.crt", "server.key"] {
                    std::fs::copy(dirs[0].join(f), dirs[i].join(f)).unwrap();
                }
            }
            let mut args = vec!["--database-url", &url, "--node-name", &names[i]];
            args.extend_from_slice(extra);
            // A free port may be taken by another test before the node binds
            // it: then the node is started again on another.
            let mut tries = 0;
            let node = loop {
                match ServerProcess::try_start_with(&dirs[i], comms_ports[i], &args) {
                    Ok(node) => break node,
                    Err(e) if tries < 2 => {
                        tracing::warn!("{} did not start, trying another port: {e}", names[i]);
                        tries += 1;
                        comms_ports[i] = free_port();
                    }
                    Err(e) => panic!("{}: {e}", names[i]),
                }
            };
            nodes.push(node);
        }
        assert!(nodes.iter().all(|p| p.thumbprint == nodes[0].thumbprint));
        let comms_lb =
            Nginx::round_robin(&comms_ports.iter().map(|&p| loopback(p)).collect::<Vec<_>>());
        let api_lb = Nginx::round_robin(&nodes.iter().map(api_addr).collect::<Vec<_>>());
        let key = std::fs::read_to_string(dirs[0].join("admin-api-key"))
            .unwrap()
            .trim()
            .to_string();
        Cluster {
            url,
            tmp,
            names,
            comms_ports,
            nodes: nodes.into_iter().map(Some).collect(),
            comms_lb,
            api_lb,
            key,
        }
    }

    pub fn dir(&self, i: usize) -> PathBuf {
        self.tmp.path().join(&self.names[i])
    }

    pub fn node(&self, i: usize) -> &ServerProcess {
        self.nodes[i].as_ref().expect("the node was killed")
    }

    pub fn thumbprint(&self) -> octo_tls::Thumbprint {
        self.nodes.iter().flatten().next().unwrap().thumbprint
    }

    pub fn api_of(&self, base: String) -> Api {
        Api {
            base,
            key: self.key.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// The API of node `i` itself.
    pub fn api(&self, i: usize) -> Api {
        self.api_of(self.node(i).base.clone())
    }

    /// The API through its balancer.
    pub fn through_lb(&self) -> Api {
        self.api_of(format!("http://{}", self.api_lb.addr()))
    }

    /// The node whose comms port is `port`.
    pub fn index_of_comms_port(&self, port: u16) -> usize {
        self.comms_ports
            .iter()
            .position(|&p| p == port)
            .unwrap_or_else(|| panic!("no node listens on comms port {port}"))
    }

    /// SIGKILL of node `i`: no shutdown code runs.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].take().expect("the node was killed").kill9();
    }
}

/// A polling tentacle's loop, polling one address until stopped.
pub struct Polling {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Polling {
    /// `comms` polls `address` as subscription `subscription`.
    pub fn start(comms: &TentacleComms, address: String, subscription: &str) -> Self {
        let token = CancellationToken::new();
        let target = PollingTarget {
            address,
            subscription_id: subscription.into(),
        };
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let (c, t) = (comms.clone(), token.clone());
        let handle = tokio::spawn(async move {
            let _ = c.run_polling(target, 1, backoff, t).await;
        });
        Polling { token, handle }
    }

    /// Stops polling (bounded).
    pub async fn stop(self) {
        self.token.cancel();
        timeout(Duration::from_secs(30), self.handle)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Reads a task's server-sent events through `api` until its end event
/// (bounded by `within`): the stdout lines the stream delivered, in order,
/// and the end event.
pub async fn follow(api: &Api, id: &str, within: Duration) -> (Vec<String>, Value) {
    let mut events = api.events(id).await;
    let mut lines = Vec::new();
    let end = timeout(within, async {
        loop {
            let (name, data) = events.next().await.expect("the event stream ended early");
            if name == "log" && data["stream"] == "stdout" {
                lines.push(data["text"].as_str().unwrap().to_string());
            }
            if name == "end" {
                return data;
            }
        }
    })
    .await
    .expect("the task did not end in time");
    (lines, end)
}

/// Once polling machine `machine` is connected (a health check of it through
/// `api` succeeds), the port of the node nginx relayed its live connection
/// to: the last one it relayed.
pub async fn holder_port(api: &Api, lb: &Nginx, machine: &str) -> u16 {
    let (status, v) = api
        .post("/api/tasks/health", json!({ "machines": [machine] }))
        .await;
    assert_eq!(status, 201, "{v}");
    let health = v["task"]["id"].as_str().unwrap().to_string();
    let (_, end) = follow(api, &health, Duration::from_secs(60)).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    lb.upstreams()
        .last()
        .expect("nginx relayed the tentacle")
        .port()
}

/// The server's own lines of a log.
pub fn server_lines(log: &[Value]) -> Vec<String> {
    log.iter()
        .filter(|l| l["stream"] == "server")
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

/// Builds (once) the `tentacle` and `calamari` binaries of this workspace.
pub fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "octo-tentacle", "--bin", "tentacle"])
            .args(["-p", "octo-calamari", "--bin", "calamari"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building tentacle and calamari"
        );
        (dir.join("tentacle"), dir.join("calamari"))
    })
}

/// A process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real listening tentacle (the `tentacle` binary, instance `name`, its
/// configuration under `dir`), on a free port of 127.0.0.1, registered
/// through `api` as machine `name` (role `web`) in `environment`, running.
/// Its home is `dir/<name>/home`.
pub struct ListeningTentacle {
    pub port: u16,
    pub home: PathBuf,
    _process: Killed,
}

impl ListeningTentacle {
    pub fn start(dir: &Path, name: &str, api: &Api, thumbprint: &str, environment: &str) -> Self {
        let port = free_port();
        Self::start_at(dir, name, api, thumbprint, environment, port, port)
    }

    /// As [`ListeningTentacle::start`], listening on `port` but registered
    /// as reached at `public_port` of 127.0.0.1 (a relay in front of it).
    pub fn start_at(
        dir: &Path,
        name: &str,
        api: &Api,
        thumbprint: &str,
        environment: &str,
        port: u16,
        public_port: u16,
    ) -> Self {
        let (tentacle, _) = binaries().clone();
        let tent = |args: &[&str]| {
            let mut c = Command::new(&tentacle);
            c.args(args).env("TENTACLE_CONFIG_DIR", dir);
            c
        };
        let ok = |args: &[&str]| {
            let out = tent(args).output().unwrap();
            assert!(out.status.success(), "tentacle {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let port_text = port.to_string();
        ok(&["create-instance", "--instance", name]);
        let made = ok(&["new-certificate", "--instance", name]);
        ok(&[
            "configure",
            "--instance",
            name,
            "--port",
            &port_text,
            "--listen-ip",
            "127.0.0.1",
        ]);
        if public_port == port {
            ok(&[
                "register-with",
                "--instance",
                name,
                "--name",
                name,
                "--public-hostname",
                "127.0.0.1",
                "--server",
                &api.base,
                "--api-key",
                &api.key,
                "--environment",
                environment,
                "--role",
                "web",
                "--server-thumbprint",
                thumbprint,
            ]);
        } else {
            let own = made
                .lines()
                .find_map(|l| l.strip_prefix("Thumbprint: "))
                .unwrap_or_else(|| panic!("no thumbprint in {made}"))
                .trim()
                .to_string();
            ok(&["configure", "--instance", name, "--trust", thumbprint]);
            let url = format!("https://127.0.0.1:{public_port}/");
            super::run(
                &[],
                &[
                    "--server",
                    &api.base,
                    "--api-key",
                    &api.key,
                    "machine",
                    "add-listening",
                    "--name",
                    name,
                    "--url",
                    &url,
                    "--thumbprint",
                    &own,
                    "--environment",
                    environment,
                    "--role",
                    "web",
                ],
                None,
            )
            .ok();
        }
        let process = Killed(
            tent(&["run", "--instance", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        octo_testkit::wait_for_listener(port, Duration::from_secs(60), name);
        ListeningTentacle {
            port,
            home: dir.join(name).join("home"),
            _process: process,
        }
    }
}
