//! The systemd path of the tentacle's self-upgrade, as far as it can be
//! tested without systemd running (this test machine has no systemd as PID 1,
//! so no unit can really be restarted here): the commands the tentacle runs
//! under systemd, through stand-in `systemctl` and `systemd-run` programs
//! on the PATH that record their arguments, and the unit the tentacle
//! installs (`Restart=always`, so a tentacle that exits is started again,
//! and the control group killed on stop, which is why the guard runs as a
//! transient unit of its own). `crates/tentacle/tests/upgrade.rs` tests the
//! re-exec path with real processes; `systemd-analyze verify` of the unit is
//! in the tentacle's service tests.
//!
//! One test in this file: it changes the process's PATH.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use octo_agent::service_unit::{render, unit_name, UnitSpec};
use octo_agent::upgrade::{restart, start_guard_process, Host, RestartMode};

/// A stand-in for `name` that appends its arguments to `log` and exits `code`.
fn stand_in(dir: &Path, name: &str, log: &Path, code: i32) {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit {code}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn host(dir: &Path, unit: &str) -> Host {
    Host {
        binary: dir.join("Tentacle"),
        args: vec!["run".into(), "--instance".into(), "Web".into()],
        cwd: dir.to_path_buf(),
        mode: RestartMode::Systemd { unit: unit.into() },
        record: dir.join("state.json"),
        restart: tokio_util::sync::CancellationToken::new(),
    }
}

#[test]
fn under_systemd_the_tentacle_restarts_through_systemctl_and_guards_from_a_transient_unit() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls.log");
    stand_in(&bin, "systemctl", &log, 0);
    stand_in(&bin, "systemd-run", &log, 0);
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(std::env::split_paths(&path));
    std::env::set_var("PATH", std::env::join_paths(dirs).unwrap());

    let unit = unit_name("Web");
    assert_eq!(unit, "tentacle-web.service");
    let h = host(dir.path(), &unit);

    // The guard: a transient unit named after the service, started from the
    // previous binary, not waited for.
    let previous = dir.path().join("Tentacle.previous");
    start_guard_process(&previous, &h.record, dir.path(), &h.mode).unwrap();
    // The restart: queued, not waited for (the caller is the unit itself).
    assert_eq!(
        restart(&h, None),
        "",
        "a successful systemctl answers no error"
    );
    let calls = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "{calls}");
    let guard = format!(
        " -- {} upgrade-guard --state {}",
        previous.display(),
        h.record.display()
    );
    assert!(
        lines[0].starts_with(
            "systemd-run --collect --quiet --no-block --unit=tentacle-web-upgrade-guard-"
        ) && lines[0].ends_with(&guard),
        "{calls}"
    );
    assert_eq!(
        lines[1],
        "systemctl restart --no-block tentacle-web.service"
    );

    // systemctl refusing: the restart says so (the tentacle then exits and
    // the unit's Restart= starts it again); the guard's failure is an error.
    stand_in(&bin, "systemctl", &log, 1);
    stand_in(&bin, "systemd-run", &log, 1);
    let why = restart(&h, None);
    assert!(
        why.contains("`systemctl restart --no-block tentacle-web.service` failed"),
        "{why}"
    );
    let err = start_guard_process(&previous, &h.record, dir.path(), &h.mode).unwrap_err();
    assert!(
        err.contains("the upgrade guard process did not start"),
        "{err}"
    );

    // The unit: restarted whatever the exit, its control group killed on stop.
    let text = render(&UnitSpec {
        instance: "Web".into(),
        binary: PathBuf::from("/opt/octopus/tentacle/Tentacle"),
        config: None,
        config_dir: None,
        user: None,
        after: None,
    });
    assert!(text.contains("Restart=always\n"), "{text}");
    assert!(text.contains("KillMode=control-group\n"), "{text}");
    assert!(
        text.contains("ExecStart=/opt/octopus/tentacle/Tentacle run --instance Web"),
        "{text}"
    );
}
