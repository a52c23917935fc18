//! Rules that hold across the nodes of a cluster, with two nodes started in
//! this process on one PostgreSQL database (a database of its own in the test
//! process's throwaway cluster), sharing the master key and the comms
//! certificate as a cluster's nodes do, and two polling tentacles with the
//! real agent services (capabilities, scripts, files) over the real
//! transport: `pa` connected to node A, `pb` to node B.
//!
//! - A node at its task cap passes a new task to a node with room; with no
//!   room anywhere it waits, Queued, and the first node with room takes it.
//! - A value a step marks sensitive on one node is masked in the lines the
//!   task's other steps write on the other node.
//! - A guided-failure decision asked through the other node is delivered
//!   where the step waits and confirmed; one for a step that is not waiting
//!   is refused (409).
//! - Deleting a machine through one node stops its step running on the other
//!   at once.
//!
//! Every wait is bounded; nothing sleeps to synchronise (scripts wait for
//! gate files the test creates).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{tar_gz_files, Api, Body};
use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::files::FileServiceImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::AgentContext;
use octo_comms::{Backoff, PollingTarget, TentacleComms};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::file_service_server::FileServiceServer;
use octo_proto::v1::script_service_server::ScriptServiceServer;
use octo_server_core::{start, RunArgs, RunningServer};
use octo_testkit as kit;
use octo_tls::{Thumbprint, TrustStore};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on any single wait.
const T: Duration = Duration::from_secs(60);

/// Builds (once) this workspace's `calamari`, which the nodes push.
fn calamari() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-q", "-p", "octo-calamari", "--bin", "calamari"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building calamari");
        dir.join("calamari")
    })
    .clone()
}

/// A node of the cluster, started in this process.
struct Node {
    running: Option<RunningServer>,
    api: Api,
}

impl Node {
    async fn start(data: &Path, url: &str, name: &str, key: Option<&str>) -> Node {
        let args = RunArgs {
            database_url: Some(url.to_string()),
            node_name: Some(name.to_string()),
            task_cap: 1,
            calamari: Some(calamari()),
            ..RunArgs::loopback(data)
        };
        let running = timeout(T, start(&args)).await.unwrap().unwrap();
        let key = key
            .map(str::to_string)
            .or_else(|| running.admin_api_key.clone());
        let api = Api::new(&format!("http://{}", running.api_addr), key);
        Node {
            running: Some(running),
            api,
        }
    }

    fn comms_port(&self) -> u16 {
        self.running.as_ref().unwrap().comms_port
    }

    fn thumbprint(&self) -> Thumbprint {
        self.running.as_ref().unwrap().thumbprint
    }

    async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            timeout(T, r.stop()).await.unwrap();
        }
    }
}

/// A polling tentacle with the real services, its home under `dir/tentacle-NAME`.
struct Polling {
    token: CancellationToken,
}

