//! `octopus server run --web-socket-listen-port/--web-socket-path`: the real
//! binary opens its WebSocket polling port (TLS), says where in its ready line,
//! serves the portal and the API there to `curl -k`, and refuses a bad path.
//! Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const BIN: &str = env!("CARGO_BIN_EXE_octopus");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl(url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-k", "-sS", "--max-time", "20", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl is installed by scripts/test.sh");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_string(), body.to_string())
}

#[test]
fn server_run_opens_the_web_socket_port_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args(["server", "run", "--data"])
        .arg(&data)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
            "--web-socket-listen-port",
            "0",
            "--web-socket-path",
            "/octopus/tentacle",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let ready = loop {
        let l = rx
            .recv_timeout(T)
            .expect("the server did not say it is ready");
        if l.starts_with("Octopus server ready") {
            break l;
        }
    };
    let ws = ready
        .split("WebSocket polling wss://HOST:")
        .nth(1)
        .unwrap_or_else(|| panic!("no WebSocket port in: {ready}"));
    let (port, rest) = ws.split_once('/').unwrap();
    assert!(rest.starts_with("octopus/tentacle,"), "{ready}");
    let port: u16 = port.parse().unwrap();
    // The portal answers there too: its front page sends a stranger to sign in.
    let (status, body) = curl(&format!("https://127.0.0.1:{port}/"));
    assert_eq!(status, "303", "{body}");
    let (status, body) = curl(&format!("https://127.0.0.1:{port}/login"));
    assert_eq!(status, "200", "{body}");
    assert!(body.contains("Sign in"), "{body}");
    let (status, body) = curl(&format!("https://127.0.0.1:{port}/api"));
    assert_eq!(status, "200", "{body}");
    assert!(body.contains('{'), "{body}");
    drop(server);

    // A path that is not a path is refused before anything listens.
    let out = Command::new(BIN)
        .args(["server", "run", "--data"])
        .arg(dir.path().join("other"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
            "--web-socket-listen-port",
            "0",
            "--web-socket-path",
            "tentacle here",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--web-socket-path 'tentacle here'"), "{err}");
}
