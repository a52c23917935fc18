//! `tentacle check-connectivity` with the real binary against a real server (in
//! this process) and a real tinyproxy: a healthy polling path passes; a stopped
//! server, a wrong server thumbprint, an unregistered tentacle and a wrong proxy
//! password each fail at their step, naming the cause and the fix; a WebSocket
//! path is checked up to the upgrade; a listening port is free before the agent
//! starts and answered by it afterwards.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use octo_server_core::{start, RunArgs, RunningServer};
use octo_testkit::tinyproxy::{Tinyproxy, TinyproxyOptions};
use serde_json::Value;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(30);

/// A tentacle configuration directory and a server.
struct Env {
    dir: tempfile::TempDir,
    server: RunningServer,
    key: String,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let server = timeout(
            T,
            start(&RunArgs {
                data: dir.path().join("server"),
                listen: "127.0.0.1:0".parse().unwrap(),
                comms_listen_port: 0,
                comms_listen_address: "127.0.0.1".into(),
                web_socket_listen_port: Some(0),
                ..RunArgs::default()
            }),
        )
        .await
        .unwrap()
        .unwrap();
        let key = server.admin_api_key.clone().unwrap();
        let env = Env { dir, server, key };
        let resp = reqwest::Client::new()
            .post(format!("{}/api/environments", env.api()))
            .header("X-Octopus-ApiKey", &env.key)
            .json(&serde_json::json!({ "name": "Test" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        env
    }

    fn api(&self) -> String {
        format!("http://{}", self.server.api_addr)
    }

    fn comms(&self) -> String {
        format!("127.0.0.1:{}", self.server.comms_port)
    }

    fn stp(&self) -> String {
        self.server.thumbprint.to_string()
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
        c.args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .stdin(Stdio::null());
        for v in ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            c.env_remove(v);
        }
        c
    }

    /// Runs a command off the async runtime (the server lives on it).
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.cmd(args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap());
        timeout(T * 2, out).await.unwrap().unwrap()
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "tentacle {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A polling instance `pol` with its certificate; not yet polling anyone.
    async fn polling_instance(&self) {
        self.ok(&["create-instance", "--instance", "pol"]).await;
        self.ok(&["new-certificate", "--instance", "pol"]).await;
        self.ok(&["configure", "--instance", "pol", "--no-listen"])
            .await;
    }

    async fn thumbprint(&self) -> String {
        self.ok(&["show-thumbprint", "--instance", "pol"])
            .await
            .trim()
            .to_string()
    }

    /// `check-connectivity` in text and in JSON: (exit code, text, JSON).
    async fn check(&self, instance: &str) -> (i32, String, Value) {
        let text = self
            .run(&["check-connectivity", "--instance", instance])
            .await;
        let json = self
            .run(&[
                "check-connectivity",
                "--instance",
                instance,
                "--format",
                "json",
            ])
            .await;
        assert_eq!(text.status.code(), json.status.code());
        let stdout = String::from_utf8_lossy(&text.stdout).into_owned();
        let v: Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
            panic!(
                "--format json is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&json.stdout)
            )
        });
        (text.status.code().unwrap(), stdout, v)
    }
}

