//! Several server nodes (real `octopus server run` processes) on one
//! PostgreSQL database behind real nginx balancers (`stream`, round robin) in
//! front of their comms ports and API ports (`common::cluster`), with real
//! tentacles:
//!
//! - a listening tentacle (the `tentacle` binary) and a polling one (the real
//!   agent services in this process, reaching the nodes only through the
//!   balancer) in one task, submitted through either node: each machine's
//!   part runs once;
//! - the node deploying a large package to both tentacles is killed
//!   (SIGKILL) in the middle of the transfers (throttling relays in front of
//!   each tentacle make them last seconds): the surviving node takes the
//!   task over, resumes each transfer from the bytes the tentacle holds, and
//!   the deployment ends Success with the package byte-identical on both
//!   tentacles and no line lost or repeated;
//! - the same, killed in the middle of the deployment scripts: they go on
//!   from their stored log sequences (the package found in cache);
//! - scheduled health checks run once per period across the nodes (the
//!   scheduler's lease moves when its holder is drained), and a scheduled
//!   check lasting longer than the lease is not started a second time by
//!   another node.
//!
//! Every wait is bounded; nothing sleeps to synchronise (scripts sleep inside
//! themselves; the relay paces bytes).
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::loopback;
use common::cluster::{
    binaries, follow, holder_port, server_lines, Cluster, ListeningTentacle, Polling, TAKEOVER,
};
use common::live::{free_port, in_process_tentacle, register_pol, Api, T};
use common::{run, Run};
use octo_testkit as kit;
use octo_testkit::throttle::Throttle;
use serde_json::{json, Value};

/// `octopus --server API --api-key KEY ARGS`.
fn cli(api: &Api, args: &[&str]) -> Run {
    let mut all = vec!["--server", &api.base, "--api-key", &api.key];
    all.extend_from_slice(args);
    run(&[], &all, None)
}

/// The stdout lines of each machine's part of a task, by machine id; each
/// machine's tentacle sequences strictly increase (none repeated).
fn stdout_by_machine(log: &[Value]) -> BTreeMap<i64, Vec<String>> {
    let mut by: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    for l in log.iter().filter(|l| l["stream"] == "stdout") {
        by.entry(l["machine_id"].as_i64().unwrap())
            .or_default()
            .push((
                l["sequence"].as_i64().unwrap(),
                l["text"].as_str().unwrap().to_string(),
            ));
    }
    by.into_iter()
        .map(|(machine, lines)| {
            assert!(
                lines.windows(2).all(|w| w[0].0 < w[1].0),
                "machine {machine}: {lines:?}"
            );
            (machine, lines.into_iter().map(|(_, t)| t).collect())
        })
        .collect()
}

