//! The data directory is the server's alone: 0700, and its secrets (the
//! database and its journal files, the first admin key, the master key, the
//! comms private key) 0600, from the first start and again at every start on
//! a directory whose modes were loosened (a restore from a backup, a careless
//! `chmod -R`).
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use octo_server_core::{start, RunArgs};
use serde_json::json;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(60);

/// Always there after a start.
const SECRETS: &[&str] = &["octopus.db", "admin-api-key", "master-key", "server.key"];
/// SQLite's journal files, when they exist.
const JOURNALS: &[&str] = &["octopus.db-wal", "octopus.db-shm"];

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Checks the modes; returns which journal files were there.
fn check(data: &Path, when: &str) -> Vec<&'static str> {
    assert_eq!(
        format!("{:o}", mode(data)),
        "700",
        "{when}: the data directory"
    );
    for f in SECRETS {
        let p = data.join(f);
        assert!(p.exists(), "{when}: {f} is missing");
        assert_eq!(format!("{:o}", mode(&p)), "600", "{when}: {f}");
    }
    let mut present = Vec::new();
    for f in JOURNALS {
        let p = data.join(f);
        if p.exists() {
            assert_eq!(format!("{:o}", mode(&p)), "600", "{when}: {f}");
            present.push(*f);
        }
    }
    present
}

#[tokio::test]
async fn data_directory_and_secrets_are_private_and_tightened_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let running = timeout(T, start(&RunArgs::loopback(&data)))
        .await
        .unwrap()
        .unwrap();
    // Some writes, so that the database has journal files while it runs.
    let http = reqwest::Client::new();
    let resp = timeout(
        T,
        http.post(format!("http://{}/api/environments", running.api_addr))
            .header("X-Octopus-ApiKey", running.admin_api_key.clone().unwrap())
            .json(&json!({ "name": "Test" }))
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.status(), 201);
    let journals = check(&data, "first start");
    assert!(
        journals.contains(&"octopus.db-wal"),
        "the check covers the WAL: {journals:?}"
    );
    timeout(T, running.stop()).await.unwrap();

    // Loosen everything, as a careless restore would.
    set_mode(&data, 0o755);
    for f in SECRETS.iter().chain(JOURNALS) {
        let p = data.join(f);
        if p.exists() {
            set_mode(&p, 0o644);
        }
    }
    let running = timeout(T, start(&RunArgs::loopback(&data)))
        .await
        .unwrap()
        .unwrap();
    assert!(running.admin_api_key.is_none(), "not a first start");
    check(&data, "second start");
    timeout(T, running.stop()).await.unwrap();
}
