//! `bench scripts`: the real `tentacle` binary, in both modes, driven by an
//! in-process server. Builds the binary (release) first.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_comms::{Connection, Endpoint, ServerComms, ServerCommsOptions};
use octo_proto::v1::{CompleteScriptRequest, ScriptState, StartScriptRequest};
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Scripts per mode.
    #[arg(long, default_value_t = 300)]
    runs: usize,
}

pub(crate) struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn tentacle(bin: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("TENTACLE_CONFIG_DIR", dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "tentacle {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `tentacle run` and returns it with its "started: ..." line.
pub(crate) fn start(bin: &Path, dir: &Path, instance: &str) -> anyhow::Result<(Agent, String)> {
    let mut child = Command::new(bin)
        .args(["run", "--instance", instance])
        .env("TENTACLE_CONFIG_DIR", dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let agent = Agent(child);
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        if line.contains("started:") {
            std::thread::spawn(move || for _ in lines {});
            return Ok((agent, line));
        }
    }
    bail!("tentacle {instance} exited before starting")
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024.0)
}

async fn script_rtt(conn: &Connection, runs: usize, tag: &str) -> anyhow::Result<(f64, f64)> {
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 20 {
        let ticket = format!("{tag}-{i}");
        let t = Instant::now();
        let status = conn
            .scripts()
            .start_script(StartScriptRequest {
                ticket: ticket.clone(),
                script_body: "true".into(),
                wait_ms: 10_000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let elapsed = t.elapsed();
        if status.state != ScriptState::Complete as i32 || status.exit_code != 0 {
            bail!("script {ticket} did not complete with 0: {status:?}");
        }
        if i >= 20 {
            samples.push(elapsed);
        }
        conn.scripts()
            .complete_script(CompleteScriptRequest {
                ticket,
                since_sequence: 0,
            })
            .await?;
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Ok((p(0.5), p(0.99)))
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let bin = crate::release_binary("octo-tentacle", "tentacle")?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let server_id = Identity::generate("bench server")?;
    let stp = server_id.thumbprint().to_string();
    let trust = TrustStore::new([], octo_testkit::hint("bench server"));
    let server = ServerComms::new(server_id, trust.clone(), ServerCommsOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let paddr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let (s, t) = (server.clone(), shutdown.clone());
        async move { s.run_polling_listener(listener, t).await }
    });

    for (name, args) in [
        (
            "L",
            vec![
                "configure",
                "--instance",
                "L",
                "--port",
                "0",
                "--listen-ip",
                "127.0.0.1",
                "--trust",
                &stp,
            ],
        ),
        ("P", vec!["configure", "--instance", "P", "--no-listen"]),
    ] {
        tentacle(&bin, d, &["create-instance", "--instance", name])?;
        tentacle(&bin, d, &["new-certificate", "--instance", name])?;
        tentacle(&bin, d, &args)?;
    }
    tentacle(
        &bin,
        d,
        &[
            "poll-server",
            "--instance",
            "P",
            "--server-comms-address",
            &paddr.to_string(),
            "--server-thumbprint",
            &stp,
            "--subscription-id",
            "bench",
        ],
    )?;
    let ltp: Thumbprint = tentacle(&bin, d, &["show-thumbprint", "--instance", "L"])?
        .trim()
        .parse()?;
    let ptp: Thumbprint = tentacle(&bin, d, &["show-thumbprint", "--instance", "P"])?
        .trim()
        .parse()?;
    trust.trust(ptp);

    let (lagent, started) = start(&bin, d, "L")?;
    let (pagent, _) = start(&bin, d, "P")?;
    let i = started.find("listening on ").context("listening address")? + "listening on ".len();
    let laddr = started[i..]
        .split(';')
        .next()
        .context("address")?
        .trim()
        .to_string();
    let listening = server.connect(&Endpoint::listening(&laddr, ltp)?).await?;
    let polling = server.connect(&Endpoint::polling("bench", ptp)?).await?;

    // Idle: connected, nothing run yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_mib(lagent.0.id())?;
    let idle_rss_polling = rss_mib(pagent.0.id())?;
    println!("tentacle idle RSS: listening {idle_rss:.1} MiB, polling {idle_rss_polling:.1} MiB");

    let (l50, l99) = script_rtt(&listening, o.runs, "l").await?;
    println!(
        "script `true`, start to exit code, listening: p50 {l50:.2} ms, p99 {l99:.2} ms ({} runs)",
        o.runs
    );
    let (p50, p99) = script_rtt(&polling, o.runs, "p").await?;
    println!("script `true`, start to exit code, polling:   p50 {p50:.2} ms, p99 {p99:.2} ms");
    let after_rss = rss_mib(lagent.0.id())?;
    println!(
        "tentacle RSS after {} scripts: {after_rss:.1} MiB",
        o.runs + 20
    );

    let stripped = d.join("tentacle-stripped");
    std::fs::copy(&bin, &stripped)?;
    let strip = Command::new("strip").arg(&stripped).status();
    let size_mib = std::fs::metadata(&stripped)?.len() as f64 / (1024.0 * 1024.0);
    let stripped_ok = strip.is_ok_and(|s| s.success());
    println!(
        "tentacle binary: {size_mib:.1} MiB{}",
        if stripped_ok {
            " stripped"
        } else {
            " (strip unavailable: not stripped)"
        }
    );

    drop(lagent);
    drop(pagent);
    shutdown.cancel();
    let r = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        json!({
            "bench": "scripts",
            "listening_script_rtt_p50_ms": r(l50),
            "listening_script_rtt_p99_ms": r(l99),
            "polling_script_rtt_p50_ms": r(p50),
            "polling_script_rtt_p99_ms": r(p99),
            "script_rtt_p50_ms": r(l50.max(p50)),
            "tentacle_idle_rss_mib": r(idle_rss.max(idle_rss_polling)),
            "tentacle_rss_after_runs_mib": r(after_rss),
            "tentacle_binary_stripped_mib": r(size_mib),
            "runs": o.runs,
        })
    );
    Ok(())
}
