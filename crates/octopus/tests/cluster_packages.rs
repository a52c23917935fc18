//! Packages in a cluster, with real processes: two `octopus server run`
//! nodes on one PostgreSQL database (a database of its own in this test
//! process's throwaway cluster), each with its OWN data directory and nothing
//! shared but the database (and the master key and certificate a cluster's
//! nodes share). A package pushed to node A downloads byte-identical from
//! node B and deploys through node B to a real listening tentacle; deleted
//! through B, it is gone for A too. Every wait is bounded.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{run, Run, BIN};

/// Longest wait for a server to start.
const SETTLE: Duration = Duration::from_secs(60);

/// Builds (once) the `tentacle` and `calamari` binaries of this workspace.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "octo-tentacle", "--bin", "tentacle"])
            .args(["-p", "octo-calamari", "--bin", "calamari"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building tentacle and calamari"
        );
        (dir.join("tentacle"), dir.join("calamari"))
    })
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running node: its process, API URL and comms thumbprint.
struct Node {
    _child: Killed,
    api: String,
    thumbprint: String,
}

/// Starts `octopus server run` on loopback with free ports; waits (bounded)
/// for its ready line.
fn start(data: &Path, extra: &[&str]) -> Node {
    let mut child = Command::new(BIN)
        .args(["server", "run", "--data", data.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--comms-listen-port", "0"])
        .args(["--comms-listen-address", "127.0.0.1"])
        .args(extra)
        .env_remove("OCTOPUS_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    loop {
        let line = rx.recv_timeout(SETTLE).expect("the server's ready line");
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            return Node {
                _child: child,
                api: format!("http://{}", rest.split("/api").next().unwrap()),
                thumbprint: line.rsplit(' ').next().unwrap().to_string(),
            };
        }
    }
}

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

/// Incompressible bytes (xorshift64).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tar.gz of a small application whose Deploy.sh says where it ran, plus
/// 3 MiB of incompressible filler so the content spans several chunks.
fn write_package(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let filler = noise(3_300_000);
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
    let (tentacle, calamari) = binaries().clone();
    let url = octo_testkit::postgres::shared().create_database();
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("a"), dir.path().join("b"));
    let tool = calamari.to_str().unwrap();
    let a = start(
        &da,
        &[
            "--database-url",
            &url,
            "--node-name",
            "node-a",
            "--calamari",
            tool,
        ],
    );
    let key = std::fs::read_to_string(da.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    // Nodes share the master key and the comms certificate, nothing else.
    std::fs::create_dir_all(&db).unwrap();
    for f in ["master-key", "server.crt", "server.key"] {
        std::fs::copy(da.join(f), db.join(f)).unwrap();
    }
    let b = start(
        &db,
        &[
            "--database-url",
            &url,
            "--node-name",
            "node-b",
            "--calamari",
            tool,
        ],
    );
    assert_eq!(a.thumbprint, b.thumbprint);

    // Pushed to A.
    let pkg = dir.path().join("Acme.Web.1.0.0.tar.gz");
    write_package(&pkg);
    let bytes = std::fs::read(&pkg).unwrap();
    assert!(bytes.len() > 3 << 20, "{} bytes", bytes.len());
    let sha = sha256_hex(&bytes);
    let out = cli(&a.api, &key, &["package", "push", pkg.to_str().unwrap()]).ok();
    assert!(out.stdout.contains("Acme.Web 1.0.0 pushed"), "{out:?}");
    assert!(da.join("packages").join(&sha).is_file(), "A keeps its copy");
    assert!(
        !db.join("packages").join(&sha).exists(),
        "B has no file of it"
    );

    // Downloaded from B, byte-identical.
    let (status, got) = get(
        &format!("{}/api/packages/Acme.Web/1.0.0/download", b.api),
        &key,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
    assert_eq!(got.len(), bytes.len());
    assert!(
        got == bytes,
        "B's download differs from what was pushed to A"
    );

    // Deployed through B to a real listening tentacle (registered through A).
    cli(&a.api, &key, &["environment", "create", "Test"]).ok();
    let tdir = dir.path().join("tentacles");
    let tent = |args: &[&str]| {
        let mut c = Command::new(&tentacle);
        c.args(args).env("TENTACLE_CONFIG_DIR", &tdir);
        c
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    for args in [
        vec!["create-instance", "--instance", "lis"],
        vec!["new-certificate", "--instance", "lis"],
        vec![
            "configure",
            "--instance",
            "lis",
            "--port",
            &port,
            "--listen-ip",
            "127.0.0.1",
        ],
        vec![
            "register-with",
            "--instance",
            "lis",
            "--name",
            "lis",
            "--public-hostname",
            "127.0.0.1",
            "--server",
            &a.api,
            "--api-key",
            &key,
            "--environment",
            "Test",
            "--role",
            "web",
            "--server-thumbprint",
            &a.thumbprint,
        ],
    ] {
        let out = tent(&args).output().unwrap();
        assert!(out.status.success(), "tentacle {args:?}: {out:?}");
    }
    let _agent = Killed(
        tent(&["run", "--instance", "lis"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deployed = cli(
        &b.api,
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
    let home = tdir.join("lis").join("home");
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
    cli(&b.api, &key, &["package", "delete", "Acme.Web", "1.0.0"]).ok();
    let (status, _) = get(
        &format!("{}/api/packages/Acme.Web/1.0.0/download", a.api),
        &key,
    );
    assert_eq!(status, 404);
    assert!(
        !db.join("packages").join(&sha).exists(),
        "B dropped its copy"
    );
}
