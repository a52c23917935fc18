//! `bench tasks`: script tasks through the server's HTTP API, end to end.
//!
//! The server (`octo_server_core::start`, SQLite in a temporary data
//! directory) runs in this process. Child processes (this binary, hidden
//! subcommand `tasks-child`, at most `--tentacles-per-process` each; see
//! [`ChildFleet`]) host the tentacles: each one a polling
//! `TentacleComms` with the real `octo-agent` services (capabilities, scripts)
//! and an `AgentContext` home of its own, all registered as polling machines in
//! one environment.
//!
//! - round trip: `POST /api/tasks/script` (bash `true`, one machine) asking
//!   for the task's events in its answer (`Accept: text/event-stream`, as the
//!   CLI does; from a server that answers JSON, the stream `GET
//!   /api/tasks/{id}/log/stream`) until `end`;
//! - fan-out: one such task on every machine of the environment, from the POST
//!   until `end`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::AgentContext;
use octo_comms::{Backoff, PollingTarget, TentacleComms};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::script_service_server::ScriptServiceServer;
use octo_server_core::{start, RunArgs};
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// Bound on any single wait.
const WAIT: Duration = Duration::from_secs(120);
const ENVIRONMENT: &str = "Bench";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Timed round trips (after the warm-up).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Untimed round trips first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Polling tentacles (machines) for the fan-out.
    #[arg(long, default_value_t = 100)]
    tentacles: usize,
    /// Fan-out tasks (the median is reported).
    #[arg(long, default_value_t = 5)]
    fanout_runs: usize,
    /// Most tentacles one child process hosts (see [`ChildFleet`]).
    #[arg(long, default_value_t = TENTACLES_PER_PROCESS)]
    tentacles_per_process: usize,
    /// The server's `--max-parallel-steps` (machines of one task at once).
    #[arg(long, default_value_t = octo_engine::DEFAULT_MAX_PARALLEL_STEPS)]
    max_parallel_steps: usize,
    /// Also time the `octopus run-script` process against ssh through a
    /// ControlMaster connection, interleaved, this many times each (as
    /// `bench fleet` does; 0: not measured). Needs openssh-server.
    #[arg(long, default_value_t = 0)]
    cli_runs: usize,
    /// Store on this PostgreSQL database (`postgres://...`; give an empty
    /// database) rather than SQLite in a temporary directory.
    #[arg(long)]
    database_url: Option<String>,
    /// Server nodes on that database (1 or 2). With 2, the tentacles poll
    /// the nodes alternately and every task is submitted to the first node,
    /// so the steps of the second node's tentacles are handed to it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    nodes: u8,
    #[command(flatten)]
    fleet_home: FleetHome,
}

/// Where the simulated tentacles keep their homes (and so their scripts' work
/// folders).
///
/// A real fleet's machines have a file system each; here thousands share one.
/// On ext4 without a journal (this kind of VM's root) every new inode skips
/// the inodes freed in the last minute or more, reading each one's inode table
/// block, so on a shared disk a script's four files cost more the more
/// scripts the whole fleet ran lately, and the figures drift from one run to
/// the next (BENCHMARKS.md, eighth session). A tmpfs has no such cost.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetHome {
    /// Directory under which each child process makes its tentacles' homes
    /// [default: /dev/shm (a tmpfs) where it is a directory, otherwise the
    /// system's temporary directory].
    #[arg(long = "fleet-home", value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl FleetHome {
    /// The directory given, or the default.
    pub(crate) fn resolve(&self) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct ChildOptions {
    /// Where the tentacles poll: tentacle i polls the (i mod n)-th address.
    #[arg(long, required = true)]
    server: Vec<String>,
    #[arg(long)]
    server_thumbprint: Thumbprint,
    #[arg(long)]
    count: usize,
    /// The fleet-wide number of this process's first tentacle (`t{first}`,
    /// subscription `bench-{first}`), when several processes host the fleet.
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Reconnect as a real tentacle does (1 s .. 60 s, full jitter) rather
    /// than quickly (50 ms .. 1 s).
    #[arg(long)]
    real_backoff: bool,
    #[command(flatten)]
    fleet_home: FleetHome,
}

