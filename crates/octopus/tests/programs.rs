//! The two programs: `octopus` (the client) runs client commands itself and
//! hands the server's commands to `octopus-server` beside it, which becomes
//! the same process.
#![allow(clippy::unwrap_used)]
// `ServerProcess` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use common::live::{free_port, ServerProcess};
use common::output as run;

const CLIENT: &str = env!("CARGO_BIN_EXE_octopus");
const SERVER: &str = env!("CARGO_BIN_EXE_octopus-server");

#[test]
fn the_clients_help_names_the_servers_commands_beside_its_own() {
    let (code, help, _) = run(CLIENT, &["--help"]);
    assert_eq!(code, 0);
    for command in [
        "quickstart",
        "demo",
        "server",
        "run-script",
        "deploy",
        "task",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`{command}` is not listed in:\n{help}"
        );
    }
}

#[test]
fn a_server_command_is_answered_by_octopus_server_under_the_name_octopus() {
    // The same arguments give the same answer from either program: the
    // server's own help (which the client does not have) and its own errors.
    let data = tempfile::tempdir().unwrap();
    let missing = data.path().join("none");
    let missing = missing.to_str().unwrap();
    for args in [
        &["server", "--help"][..],
        &["server", "show-thumbprint", "--data", missing],
        // Global options before the command go along too.
        &[
            "--output",
            "json",
            "server",
            "show-thumbprint",
            "--data",
            missing,
        ],
    ] {
        let handed = run(CLIENT, args);
        let direct = run(SERVER, args);
        assert_eq!(handed.0, direct.0, "exit code of {args:?}");
        assert_eq!(handed.2, direct.2, "stderr of {args:?}");
        // Usage lines name the program as it was called.
        assert_eq!(
            handed.1,
            direct.1.replace("octopus-server", "octopus"),
            "stdout of {args:?}"
        );
    }
    let (code, help, _) = run(CLIENT, &["server", "--help"]);
    assert_eq!(code, 0);
    assert!(
        help.contains("show-thumbprint") && help.contains("reset-admin"),
        "{help}"
    );
    assert!(help.contains("Usage: octopus server"), "{help}");
    let (code, _, err) = run(CLIENT, &["server", "show-thumbprint", "--data", missing]);
    assert_eq!(code, 1);
    assert!(err.contains("there is no server in"), "{err}");
}

#[test]
fn octopus_server_run_is_the_process_that_was_started() {
    // `octopus server run` execs: the process a service manager started (and
    // signals) is the server itself, not a parent waiting on it. `start`
    // returns once the server printed that it is ready.
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), free_port());
    let exe = std::fs::read_link(format!("/proc/{}/exe", server.child.id())).unwrap();
    assert_eq!(exe, std::fs::canonicalize(SERVER).unwrap());
}

#[test]
fn the_server_raises_its_open_file_limit_and_says_when_it_is_small() {
    // Each polling tentacle holds a connection open: a soft limit of 1,024
    // (a shell's, systemd's default) would cap the fleet at about a thousand.
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::try_start_via(
        &["prlimit", "--nofile=256:4096"],
        data.path(),
        free_port(),
        &[],
    )
    .unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
    // 4,096 is below what a fleet needs: the log says so, and how to raise it.
    drop(server);
    let log = std::fs::read_to_string(data.path().with_extension("stderr")).unwrap();
    assert!(
        log.contains("at most 4096 files open") && log.contains("LimitNOFILE="),
        "{log}"
    );
}

#[test]
fn without_octopus_server_beside_it_the_client_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("octopus");
    std::fs::copy(CLIENT, &alone).unwrap();
    let alone = alone.to_str().unwrap();
    let (code, _, err) = run(alone, &["server", "run", "--data", "/nonexistent"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("octopus-server") && err.contains("not beside") && err.contains(alone),
        "{err}"
    );
    // Client commands need nothing beside it.
    let (code, out, _) = run(alone, &["--version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("octopus "), "{out}");
    let (code, _, err) = run(
        alone,
        &["--server", "http://127.0.0.1:1", "machine", "list"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the server"), "{err}");
}
