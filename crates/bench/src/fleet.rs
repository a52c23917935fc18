//! `bench fleet`: one server node and a fleet of polling tentacles.
//!
//! The server runs in this process (SQLite in a temporary data directory, or
//! PostgreSQL with `--database-url`).
//! Child processes (hidden subcommand `tasks-child`, at most
//! `--tentacles-per-process` each) host `--tentacles` polling tentacles (5,000
//! by default), each with the real comms and agent services,
//! its own certificate and its own polling connection, reconnecting as a real
//! tentacle does (1 s .. 60 s, full jitter). Machines are spread over five
//! environments (`Fleet-0` .. `Fleet-4`), all with role `fleet`.
//!
//! Figures: registration rate; the first connection of the whole fleet; the
//! server's RSS with the fleet idle and connected (this process: the server
//! and this benchmark's small client); a health check of every machine;
//! one script task (`true`) on 1,000 machines (one environment) and on all;
//! a one-machine task's round trip; a page of 50 machines of one environment
//! (`GET /api/machines?environment=..&take=50`); the server restarted on the
//! same data and ports, until every tentacle is connected again, counting
//! the accept and handshake warnings the server logs meanwhile, twice: on
//! sockets this process holds across the restart (as systemd's
//! `octopus.socket` does: connections wait in the accept queue), then
//! binding the ports anew (connections in the gap are refused); and the
//! `octopus run-script` process against `ssh` through a ControlMaster
//! connection to a private sshd, interleaved.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use octo_server_core::{start_on, PassedSockets, RunArgs, RunningServer};
use serde_json::{json, Value};

use crate::tasks::{cpu_ms, percentile_ms, round2, round3, Api, ChildFleet, StepCpu};

/// Bound on the fleet's (re)connection.
const CONNECT_WAIT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Polling tentacles (machines).
    #[arg(long, default_value_t = 5000)]
    tentacles: usize,
    /// Timed one-machine round trips (after 20 warm-up ones).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Runs of each fan-out (the median is reported).
    #[arg(long, default_value_t = 3)]
    fanout_runs: usize,
    /// Interleaved runs of the CLI and of ssh.
    #[arg(long, default_value_t = 30)]
    cli_runs: usize,
    /// The server's `--max-parallel-steps` (machines of one task at once).
    #[arg(long, default_value_t = octo_engine::DEFAULT_MAX_PARALLEL_STEPS)]
    max_parallel_steps: usize,
    /// The server's `--max-running-steps` (steps of every task at once).
    #[arg(long, default_value_t = octo_engine::DEFAULT_MAX_RUNNING_STEPS)]
    max_running_steps: usize,
    /// Most tentacles one child process hosts (see `tasks::ChildFleet`).
    #[arg(long, default_value_t = crate::tasks::TENTACLES_PER_PROCESS)]
    tentacles_per_process: usize,
    /// Store on this PostgreSQL database (`postgres://...`; give an empty
    /// database) rather than SQLite in a temporary directory. The restart
    /// reuses it; the RSS is the server's process alone, not PostgreSQL's.
    #[arg(long)]
    database_url: Option<String>,
    #[command(flatten)]
    fleet_home: crate::tasks::FleetHome,
}

/// Counts the warnings and errors the server's comms log while armed (the
/// reconnect storm's "accept or handshake errors").
pub struct CommsProblems;