pub(crate) fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// CPU time (user and system, all threads) of a process in milliseconds:
/// this process with `None`; with `Some(pid)`, that process and its children
/// that ended (a tentacle process and the scripts it ran). 0 when unreadable.
pub(crate) fn cpu_ms(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(
        || "/proc/self/stat".to_string(),
        |p| format!("/proc/{p}/stat"),
    );
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // The fields after the command name (which may hold spaces): state is the
    // first; utime, stime, cutime and cstime the 12th to the 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let take = if pid.is_some() { 11..15 } else { 11..13 };
    let ticks: f64 = fields
        .get(take)
        .unwrap_or_default()
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // USER_HZ: 100 on Linux.
    ticks * 10.0
}

/// The CPU a fan-out of `steps` steps cost per step, in ms: this process (the
/// server and this benchmark's client) and the fleet's processes (tentacles and
/// their scripts), from [`cpu_ms`] readings before and after.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepCpu {
    pub(crate) server_ms: f64,
    pub(crate) fleet_ms: f64,
}

impl StepCpu {
    pub(crate) fn measure(before: (f64, f64), after: (f64, f64), steps: usize) -> Self {
        let n = steps.max(1) as f64;
        Self {
            server_ms: (after.0 - before.0) / n,
            fleet_ms: (after.1 - before.1) / n,
        }
    }

    /// Medians of each.
    pub(crate) fn median(v: &[StepCpu]) -> Option<StepCpu> {
        let mid = |f: fn(&StepCpu) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x.get(x.len() / 2).copied()
        };
        Some(StepCpu {
            server_ms: mid(|c| c.server_ms)?,
            fleet_ms: mid(|c| c.fleet_ms)?,
        })
    }
}

pub(crate) fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The server's API, authenticated with the admin key.
pub(crate) struct Api {
    pub(crate) base: String,
    pub(crate) key: String,
    pub(crate) http: reqwest::Client,
}