/// The steps of the JSON report's only path, as (name, ok).
fn steps(v: &Value) -> Vec<(String, bool)> {
    let paths = v["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 1, "{v}");
    paths[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["elapsed_ms"].is_u64(), "{s}");
            assert!(s["detail"].is_string(), "{s}");
            (
                s["name"].as_str().unwrap().to_string(),
                s["ok"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The failed step of the JSON report: (name, detail, fix).
fn failed(v: &Value) -> (String, String, String) {
    let step = v["paths"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["ok"] == false)
        .unwrap_or_else(|| panic!("no failed step: {v}"));
    (
        step["name"].as_str().unwrap().to_string(),
        step["detail"].as_str().unwrap().to_string(),
        step["fix"].as_str().unwrap_or_default().to_string(),
    )
}

fn names(list: &[&str]) -> Vec<(String, bool)> {
    list.iter().map(|n| (n.to_string(), true)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_polling_path_passes_every_step() {
    let env = Env::new().await;
    env.polling_instance().await;
    let (api, key, comms, stp) = (env.api(), env.key.clone(), env.comms(), env.stp());
    env.ok(&[
        "register-with",
        "--instance",
        "pol",
        "--name",
        "pol",
        "--server",
        &api,
        "--api-key",
        &key,
        "--environment",
        "Test",
        "--comms-style",
        "TentacleActive",
        "--server-comms-address",
        &comms,
        "--server-thumbprint",
        &stp,
    ])
    .await;

    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["instance"], "pol");
    assert_eq!(v["thumbprint"], env.thumbprint().await.as_str());
    assert_eq!(v["paths"][0]["kind"], "polling");
    assert_eq!(v["paths"][0]["target"], comms.as_str());
    assert_eq!(
        steps(&v),
        names(&["proxy", "dns", "tcp", "tls", "accepted", "session"]),
        "{v}"
    );
    for step in ["proxy", "dns", "tcp", "tls", "accepted", "session"] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("ok") && l.contains(step)),
            "{step}:\n{text}"
        );
    }
    assert!(text.contains("Session/Hello"), "{text}");
    assert!(text.contains("All 1 path(s) ok."), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_socket_path_passes_up_to_the_upgrade_and_names_a_wrong_path() {
    let env = Env::new().await;
    env.polling_instance().await;
    let (api, key, stp) = (env.api(), env.key.clone(), env.stp());
    let url = format!(
        "wss://127.0.0.1:{}/tentacle",
        env.server.web_socket_port.unwrap()
    );
    env.ok(&[
        "register-with",
        "--instance",
        "pol",
        "--name",
        "pol",
        "--server",
        &api,
        "--api-key",
        &key,
        "--environment",
        "Test",
        "--comms-style",
        "TentacleActive",
        "--server-web-socket",
        &url,
        "--server-thumbprint",
        &stp,
    ])
    .await;
    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        steps(&v),
        names(&["proxy", "dns", "tcp", "tls", "websocket"]),
        "{v}"
    );
    assert!(text.contains("accepted the WebSocket"), "{text}");

    // The same server under a path it does not serve.
    let wrong = url.replace("/tentacle", "/nothing-here");
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-web-socket",
        &url,
        "--remove",
    ])
    .await;
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-web-socket",
        &wrong,
        "--server-thumbprint",
        &stp,
    ])
    .await;
    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 1, "{text}");
    let (name, detail, fix) = failed(&v);
    assert_eq!(name, "websocket");
    assert!(detail.contains("404"), "{detail}");
    assert!(fix.contains("/tentacle"), "{fix}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_server_gives_connection_refused_and_the_firewall_fix() {
    let env = Env::new().await;
    env.polling_instance().await;
    let (comms, stp) = (env.comms(), env.stp());
    let port = env.server.comms_port;
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-comms-address",
        &comms,
        "--server-thumbprint",
        &stp,
    ])
    .await;
    let Env { dir, server, key } = env;
    server.stop().await;
    let env = StoppedEnv { dir, _key: key };

    let out = env.run(&["check-connectivity", "--instance", "pol"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("FAILED") && l.contains("tcp")),
        "{text}"
    );
    assert!(text.contains("connection refused"), "{text}");
    assert!(
        text.contains(&format!("open port {port} on the server's firewall")),
        "{text}"
    );
    assert!(text.contains("1 of 1 path(s) FAILED."), "{text}");

    let out = env.run(&[
        "check-connectivity",
        "--instance",
        "pol",
        "--format",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(
        steps(&v),
        vec![
            ("proxy".into(), true),
            ("dns".into(), true),
            ("tcp".into(), false)
        ]
    );
    let (_, detail, fix) = failed(&v);
    assert!(detail.contains("connection refused"), "{detail}");
    assert!(
        fix.contains("is the server running") && fix.contains(&format!("open port {port}")),
        "{fix}"
    );
}

/// What is left of an [`Env`] after its server stopped.
struct StoppedEnv {
    dir: tempfile::TempDir,
    _key: String,
}

impl StoppedEnv {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
        c.args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .stdin(Stdio::null());
        for v in ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            c.env_remove(v);
        }
        c.output().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_server_thumbprint_names_both_thumbprints_and_the_fix() {
    let env = Env::new().await;
    env.polling_instance().await;
    let wrong = octo_testkit::identity("not the server")
        .thumbprint()
        .to_string();
    let (comms, stp) = (env.comms(), env.stp());
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-comms-address",
        &comms,
        "--server-thumbprint",
        &wrong,
    ])
    .await;
    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 1, "{text}");
    let (name, detail, fix) = failed(&v);
    assert_eq!(name, "tls");
    assert!(
        detail.contains(&format!("presented thumbprint {stp}"))
            && detail.contains(&format!("{wrong} is expected")),
        "{detail}"
    );
    assert!(
        fix.contains(&format!(
            "tentacle poll-server --instance pol --server-comms-address {comms} --server-thumbprint {stp}"
        )),
        "{fix}"
    );
    assert!(text.contains(&wrong) && text.contains(&stp), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tentacle_the_server_does_not_know_is_told_to_register() {
    let env = Env::new().await;
    env.polling_instance().await;
    let (comms, stp) = (env.comms(), env.stp());
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-comms-address",
        &comms,
        "--server-thumbprint",
        &stp,
    ])
    .await;
    let ours = env.thumbprint().await;
    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        steps(&v)[..4],
        names(&["proxy", "dns", "tcp", "tls"])[..],
        "{v}"
    );
    let (name, detail, fix) = failed(&v);
    assert_eq!(name, "accepted", "{v}");
    assert!(
        detail.contains("refused this tentacle's certificate") && detail.contains(&ours),
        "{detail}"
    );
    assert!(
        fix.contains("tentacle register-with --instance pol") && fix.contains(&ours),
        "{fix}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_with_a_wrong_password_names_the_proxy_and_its_answer() {
    let env = Env::new().await;
    env.polling_instance().await;
    let (comms, stp) = (env.comms(), env.stp());
    env.ok(&[
        "poll-server",
        "--instance",
        "pol",
        "--server-comms-address",
        &comms,
        "--server-thumbprint",
        &stp,
    ])
    .await;
    let proxy = Tinyproxy::start(&TinyproxyOptions {
        basic_auth: Some(("octo".into(), "right".into())),
        ..TinyproxyOptions::default()
    });
    let port = proxy.addr().port().to_string();
    env.ok(&[
        "polling-proxy",
        "--instance",
        "pol",
        "--proxy-enable",
        "true",
        "--proxy-host",
        "127.0.0.1",
        "--proxy-port",
        &port,
        "--proxy-username",
        "octo",
        "--proxy-password",
        "Xyzzy-bad-pw",
    ])
    .await;
    let (code, text, v) = env.check("pol").await;
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        steps(&v),
        vec![
            ("proxy".into(), true),
            ("dns".into(), true),
            ("tcp".into(), true),
            ("proxy-connect".into(), false)
        ],
        "{v}"
    );
    let (_, detail, fix) = failed(&v);
    assert!(
        detail.contains(&format!("127.0.0.1:{port}"))
            && detail.contains("refused the credentials")
            // tinyproxy answers a wrong password with 401, others with 407.
            && (detail.contains("(401 Unauthorized)") || detail.contains("(407 ")),
        "{detail}"
    );
    assert!(fix.contains("--proxy-password"), "{fix}");
    // The password is never printed.
    assert!(!text.contains("Xyzzy-bad-pw"), "{text}");
    assert!(!v.to_string().contains("Xyzzy-bad-pw"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_port_is_free_before_the_agent_and_answered_by_it_after() {
    let env = Env::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    env.ok(&["create-instance", "--instance", "lis"]).await;
    env.ok(&["new-certificate", "--instance", "lis"]).await;
    let stp = env.stp();
    env.ok(&[
        "configure",
        "--instance",
        "lis",
        "--port",
        &port,
        "--listen-ip",
        "127.0.0.1",
    ])
    .await;

    // Nobody trusted yet: the trust step fails and says how to fix it.
    let (code, text, v) = env.check("lis").await;
    assert_eq!(code, 1, "{text}");
    let (name, _, fix) = failed(&v);
    assert_eq!(name, "trust");
    assert!(
        fix.contains("tentacle configure --instance lis --trust"),
        "{fix}"
    );

    env.ok(&["configure", "--instance", "lis", "--trust", &stp])
        .await;
    let (code, text, v) = env.check("lis").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(v["paths"][0]["kind"], "listening");
    assert_eq!(steps(&v), names(&["trust", "listen"]), "{v}");
    assert!(text.contains(&stp), "{text}");
    assert!(text.contains("is free"), "{text}");

    let _agent = Agent::start(&env, "lis");
    let (code, text, v) = env.check("lis").await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(steps(&v), names(&["trust", "listen", "agent"]), "{v}");
    assert!(text.contains("this instance's agent listens"), "{text}");
}

/// `tentacle run`, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Agent {
    /// Starts the agent and waits (bounded) for its "started:" line.
    fn start(env: &Env, instance: &str) -> Agent {
        let mut child = env
            .cmd(&["run", "--instance", instance])
            .env("RUST_LOG", "info")
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
        let deadline = std::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains("started:") => return agent,
                Ok(_) => {}
                Err(e) => panic!("the agent did not start: {e}"),
            }
        }
    }
}
