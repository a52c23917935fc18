//! `bench feed`: how fast a package is pushed into the built-in feed (its
//! content goes into the database, in chunks) and downloaded out of it, on
//! SQLite and, with `--database-url`, on PostgreSQL. The server runs in this
//! process; the client is reqwest over 127.0.0.1. The download reads the
//! database: the node's local copy of the content is removed first.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_server_core::{start, RunArgs};
use serde_json::json;
use sha2::Digest;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Package size in MiB (incompressible bytes in a tar.gz that stores them).
    #[arg(long, default_value_t = 100)]
    mib: usize,
    /// Runs per store (the median is reported; every run is printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also measure on this PostgreSQL database (a fresh, empty one: the
    /// bench creates the first administrator in it).
    #[arg(long)]
    database_url: Option<String>,
}

/// One incompressible package of `mib` MiB.
fn package(mib: usize) -> anyhow::Result<Vec<u8>> {
    let size = mib << 20;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut noise = Vec::with_capacity(size);
    while noise.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    let mut header = tar::Header::new_gnu();
    header.set_path("data.bin")?;
    header.set_size(noise.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::none(),
    ));
    builder.append(&header, &noise[..])?;
    Ok(builder.into_inner()?.finish()?)
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Push and download MB/s of each run on one store.
async fn measure(
    store: &str,
    database_url: Option<String>,
    pkg: &[u8],
    runs: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let server = start(&RunArgs {
        database_url,
        ..RunArgs::loopback(&data)
    })
    .await
    .with_context(|| format!("starting the server on {store}"))?;
    let base = format!("http://{}", server.api_addr);
    let key = server
        .admin_api_key
        .clone()
        .context("the database is not fresh: give --database-url of an empty database")?;
    let http = reqwest::Client::new();
    let sha: String = sha2::Sha256::digest(pkg)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (mut push, mut download) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let version = format!("1.0.{run}");
        let started = Instant::now();
        let resp = http
            .post(format!(
                "{base}/api/packages?package_id=Big&version={version}"
            ))
            .header("X-Octopus-ApiKey", &key)
            .header("content-type", "application/octet-stream")
            .body(pkg.to_vec())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("push on {store}: {} {}", resp.status(), resp.text().await?);
        }
        let pushed = started.elapsed();
        // The download reads the database, not this node's copy.
        let local = data.join("packages").join(&sha);
        if local.exists() {
            std::fs::remove_file(&local)?;
        }
        let started = Instant::now();
        let resp = http
            .get(format!("{base}/api/packages/Big/{version}/download"))
            .header("X-Octopus-ApiKey", &key)
            .send()
            .await?;
        if resp.status().as_u16() != 200 {
            bail!("download on {store}: {}", resp.status());
        }
        let got = resp.bytes().await?;
        let downloaded = started.elapsed();
        if got[..] != pkg[..] {
            bail!("the download on {store} differs from what was pushed");
        }
        // Removed, so the next run stores the content again.
        let resp = http
            .delete(format!("{base}/api/packages/Big/{version}"))
            .header("X-Octopus-ApiKey", &key)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("delete on {store}: {}", resp.status());
        }
        println!(
            "{store} run {run}: pushed in {:.2} s ({:.0} MB/s), downloaded in {:.2} s ({:.0} MB/s)",
            pushed.as_secs_f64(),
            mb_per_s(pkg.len(), pushed),
            downloaded.as_secs_f64(),
            mb_per_s(pkg.len(), downloaded)
        );
        push.push(mb_per_s(pkg.len(), pushed));
        download.push(mb_per_s(pkg.len(), downloaded));
    }
    server.stop().await;
    Ok((push, download))
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    if o.mib == 0 || o.runs == 0 {
        bail!("--mib and --runs must be at least 1");
    }
    let pkg = package(o.mib)?;
    let mut out = json!({ "bench": "feed", "mib": o.mib, "runs": o.runs });
    let (push, download) = measure("SQLite", None, &pkg, o.runs).await?;
    out["sqlite_push_mb_s"] = json!(median(push).round());
    out["sqlite_download_mb_s"] = json!(median(download).round());
    if let Some(url) = o.database_url {
        let (push, download) = measure("PostgreSQL", Some(url), &pkg, o.runs).await?;
        out["postgres_push_mb_s"] = json!(median(push).round());
        out["postgres_download_mb_s"] = json!(median(download).round());
    }
    println!("{out}");
    Ok(())
}
