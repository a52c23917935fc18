//! `bench comms`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use octo_comms::{
    Backoff, Connection, Endpoint, PollingTarget, ServerComms, ServerCommsOptions, TentacleComms,
};
use octo_proto::v1::{
    upload_request, FileChunk, PingRequest, UploadFinish, UploadRequest, UploadStart,
};
use octo_tls::{Identity, Thumbprint, TrustStore};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Sequential pings per mode.
    #[arg(long, default_value_t = 5000)]
    pings: usize,
    /// Upload size in MiB.
    #[arg(long, default_value_t = 1024)]
    upload_mib: usize,
    /// Upload chunk size in KiB.
    #[arg(long, default_value_t = 1024)]
    chunk_kib: usize,
    /// Idle polling connections for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    idle: usize,
}

#[derive(clap::Args, Debug)]
pub struct ChildOptions {
    #[arg(long)]
    server: String,
    #[arg(long)]
    server_thumbprint: Thumbprint,
}

fn rss_kib() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    Ok(pages * 4)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

async fn rtt(conn: &Connection, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut client = conn.capabilities();
    for _ in 0..200 {
        client.ping(PingRequest::default()).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        client.ping(PingRequest::default()).await?;
        samples.push(t.elapsed());
    }
    samples.sort();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

async fn upload(conn: &Connection, mib: usize, chunk_kib: usize) -> anyhow::Result<f64> {
    let chunk = chunk_kib << 10;
    let block: Vec<u8> = (0..chunk).map(|i| (i % 251) as u8).collect();
    let block = Bytes::from(block);
    let total = (mib as u64) << 20;
    let chunks = total / chunk as u64;
    // The sender knows its file's hash (a server stores packages by hash), so it is
    // computed before timing; the receiver hashes everything it gets.
    let mut h = Sha256::new();
    for _ in 0..chunks {
        h.update(&block);
    }
    let sha: String = h.finalize().iter().map(|b| format!("{b:02X}")).collect();
    let start = UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: "bench.bin".into(),
            total_length: total,
            ..Default::default()
        })),
    };
    let finish = UploadRequest {
        part: Some(upload_request::Part::Finish(UploadFinish {
            sha256: sha.clone(),
            total_length: total,
        })),
    };
    let body = tokio_stream::StreamExt::chain(
        tokio_stream::StreamExt::chain(
            tokio_stream::once(start),
            tokio_stream::iter((0..chunks).map(move |i| UploadRequest {
                part: Some(upload_request::Part::Chunk(FileChunk {
                    offset: i * chunk as u64,
                    data: block.clone(),
                })),
            })),
        ),
        tokio_stream::once(finish),
    );
    let t = Instant::now();
    let reply = conn.files().upload_file(body).await?.into_inner();
    let secs = t.elapsed().as_secs_f64();
    if reply.sha256 != sha || reply.length != total {
        bail!(
            "receiver reported {} ({} bytes), expected {sha}",
            reply.sha256,
            reply.length
        );
    }
    Ok(mib as f64 / secs)
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    crate::raise_fd_limit();
    let server_id = Identity::generate("bench server")?;
    let trust = TrustStore::new([], octo_testkit::hint("bench server"));
    let options = ServerCommsOptions {
        polling_wait: Duration::from_secs(30),
        ..Default::default()
    };
    let server = ServerComms::new(server_id.clone(), trust.clone(), options);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let (s, t) = (server.clone(), shutdown.clone());
        async move { s.run_polling_listener(listener, t).await }
    });

    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args([
            "comms-child",
            "--server",
            &addr.to_string(),
            "--server-thumbprint",
            &server_id.thumbprint().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("child stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("child stdout")?).lines();
    let hello: serde_json::Value =
        serde_json::from_str(&lines.next_line().await?.context("child said nothing")?)?;
    let tentacle_tp: Thumbprint = hello["thumbprint"]
        .as_str()
        .context("thumbprint")?
        .parse()?;
    let listening_addr = hello["listening"]
        .as_str()
        .context("listening")?
        .to_string();
    trust.trust(tentacle_tp);
    stdin.write_all(b"poll\n").await?;

    println!(
        "machine: {} cores; server pid {}, tentacle child pid {:?}",
        std::thread::available_parallelism()?.get(),
        std::process::id(),
        child.id()
    );
    let listening = server
        .connect(&Endpoint::listening(&listening_addr, tentacle_tp)?)
        .await?;
    let polling = server
        .connect(&Endpoint::polling("bench", tentacle_tp)?)
        .await?;

    let (l50, l99) = rtt(&listening, o.pings).await?;
    println!(
        "listening ping: p50 {l50:.1} us, p99 {l99:.1} us ({} calls)",
        o.pings
    );
    let (p50, p99) = rtt(&polling, o.pings).await?;
    println!(
        "polling ping:   p50 {p50:.1} us, p99 {p99:.1} us ({} calls)",
        o.pings
    );

    // Warm both paths (buffers, allocator, page faults) so each measures steady state.
    upload(&listening, 64, o.chunk_kib).await?;
    upload(&polling, 64, o.chunk_kib).await?;
    let up = upload(&listening, o.upload_mib, o.chunk_kib).await?;
    println!("upload over listening: {} MiB in {} KiB chunks, SHA-256 verified by the receiver: {up:.0} MiB/s", o.upload_mib, o.chunk_kib);
    let up_polling = upload(&polling, o.upload_mib, o.chunk_kib).await?;
    println!("upload over polling:   {up_polling:.0} MiB/s");

    // Idle polling connections: server RSS growth per connection.
    let before_conns = server.polling().len();
    let before = rss_kib()?;
    stdin
        .write_all(format!("idle {}\n", o.idle).as_bytes())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.polling().len() < before_conns + o.idle {
        if Instant::now() > deadline {
            bail!(
                "only {} of {} idle connections arrived",
                server.polling().len() - before_conns,
                o.idle
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let handshakes' transient buffers settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib()?;
    let per_conn = (after.saturating_sub(before)) as f64 / o.idle as f64;
    println!("idle polling connections: {} held; server RSS {before} KiB -> {after} KiB: {per_conn:.1} KiB each", o.idle);

    drop(stdin);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    shutdown.cancel();
    println!(
        "{}",
        json!({
            "bench": "comms",
            "listening_rtt_p50_us": round1(l50),
            "listening_rtt_p99_us": round1(l99),
            "polling_rtt_p50_us": round1(p50),
            "polling_rtt_p99_us": round1(p99),
            "upload_mib_s": up.round(),
            "polling_upload_mib_s": up_polling.round(),
            "upload_mib": o.upload_mib,
            "chunk_kib": o.chunk_kib,
            "idle_conn_kib": round1(per_conn),
            "idle_connections": o.idle,
        })
    );
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub async fn child(o: ChildOptions) -> anyhow::Result<()> {
    crate::raise_fd_limit();
    let id = Identity::generate("bench tentacle")?;
    let trust = TrustStore::new([o.server_thumbprint], octo_testkit::hint("bench tentacle"));
    let comms = TentacleComms::new(id.clone(), trust, octo_testkit::services::routes(), "bench");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let (c, t) = (comms.clone(), shutdown.clone());
        async move { c.run_listening(listener, t).await }
    });
    println!(
        "{}",
        json!({ "listening": addr.to_string(), "thumbprint": id.thumbprint().to_string() })
    );
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let (target, n) = match line.split_once(' ') {
            None if line == "poll" => ("bench", 1),
            Some(("idle", n)) => ("idle", n.parse()?),
            _ => bail!("unknown command {line}"),
        };
        let target = PollingTarget {
            address: o.server.clone(),
            subscription_id: target.into(),
        };
        let (c, t) = (comms.clone(), shutdown.clone());
        tokio::spawn(async move { c.run_polling(target, n, Backoff::default(), t).await });
    }
    shutdown.cancel();
    Ok(())
}
