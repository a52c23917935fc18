//! Runs the built `octopus demo` and checks what it shows.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Longest the demo may take (it normally takes about a second).
const DEADLINE: Duration = Duration::from_secs(60);

struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `octopus ARGS`, killing it if it outlives the deadline.
fn octopus(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start octopus");
    // Drain both pipes while waiting so a full pipe cannot stall the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(DEADLINE) {
        Ok(status) => status.expect("wait for octopus"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
            panic!("octopus {args:?} did not finish within {DEADLINE:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        }
    };
    Run {
        success: status.success(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The 64-hex thumbprint printed on the identity line of `name`.
fn thumbprint_of(stdout: &str, name: &str) -> String {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with(name) && l.contains("thumbprint "))
        .unwrap_or_else(|| panic!("no thumbprint line for {name}:\n{stdout}"));
    let tp = line.rsplit("thumbprint ").next().unwrap().trim();
    let tp = tp.split_whitespace().next().unwrap().to_string();
    assert_eq!(tp.len(), 64, "{line}");
    assert!(tp.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    tp
}

#[test]
fn demo_shows_both_modes_and_a_refusal() {
    let run = octopus(&["demo"]);
    let out = &run.stdout;
    assert!(
        run.success,
        "demo failed\nstdout:\n{out}\nstderr:\n{}",
        run.stderr
    );

    // Each tentacle's identity, and the same thumbprint reported by its hello.
    for name in ["Tentacle listening", "Tentacle polling"] {
        let tp = thumbprint_of(out, name);
        assert!(
            out.contains(&format!("tentacle thumbprint {tp}")),
            "no hello from {name} with {tp}:\n{out}"
        );
    }
    assert!(!thumbprint_of(out, "Octopus Server").is_empty());

    assert!(out.contains("poll://demo-polling/"), "{out}");
    assert!(out.contains("subscription poll://demo-polling/"), "{out}");
    assert!(
        out.contains("[Tentacle listening] line 0 from Tentacle listening in "),
        "{out}"
    );
    assert!(
        out.contains("[Tentacle polling] line 4 from Tentacle polling in "),
        "{out}"
    );
    assert_eq!(
        out.matches("final state: COMPLETE, exit code 0").count(),
        2,
        "{out}"
    );
    assert!(out.contains("ping x200: p50 "), "{out}");
    assert!(out.contains("real agent services"), "{out}");

    // The refusal names what was presented and what was expected.
    let listening = thumbprint_of(out, "Tentacle listening");
    let impostor = thumbprint_of(out, "Tentacle untrusted");
    assert!(
        out.contains(&format!(
            "the tentacle presented thumbprint {impostor} but {listening} was expected"
        )),
        "{out}"
    );
    assert!(out.contains("curl -k https://127.0.0.1:"), "{out}");
}

#[test]
fn demo_keeps_identities_in_dir() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("ids");
    let run = octopus(&["demo", "--dir", keep.to_str().unwrap()]);
    assert!(
        run.success,
        "demo failed\nstdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
    for stem in ["octopus-server", "tentacle-listening", "tentacle-polling"] {
        for ext in ["crt", "key"] {
            let path = keep.join(format!("{stem}.{ext}"));
            assert!(path.is_file(), "{} is missing", path.display());
            assert!(
                run.stdout.contains(&path.display().to_string()),
                "{}",
                run.stdout
            );
        }
    }
}
