//! What the CLI tests share: a real `octopus server run` on loopback and a
//! runner for the CLI that bounds every invocation.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub mod cluster;
pub mod live;

/// Longest any one CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(90);

pub const BIN: &str = env!("CARGO_BIN_EXE_octopus");

/// Runs `program` with `args` (no server or key from the environment) to its
/// end: exit code, stdout, stderr.
pub fn output(program: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(program)
        .args(args)
        .env_remove("OCTOPUS_URL")
        .env_remove("OCTOPUS_API_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub api: String,
    /// The first admin API key.
    pub key: String,
    /// The server's comms thumbprint.
    pub thumbprint: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("data");
    let mut child = Command::new(BIN)
        .args([
            "server",
            "run",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (api, thumbprint) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server ready line");
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            break (
                format!("http://{}", rest.split("/api").next().unwrap()),
                line.rsplit(' ').next().unwrap().to_string(),
            );
        }
    };
    let key = std::fs::read_to_string(data.join("admin-api-key"))
        .unwrap()
        .trim()
        .to_string();
    Server {
        child,
        api,
        key,
        thumbprint,
        dir,
    }
}

/// What one CLI run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:#?}");
        self
    }

    /// Exit 1 with exactly one line on stderr, `error: ...`; returns that line.
    pub fn error(self) -> String {
        assert_eq!(self.code, 1, "{self:#?}");
        assert_eq!(self.stderr.lines().count(), 1, "{self:#?}");
        assert!(self.stderr.starts_with("error: "), "{self:#?}");
        self.stderr.trim_end().to_string()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:#?}"))
    }
}

/// Runs `octopus ARGS` with nothing from the environment but what is given,
/// bounded by [`CLI_TIMEOUT`].
pub fn run(env: &[(&str, &str)], args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("OCTOPUS_URL")
        .env_remove("OCTOPUS_API_KEY")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(CLI_TIMEOUT) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("octopus {args:?} did not finish within {CLI_TIMEOUT:?}");
        }
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Server {
    /// `octopus --server API --api-key KEY ARGS`.
    pub fn cli(&self, args: &[&str]) -> Run {
        let mut all = vec!["--server", &self.api, "--api-key", &self.key];
        all.extend_from_slice(args);
        run(&[], &all, None)
    }
}

/// A made-up thumbprint: 64 upper-case hex digits.
pub fn tp(n: u8) -> String {
    format!("{:02X}", n).repeat(32)
}

/// The `name` fields of a JSON array.
pub fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_string())
        .collect()
}

/// The column where `word` starts in `line`.
pub fn col(line: &str, word: &str) -> usize {
    line.find(word)
        .unwrap_or_else(|| panic!("'{word}' not in '{line}'"))
}