static ARMED: AtomicBool = AtomicBool::new(false);
static PROBLEMS: AtomicUsize = AtomicUsize::new(0);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CommsProblems {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let m = event.metadata();
        if ARMED.load(Ordering::Relaxed)
            && *m.level() <= tracing::Level::WARN
            && m.target().starts_with("octo_comms")
        {
            PROBLEMS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn wait_connected(server: &RunningServer, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while server.polling_connections() < n {
        if t.elapsed() > CONNECT_WAIT {
            bail!(
                "only {} of {n} tentacles connected after {CONNECT_WAIT:?}",
                server.polling_connections()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t.elapsed())
}

/// The kernel's count of connection attempts dropped because a listener's
/// accept queue was full (`TcpExt: ListenDrops` in `/proc/net/netstat`, this
/// network namespace's listeners together; the fleet's server is by far the
/// busiest here). None when it cannot be read.
fn listen_drops() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    tcp_ext(&text, "ListenDrops")
}

/// A `TcpExt` counter from the text of `/proc/net/netstat` (a line of names,
/// then a line of values).
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace().skip(1);
    let values = lines.next()?.split_whitespace().skip(1);
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// How many attempts were dropped since `before` (None when unknown).
fn drops_since(before: Option<u64>) -> Option<u64> {
    Some(listen_drops()?.saturating_sub(before?))
}

/// Copies of `held` for a server to listen on (as systemd passes its own).
fn passed(held: &[std::net::TcpListener]) -> anyhow::Result<PassedSockets> {
    let copies = held
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PassedSockets::new(copies)?)
}

/// What one restart measured.
struct Restart {
    /// From the old server's end to every tentacle connected to the new one.
    seconds: f64,
    /// The comms' warnings and errors meanwhile.
    problems: usize,
    /// Connection attempts the kernel dropped meanwhile.
    drops: Option<u64>,
}

/// Starts the server again (the old one stopped) on `sockets` and waits for
/// `tentacles` to connect; `how` names the restart in the output.
async fn restart(
    args: &RunArgs,
    sockets: PassedSockets,
    tentacles: usize,
    how: &str,
) -> anyhow::Result<(RunningServer, Restart)> {
    let t = Instant::now();
    let drops = listen_drops();
    PROBLEMS.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let server = start_on(args, sockets, |_| None).await?;
    let reconnect = wait_connected(&server, tentacles).await?;
    let seconds = t.elapsed().as_secs_f64();
    let drops = drops_since(drops);
    ARMED.store(false, Ordering::Relaxed);
    let problems = PROBLEMS.load(Ordering::Relaxed);
    println!(
        "restart {how}: all {tentacles} reconnected {:.1} s after the new start ({seconds:.1} s in all), {problems} comms warnings, {} connection attempts dropped by the kernel",
        reconnect.as_secs_f64(),
        drops.map_or("unknown".into(), |d| d.to_string())
    );
    Ok((
        server,
        Restart {
            seconds,
            problems,
            drops,
        },
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    crate::raise_fd_limit();
    if o.tentacles < 1000 {
        bail!("--tentacles must be at least 1000 (fanout_1000_s uses one environment of a fifth of them)");
    }
    let octopus = crate::release_binary("octo-server", "octopus")?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    // The API's and the comms port's sockets, held by this process as
    // systemd's octopus.socket holds them, for the first restart; the second
    // binds the same ports anew, as a server on its own does.
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let held = [
        octo_comms::net::listen_on(loopback)?.into_std()?,
        octo_comms::net::listen_on(loopback)?.into_std()?,
    ];
    let args = RunArgs {
        max_parallel_steps: o.max_parallel_steps,
        max_running_steps: o.max_running_steps,
        database_url: o.database_url.clone(),
        listen: held[0].local_addr()?,
        comms_listen_port: held[1].local_addr()?.port(),
        ..RunArgs::loopback(&data)
    };
    let server = start_on(&args, passed(&held)?, |_| None).await?;
    let api = Api {
        base: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().context("admin key")?,
        http: reqwest::Client::new(),
    };
    for e in 0..5 {
        api.post_ok("/api/environments", json!({ "name": format!("Fleet-{e}") }))
            .await?;
    }

    let servers = [format!("127.0.0.1:{}", server.comms_port)];
    let mut fleet = ChildFleet::spawn(
        &servers,
        &server.thumbprint,
        o.tentacles,
        o.tentacles_per_process,
        true,
        &o.fleet_home,
    )
    .await?;

    // Registration, 16 at a time.
    let t = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (i, tp) in fleet.thumbprints.iter().enumerate() {
        let body = json!({
            "name": format!("t{i}"),
            "comms_style": "TentacleActive",
            "uri": format!("poll://bench-{i}/"),
            "thumbprint": tp,
            "environments": [format!("Fleet-{}", i % 5)],
            "roles": ["fleet"],
        });
        pending.push(api.post_ok("/api/machines", body));
        if pending.len() >= 16 {
            pending.next().await.context("a registration")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    drop(pending);
    let register_per_s = o.tentacles as f64 / t.elapsed().as_secs_f64();
    println!(
        "registered {} machines in {:.1} s ({register_per_s:.0}/s)",
        o.tentacles,
        t.elapsed().as_secs_f64()
    );

    let drops = listen_drops();
    fleet.go().await?;
    println!("{}", fleet.describe());
    let first_connect = wait_connected(&server, o.tentacles).await?;
    let first_connect_drops = drops_since(drops);
    println!(
        "{} tentacles connected in {:.1} s ({} connection attempts dropped by the kernel, accept queue full)",
        o.tentacles,
        first_connect.as_secs_f64(),
        first_connect_drops.map_or("unknown".into(), |d| d.to_string())
    );
    // Idle a moment (handshakes' garbage freed), then the RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_mib();
    println!("RSS with {} idle connections: {rss:.0} MiB", o.tentacles);

    // Health of every machine.
    let t = Instant::now();
    let id = api.create("/api/tasks/health", json!({})).await?;
    let end = api.wait_end(&id).await?;
    let health_s = t.elapsed().as_secs_f64();
    if end["task"]["state"] != "Success" {
        bail!("health check ended {}", end["task"]["state"]);
    }
    println!("health check of {}: {health_s:.2} s", o.tentacles);

    // Fan-outs.
    let mut fan_1000 = Vec::new();
    let mut fan_all = Vec::new();
    let mut cpu = Vec::new();
    let reading = || (cpu_ms(None), fleet.cpu_ms());
    for _ in 0..o.fanout_runs {
        let (d, end) = api
            .run_script(json!({ "script": "true", "environment": "Fleet-0" }))
            .await?;
        let steps = end["steps"].as_array().map_or(0, Vec::len);
        println!("fan-out to {steps}: {:.3} s", d.as_secs_f64());
        fan_1000.push(d.as_secs_f64());
        let before = reading();
        let (d, end) = api
            .run_script(json!({ "script": "true", "role": "fleet" }))
            .await?;
        let steps = end["steps"].as_array().map_or(0, Vec::len);
        cpu.push(StepCpu::measure(before, reading(), steps));
        println!("fan-out to {steps}: {:.3} s", d.as_secs_f64());
        fan_all.push(d.as_secs_f64());
    }
    let cpu = StepCpu::median(&cpu);
    if let Some(c) = cpu {
        println!(
            "fan-out to all, CPU per step: {:.2} ms in the server's process, {:.2} ms in the fleet's (tentacles and scripts)",
            c.server_ms, c.fleet_ms
        );
    }

    // One-machine round trip.
    let one = json!({ "script": "true", "machines": ["t0"] });
    for _ in 0..20 {
        api.run_script(one.clone()).await?;
    }
    let mut rtt = Vec::with_capacity(o.runs);
    for _ in 0..o.runs {
        rtt.push(api.run_script(one.clone()).await?.0);
    }
    rtt.sort();
    let rtt_p50 = percentile_ms(&rtt, 0.5);
    println!("task round trip p50 {rtt_p50:.2} ms");

    // A page of the machine list.
    let mut list = Vec::new();
    for i in 0..220 {
        let t = Instant::now();
        let resp = api
            .http
            .get(format!(
                "{}/api/machines?environment=Fleet-{}&skip=100&take=50",
                api.base,
                i % 5
            ))
            .header("X-Octopus-ApiKey", &api.key)
            .send()
            .await?;
        if resp.status() != 200 {
            bail!("machine list: {}", resp.status());
        }
        let body: Value = resp.json().await?;
        if body.as_array().map_or(0, Vec::len) != 50 {
            bail!("machine list: not 50 machines");
        }
        if i >= 20 {
            list.push(t.elapsed());
        }
    }
    list.sort();
    let list_p50 = percentile_ms(&list, 0.5);
    println!("machine list page p50 {list_p50:.2} ms");

    // The CLI against ssh.
    let cli_ratio = cli_vs_ssh(&octopus, &api, o.cli_runs, tmp.path()).await?;

    // Restarts: until every tentacle is connected again. First on the held
    // sockets (connections made meanwhile wait in their accept queue), then
    // with the ports closed in between (connections meanwhile are refused).
    server.stop().await;
    let (server, held_restart) =
        restart(&args, passed(&held)?, o.tentacles, "on held sockets").await?;
    server.stop().await;
    drop(held);
    let (server, plain_restart) = restart(
        &args,
        PassedSockets::none(),
        o.tentacles,
        "binding its ports",
    )
    .await?;

    let per_process = fleet.per_process;
    let fleet_home = fleet.home.display().to_string();
    fleet.stop(Duration::from_secs(30)).await;
    server.stop().await;
    let mut out = json!({
        "bench": "fleet",
        "store": if o.database_url.is_some() { "postgresql" } else { "sqlite" },
        "tentacles": o.tentacles,
        "tentacles_per_process": per_process,
        "fleet_home": fleet_home,
        "fanout_server_cpu_ms_per_step": cpu.map(|c| round2(c.server_ms)),
        "fanout_fleet_cpu_ms_per_step": cpu.map(|c| round2(c.fleet_ms)),
        "register_per_s": register_per_s.round(),
        "first_connect_s": round2(first_connect.as_secs_f64()),
        "first_connect_listen_drops": first_connect_drops,
        "server_rss_5000_mib": rss.round(),
        "health_5000_s": round2(health_s),
        "fanout_1000_s": round3(median(fan_1000)),
        "fanout_5000_s": round3(median(fan_all)),
        "task_rtt_p50_ms": round2(rtt_p50),
        "machine_list_5000_p50_ms": round2(list_p50),
        "reconnect_5000_s": round2(plain_restart.seconds),
        "reconnect_errors": plain_restart.problems,
        "reconnect_listen_drops": plain_restart.drops,
        "reconnect_held_sockets_5000_s": round2(held_restart.seconds),
        "reconnect_held_sockets_errors": held_restart.problems,
        "reconnect_held_sockets_listen_drops": held_restart.drops,
        "max_parallel_steps": o.max_parallel_steps,
        "max_running_steps": o.max_running_steps,
    });
    if let (Some(out), Value::Object(keys)) =
        (out.as_object_mut(), CliVsSsh::keys(cli_ratio.as_ref()))
    {
        out.extend(keys);
    }
    println!("{out}");
    Ok(())
}

/// The CLI against ssh (see [`cli_vs_ssh`]).
pub(crate) struct CliVsSsh {
    /// `cli_ms / ssh_ms` of the ssh account with `/bin/sh`: the issue's
    /// `cli_over_ssh_mux`.
    pub ratio: f64,
    /// Median of the whole `octopus run-script` process, ms, its script run by
    /// the shell ssh runs its command with.
    pub cli_ms: f64,
    /// Median of the whole `ssh` process, ms.
    pub ssh_ms: f64,
    /// The ssh account's login shell, which runs ssh's command.
    pub shell: String,
    /// The same with bash on both sides, when its account could be made.
    pub bash: Option<Pair>,
}

/// Medians of the CLI and of ssh through one account, ms.
pub(crate) struct Pair {
    pub cli_ms: f64,
    pub ssh_ms: f64,
}

impl CliVsSsh {
    /// The JSON keys of these figures, each null when `c` is None.
    /// `cli_bash_over_ssh_mux` is the CLI with bash over ssh with sh: what this
    /// benchmark compared before it matched the shells (twenty-first session).
    pub(crate) fn keys(c: Option<&Self>) -> Value {
        let bash = c.and_then(|c| c.bash.as_ref());
        json!({
            "cli_over_ssh_mux": c.map(|c| round2(c.ratio)),
            "cli_median_ms": c.map(|c| round2(c.cli_ms)),
            "ssh_median_ms": c.map(|c| round2(c.ssh_ms)),
            "ssh_shell": c.map(|c| c.shell.clone()),
            "cli_over_ssh_mux_bash": bash.map(|b| round2(b.cli_ms / b.ssh_ms)),
            "cli_bash_median_ms": bash.map(|b| round2(b.cli_ms)),
            "ssh_bash_median_ms": bash.map(|b| round2(b.ssh_ms)),
            "cli_bash_over_ssh_mux": c.and_then(|c| c.bash.as_ref().map(|b| round2(b.cli_ms / c.ssh_ms))),
        })
    }
}

/// The `--syntax` of `octopus run-script` that runs a script with `shell`
/// (a login shell's path), if there is one.
fn syntax_of(shell: &str) -> Option<&'static str> {
    match shell.rsplit('/').next()? {
        "bash" => Some("bash"),
        "sh" | "dash" => Some("sh"),
        _ => None,
    }
}

/// `user`'s login shell, from the account database.
fn login_shell(user: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("getent")
        .args(["passwd", user])
        .output()
        .context("running getent passwd")?;
    let line = String::from_utf8_lossy(&out.stdout);
    match line.trim_end().rsplit(':').next() {
        Some(shell) if out.status.success() && !shell.is_empty() => Ok(shell.to_string()),
        _ => bail!(
            "no login shell for the account {user} (getent passwd {user}: {})",
            out.status
        ),
    }
}

/// Median time of `octopus run-script --machine t0 --script true` over the
/// median of `ssh HOST true` through a ControlMaster connection, interleaved.
/// None (and said) when sshd is not installed; None when `runs` is 0.
///
/// Like for like: both run `true` with the same shell, the ssh account's
/// login shell (`--syntax` to match), and with this process's locale (sent
/// by ssh and accepted by its sshd, as Debian's stock configuration does; a
/// tentacle's scripts inherit it). Twice, interleaved: through an account
/// whose shell is `/bin/sh` (the figure), and through one whose shell
/// is bash, the CLI's default.
pub(crate) async fn cli_vs_ssh(
    octopus: &Path,
    api: &Api,
    runs: usize,
    dir: &Path,
) -> anyhow::Result<Option<CliVsSsh>> {
    if runs == 0 {
        return Ok(None);
    }
    let Some(sshd) = crate::deploy::start_sshd(&dir.join("ssh"))? else {
        println!("cli_over_ssh_mux: skipped (no /usr/sbin/sshd; install openssh-server)");
        return Ok(None);
    };
    let mut accounts = vec![Account::new(crate::deploy::ssh_user(), &sshd, dir, 0)?];
    match crate::deploy::ssh_account(crate::deploy::SSH_BASH_USER, "/bin/bash") {
        (user, None) => accounts.push(Account::new((user, None), &sshd, dir, 1)?),
        (_, Some(note)) => println!("cli_over_ssh_mux_bash: skipped: {note}"),
    }
    let cli = |syntax: &str| {
        let mut c = std::process::Command::new(octopus);
        c.args([
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "run-script",
            "--machine",
            "t0",
            "--syntax",
            syntax,
            "--script",
            "true",
        ]);
        c
    };
    // The master connections, kept open, then each pair warmed.
    for a in &accounts {
        let status = a.ssh(&[]).status()?;
        if !status.success() {
            bail!("ssh to the private sshd as {} failed ({status})", a.user);
        }
        for _ in 0..3 {
            timed(cli(a.syntax)).await?;
            timed(a.ssh(&[])).await?;
        }
    }
    let mut times = vec![(Vec::new(), Vec::new()); accounts.len()];
    for _ in 0..runs {
        for (a, (c, s)) in accounts.iter().zip(times.iter_mut()) {
            c.push(timed(cli(a.syntax)).await?);
            s.push(timed(a.ssh(&[])).await?);
        }
    }
    let mut pairs = Vec::new();
    for (a, (c, s)) in accounts.iter().zip(times) {
        let _ = a.ssh(&["-O", "exit"]).status();
        let pair = Pair {
            cli_ms: median(c),
            ssh_ms: median(s),
        };
        println!(
            "octopus run-script --syntax {}: median {:.2} ms; ssh over ControlMaster ({}, shell {}): {:.2} ms",
            a.syntax, pair.cli_ms, a.user, a.shell, pair.ssh_ms
        );
        pairs.push(pair);
    }
    let mut pairs = pairs.into_iter();
    let (Some(first), bash) = (pairs.next(), pairs.next()) else {
        bail!("no ssh account measured");
    };
    Ok(Some(CliVsSsh {
        ratio: first.cli_ms / first.ssh_ms,
        cli_ms: first.cli_ms,
        ssh_ms: first.ssh_ms,
        shell: accounts[0].shell.clone(),
        bash,
    }))
}

/// An account ssh logs in as, and its own ControlMaster connection.
struct Account {
    user: String,
    shell: String,
    /// The `--syntax` that runs the CLI's script with `shell`.
    syntax: &'static str,
    host: String,
    sock: std::path::PathBuf,
    key: std::path::PathBuf,
    port: u16,
}

impl Account {
    fn new(
        (user, note): (String, Option<String>),
        sshd: &crate::deploy::Sshd,
        dir: &Path,
        n: usize,
    ) -> anyhow::Result<Self> {
        if let Some(note) = note {
            println!("{note}");
        }
        let shell = login_shell(&user)?;
        let Some(syntax) = syntax_of(&shell) else {
            bail!(
                "ssh runs its command with {user}'s login shell {shell}, which `octopus run-script --syntax` cannot match (bash or sh); give {user} one of those"
            );
        };
        Ok(Self {
            host: format!("{user}@127.0.0.1"),
            user,
            shell,
            syntax,
            sock: dir.join(format!("ssh/ctl-{n}.sock")),
            key: sshd.key.clone(),
            port: sshd.port,
        })
    }

    /// `ssh` to this account running `true`, or with `control` (`-O exit`).
    fn ssh(&self, control: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("ssh");
        c.args([
            "-q",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ControlMaster=auto",
            "-o",
            "ControlPersist=60",
            "-o",
            "SendEnv=LANG LC_*",
        ])
        .arg("-o")
        .arg(format!("ControlPath={}", self.sock.display()))
        .arg("-i")
        .arg(&self.key)
        .arg("-p")
        .arg(self.port.to_string())
        .args(control)
        .arg(&self.host);
        if control.is_empty() {
            c.arg("true");
        }
        c
    }
}

/// Milliseconds `c` takes to run, on a blocking thread: the server answering
/// the CLI runs in this process, and a runtime worker waiting for the CLI
/// could hold the very task that serves it (the CLI then timed out after
/// 60 s now and then). Standard error is kept for the error when `c` fails;
/// standard output is discarded.
async fn timed(mut c: std::process::Command) -> anyhow::Result<f64> {
    tokio::task::spawn_blocking(move || {
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        let t = Instant::now();
        let out = c.output()?;
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!(
                "{c:?} failed ({}, after {elapsed:.1} ms): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(elapsed)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::{syntax_of, tcp_ext};

    #[test]
    fn the_cli_runs_its_script_with_the_shell_ssh_runs_its_command_with() {
        assert_eq!(syntax_of("/bin/sh"), Some("sh"));
        assert_eq!(syntax_of("/usr/bin/dash"), Some("sh"));
        assert_eq!(syntax_of("/bin/bash"), Some("bash"));
        assert_eq!(syntax_of("/usr/bin/zsh"), None);
        assert_eq!(syntax_of(""), None);
    }

    #[test]
    fn a_tcp_ext_counter_is_read_by_its_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 3 16243 16250\n\
                       IpExt: InNoRoutes ListenDrops\n\
                       IpExt: 0 7\n";
        assert_eq!(tcp_ext(netstat, "ListenDrops"), Some(16250));
        assert_eq!(tcp_ext(netstat, "SyncookiesSent"), Some(3));
        assert_eq!(tcp_ext(netstat, "Missing"), None);
        assert_eq!(tcp_ext("", "ListenDrops"), None);
    }
}
