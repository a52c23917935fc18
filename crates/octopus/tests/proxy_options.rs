//! `octopus server run` takes its proxy from --proxy, --proxy-file or
//! `OCTOPUS_PROXY`; a password on the command line (which `ps` shows every
//! user) gets one warning line, the other two none.
#![allow(clippy::unwrap_used)]
// `Run` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server with `args` and `env`, waits for it to be ready, stops
/// it, and answers what it wrote to stderr.
fn stderr_of(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_octopus"));
    cmd.args(["server", "run", "--data"])
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
        ])
        .args(args)
        .env_remove("OCTOPUS_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut run = Run(cmd.spawn().unwrap());
    let stdout = run.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server ready line");
        if line.starts_with("Octopus server ready") {
            break;
        }
    }
    let _ = run.0.kill();
    let _ = run.0.wait();
    let mut err = String::new();
    run.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

const WARNING: &str = "--proxy carries a password";

#[test]
fn a_proxy_password_stays_off_the_command_line() {
    let inline = stderr_of(&["--proxy", "http://ops:hunter2@127.0.0.1:9"], &[]);
    let warnings: Vec<&str> = inline.lines().filter(|l| l.contains(WARNING)).collect();
    assert_eq!(warnings.len(), 1, "{inline}");
    assert!(warnings[0].contains("--proxy-file") && warnings[0].contains("OCTOPUS_PROXY"));
    assert!(!inline.contains("hunter2"), "{inline}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy");
    std::fs::write(&file, "http://ops:hunter2@127.0.0.1:9\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let from_file = stderr_of(&["--proxy-file", file.to_str().unwrap()], &[]);
    assert!(!from_file.contains(WARNING), "{from_file}");
    assert!(!from_file.contains("hunter2"), "{from_file}");

    let from_env = stderr_of(&[], &[("OCTOPUS_PROXY", "http://ops:hunter2@127.0.0.1:9")]);
    assert!(!from_env.contains(WARNING), "{from_env}");
    assert!(!from_env.contains("hunter2"), "{from_env}");

    // A file others can read is pointed out.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let readable = stderr_of(&["--proxy-file", file.to_str().unwrap()], &[]);
    assert!(readable.contains("chmod 600"), "{readable}");
}