/// The id of machine `name`.
async fn machine_id(api: &Api, name: &str) -> i64 {
    let (status, v) = api.get(&format!("/api/machines/{name}")).await;
    assert_eq!(status, 200, "{v}");
    v["id"]
        .as_i64()
        .or_else(|| v["machine"]["id"].as_i64())
        .unwrap_or_else(|| panic!("no id in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listening_and_a_polling_tentacle_run_one_task_once_through_either_node() {
    kit::init_tracing();
    let cluster = Cluster::start(2, &[]);
    let through_lb = cluster.through_lb();
    let identity = kit::identity("pol");
    register_pol(&through_lb, &identity).await;
    let comms = in_process_tentacle(cluster.tmp.path(), &identity, cluster.thumbprint());
    let polling = Polling::start(&comms, cluster.comms_lb.addr().to_string(), "sub-pol");
    holder_port(&through_lb, &cluster.comms_lb, "pol").await;
    let lis = ListeningTentacle::start(
        &cluster.tmp.path().join("tentacles"),
        "lis",
        &through_lb,
        &cluster.thumbprint().to_string(),
        "Test",
    );
    let pol_home = cluster.tmp.path().join("home");
    let ids = [
        ("pol", machine_id(&through_lb, "pol").await),
        ("lis", machine_id(&through_lb, "lis").await),
    ];

    // One task on both machines, submitted through each node in turn; each
    // run appends a line to a file in the tentacle's home.
    for (i, name) in cluster.names.iter().enumerate() {
        let api = cluster.api(i);
        let script = format!(
            "echo \"{name}\" >> \"$TentacleHome/runs.txt\"; \
             for j in 1 2 3 4 5; do echo \"{name} line $j\"; sleep 0.02; done"
        );
        let (status, v) = api
            .post(
                "/api/tasks/script",
                json!({ "script": script, "machines": ["pol", "lis"] }),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        let id = v["task"]["id"].as_str().unwrap().to_string();
        let (_, end) = follow(&api, &id, Duration::from_secs(60)).await;
        assert_eq!(end["task"]["state"], "Success", "{end}");
        // Every line once, per machine, in order; through the other node too.
        let other = cluster.api(1 - i);
        let log = other.log(&id).await;
        let by = stdout_by_machine(&log);
        let expected: Vec<String> = (1..=5).map(|j| format!("{name} line {j}")).collect();
        for (machine, mid) in ids {
            assert_eq!(
                by.get(&mid),
                Some(&expected),
                "{machine}'s lines of the task submitted to {name}: {log:?}"
            );
        }
        let (status, steps) = other.get(&format!("/api/tasks/{id}")).await;
        assert_eq!(status, 200, "{steps}");
        let steps = steps["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert!(steps.iter().all(|s| s["state"] == "Success"), "{steps:?}");
    }
    // Each machine ran its part of each task exactly once.
    let runs = format!("{}\n", cluster.names.join("\n"));
    assert_eq!(
        std::fs::read_to_string(pol_home.join("runs.txt")).unwrap(),
        runs
    );
    assert_eq!(
        std::fs::read_to_string(lis.home.join("runs.txt")).unwrap(),
        runs
    );

    polling.stop().await;
}

/// Lines the deployment script of [`write_package`] prints.
const DEPLOY_LINES: usize = 10;
/// Lines the slow deployment script prints, 50 ms apart.
const SLOW_LINES: usize = 40;

/// A tar.gz (stored, not compressed: the filler would not shrink) whose
/// Deploy.sh prints `lines` numbered lines `pause` seconds apart, plus
/// `filler` bytes of noise in `data/filler.bin`.
fn write_package(path: &Path, filler: &[u8], lines: usize, pause: &str) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let deploy = format!(
        "for i in $(seq 1 {lines}); do echo \"deploy line $i\"; sleep {pause}; done\n\
         echo \"deployed $Octopus_Action_Package_PackageVersion\" > \"$TentacleHome/deployed.txt\"\n"
    );
    for (name, body, mode) in [
        ("Deploy.sh", deploy.as_bytes(), 0o755),
        ("data/filler.bin", filler, 0o644),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, name, body).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deploys `package` to environment Test through `api`: the task's id.
async fn deploy(api: &Api, package: &str) -> String {
    let (status, v) = api
        .post(
            "/api/tasks/deploy",
            json!({ "package_id": package, "environment": "Test" }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    v["task"]["id"].as_str().unwrap().to_string()
}

/// Bytes per second the relays let through until the node sending the big
/// package is killed.
const SLOW: u64 = 1 << 20;
/// Size of the big package's filler.
const BIG: usize = 24 << 20;

/// The machines of the deployment test, each behind its own relay.
const MACHINES: [&str; 2] = ["pol", "lis"];

/// Two nodes with calamari, a polling tentacle `pol` (through a relay to the
/// comms balancer) and a listening one `lis` (the nodes dial it through a
/// relay), both in environment Test with the deployment tool installed (a
/// first small deployment).
struct Lab {
    cluster: Cluster,
    pol_relay: Throttle,
    lis_relay: Throttle,
    _lis: ListeningTentacle,
    polling: Polling,
    /// The node holding the polling tentacle, and the other one.
    holder: usize,
    survivor: usize,
    /// Where each machine of [`MACHINES`] keeps packages and extracts them.
    homes: [(PathBuf, PathBuf); 2],
}

impl Lab {
    async fn start() -> Lab {
        let (_, calamari) = binaries().clone();
        let cluster = Cluster::start(2, &["--calamari", calamari.to_str().unwrap()]);
        let through_lb = cluster.through_lb();
        let identity = kit::identity("pol");
        register_pol(&through_lb, &identity).await;
        let pol_relay = Throttle::start(cluster.comms_lb.addr()).await.unwrap();
        let comms = in_process_tentacle(cluster.tmp.path(), &identity, cluster.thumbprint());
        let polling = Polling::start(&comms, pol_relay.addr().to_string(), "sub-pol");
        let lis_port = free_port();
        let lis_relay = Throttle::start(loopback(lis_port)).await.unwrap();
        let lis = ListeningTentacle::start_at(
            &cluster.tmp.path().join("tentacles"),
            "lis",
            &through_lb,
            &cluster.thumbprint().to_string(),
            "Test",
            lis_port,
            lis_relay.addr().port(),
        );
        let port = holder_port(&through_lb, &cluster.comms_lb, "pol").await;
        let holder = cluster.index_of_comms_port(port);
        let homes = [
            (
                cluster.tmp.path().join("home"),
                cluster.tmp.path().join("apps"),
            ),
            (lis.home.clone(), lis.home.join("Applications")),
        ];
        let small = cluster.tmp.path().join("Small.App.1.0.0.tar.gz");
        write_package(&small, b"small", DEPLOY_LINES, "0");
        cli(&through_lb, &["package", "push", small.to_str().unwrap()]).ok();
        let at_holder = cluster.api(holder);
        let id = deploy(&at_holder, "Small.App").await;
        let (_, end) = follow(&at_holder, &id, Duration::from_secs(90)).await;
        assert_eq!(end["task"]["state"], "Success", "{end}");
        Lab {
            cluster,
            pol_relay,
            lis_relay,
            _lis: lis,
            polling,
            holder,
            survivor: 1 - holder,
            homes,
        }
    }

    /// After the holder was killed during task `id`: the survivor ends it
    /// Success, saying it took the task over; the log, which is returned,
    /// holds each machine's `lines` script lines once each, in order.
    async fn taken_over(&self, id: &str, lines: usize) -> Vec<Value> {
        let at_survivor = self.cluster.api(self.survivor);
        let (_, end) = follow(&at_survivor, id, TAKEOVER).await;
        assert_eq!(end["task"]["state"], "Success", "{end}");
        let log = at_survivor.log(id).await;
        let said = server_lines(&log);
        let survivor_name = &self.cluster.names[self.survivor];
        assert!(
            said.iter().any(|l| l.starts_with(&format!(
                "Node {survivor_name} takes the task: the node running it went offline"
            ))),
            "{said:?}"
        );
        let by = stdout_by_machine(&log);
        let expected: Vec<String> = (1..=lines).map(|i| format!("deploy line {i}")).collect();
        for m in MACHINES {
            let mid = machine_id(&at_survivor, m).await;
            let deployed: Vec<String> = by[&mid]
                .iter()
                .filter(|l| l.starts_with("deploy line "))
                .cloned()
                .collect();
            assert_eq!(deployed, expected, "{m}");
            let finished = by[&mid]
                .iter()
                .filter(|l| l.starts_with("Deploy.sh finished (exit code 0"))
                .count();
            assert_eq!(finished, 1, "{m}: {:?}", by[&mid]);
        }
        log
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_node_deploying_mid_transfer_loses_nothing() {
    kit::init_tracing();
    let mut lab = Lab::start().await;
    let through_lb = lab.cluster.through_lb();
    let at_holder = lab.cluster.api(lab.holder);
    let at_survivor = lab.cluster.api(lab.survivor);

    // The big one, pushed through the balancer, deployed through the node
    // holding the polling tentacle: the task's node, which runs both
    // machines' steps (the listening one because the task is its own), at
    // SLOW to each machine.
    let big = lab.cluster.tmp.path().join("Big.App.1.0.0.tar.gz");
    let filler = octo_testkit::noise(BIG, 7);
    write_package(&big, &filler, DEPLOY_LINES, "0");
    let bytes = std::fs::read(&big).unwrap();
    let sha = sha256_hex(&bytes);
    cli(&through_lb, &["package", "push", big.to_str().unwrap()]).ok();
    lab.pol_relay.limit(Some(SLOW));
    lab.lis_relay.limit(Some(SLOW));
    let id = deploy(&at_holder, "Big.App").await;
    // Killed once each tentacle holds part of the package (its partial file
    // has grown past a MiB), which at SLOW is seconds before the end.
    let file = format!("Big.App@1.0.0@{sha}.tar.gz");
    let deadline = Instant::now() + T;
    loop {
        let received: Vec<u64> = lab
            .homes
            .iter()
            .map(|(home, _)| {
                std::fs::metadata(home.join("Files").join(format!("{file}.partial")))
                    .map_or(0, |m| m.len())
            })
            .collect();
        if received.iter().all(|&n| n >= 1 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the transfers did not start within {T:?}: {received:?} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    lab.cluster.kill9(lab.holder);
    // Mid-transfer on both sides: no tentacle holds the whole package and the
    // dead node stored no end of a transfer.
    for (m, (home, _)) in MACHINES.iter().zip(&lab.homes) {
        assert!(
            !home.join("Files").join(&file).exists(),
            "{m} holds the whole package already"
        );
    }
    let before = server_lines(&at_survivor.log(&id).await);
    for m in MACHINES {
        assert!(
            !before
                .iter()
                .any(|l| l.starts_with(&format!("{m}: package uploaded"))),
            "{m}'s transfer ended before the kill: {before:?}"
        );
    }
    // The rest goes at full speed.
    lab.pol_relay.limit(None);
    lab.lis_relay.limit(None);

    let log = lab.taken_over(&id, DEPLOY_LINES).await;
    let lines = server_lines(&log);
    for (m, (home, apps)) in MACHINES.iter().zip(&lab.homes) {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("{m}: resuming the transfer of Big.App 1.0.0 at"))),
            "the survivor did not resume {m}'s transfer: {lines:?}"
        );
        // The package on the tentacle is the one pushed, byte for byte.
        let on_tentacle = std::fs::read(
            home.join("Files")
                .join(format!("Big.App@1.0.0@{sha}.tar.gz")),
        )
        .unwrap();
        assert!(on_tentacle == bytes, "{m}: the transferred package differs");
        let app = apps.join("Test/Big.App/1.0.0/data/filler.bin");
        assert!(
            std::fs::read(app).unwrap() == filler,
            "{m}: the extracted filler differs"
        );
        assert_eq!(
            std::fs::read_to_string(home.join("deployed.txt")).unwrap(),
            "deployed 1.0.0\n"
        );
    }

    lab.polling.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_node_deploying_mid_script_loses_nothing() {
    kit::init_tracing();
    let mut lab = Lab::start().await;
    let through_lb = lab.cluster.through_lb();
    let at_holder = lab.cluster.api(lab.holder);
    let at_survivor = lab.cluster.api(lab.survivor);
    let pkg = lab.cluster.tmp.path().join("Slow.App.1.0.0.tar.gz");
    write_package(&pkg, b"slow", SLOW_LINES, "0.05");
    cli(&through_lb, &["package", "push", pkg.to_str().unwrap()]).ok();
    let id = deploy(&at_holder, "Slow.App").await;
    // Killed once both machines' scripts have printed a few lines.
    let mut ids = BTreeMap::new();
    for m in MACHINES {
        ids.insert(machine_id(&at_holder, m).await, 0usize);
    }
    at_survivor
        .events(&id)
        .await
        .until(|e, d| {
            if e == "log" && d["stream"] == "stdout" {
                let text = d["text"].as_str().unwrap_or_default();
                if let Some(n) = d["machine_id"].as_i64().and_then(|m| ids.get_mut(&m)) {
                    *n += usize::from(text.starts_with("deploy line "));
                }
            }
            ids.values().all(|&n| n >= 3)
        })
        .await;
    lab.cluster.kill9(lab.holder);
    let before = stdout_by_machine(&at_survivor.log(&id).await);
    for (mid, lines) in &before {
        let printed = lines
            .iter()
            .filter(|l| l.starts_with("deploy line "))
            .count();
        assert!(
            printed < SLOW_LINES,
            "machine {mid}'s script ended before the kill: {lines:?}"
        );
    }
    let log = lab.taken_over(&id, SLOW_LINES).await;
    // Resumed, not started again: the package was in the tentacles' cache.
    let said = server_lines(&log);
    for m in MACHINES {
        assert!(
            said.iter()
                .any(|l| l.starts_with(&format!("{m}: package Slow.App 1.0.0 found in cache"))),
            "{m}: {said:?}"
        );
    }
    lab.polling.stop().await;
}

/// Scheduled health tasks (newest first) with a step on `machine`.
async fn scheduled_checks(api: &Api, machine: &str) -> Vec<Value> {
    let (status, v) = api
        .get(&format!(
            "/api/tasks?kind=Health&machine={machine}&limit=1000"
        ))
        .await;
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|t| t["arguments"]["scheduled"] == true)
        .cloned()
        .collect()
}

fn unfinished(t: &Value) -> bool {
    t["state"] == "Queued" || t["state"] == "Executing"
}

/// The node holding the scheduler's lease now (read in the database).
fn lease_holder(cluster: &Cluster) -> String {
    kit::postgres::shared()
        .psql(
            &cluster.url,
            "SELECT holder FROM leases WHERE name = 'scheduled-health-checks'",
        )
        .trim()
        .to_string()
}

/// Every machine's default policy checks every `interval_s` seconds, each
/// check taking at most `timeout_s`. Written in the database: the API keeps
/// intervals to a minute or more.
fn fast_policy(cluster: &Cluster, interval_s: u32, timeout_s: u32) {
    kit::postgres::shared().psql(
        &cluster.url,
        &format!(
            "UPDATE machine_policies SET health_check_interval_s = {interval_s}, \
             health_check_timeout_s = {timeout_s}"
        ),
    );
}

/// How often the nodes scan for machines due a check in these tests (the
/// lease lasts two scans).
const SCAN_MS: u64 = 300;
/// The policy's interval between checks of a machine.
const PERIOD_MS: i64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_health_checks_run_once_per_period_across_nodes() {
    kit::init_tracing();
    let scan = SCAN_MS.to_string();
    let cluster = Cluster::start(2, &["--health-scan-interval-ms", &scan]);
    let through_lb = cluster.through_lb();
    let identity = kit::identity("pol");
    register_pol(&through_lb, &identity).await;
    let comms = in_process_tentacle(cluster.tmp.path(), &identity, cluster.thumbprint());
    let polling = Polling::start(&comms, cluster.comms_lb.addr().to_string(), "sub-pol");
    holder_port(&through_lb, &cluster.comms_lb, "pol").await;
    fast_policy(&cluster, u32::try_from(PERIOD_MS / 1000).unwrap(), 10);

    // Watches the scheduled checks of pol until `n` have finished (bounded):
    // never two unfinished at once.
    let watch = |what: &'static str, n: usize| {
        let api = cluster.through_lb();
        async move {
            let deadline = Instant::now() + T;
            loop {
                let checks = scheduled_checks(&api, "pol").await;
                let running = checks.iter().filter(|t| unfinished(t)).count();
                assert!(running <= 1, "overlapping scheduled checks: {checks:#?}");
                if checks.len() - running >= n {
                    return checks;
                }
                assert!(Instant::now() < deadline, "{what}: not within {T:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // A few periods with whichever node holds the lease.
    watch("three scheduled checks", 3).await;
    let first = lease_holder(&cluster);
    assert!(cluster.names.contains(&first), "lease held by '{first}'");
    // The holder drained (it learns so at its next heartbeat, 5 s at most):
    // it schedules no more and lets its lease run out; the other node takes
    // it and goes on.
    let drained = cluster.names.iter().position(|n| *n == first).unwrap();
    let next = cluster.names[1 - drained].clone();
    let out = cli(&cluster.api(1 - drained), &["node", "drain", &first])
        .ok()
        .stdout;
    assert!(out.contains("is draining"), "{out}");
    let deadline = Instant::now() + T;
    while lease_holder(&cluster) != next {
        assert!(
            Instant::now() < deadline,
            "{next} took no lease within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = watch("the checks so far", 0)
        .await
        .iter()
        .filter(|t| !unfinished(t))
        .count();
    let checks = watch("three more scheduled checks", n + 3).await;
    assert_eq!(lease_holder(&cluster), next);
    assert!(checks.len() >= 6, "{checks:#?}");

    // Oldest first: each check began a period or more after the one before
    // (its machine's last check time is written when a check ends), and no
    // later than a period, a scan, the lease moving and some slack after it
    // ended: once per period.
    let mut done: Vec<&Value> = checks.iter().filter(|t| !unfinished(t)).collect();
    done.sort_by_key(|t| t["created_at"].as_i64().unwrap());
    let slack = 2 * i64::try_from(SCAN_MS).unwrap() + 1_500;
    for w in done.windows(2) {
        let (prev, next) = (w[0], w[1]);
        let began = next["created_at"].as_i64().unwrap();
        let prev_start = prev["started_at"].as_i64().unwrap();
        let prev_end = prev["completed_at"].as_i64().unwrap();
        assert!(
            began >= prev_start + PERIOD_MS,
            "two checks within one period: {prev:#} then {next:#}"
        );
        assert!(
            began <= prev_end + PERIOD_MS + slack,
            "a period without a check: {prev:#} then {next:#}"
        );
        assert!(prev_end <= began, "overlapping checks: {prev:#} {next:#}");
    }
    let span = done.last().unwrap()["created_at"].as_i64().unwrap()
        - done[0]["created_at"].as_i64().unwrap();
    assert!(
        i64::try_from(done.len()).unwrap() <= span / PERIOD_MS + 1,
        "{} checks in {span} ms",
        done.len()
    );
    polling.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_check_outlasting_the_lease_is_not_started_again_by_another_node() {
    kit::init_tracing();
    let scan = SCAN_MS.to_string();
    let cluster = Cluster::start(2, &["--health-scan-interval-ms", &scan]);
    let api = cluster.through_lb();
    // A listening machine that accepts connections and never answers: its
    // check lasts the policy's timeout, many leases long.
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tarpit_port = tarpit.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = tarpit.accept().await {
            open.push(conn);
        }
    });
    let (status, v) = api
        .post("/api/environments", json!({ "name": "Test" }))
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = api
        .post(
            "/api/machines",
            json!({
                "name": "slow",
                "comms_style": "TentaclePassive",
                "uri": format!("https://127.0.0.1:{tarpit_port}/"),
                "thumbprint": common::tp(9),
                "environments": ["Test"],
                "roles": ["web"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let timeout_s = 6;
    fast_policy(
        &cluster,
        u32::try_from(PERIOD_MS / 1000).unwrap(),
        timeout_s,
    );

    // The first scheduled check starts; while it runs (for far longer than
    // the lease's two scans), no node starts another.
    let deadline = Instant::now() + T;
    let first = loop {
        let checks = scheduled_checks(&api, "slow").await;
        if let Some(t) = checks.last() {
            break t.clone();
        }
        assert!(Instant::now() < deadline, "no scheduled check within {T:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = first["id"].as_str().unwrap().to_string();
    let watched_from = Instant::now();
    let mut polls = 0;
    loop {
        let checks = scheduled_checks(&api, "slow").await;
        let me = checks.iter().find(|t| t["id"] == id.as_str()).unwrap();
        if !unfinished(me) {
            break;
        }
        polls += 1;
        assert_eq!(
            checks.len(),
            1,
            "a second scheduled check of the same machine while the first runs: {checks:#?}"
        );
        assert!(
            watched_from.elapsed() < Duration::from_secs(u64::from(timeout_s) + 30),
            "the slow check did not end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It ran long enough for the lease to run out several times over.
    let (status, v) = api.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(status, 200, "{v}");
    let ran =
        v["task"]["completed_at"].as_i64().unwrap() - v["task"]["started_at"].as_i64().unwrap();
    assert!(
        ran > 4 * i64::try_from(SCAN_MS).unwrap(),
        "the check took only {ran} ms ({polls} polls)"
    );
    held.abort();
}
