//! Two server nodes (real `octopus server run` processes) on one PostgreSQL
//! database, behind real nginx balancers (`stream`, round robin) in front of
//! their comms ports and their API ports. A polling tentacle (the real agent
//! services, in this process) reaches the nodes only through the comms
//! balancer, so it is connected to one node, whichever nginx picked:
//!
//! - a task submitted on the other node runs on the node holding the
//!   tentacle, and a reader following the task through the other node sees
//!   every line as it is stored;
//! - the tentacle moves to the other node in the middle of a script: the
//!   step goes on there from its stored log sequence;
//! - the node holding the tentacle is killed (SIGKILL) in the middle of a
//!   script it runs: the tentacle reconnects through the balancer to the
//!   surviving node, which takes the task over once the dead node is offline
//!   and resumes it from its stored log sequence: no line lost or repeated.
//!
//! Every wait is bounded; nothing sleeps to synchronise (the scripts sleep
//! inside themselves).
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::live::{
    free_port, in_process_tentacle, register_pol, stdout_lines, Api, ServerProcess,
};
use octo_comms::{Backoff, PollingTarget};
use octo_testkit as kit;
use octo_testkit::nginx::Nginx;
use serde_json::{json, Value};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on a wait that includes a node going offline (no heartbeat for 30 s,
/// then the next scan of a surviving node, 5 s apart).
const TAKEOVER: Duration = Duration::from_secs(120);
/// Lines the long script prints.
const LINES: usize = 40;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn api_addr(p: &ServerProcess) -> SocketAddr {
    p.base.trim_start_matches("http://").parse().unwrap()
}

/// Starts node `name` on `url` with its data in `data`.
fn node(data: &Path, comms_port: u16, url: &str, name: &str) -> ServerProcess {
    ServerProcess::start_with(
        data,
        comms_port,
        &["--database-url", url, "--node-name", name],
    )
}

/// Reads a task's server-sent events through `api` until its end event
/// (bounded by `within`): the stdout lines the stream delivered, in order,
/// and the end event.
async fn follow(api: &Api, id: &str, within: Duration) -> (Vec<String>, Value) {
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

/// Once the tentacle is connected (a health check through the balanced API
/// succeeds), the port of the node nginx relayed its live connection to:
/// the last one it relayed.
async fn holder_port(api: &Api, lb: &Nginx) -> u16 {
    let (status, v) = api
        .post("/api/tasks/health", json!({ "machines": ["pol"] }))
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

fn server_lines(log: &[Value]) -> Vec<String> {
    log.iter()
        .filter(|l| l["stream"] == "server")
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_tentacle_reaches_one_node_and_its_steps_survive_that_node() {
    kit::init_tracing();
    let url = kit::postgres::shared().create_database();
    let tmp = tempfile::tempdir().unwrap();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ca, cb) = (free_port(), free_port());
    let a = node(&da, ca, &url, "node-a");
    // Nodes share the comms certificate and the master key.
    std::fs::create_dir_all(&db).unwrap();
    for f in ["master-key", "server.crt", "server.key"] {
        std::fs::copy(da.join(f), db.join(f)).unwrap();
    }
    let b = node(&db, cb, &url, "node-b");
    assert_eq!(a.thumbprint, b.thumbprint);
    let mut comms_lb = Nginx::round_robin(&[loopback(ca), loopback(cb)]);
    let api_lb = Nginx::round_robin(&[api_addr(&a), api_addr(&b)]);
    let key = std::fs::read_to_string(da.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    let api_of = |base: String| Api {
        base,
        key: key.clone(),
        http: reqwest::Client::new(),
    };
    let through_lb = api_of(format!("http://{}", api_lb.addr()));
    let identity = kit::identity("pol");

    register_pol(&through_lb, &identity).await;

    // A polling tentacle with the real services, reaching only the balancer.
    let comms = in_process_tentacle(tmp.path(), &identity, a.thumbprint);
    // Polls `address` until the returned token is cancelled.
    let poll = |address: String| {
        let token = CancellationToken::new();
        let target = PollingTarget {
            address,
            subscription_id: "sub-pol".into(),
        };
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let (c, t) = (comms.clone(), token.clone());
        let handle = tokio::spawn(async move {
            let _ = c.run_polling(target, 1, backoff, t).await;
        });
        (token, handle)
    };
    let stop = |(token, handle): (CancellationToken, tokio::task::JoinHandle<()>)| async move {
        token.cancel();
        timeout(Duration::from_secs(30), handle)
            .await
            .unwrap()
            .unwrap();
    };
    // Connected (a health check through either node succeeds), nginx names
    // the node it relayed the tentacle's live connection to: the last one.
    let mut polling = poll(comms_lb.addr().to_string());
    let (holder_name, other_name, other_comms) = if holder_port(&through_lb, &comms_lb).await == ca
    {
        ("node-a", "node-b", cb)
    } else {
        ("node-b", "node-a", ca)
    };
    let at_other = api_of(if holder_name == "node-a" {
        b.base.clone()
    } else {
        a.base.clone()
    });

    // 1. Submitted on the node the tentacle is not connected to: the node
    // holding it runs the step; the reader on the other node sees every line.
    let (status, v) = at_other
        .post(
            "/api/tasks/script",
            json!({
                "script": "for i in $(seq 1 10); do echo \"hello $i\"; sleep 0.02; done",
                "machines": ["pol"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    let (live, end) = follow(&at_other, &id, Duration::from_secs(60)).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let expected: Vec<String> = (1..=10).map(|i| format!("hello {i}")).collect();
    assert_eq!(live, expected, "the lines as the other node streamed them");
    let log = at_other.log(&id).await;
    assert_eq!(stdout_lines(&log), expected);
    let handed = format!(
        "pol: its polling tentacle is connected to node {holder_name}, which runs this step"
    );
    assert!(
        server_lines(&log).iter().any(|l| l == &handed),
        "{:?}",
        server_lines(&log)
    );

    // 2. The tentacle moves to the other node in the middle of a script
    // (its connection ends; it connects straight to the other node, as a
    // balancer may send it there): the step goes on there, from its stored
    // log sequence.
    let script = format!("for i in $(seq 1 {LINES}); do echo \"move $i\"; sleep 0.05; done");
    let (status, v) = at_other
        .post(
            "/api/tasks/script",
            json!({ "script": script, "machines": ["pol"] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    at_other
        .events(&id)
        .await
        .until(|e, d| e == "log" && d["text"] == "move 3")
        .await;
    // The balancer dies: the connection ends at once on both sides.
    comms_lb.stop();
    stop(polling).await;
    polling = poll(loopback(other_comms).to_string());
    let (_, end) = follow(&at_other, &id, Duration::from_secs(60)).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = at_other.log(&id).await;
    let expected: Vec<String> = (1..=LINES).map(|i| format!("move {i}")).collect();
    assert_eq!(stdout_lines(&log), expected);
    let moved = format!(
        "pol: its polling tentacle is now connected to node {other_name}; the step goes on there"
    );
    assert!(
        server_lines(&log).iter().any(|l| l == &moved),
        "{:?}",
        server_lines(&log)
    );

    // Behind a new balancer, wherever it sends the tentacle now.
    let comms_lb = Nginx::round_robin(&[loopback(ca), loopback(cb)]);
    stop(polling).await;
    let polling = poll(comms_lb.addr().to_string());
    let port = holder_port(&through_lb, &comms_lb).await;
    let (holder, survivor, survivor_name) = if port == ca {
        (a, b, "node-b")
    } else {
        (b, a, "node-a")
    };
    let at_holder = api_of(holder.base.clone());
    let at_survivor = api_of(survivor.base.clone());
    drop(at_other);

    // 3. SIGKILL of the node running a script (submitted there, so it is
    // both the task's node and the step's).
    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done");
    let (status, v) = at_holder
        .post(
            "/api/tasks/script",
            json!({ "script": script, "machines": ["pol"] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    at_survivor
        .events(&id)
        .await
        .until(|e, d| e == "log" && d["text"] == "line 5")
        .await;
    let stored = stdout_lines(&at_survivor.log(&id).await);
    assert!(
        stored.len() < LINES,
        "the script ended before the kill: {stored:?}"
    );
    holder.kill9();

    let (_, end) = follow(&at_survivor, &id, TAKEOVER).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let log = at_survivor.log(&id).await;
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout_lines(&log), expected);
    let lines = server_lines(&log);
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "Node {survivor_name} takes the task: the node running it went offline"
        ))),
        "{lines:?}"
    );
    // The balancer still answers, through the surviving node.
    let (status, v) = through_lb.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(
        (status, &v["task"]["state"]),
        (200, &json!("Success")),
        "{v}"
    );

    stop(polling).await;
    drop(at_holder);
    drop(survivor);
}

/// Three nodes behind the balancers: a task submitted to each node runs its
/// step on the one node holding the tentacle, and a cancel asked through yet
/// another node stops a script running there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_hand_steps_to_the_holder_and_a_cancel_reaches_it() {
    kit::init_tracing();
    let url = kit::postgres::shared().create_database();
    let tmp = tempfile::tempdir().unwrap();
    let names = ["node-a", "node-b", "node-c"];
    let dirs: Vec<_> = names.iter().map(|n| tmp.path().join(n)).collect();
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let first = node(&dirs[0], ports[0], &url, names[0]);
    let mut nodes = vec![first];
    for i in 1..3 {
        std::fs::create_dir_all(&dirs[i]).unwrap();
        for f in ["master-key", "server.crt", "server.key"] {
            std::fs::copy(dirs[0].join(f), dirs[i].join(f)).unwrap();
        }
        nodes.push(node(&dirs[i], ports[i], &url, names[i]));
    }
    let comms_lb = Nginx::round_robin(&ports.iter().map(|&p| loopback(p)).collect::<Vec<_>>());
    let api_lb = Nginx::round_robin(&nodes.iter().map(api_addr).collect::<Vec<_>>());
    let key = std::fs::read_to_string(dirs[0].join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    let api_of = |base: String| Api {
        base,
        key: key.clone(),
        http: reqwest::Client::new(),
    };
    let through_lb = api_of(format!("http://{}", api_lb.addr()));
    let identity = kit::identity("pol");
    register_pol(&through_lb, &identity).await;
    let comms = in_process_tentacle(tmp.path(), &identity, nodes[0].thumbprint);
    let token = CancellationToken::new();
    let polling = tokio::spawn({
        let target = PollingTarget {
            address: comms_lb.addr().to_string(),
            subscription_id: "sub-pol".into(),
        };
        let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let t = token.clone();
        async move {
            let _ = comms.run_polling(target, 1, backoff, t).await;
        }
    });
    let port = holder_port(&through_lb, &comms_lb).await;
    let holder = ports.iter().position(|&p| p == port).unwrap();

    // A task submitted to each node: every one runs on the holder.
    for (i, n) in nodes.iter().enumerate() {
        let api = api_of(n.base.clone());
        let (status, v) = api
            .post(
                "/api/tasks/script",
                json!({ "script": format!("echo from {}", names[i]), "machines": ["pol"] }),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        let id = v["task"]["id"].as_str().unwrap().to_string();
        let (live, end) = follow(&api, &id, Duration::from_secs(60)).await;
        assert_eq!(end["task"]["state"], "Success", "{end}");
        assert_eq!(live, [format!("from {}", names[i])]);
        let handed = server_lines(&api.log(&id).await).iter().any(|l| {
            l == &format!(
                "pol: its polling tentacle is connected to node {}, which runs this step",
                names[holder]
            )
        });
        assert_eq!(handed, i != holder, "task submitted to {}", names[i]);
    }

    // A long script submitted to one node that is not the holder, canceled
    // through the third: the holder stops it, the task ends Canceled.
    let (submit, cancel) = match holder {
        0 => (1, 2),
        1 => (2, 0),
        _ => (0, 1),
    };
    let at_submit = api_of(nodes[submit].base.clone());
    let at_cancel = api_of(nodes[cancel].base.clone());
    let (status, v) = at_submit
        .post(
            "/api/tasks/script",
            json!({
                "script": "for i in $(seq 1 600); do echo \"tick $i\"; sleep 0.05; done",
                "machines": ["pol"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    at_cancel
        .events(&id)
        .await
        .until(|e, d| e == "log" && d["text"] == "tick 3")
        .await;
    let (status, v) = at_cancel
        .post(&format!("/api/tasks/{id}/cancel"), json!({}))
        .await;
    assert!(status == 200 || status == 202, "{status} {v}");
    let (lines, end) = follow(&at_cancel, &id, Duration::from_secs(60)).await;
    assert_eq!(end["task"]["state"], "Canceled", "{end}");
    assert!(
        lines.len() < 600,
        "the script ran to its end: {} lines",
        lines.len()
    );

    token.cancel();
    timeout(Duration::from_secs(30), polling)
        .await
        .unwrap()
        .unwrap();
}
