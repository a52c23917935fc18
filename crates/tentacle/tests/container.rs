//! `tentacle agent --from-env`, the container entrypoint, without a container:
//! the original container's variables in the environment, the "volume" a
//! temporary registry folder kept between starts, and a real server (in this
//! process). The entrypoint is started twice in a row on the same volume: one
//! machine on the server, registered once; changed variables register again,
//! replacing it.
#![allow(clippy::unwrap_used)]
// Children are killed and waited for by `Agent`'s Drop.
#![allow(clippy::zombie_processes)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

struct Agent {
    child: Child,
    out: std::path::PathBuf,
}

impl Agent {
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Stops it as a container engine would (SIGTERM) and waits (bounded).
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + T;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the entrypoint with the container's variables (and nothing else of
/// ours) on the volume `volume`.
fn entrypoint(volume: &Path, run: usize, vars: &[(&str, &str)]) -> Agent {
    let out = volume.with_extension(format!("run{run}.out"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
    c.args(["agent", "--from-env"])
        .env("TENTACLE_CONFIG_DIR", volume)
        .env_remove("RUST_LOG")
        .env_remove("OCTOPUS_API_KEY")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(volume.with_extension(format!("run{run}.err"))).unwrap());
    for (k, v) in vars {
        c.env(k, v);
    }
    Agent {
        child: c.spawn().unwrap(),
        out,
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

/// The machines named `name` on the server, waiting (bounded) for at least one.
async fn machines_named(server: &RunningServer, name: &str, agent: &Agent) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let (_, v) = api(server, reqwest::Method::GET, "/api/machines", None).await;
        let found: Vec<Value> = v
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["name"] == name)
            .cloned()
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no machine '{name}' registered: {}",
            agent.stdout()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy(server: &RunningServer, name: &str) {
    let (s, v) = api(
        server,
        reqwest::Method::POST,
        "/api/tasks/health",
        Some(json!({ "machines": [name] })),
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
        match v["task"]["state"].as_str().unwrap_or("") {
            "Success" => return,
            "Failed" | "Canceled" => panic!("health check of {name}: {v}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_entrypoint_registers_once() {
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
    for env in ["Test", "Prod"] {
        let (s, v) = api(
            &server,
            reqwest::Method::POST,
            "/api/environments",
            Some(json!({"name": env})),
        )
        .await;
        assert_eq!(s, 201, "{v}");
    }
    let url = format!("http://{}", server.api_addr);
    let key = server.admin_api_key.clone().unwrap();
    let comms_port = server.comms_port.to_string();
    let volume = dir.path().join("volume");
    // A polling container (ServerPort set), as documented: ServerUrl, a key,
    // where it belongs, and its name.
    let mut vars = vec![
        ("ACCEPT_EULA", "Y"),
        ("ServerUrl", url.as_str()),
        ("ServerApiKey", key.as_str()),
        ("Space", "Default"),
        ("TargetEnvironment", "Test"),
        ("TargetRole", "container-server,web server"),
        ("TargetName", "ctr-1"),
        ("ServerPort", comms_port.as_str()),
        ("MachinePolicy", "Default Machine Policy"),
    ];

    let first = tokio::task::block_in_place(|| entrypoint(&volume, 1, &vars));
    let found = machines_named(&server, "ctr-1", &first).await;
    assert_eq!(found.len(), 1);
    let id = found[0]["id"].clone();
    assert_eq!(found[0]["kind"], "Polling");
    assert_eq!(found[0]["roles"], json!(["container-server", "web server"]));
    healthy(&server, "ctr-1").await;
    assert!(
        first.stdout().contains("Creating instance 'Tentacle'"),
        "{}",
        first.stdout()
    );
    tokio::task::block_in_place(|| first.stop());

    // Same container restarted on the same volume: nothing registered again.
    let second = tokio::task::block_in_place(|| entrypoint(&volume, 2, &vars));
    healthy(&server, "ctr-1").await;
    let out = second.stdout();
    assert!(
        out.contains("already registered") && !out.contains("Registered '"),
        "{out}"
    );
    let (_, all) = api(&server, reqwest::Method::GET, "/api/machines", None).await;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    assert_eq!(all[0]["id"], id, "the same machine");
    tokio::task::block_in_place(|| second.stop());

    // Changed variables: registered again, replacing the machine (same id).
    vars.retain(|(k, _)| *k != "TargetEnvironment");
    vars.push(("TargetEnvironment", "Prod"));
    let third = tokio::task::block_in_place(|| entrypoint(&volume, 3, &vars));
    let deadline = Instant::now() + T;
    loop {
        let (_, m) = api(&server, reqwest::Method::GET, "/api/machines/ctr-1", None).await;
        if m["environments"] == json!(["Prod"]) {
            assert_eq!(m["id"], id);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not re-registered: {m} {}",
            third.stdout()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        third.stdout().contains("settings changed"),
        "{}",
        third.stdout()
    );
    healthy(&server, "ctr-1").await;
    let (_, all) = api(&server, reqwest::Method::GET, "/api/machines", None).await;
    assert_eq!(all.as_array().unwrap().len(), 1, "{all}");
    drop(third);

    // Missing variables are refused before anything happens, naming the variable.
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_tentacle"))
            .args(["agent", "--from-env"])
            .env("TENTACLE_CONFIG_DIR", dir.path().join("other"))
            .env("ServerUrl", &url)
            .env_remove("ServerApiKey")
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ServerApiKey"), "{err}");
    assert!(!dir.path().join("other").exists(), "nothing created");
    server.stop().await;
}
