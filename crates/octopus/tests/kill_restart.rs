//! A server process killed with SIGKILL in the middle of a script task and
//! started again on the same data directory (and comms port) resumes the task:
//! no log line is lost or repeated.
//!
//! The server is the real `octopus server run` binary; the tentacle is a polling
//! `TentacleComms` with the real `octo-agent` services in this process. Every
//! wait is bounded and waits for an event (a stdout line, a server-sent event);
//! nothing sleeps to synchronise (the script sleeps inside itself).
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use common::live::{
    admin_api, free_port, in_process_tentacle, poll_as_pol, register_pol, script_on_pol,
    stdout_lines, ServerProcess, T,
};
use octo_testkit as kit;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Lines the script prints.
const LINES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_task_and_restart_resumes_without_losing_or_repeating_lines() {
    kit::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let comms_port = free_port();
    let server = ServerProcess::start(&data, comms_port);
    let mut api = admin_api(&server, &data);

    // A polling tentacle with the real services, in this process.
    let identity = kit::identity("pol");
    let comms = in_process_tentacle(tmp.path(), &identity, server.thumbprint);
    let token = CancellationToken::new();
    let polling = poll_as_pol(comms, comms_port, token.clone());

    register_pol(&api, &identity).await;

    let script = format!("for i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done");
    let id = script_on_pol(&api, &script).await;

    // Lines are stored before they are published: once "line 5" is seen, the
    // stored log holds at least five of the script's lines.
    {
        let mut events = api.events(&id).await;
        events
            .until(|e, d| e == "log" && d["text"] == "line 5")
            .await;
    }
    let stored = stdout_lines(&api.log(&id).await);
    assert!(stored.len() >= 5, "{stored:?}");
    assert!(
        stored.len() < LINES,
        "the script ended before the kill: {stored:?}"
    );

    server.kill9();
    let server = ServerProcess::start(&data, comms_port);
    api.base = server.base.clone();

    let end = api.events(&id).await.until(|e, _| e == "end").await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let (status, task) = api.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["task"]["state"], "Success", "{task}");

    let log = api.log(&id).await;
    let expected: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(stdout_lines(&log), expected);
    // The restarted server resumed the task (rather than the script having ended
    // before the kill).
    let server_lines: Vec<&str> = log
        .iter()
        .filter(|l| l["stream"] == "server")
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(
        server_lines.iter().any(|l| l.contains("Resuming task")),
        "{server_lines:?}"
    );

    token.cancel();
    timeout(T, polling).await.unwrap().unwrap();
    drop(server);
}
