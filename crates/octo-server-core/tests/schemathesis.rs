//! The API against a schema-driven fuzzer: `schemathesis` (PyPI, installed by
//! `./scripts/test.sh` into `target/schemathesis-venv`) reads the live server's
//! `GET /api/openapi.json`, sends generated valid and invalid requests to every
//! operation, and checks every answer: no 5xx, every status and content type
//! documented, every body matching its schema, invalid input refused, every
//! error the JSON error body. No failure is allowed.
//!
//! Bounded: a few examples per operation and a time budget (`FUZZ_SECONDS`),
//! and the process is killed if it runs past twice that.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use octo_server_core::{start, RunArgs};
use tokio::io::AsyncReadExt;

/// The fuzzer's time budget (its `--max-time`).
const FUZZ_SECONDS: u64 = 120;

/// Where `./scripts/test.sh` installs schemathesis.
fn schemathesis() -> PathBuf {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/schemathesis-venv/bin/schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() {
    let bin = schemathesis();
    assert!(
        bin.exists(),
        "{} is missing: ./scripts/test.sh installs it (python3 -m venv target/schemathesis-venv && target/schemathesis-venv/bin/pip install 'schemathesis==4.*')",
        bin.display()
    );
    octo_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Machines the fuzzer adds have made-up addresses: every dial to them goes
    // to a proxy on a closed loopback port, so nothing leaves this machine.
    let server = start(&RunArgs {
        proxy: Some("http://127.0.0.1:9".into()),
        ..RunArgs::loopback(&dir.path().join("data"))
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.api_addr);
    let key = server.admin_api_key.clone().unwrap();
    // The reports stay after the run (the JSON report lists every failure).
    let reports =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/schemathesis-report");
    // Valid JSON can still break a rule the schema cannot say (a reserved
    // variable name, an endpoint that does not parse: 400) or meet the state
    // of the server (the default space cannot be deleted, no machine matches:
    // 422); schema-valid requests may get those, never a 5xx.
    //
    // A 404 also names a thing the body refers to (`POST
    // /api/spaces/{space}/tasks/health` with `machines: ["x"]`: "machine 'x'
    // does not exist"), which the stateful check `ensure_resource_availability`
    // takes for the space it just created being missing: that check is off
    // (`--exclude-checks` below; the config file says so too).
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[checks.positive_data_acceptance]\nexpected-statuses = [\"2xx\", \"3xx\", \"400\", \"401\", \"403\", \"404\", \"409\", \"422\", \"429\"]\n\n[checks.ensure_resource_availability]\nenabled = false\n",
    )
    .unwrap();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&bin)
        .arg("--no-color")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{base}/api/openapi.json"))
        .args(["--checks", "all"])
        // (`--checks all` overrides the config file's `enabled = false`.)
        .args(["--exclude-checks", "ensure_resource_availability"])
        .args(["--max-examples", "8"])
        .args(["--max-time", &FUZZ_SECONDS.to_string()])
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .args(["--seed", "14"])
        .args(["--generation-database", "none"])
        .arg("--header")
        .arg(format!("{}: {key}", octo_api_types::API_KEY_HEADER))
        // The fuzzer's own key and user stay usable: revoking every key, logging
        // out and disabling or re-passwording users are checked by the
        // security tests, not fuzzed away under the fuzzer's feet. Discovery
        // dials the address it is given and answers 502 when nothing is there
        // (tests/permissions.rs covers it). Nor may it take itself off the
        // administrators' team or take a grant away from it (it did: every
        // later answer was a 403). Nor drain the node under test (it did: the
        // node then refuses new work and its ping answers 418, as documented;
        // tests/nodes.rs covers draining).
        .args(["--exclude-path", "/api/api-keys/{id}"])
        .args(["--exclude-path", "/api/users/logout"])
        .args([
            "--exclude-path-regex",
            "^/api/users/\\{username\\}/(disable|password)$|/machines/discover$|^/api/nodes/\\{name\\}/drain$|/teams/\\{name\\}/(members/\\{username\\}|grants/\\{id\\})$",
        ])
        .args(["--report", "ndjson"])
        .arg("--report-dir")
        .arg(&reports)
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let read_out = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });
    let read_err = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let bound = Duration::from_secs(FUZZ_SECONDS * 2 + 60);
    let status = match tokio::time::timeout(bound, child.wait()).await {
        Ok(s) => s.unwrap(),
        Err(_) => {
            let _ = child.kill().await;
            panic!("schemathesis ran past {} s", bound.as_secs());
        }
    };
    let out = read_out.await.unwrap();
    let err = read_err.await.unwrap();
    // What it found first (a CI log shows the start of a failing test's
    // output, and this one's is long), then everything.
    let found = findings(&out);
    eprintln!(
        "schemathesis ran {:.0} s\n{found}\n{out}\n{err}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "schemathesis found failures ({status}):\n{found}\n(its whole output is above)"
    );
    server.stop().await;
}

/// The FAILURES and ERRORS sections of schemathesis's output (each begins with
/// a line of `=` around its name), at most 80 lines.
fn findings(out: &str) -> String {
    let mut kept = Vec::new();
    let mut keep = false;
    for line in out.lines() {
        let t = line.trim();
        if t.len() > 6 && t.starts_with("===") && t.ends_with("===") {
            keep = t.contains(" FAILURES ") || t.contains(" ERRORS ");
        }
        if keep {
            kept.push(line);
        }
    }
    if kept.is_empty() {
        return "(no FAILURES or ERRORS section)".into();
    }
    let more = kept.len().saturating_sub(80);
    kept.truncate(80);
    let mut s = kept.join("\n");
    if more > 0 {
        s.push_str(&format!("\n[{more} more lines below]"));
    }
    s
}

#[test]
fn findings_are_the_failures_and_errors_sections() {
    let out = "header\n==== FAILURES ====\n____ GET /a ____\n500\n==== ERRORS ====\ntimeout\n==== SUMMARY ====\nok\n";
    assert_eq!(
        findings(out),
        "==== FAILURES ====\n____ GET /a ____\n500\n==== ERRORS ====\ntimeout"
    );
    assert_eq!(findings("all good\n"), "(no FAILURES or ERRORS section)");
}
