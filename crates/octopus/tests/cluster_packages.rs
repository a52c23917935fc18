//! Packages in a cluster, with real processes: two `octopus server run`
//! nodes on one PostgreSQL database (a database of its own in this test
//! process's throwaway cluster), each with its OWN data directory and nothing
//! shared but the database (and the master key and certificate a cluster's
//! nodes share). A package pushed to node A downloads byte-identical from
//! node B and deploys through node B to a real listening tentacle; deleted
//! through B, it is gone for A too. Every wait is bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use common::cluster::{binaries, Cluster, ListeningTentacle};
use common::{run, Run};

/// `octopus --server API --api-key KEY ARGS`.
fn cli(api: &str, key: &str, args: &[&str]) -> Run {
    let mut all = vec!["--server", api, "--api-key", key];
    all.extend_from_slice(args);
    run(&[], &all, None)
}

/// `GET url` with the key: status and body bytes (bounded).
fn get(url: &str, key: &str) -> (u16, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(url)
            .header("X-Octopus-ApiKey", key)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.bytes().await.unwrap().to_vec())
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tar.gz of a small application whose Deploy.sh says where it ran, plus
/// 3 MiB of incompressible filler so the content spans several chunks.
fn write_package(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let filler = octo_testkit::noise(3_300_000, 0);
    let deploy = b"echo \"deployed $Octopus_Action_Package_PackageVersion\" > \"$TentacleHome/deployed.txt\"\n";
    for (name, body, mode) in [
        ("Deploy.sh", &deploy[..], 0o755),
        ("VERSION", &b"1.0.0"[..], 0o644),
        ("data/filler.bin", &filler[..], 0o644),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        tar.append_data(&mut header, name, body).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn a_package_pushed_to_one_node_downloads_and_deploys_through_another() {
    let (_, calamari) = binaries().clone();
    let tool = calamari.to_str().unwrap();
    // Nodes share the master key and the comms certificate, nothing else.
    let cluster = Cluster::start(2, &["--calamari", tool]);
    let (da, db) = (cluster.dir(0), cluster.dir(1));
    let (a, b) = (cluster.api(0), cluster.api(1));
    let key = cluster.key.clone();
    let dir = &cluster.tmp;

    // Pushed to A.
    let pkg = dir.path().join("Acme.Web.1.0.0.tar.gz");
    write_package(&pkg);
    let bytes = std::fs::read(&pkg).unwrap();
    assert!(bytes.len() > 3 << 20, "{} bytes", bytes.len());
    let sha = sha256_hex(&bytes);
    let out = cli(&a.base, &key, &["package", "push", pkg.to_str().unwrap()]).ok();
    assert!(out.stdout.contains("Acme.Web 1.0.0 pushed"), "{out:?}");
    assert!(da.join("packages").join(&sha).is_file(), "A keeps its copy");
    assert!(
        !db.join("packages").join(&sha).exists(),
        "B has no file of it"
    );

    // Downloaded from B, byte-identical.
    let (status, got) = get(
        &format!("{}/api/packages/Acme.Web/1.0.0/download", b.base),
        &key,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert_eq!(got.len(), bytes.len());
    assert!(
        got == bytes,
        "B's download differs from what was pushed to A"
    );

    // Deployed through B to a real listening tentacle (registered through A).
    cli(&a.base, &key, &["environment", "create", "Test"]).ok();
    let lis = ListeningTentacle::start(
        &dir.path().join("tentacles"),
        "lis",
        &a,
        &cluster.thumbprint().to_string(),
        "Test",
    );
    let deployed = cli(
        &b.base,
        &key,
        &[
            "--output",
            "json",
            "deploy",
            "--package",
            "Acme.Web",
            "--environment",
            "Test",
        ],
    );
    assert_eq!(deployed.code, 0, "{deployed:#?}");
    let end: serde_json::Value =
        serde_json::from_str(deployed.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let home = &lis.home;
    assert_eq!(
        std::fs::read_to_string(home.join("deployed.txt")).unwrap(),
        "deployed 1.0.0\n"
    );
    let app = home.join("Applications/Test/Acme.Web/1.0.0");
    assert_eq!(
        std::fs::read(app.join("data/filler.bin")).unwrap().len(),
        3_300_000
    );
    // B filled its own verified copy from the database to send it.
    assert!(std::fs::read(db.join("packages").join(&sha)).unwrap() == bytes);

    // Deleted through B: gone for A too (content and all).
    cli(&b.base, &key, &["package", "delete", "Acme.Web", "1.0.0"]).ok();
    let (status, _) = get(
        &format!("{}/api/packages/Acme.Web/1.0.0/download", a.base),
        &key,
    );
    assert_eq!(status, 404);
    assert!(
        !db.join("packages").join(&sha).exists(),
        "B dropped its copy"
    );
}
