//! `octopus quickstart` end to end: server, two real tentacles, registration,
//! health check and a script; exits 0.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[test]
fn quickstart_exits_zero_with_both_tentacles_healthy_and_the_script_run() {
    let octopus = PathBuf::from(env!("CARGO_BIN_EXE_octopus"));
    let tentacle = octopus.with_file_name("tentacle");
    assert!(
        tentacle.exists(),
        "{} is missing: build it first (`cargo build -p octo-tentacle`; `cargo test --workspace` does)",
        tentacle.display()
    );
    let child = Command::new(&octopus)
        .args(["quickstart", "--tentacle", tentacle.to_str().unwrap()])
        .env_remove("OCTOPUS_URL")
        .env_remove("OCTOPUS_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("quickstart did not finish within 120 s");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "quickstart-listening  Healthy",
        "quickstart-polling    Healthy",
        "[quickstart-listening] Hello from Listening",
        "[quickstart-polling] Hello from Polling",
        "Everything works.",
        "Stopped the server and both tentacles.",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
