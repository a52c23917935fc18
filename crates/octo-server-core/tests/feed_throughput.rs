//! A measurement, not a check (`--ignored`): how fast a ~100 MiB package is
//! pushed into the database and downloaded out of it, on SQLite and on
//! PostgreSQL (the throwaway cluster on this machine). Run it in release:
//!
//! ```text
//! cargo test --release -p octo-server-core --test feed_throughput -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used)]
// A measurement: its result is what it prints.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs};
use sha2::Digest;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(600);
const SIZE: usize = 100 << 20;

/// A zip of one stored (uncompressed) entry of incompressible bytes.
fn package() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let noise: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    w.start_file("data.bin", opts).unwrap();
    w.write_all(&noise).unwrap();
    w.finish().unwrap().into_inner()
}

fn mb_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

async fn measure(engine: &str, database_url: Option<String>, pkg: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = timeout(
        T,
        start(&RunArgs {
            database_url,
            ..RunArgs::loopback(&data)
        }),
    )
    .await
    .unwrap()
    .unwrap();
    let base = format!("http://{}", server.api_addr);
    let key = server.admin_api_key.clone().unwrap();
    let http = reqwest::Client::new();

    let started = Instant::now();
    let resp = timeout(
        T,
        http.post(format!("{base}/api/packages?package_id=Big&version=1.0.0"))
            .header("X-Octopus-ApiKey", &key)
            .header("content-type", "application/octet-stream")
            .body(pkg.to_vec())
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
    let push = started.elapsed();
    let sha: String = sha2::Sha256::digest(pkg)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Downloads read the database (this node's copy is not used).
    std::fs::remove_file(data.join("packages").join(&sha)).unwrap();

    let started = Instant::now();
    let resp = timeout(
        T,
        http.get(format!("{base}/api/packages/Big/1.0.0/download"))
            .header("X-Octopus-ApiKey", &key)
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let got = timeout(T, resp.bytes()).await.unwrap().unwrap();
    let download = started.elapsed();
    assert!(got[..] == pkg[..], "the download differs");
    println!(
        "{engine}: {:.1} MiB pushed in {:.2} s ({:.0} MB/s), downloaded in {:.2} s ({:.0} MB/s)",
        pkg.len() as f64 / (1 << 20) as f64,
        push.as_secs_f64(),
        mb_per_s(pkg.len(), push),
        download.as_secs_f64(),
        mb_per_s(pkg.len(), download)
    );
    timeout(T, server.stop()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture, in release"]
async fn package_push_and_download_throughput() {
    let pkg = package();
    measure("SQLite", None, &pkg).await;
    let url = octo_testkit::postgres::shared().create_database();
    measure("PostgreSQL", Some(url), &pkg).await;
}
