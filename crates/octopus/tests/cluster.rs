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

use std::time::Duration;

use common::cluster::{follow, holder_port, loopback, server_lines, Cluster, Polling, TAKEOVER};
use common::live::{in_process_tentacle, register_pol, script_on_pol, stdout_lines};
use octo_testkit as kit;
use octo_testkit::nginx::Nginx;
use serde_json::json;

/// Lines the long script prints.
const LINES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_tentacle_reaches_one_node_and_its_steps_survive_that_node() {
    kit::init_tracing();
    let mut cluster = Cluster::start(2, &[]);
    let (ca, cb) = (cluster.comms_ports[0], cluster.comms_ports[1]);
    let through_lb = cluster.through_lb();
    let identity = kit::identity("pol");

    register_pol(&through_lb, &identity).await;

    // A polling tentacle with the real services, reaching only the balancer.
    let comms = in_process_tentacle(cluster.tmp.path(), &identity, cluster.thumbprint());
    let poll = |address: String| Polling::start(&comms, address, "sub-pol");
    // Connected (a health check through either node succeeds), nginx names
    // the node it relayed the tentacle's live connection to: the last one.
    let mut polling = poll(cluster.comms_lb.addr().to_string());
    let (holder_name, other_name, other_comms) =
        if holder_port(&through_lb, &cluster.comms_lb, "pol").await == ca {
            ("node-a", "node-b", cb)
        } else {
            ("node-b", "node-a", ca)
        };
    let at_other = cluster.api(if holder_name == "node-a" { 1 } else { 0 });

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
    let id = script_on_pol(&at_other, &script).await;
    at_other
        .events(&id)
        .await
        .until(|e, d| e == "log" && d["text"] == "move 3")
        .await;
    // The balancer dies: the connection ends at once on both sides.
    cluster.comms_lb.stop();
    polling.stop().await;
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
    cluster.comms_lb = Nginx::round_robin(&[loopback(ca), loopback(cb)]);
    polling.stop().await;
    let polling = poll(cluster.comms_lb.addr().to_string());
    let port = holder_port(&through_lb, &cluster.comms_lb, "pol").await;
    let holder = cluster.index_of_comms_port(port);
    let survivor = 1 - holder;
    let survivor_name = cluster.names[survivor].clone();
    let at_holder = cluster.api(holder);
    let at_survivor = cluster.api(survivor);
    drop(at_other);

    // 3. SIGKILL of the node running a script (submitted there, so it is
    // both the task's node and the step's).
    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done");
    let id = script_on_pol(&at_holder, &script).await;
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
    cluster.kill9(holder);

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

    polling.stop().await;
    drop(at_holder);
}

/// Three nodes behind the balancers: a task submitted to each node runs its
/// step on the one node holding the tentacle, and a cancel asked through yet
/// another node stops a script running there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_hand_steps_to_the_holder_and_a_cancel_reaches_it() {
    kit::init_tracing();
    let cluster = Cluster::start(3, &[]);
    let names = ["node-a", "node-b", "node-c"];
    let through_lb = cluster.through_lb();
    let identity = kit::identity("pol");
    register_pol(&through_lb, &identity).await;
    let comms = in_process_tentacle(cluster.tmp.path(), &identity, cluster.thumbprint());
    let polling = Polling::start(&comms, cluster.comms_lb.addr().to_string(), "sub-pol");
    let port = holder_port(&through_lb, &cluster.comms_lb, "pol").await;
    let holder = cluster.index_of_comms_port(port);

    // A task submitted to each node: every one runs on the holder.
    for i in 0..names.len() {
        let api = cluster.api(i);
        let id = script_on_pol(&api, &format!("echo from {}", names[i])).await;
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
    let at_submit = cluster.api(submit);
    let at_cancel = cluster.api(cancel);
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

    polling.stop().await;
}
