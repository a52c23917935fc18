//! Standard gRPC clients reach a real tentacle: Python's grpcio (gRPC-core, the
//! stack grpcurl's C-core cousins and most languages' clients share) with a client
//! certificate the tentacle trusts, the tentacle's own generated certificate as
//! its root, and the certificates' fixed DNS name as the target-name override
//! (proto/README.md). Services are found by server reflection.
//!
//! The Python environment is made by scripts/test.sh (`target/py-venv`, with
//! grpcio, grpcio-reflection and protobuf from PyPI); `OCTO_TEST_PYTHON` points
//! elsewhere.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use octo_testkit as kit;
use octo_tls::CERTIFICATE_DNS_NAME;

const T: Duration = Duration::from_secs(30);

fn python() -> PathBuf {
    let path = std::env::var_os("OCTO_TEST_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/py-venv/bin/python"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh, which makes it, or `python3 -m venv target/py-venv && target/py-venv/bin/pip install grpcio grpcio-reflection protobuf`",
        path.display()
    );
    path
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
        c.args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .env("RUST_LOG", "info");
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tentacle {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Runs the agent; returns it and the address it listens on.
    fn start(&self) -> (Agent, String) {
        let mut child = self
            .cmd(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let agent = Agent(child);
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("the agent starts");
            if let Some(i) = line.find("listening on ") {
                let rest = &line[i + "listening on ".len()..];
                let addr = rest.split(';').next().unwrap().trim().to_string();
                return (agent, addr);
            }
        }
    }
}

/// Runs the Python client; its JSON answer, and whether it succeeded.
fn call(
    addr: &str,
    tentacle_cert: &Path,
    client: &Path,
    client_key: &Path,
    name: &str,
) -> (bool, serde_json::Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc_client.py");
    let mut child = Command::new(python())
        .arg(script)
        .args([addr, &tentacle_cert.display().to_string()])
        .args([client, client_key])
        .arg(name)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The script bounds its own waits to 20 s; this bounds the process.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the Python client hung");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "the client printed no JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json)
}

#[test]
fn grpcio_calls_a_tentacle_by_reflection_with_the_certificate_name() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let home = env.home();
    env.ok(&["create-instance", "--home", &home.display().to_string()]);
    env.ok(&["new-certificate"]);
    let thumbprint = env.ok(&["show-thumbprint"]).trim().to_string();

    let client = kit::identity("python client");
    let stranger = kit::identity("stranger");
    let write = |name: &str, text: String| {
        let p = env.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (client_cert, client_key) = (
        write("client.crt", client.cert_pem()),
        write("client.key", client.key_pem()),
    );
    let (stranger_cert, stranger_key) = (
        write("stranger.crt", stranger.cert_pem()),
        write("stranger.key", stranger.key_pem()),
    );
    env.ok(&[
        "configure",
        "--port",
        "0",
        "--listen-ip",
        "127.0.0.1",
        "--trust",
        &client.thumbprint().to_string(),
    ]);
    let (_agent, addr) = env.start();
    let tentacle_cert = home.join("tentacle.crt");

    // The name override: TLS, the host-name check and reflection all pass.
    let (ok, json) = call(
        &addr,
        &tentacle_cert,
        &client_cert,
        &client_key,
        CERTIFICATE_DNS_NAME,
    );
    assert!(ok, "{json}");
    let services: Vec<&str> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "octopus.tentacle.v1.Session",
        "octopus.tentacle.v1.Capabilities",
        "octopus.tentacle.v1.ScriptService",
        "octopus.tentacle.v1.FileService",
    ] {
        assert!(services.contains(&s), "{s} not in {services:?}");
    }
    assert_eq!(json["hello"]["thumbprint"], thumbprint.as_str(), "{json}");
    assert_eq!(json["capabilities"]["instance_name"], "Tentacle", "{json}");

    // Without the override the client checks the address against the
    // certificate's name and refuses.
    let (ok, json) = call(&addr, &tentacle_cert, &client_cert, &client_key, "");
    assert!(!ok, "{json}");

    // A client certificate the tentacle does not trust gets nothing.
    let (ok, json) = call(
        &addr,
        &tentacle_cert,
        &stranger_cert,
        &stranger_key,
        CERTIFICATE_DNS_NAME,
    );
    assert!(!ok, "{json}");
}