impl Drop for Polling {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn polling(dir: &Path, name: &str, server: Thumbprint, port: u16) -> (Polling, Thumbprint) {
    let root = dir.join(format!("tentacle-{name}"));
    let ctx = AgentContext {
        instance_name: name.to_string(),
        home: root.join("home"),
        applications: root.join("apps"),
    };
    std::fs::create_dir_all(&ctx.home).unwrap();
    std::fs::create_dir_all(&ctx.applications).unwrap();
    let identity = kit::identity(name);
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(
                ScriptServiceServer::new(ScriptServiceImpl::new(ctx.clone()))
                    .max_decoding_message_size(64 << 20),
            )
            .add_service(
                FileServiceServer::new(FileServiceImpl::new(ctx))
                    .max_decoding_message_size(64 << 20),
            );
    let comms = TentacleComms::new(
        identity.clone(),
        TrustStore::new([server], kit::hint("tentacle")),
        routes,
        name,
    );
    let token = CancellationToken::new();
    let target = PollingTarget {
        address: format!("127.0.0.1:{port}"),
        subscription_id: format!("sub-{name}"),
    };
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
    let t = token.clone();
    tokio::spawn(async move {
        let _ = comms.run_polling(target, 1, backoff, t).await;
    });
    (Polling { token }, identity.thumbprint())
}

/// Polls `check` every 100 ms until it gives a value (bounded by [`T`]).
async fn eventually<F, Fut, R>(what: &str, mut check: F) -> R
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<R>>,
{
    let deadline = Instant::now() + T;
    loop {
        if let Some(r) = check().await {
            return r;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn task(api: &Api, id: &str) -> Value {
    api.get(&format!("/api/tasks/{id}")).await.expect(200)
}

/// The task's answer once it ended.
async fn ended(api: &Api, id: &str) -> Value {
    eventually(&format!("task {id} to end"), || async {
        let t = task(api, id).await;
        let state = t["task"]["state"].as_str().unwrap().to_string();
        ["Success", "Failed", "Canceled"]
            .contains(&state.as_str())
            .then_some(t)
    })
    .await
}

/// Every line of the task's log (text only), in order.
async fn lines(api: &Api, id: &str) -> Vec<String> {
    let v = api
        .get(&format!("/api/tasks/{id}/log?limit=10000"))
        .await
        .expect(200);
    let items = v["lines"].as_array().or(v.as_array()).unwrap().clone();
    items
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until a line of the task's log contains `text`; all lines then.
async fn until_line(api: &Api, id: &str, text: &str) -> Vec<String> {
    eventually(&format!("'{text}' in task {id}'s log"), || async {
        let all = lines(api, id).await;
        all.iter().any(|l| l.contains(text)).then_some(all)
    })
    .await
}

async fn script(api: &Api, machine: &str, script: &str) -> String {
    let v = api
        .post(
            "/api/tasks/script",
            // Scripts of one tentacle may run at once (the tests hold some).
            json!({ "script": script, "machines": [machine], "isolation": "none" }),
        )
        .await
        .expect(201);
    v["task"]["id"].as_str().unwrap().to_string()
}

/// Pushes package `id` 1.0.0 holding `deploy` as its Deploy.sh through
/// `push_to`, then starts its deployment to Test through `deploy_on` with
/// the request's `extra` fields; the task's id.
async fn deploy(push_to: &Api, deploy_on: &Api, id: &str, deploy: &str, extra: Value) -> String {
    let pkg = tar_gz_files(&[("Deploy.sh", deploy.as_bytes(), 0o755)]);
    push_to
        .call(
            Method::POST,
            &format!("/api/packages?package_id={id}&version=1.0.0"),
            Body::Bytes(pkg),
        )
        .await
        .expect(201);
    let mut body = json!({ "package_id": id, "environment": "Test" });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let v = deploy_on.post("/api/tasks/deploy", body).await.expect(201);
    v["task"]["id"].as_str().unwrap().to_string()
}

/// Waits until machine `machine`'s step of task `id` is in `state`.
async fn until_step(api: &Api, id: &str, machine: &str, state: &str) {
    eventually(
        &format!("{machine}'s step of {id} to be {state}"),
        || async {
            let t = task(api, id).await;
            let steps = t["steps"].as_array().unwrap().clone();
            steps
                .iter()
                .any(|s| s["machine_name"] == machine && s["state"] == state)
                .then_some(())
        },
    )
    .await;
}

/// A script that waits (bounded) for `gate` to exist, then prints `done`.
fn gated(first: &str, gate: &Path, done: &str) -> String {
    format!(
        "echo {first}; for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.05; done; echo {done}",
        gate.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_masks_guidance_and_deletes_hold_across_nodes() {
    kit::init_tracing();
    let url = kit::postgres::shared().create_database();
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut a = Node::start(&da, &url, "node-a", None).await;
    // Nodes share the comms certificate and the master key.
    std::fs::create_dir_all(&db).unwrap();
    for f in ["master-key", "server.crt", "server.key"] {
        std::fs::copy(da.join(f), db.join(f)).unwrap();
    }
    let key = a.api.key.clone();
    let mut b = Node::start(&db, &url, "node-b", key.as_deref()).await;
    assert_eq!(a.thumbprint(), b.thumbprint());
    a.api
        .post("/api/environments", json!({ "name": "Test" }))
        .await
        .expect(201);
    let (pa, pa_tp) = polling(tmp.path(), "pa", a.thumbprint(), a.comms_port());
    let (pb, pb_tp) = polling(tmp.path(), "pb", b.thumbprint(), b.comms_port());
    for (name, tp) in [("pa", pa_tp), ("pb", pb_tp)] {
        a.api
            .post(
                "/api/machines",
                json!({
                    "name": name,
                    "comms_style": "TentacleActive",
                    "uri": format!("poll://sub-{name}/"),
                    "thumbprint": tp.to_string(),
                    "environments": ["Test"],
                    "roles": ["web"],
                }),
            )
            .await
            .expect(201);
    }
    // Both connected (to their own node): a health check of both succeeds.
    let v = a
        .api
        .post("/api/tasks/health", json!({ "machines": ["pa", "pb"] }))
        .await
        .expect(201);
    let health = ended(&a.api, v["task"]["id"].as_str().unwrap()).await;
    assert_eq!(health["task"]["state"], "Success", "{health}");

    // 1. The task cap (1 on each node). A runs a task that waits; a second
    // task submitted to A goes to B, which has room (its step is handed
    // back to A, which holds pa: a step is not a task).
    let gate1 = tmp.path().join("gate1");
    let t1 = script(&a.api, "pa", &gated("first", &gate1, "first-done")).await;
    until_line(&a.api, &t1, "first").await;
    let t2 = script(&a.api, "pa", "echo second").await;
    let end = ended(&b.api, &t2).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = lines(&b.api, &t2).await;
    assert!(
        log.iter().any(|l| l
            == "Waiting: node node-a runs its cap of 1 tasks; the first node with room takes the task"),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l == "Node node-b takes the task: no other node with room took it"),
        "{log:?}"
    );
    assert_eq!(task(&a.api, &t1).await["task"]["state"], "Executing");
    // B runs a task that waits too: a task submitted to A now finds no room
    // and waits, Queued, until A has room again.
    let gate3 = tmp.path().join("gate3");
    let t3 = script(&b.api, "pb", &gated("third", &gate3, "third-done")).await;
    until_line(&b.api, &t3, "third").await;
    let t4 = script(&a.api, "pb", "echo fourth").await;
    until_line(&a.api, &t4, "Waiting: node node-a runs its cap").await;
    assert_eq!(task(&a.api, &t4).await["task"]["state"], "Queued");
    std::fs::write(&gate1, "").unwrap();
    let end = ended(&a.api, &t4).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = lines(&a.api, &t4).await;
    assert!(log.iter().any(|l| l == "fourth"), "{log:?}");
    assert_eq!(
        log.iter().filter(|l| l.starts_with("Node ")).count(),
        1,
        "taken once: {log:?}"
    );
    assert_eq!(ended(&a.api, &t1).await["task"]["state"], "Success");
    std::fs::write(&gate3, "").unwrap();
    assert_eq!(ended(&b.api, &t3).await["task"]["state"], "Success");

    // 2. A sensitive output variable learned on node A (pa's step) is masked
    // in the lines of pb's step, which node B (the task's node) runs.
    const TOKEN: &str = "tok-5ecret-4711";
    let gate = tmp.path().join("gate-mask");
    let deploy_sh = format!(
        "case \"$TentacleHome\" in\n\
         */tentacle-pa/*)\n\
           echo \"##octopus[setVariable name='Token' value='{TOKEN}' sensitive='True']\"\n\
           echo \"pa says {TOKEN}\" ;;\n\
         *)\n\
           for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.05; done\n\
           echo \"pb says {TOKEN}\" ;;\n\
         esac\n",
        gate.display()
    );
    let id = deploy(
        &a.api,
        &b.api,
        "Acme.Mask",
        &deploy_sh,
        json!({ "max_parallel_steps": 2 }),
    )
    .await;
    until_step(&b.api, &id, "pa", "Success").await;
    std::fs::write(&gate, "").unwrap();
    let end = ended(&b.api, &id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = lines(&b.api, &id).await;
    assert!(
        !log.iter().any(|l| l.contains(TOKEN)),
        "the value leaked: {log:?}"
    );
    assert!(log.iter().any(|l| l == "pa says ********"), "{log:?}");
    assert!(log.iter().any(|l| l == "pb says ********"), "{log:?}");

    // 3. Guided failure: pa's deployment waits for a gate, then fails once.
    let gate = tmp.path().join("gate-guide");
    let deploy_sh = format!(
        "case \"$TentacleHome\" in\n\
         */tentacle-pa/*)\n\
           for i in $(seq 1 1200); do [ -f '{}' ] && break; sleep 0.05; done\n\
           if [ ! -f \"$TentacleHome/failed-once\" ]; then touch \"$TentacleHome/failed-once\"; echo failing; exit 3; fi ;;\n\
         esac\n\
         echo deployed\n",
        gate.display()
    );
    let id = deploy(
        &a.api,
        &b.api,
        "Acme.Guide",
        &deploy_sh,
        json!({ "guided_failure": true }),
    )
    .await;
    until_step(&b.api, &id, "pa", "Executing").await;
    // Not waiting for a decision (its script runs): nobody confirms.
    let guide = format!("/api/tasks/{id}/guidance");
    let refused = b
        .api
        .post(&guide, json!({ "machine": "pa", "action": "retry" }))
        .await;
    assert_eq!(refused.status, 409, "{}", refused.error());
    assert!(refused.error().contains("not waiting for a decision"));
    std::fs::write(&gate, "").unwrap();
    until_line(&b.api, &id, "Guided failure: waiting for a decision").await;
    b.api
        .post(&guide, json!({ "machine": "pa", "action": "retry" }))
        .await
        .expect(202);
    let end = ended(&b.api, &id).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = lines(&b.api, &id).await;
    assert!(
        log.iter().any(|l| l.contains("retrying the deployment")),
        "{log:?}"
    );

    // 4. Deleting pa through node B stops its script on node A at once.
    let long = script(&b.api, "pa", "echo started; sleep 120; echo finished").await;
    until_line(&b.api, &long, "started").await;
    let asked = Instant::now();
    b.api.delete("/api/machines/pa").await.expect(204);
    let end = ended(&b.api, &long).await;
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "took {:?}",
        asked.elapsed()
    );
    assert_ne!(end["task"]["state"], "Success", "{end}");
    let log = lines(&b.api, &long).await;
    assert!(
        log.iter()
            .any(|l| l == "pa: canceling: machine pa was deleted by admin"),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l == "finished"), "{log:?}");

    drop((pa, pb));
    b.stop().await;
    a.stop().await;
}