impl Api {
    pub(crate) async fn post(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let resp = tokio::time::timeout(
            WAIT,
            self.http
                .post(format!("{}{path}", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .json(&body)
                .send(),
        )
        .await
        .context("POST timed out")??;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub(crate) async fn post_ok(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let (status, v) = self.post(path, body).await?;
        if status != 201 {
            bail!("POST {path}: {status} {v}");
        }
        Ok(v)
    }

    /// Creates a task; returns its id.
    pub(crate) async fn create(&self, path: &str, body: Value) -> anyhow::Result<String> {
        let v = self.post_ok(path, body).await?;
        Ok(v["task"]["id"].as_str().context("task id")?.to_string())
    }

    /// Follows the task's event stream until `end`; returns its `{"task","steps"}`.
    pub(crate) async fn wait_end(&self, task_id: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!(
                "{}/api/tasks/{task_id}/log/stream?after=0",
                self.base
            ))
            .header("X-Octopus-ApiKey", &self.key)
            .send()
            .await?;
        if resp.status() != 200 {
            bail!("event stream of {task_id}: {}", resp.status());
        }
        Events::new(resp).until_end(task_id).await
    }

    /// Runs a script task and returns (elapsed from the POST to `end`, end).
    /// As the CLI does, the POST asks for the task's events in its answer
    /// (`Accept: text/event-stream`); a server that answers with the task as
    /// JSON is followed through its stream (a second request).
    pub(crate) async fn run_script(&self, body: Value) -> anyhow::Result<(Duration, Value)> {
        let t = Instant::now();
        let resp = tokio::time::timeout(
            WAIT,
            self.http
                .post(format!("{}/api/tasks/script", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .header("Accept", "text/event-stream, application/json;q=0.9")
                .json(&body)
                .send(),
        )
        .await
        .context("POST timed out")??;
        if resp.status() != 201 {
            let status = resp.status();
            bail!("POST /api/tasks/script: {status} {}", resp.text().await?);
        }
        let streamed = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let end = if streamed {
            Events::new(resp).until_end("the new task").await?
        } else {
            let v: Value = resp.json().await?;
            let id = v["task"]["id"].as_str().context("task id")?;
            self.wait_end(id).await?
        };
        let elapsed = t.elapsed();
        if end["task"]["state"] != "Success" {
            let id = &end["task"]["id"];
            bail!("task {id} ended {}: {end}", end["task"]["state"]);
        }
        Ok((elapsed, end))
    }
}

/// A server-sent event stream, parsed.
struct Events {
    resp: reqwest::Response,
    /// Bytes received and not yet returned as events (a chunk may end inside
    /// a character: decoded by whole events).
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of an event: a large
    /// event (a task of thousands of steps) arrives in many chunks, and each
    /// chunk is searched once, not the whole buffer again.
    scanned: usize,
}

impl Events {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            resp,
            buf: Vec::new(),
            scanned: 0,
        }
    }

    /// Reads events until `end` (at most [`WAIT`]); returns its data.
    async fn until_end(mut self, task: &str) -> anyhow::Result<Value> {
        tokio::time::timeout(WAIT, async {
            while let Some((name, data)) = self.next().await? {
                if name == "end" {
                    return Ok(data);
                }
            }
            bail!("the event stream of {task} ended without `end`")
        })
        .await
        .with_context(|| format!("{task} did not end in {WAIT:?}"))?
    }

    /// The next event (name, JSON data); None when the stream ended.
    async fn next(&mut self) -> anyhow::Result<Option<(String, Value)>> {
        loop {
            let from = self.scanned.saturating_sub(1);
            let end = self.buf[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|j| from + j);
            let Some(i) = end else {
                self.scanned = self.buf.len();
                let Some(chunk) = self.resp.chunk().await? else {
                    return Ok(None);
                };
                self.buf.extend_from_slice(&chunk);
                continue;
            };
            let mut name = "message".to_string();
            let mut data = String::new();
            for line in std::str::from_utf8(&self.buf[..i])?.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            self.buf.drain(..i + 2);
            self.scanned = 0;
            if data.is_empty() {
                continue; // keep-alive comment
            }
            return Ok(Some((name, serde_json::from_str(&data)?)));
        }
    }
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    crate::raise_fd_limit();
    if o.tentacles == 0 || o.runs == 0 || o.fanout_runs == 0 {
        bail!("--tentacles, --runs and --fanout-runs must be at least 1");
    }
    if o.nodes > 1 && o.database_url.is_none() {
        bail!("--nodes 2 needs --database-url (nodes share a PostgreSQL database)");
    }
    let tmp = tempfile::tempdir()?;
    let args = |data: &str, node: &str| RunArgs {
        max_parallel_steps: o.max_parallel_steps,
        database_url: o.database_url.clone(),
        node_name: Some(node.to_string()),
        ..RunArgs::loopback(&tmp.path().join(data))
    };
    let server = start(&args("data", "bench-a")).await?;
    // A second node shares the first one's keys (as an operator copies them).
    let second = if o.nodes > 1 {
        let dir = tmp.path().join("data-b");
        std::fs::create_dir_all(&dir)?;
        for f in ["master-key", "server.crt", "server.key"] {
            std::fs::copy(tmp.path().join("data").join(f), dir.join(f))?;
        }
        Some(start(&args("data-b", "bench-b")).await?)
    } else {
        None
    };
    let mut servers = vec![format!("127.0.0.1:{}", server.comms_port)];
    if let Some(b) = &second {
        servers.push(format!("127.0.0.1:{}", b.comms_port));
    }
    let api = Api {
        base: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().context("admin key")?,
        http: reqwest::Client::new(),
    };
    api.post_ok("/api/environments", json!({ "name": ENVIRONMENT }))
        .await?;

    let mut fleet = ChildFleet::spawn(
        &servers,
        &server.thumbprint,
        o.tentacles,
        o.tentacles_per_process,
        false,
        &o.fleet_home,
    )
    .await?;
    for (i, tp) in fleet.thumbprints.iter().enumerate() {
        api.post_ok(
            "/api/machines",
            json!({
                "name": format!("t{i}"),
                "comms_style": "TentacleActive",
                "uri": format!("poll://bench-{i}/"),
                "thumbprint": tp,
                "environments": [ENVIRONMENT],
                "roles": ["bench"],
            }),
        )
        .await?;
    }
    // Registered (so trusted): now the tentacles connect.
    fleet.go().await?;
    println!(
        "machine: {} cores; server pid {}, {}",
        std::thread::available_parallelism()?.get(),
        std::process::id(),
        fleet.describe()
    );

    // Every tentacle connected and answering: a health check of the environment.
    let t = Instant::now();
    let mut healthy = false;
    for _ in 0..5 {
        let id = api
            .create("/api/tasks/health", json!({ "environment": ENVIRONMENT }))
            .await?;
        let end = api.wait_end(&id).await?;
        if end["task"]["state"] == "Success" {
            healthy = true;
            break;
        }
        println!("health check: {}", end["task"]["state"]);
    }
    if !healthy {
        bail!("the tentacles are not all healthy");
    }
    println!(
        "{} tentacles connected and healthy in {:.2} s",
        o.tentacles,
        t.elapsed().as_secs_f64()
    );

    // Round trip: one machine.
    let one = json!({ "script": "true", "machines": ["t0"] });
    for _ in 0..o.warmup {
        api.run_script(one.clone()).await?;
    }
    let mut samples = Vec::with_capacity(o.runs);
    for _ in 0..o.runs {
        samples.push(api.run_script(one.clone()).await?.0);
    }
    samples.sort();
    let (p50, p99) = (percentile_ms(&samples, 0.5), percentile_ms(&samples, 0.99));
    println!(
        "task round trip (POST to `end`, one polling machine): p50 {p50:.2} ms, p99 {p99:.2} ms ({} runs after {} warm-up)",
        o.runs, o.warmup
    );
    // With two nodes: a machine polling the second node, its task submitted
    // to the first (the step is handed over).
    let mut handed_p50 = None;
    if second.is_some() && o.tentacles > 1 {
        let other = json!({ "script": "true", "machines": ["t1"] });
        for _ in 0..o.warmup {
            api.run_script(other.clone()).await?;
        }
        let mut handed = Vec::with_capacity(o.runs);
        for _ in 0..o.runs {
            handed.push(api.run_script(other.clone()).await?.0);
        }
        handed.sort();
        let p = percentile_ms(&handed, 0.5);
        println!(
            "task round trip, step handed to the second node: p50 {p:.2} ms, p99 {:.2} ms",
            percentile_ms(&handed, 0.99)
        );
        handed_p50 = Some(round2(p));
    }

    // Fan-out: every machine of the environment.
    let all = json!({ "script": "true", "environment": ENVIRONMENT });
    let mut fanout = Vec::with_capacity(o.fanout_runs);
    let mut cpu = Vec::with_capacity(o.fanout_runs);
    for i in 0..o.fanout_runs {
        let before = (cpu_ms(None), fleet.cpu_ms());
        let (d, end) = api.run_script(all.clone()).await?;
        cpu.push(StepCpu::measure(
            before,
            (cpu_ms(None), fleet.cpu_ms()),
            o.tentacles,
        ));
        let steps = end["steps"].as_array().map_or(0, Vec::len);
        if steps != o.tentacles {
            bail!("fan-out task has {steps} steps, expected {}", o.tentacles);
        }
        println!(
            "fan-out {}: {} machines in {:.3} s",
            i + 1,
            steps,
            d.as_secs_f64()
        );
        fanout.push(d.as_secs_f64());
    }
    let mut sorted = fanout.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let cpu = StepCpu::median(&cpu);
    if let Some(c) = cpu {
        println!(
            "fan-out CPU per step: {:.2} ms in the server's process, {:.2} ms in the fleet's (tentacles and scripts)",
            c.server_ms, c.fleet_ms
        );
    }

    let cli_ratio = if o.cli_runs > 0 {
        let octopus = crate::release_binary("octo-server", "octopus")?;
        crate::fleet::cli_vs_ssh(&octopus, &api, o.cli_runs, tmp.path()).await?
    } else {
        None
    };

    let fleet_per_process = fleet.per_process;
    let fleet_home = fleet.home.display().to_string();
    fleet.stop(Duration::from_secs(10)).await;
    server.stop().await;
    if let Some(b) = second {
        b.stop().await;
    }
    let mut out = json!({
        "bench": "tasks",
        "store": if o.database_url.is_some() { "postgresql" } else { "sqlite" },
        "nodes": o.nodes,
        "task_rtt_handed_p50_ms": handed_p50,
        "task_rtt_p50_ms": round2(p50),
        "task_rtt_p99_ms": round2(p99),
        "runs": o.runs,
        "warmup": o.warmup,
        "fanout_100_s": round3(median),
        "fanout_runs_s": fanout.iter().map(|&x| round3(x)).collect::<Vec<_>>(),
        "fanout_machines": o.tentacles,
        "fanout_server_cpu_ms_per_step": cpu.map(|c| round2(c.server_ms)),
        "fanout_fleet_cpu_ms_per_step": cpu.map(|c| round2(c.fleet_ms)),
        "tentacles_per_process": fleet_per_process,
        "fleet_home": fleet_home,
        "max_parallel_steps": o.max_parallel_steps,
        "comms_style": "TentacleActive",
    });
    if let (Some(out), Value::Object(keys)) = (
        out.as_object_mut(),
        crate::fleet::CliVsSsh::keys(cli_ratio.as_ref()),
    ) {
        out.extend(keys);
    }
    println!("{out}");
    Ok(())
}

/// Most tentacles one child process hosts by default. A real tentacle is a
/// process of its own with a handful of descriptors; thousands of tentacles in
/// one process give every script the kernel's work of closing thousands of
/// descriptors at `exec` (and copying the descriptor table at the spawn), a
/// cost no real machine has (BENCHMARKS: "The fleet in processes of 500").
pub(crate) const TENTACLES_PER_PROCESS: usize = 500;

/// The simulated fleet: `tasks-child` processes hosting `count` polling
/// tentacles, at most `per_process` each, numbered `t0`.. across them.
pub(crate) struct ChildFleet {
    children: Vec<tokio::process::Child>,
    stdins: Vec<tokio::process::ChildStdin>,
    /// Every tentacle's thumbprint, `t0` first.
    pub(crate) thumbprints: Vec<String>,
    /// Tentacles in each process (the last may have fewer).
    pub(crate) per_process: usize,
    /// Where the tentacles' homes are (see [`FleetHome`]).
    pub(crate) home: PathBuf,
}

impl ChildFleet {
    /// Starts the processes (their identities are made at once) and reads
    /// every thumbprint; nothing connects before [`ChildFleet::go`].
    pub(crate) async fn spawn(
        servers: &[String],
        server_thumbprint: &Thumbprint,
        count: usize,
        per_process: usize,
        real_backoff: bool,
        home: &FleetHome,
    ) -> anyhow::Result<Self> {
        let home = home.resolve();
        if per_process == 0 {
            bail!("--tentacles-per-process must be at least 1");
        }
        let exe = std::env::current_exe()?;
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        let mut outs = Vec::new();
        for first in (0..count).step_by(per_process) {
            let n = per_process.min(count - first);
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("tasks-child")
                .args(servers.iter().flat_map(|a| ["--server", a.as_str()]))
                .args(["--server-thumbprint", &server_thumbprint.to_string()])
                .args(["--count", &n.to_string(), "--first", &first.to_string()]);
            if real_backoff {
                cmd.arg("--real-backoff");
            }
            cmd.arg("--fleet-home").arg(&home);
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            stdins.push(child.stdin.take().context("child stdin")?);
            outs.push((n, child.stdout.take().context("child stdout")?));
            children.push(child);
        }
        let mut thumbprints = Vec::with_capacity(count);
        for (n, out) in outs {
            let mut lines = BufReader::new(out).lines();
            let hello: Value =
                serde_json::from_str(&lines.next_line().await?.context("child said nothing")?)?;
            let made: Vec<String> = hello["thumbprints"]
                .as_array()
                .context("thumbprints")?
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            if made.len() != n {
                bail!("a child made {} tentacles, not {n}", made.len());
            }
            thumbprints.extend(made);
        }
        Ok(Self {
            children,
            stdins,
            thumbprints,
            per_process: per_process.min(count),
            home,
        })
    }

    /// Every tentacle starts polling.
    pub(crate) async fn go(&mut self) -> anyhow::Result<()> {
        for stdin in &mut self.stdins {
            stdin.write_all(b"go\n").await?;
        }
        Ok(())
    }

    /// CPU of the fleet's processes and of the scripts they ran (see
    /// [`cpu_ms`]), in ms.
    pub(crate) fn cpu_ms(&self) -> f64 {
        self.children.iter().map(|c| cpu_ms(c.id())).sum()
    }

    /// "N polling tentacles in P processes (pids ...), homes under DIR".
    pub(crate) fn describe(&self) -> String {
        let pids: Vec<String> = self
            .children
            .iter()
            .filter_map(|c| c.id().map(|p| p.to_string()))
            .collect();
        format!(
            "{} polling tentacles in {} child process(es) of at most {} (pids {}), homes under {}",
            self.thumbprints.len(),
            self.children.len(),
            self.per_process,
            pids.join(" "),
            self.home.display()
        )
    }

    /// Closes their standard input (they stop) and waits up to `wait` for
    /// each; any still running is killed when dropped.
    pub(crate) async fn stop(self, wait: Duration) {
        drop(self.stdins);
        let deadline = tokio::time::Instant::now() + wait;
        for mut child in self.children {
            let _ = tokio::time::timeout_at(deadline, child.wait()).await;
        }
    }
}

/// The tentacles: `count` polling identities with the real services, each with
/// its own home directory. Prints their thumbprints, starts polling on "go",
/// stops when stdin closes.
pub async fn child(o: ChildOptions) -> anyhow::Result<()> {
    crate::raise_fd_limit();
    let root = o.fleet_home.resolve();
    let tmp = tempfile::tempdir_in(&root)
        .with_context(|| format!("cannot make the tentacles' homes in {}", root.display()))?;
    let mut tentacles = Vec::with_capacity(o.count);
    for i in o.first..o.first + o.count {
        let name = format!("t{i}");
        let dir = tmp.path().join(&name);
        let ctx = AgentContext {
            instance_name: name.clone(),
            home: dir.join("home"),
            applications: dir.join("apps"),
        };
        std::fs::create_dir_all(&ctx.home)?;
        std::fs::create_dir_all(&ctx.applications)?;
        let id = Identity::generate(&name)?;
        let routes = tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(
            ctx.clone(),
        )))
        .add_service(ScriptServiceServer::new(ScriptServiceImpl::new(ctx)));
        let trust = TrustStore::new([o.server_thumbprint], octo_testkit::hint("bench tentacle"));
        tentacles.push((
            id.thumbprint(),
            TentacleComms::new(id, trust, routes, &name),
        ));
    }
    let thumbprints: Vec<String> = tentacles.iter().map(|(t, _)| t.to_string()).collect();
    println!("{}", json!({ "thumbprints": thumbprints }));

    let shutdown = CancellationToken::new();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        if line != "go" {
            bail!("unknown command {line}");
        }
        for (i, (_, comms)) in (o.first..).zip(tentacles.iter()) {
            let target = PollingTarget {
                address: o.server[i % o.server.len()].clone(),
                subscription_id: format!("bench-{i}"),
            };
            let (c, t) = (comms.clone(), shutdown.clone());
            let backoff = if o.real_backoff {
                Backoff::default()
            } else {
                Backoff::new(Duration::from_millis(50), Duration::from_secs(1))
            };
            tokio::spawn(async move { c.run_polling(target, 1, backoff, t).await });
        }
    }
    shutdown.cancel();
    Ok(())
}
