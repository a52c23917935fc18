//! The CLI's spaces, users, teams, roles, login, audit and terminal safety,
//! against a real `octopus server run` on loopback. Every CLI run is bounded.
#![allow(clippy::unwrap_used)]
#![allow(clippy::zombie_processes)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{names, run, start, Server};

/// `octopus` as `user` logged in (the session in `config`), nothing else
/// from the environment.
fn as_session(server: &Server, config: &std::path::Path, args: &[&str]) -> common::Run {
    let mut all = vec!["--server", server.api.as_str()];
    all.extend_from_slice(args);
    run(&[("XDG_CONFIG_HOME", config.to_str().unwrap())], &all, None)
}

#[test]
fn spaces_partition_what_the_cli_sees() {
    let s = start();
    s.cli(&[
        "space",
        "create",
        "Ops Team",
        "--description",
        "the ops people",
    ])
    .ok();
    let spaces = s.cli(&["--output", "json", "space", "list"]).ok().json();
    let names: Vec<&str> = spaces
        .as_array()
        .unwrap()
        .iter()
        .map(|sp| sp["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Default", "Ops Team"]);
    assert!(s
        .cli(&["space", "show", "ops team"])
        .ok()
        .stdout
        .contains("the ops people"));

    // The same name in two spaces; each list shows its own.
    s.cli(&["environment", "create", "Prod"]).ok();
    s.cli(&["--space", "Ops Team", "environment", "create", "Prod"])
        .ok();
    s.cli(&["--space", "Ops Team", "environment", "create", "OpsOnly"])
        .ok();
    let listed = s
        .cli(&[
            "--space",
            "Ops Team",
            "--output",
            "json",
            "environment",
            "list",
        ])
        .ok()
        .json();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let default = s
        .cli(&["--output", "json", "environment", "list"])
        .ok()
        .json();
    assert_eq!(default.as_array().unwrap().len(), 1);
    // OCTOPUS_SPACE does the same as --space.
    let mut args = vec!["--server", s.api.as_str(), "--api-key", s.key.as_str()];
    args.extend(["--output", "json", "environment", "list"]);
    let by_env = run(&[("OCTOPUS_SPACE", "Ops Team")], &args, None)
        .ok()
        .json();
    assert_eq!(by_env.as_array().unwrap().len(), 2);

    // A machine keeps the space; deleting it is refused, saying how many.
    s.cli(&[
        "--space",
        "Ops Team",
        "machine",
        "add-listening",
        "--name",
        "web01",
        "--url",
        "https://127.0.0.1:1",
        "--thumbprint",
        &common::tp(1),
        "--environment",
        "Prod",
    ])
    .ok();
    let err = s.cli(&["space", "delete", "Ops Team"]).error();
    assert!(err.contains("1 machine"), "{err}");
    assert!(s
        .cli(&["machine", "show", "web01"])
        .error()
        .contains("does not exist"));
    s.cli(&["--space", "Ops Team", "machine", "delete", "web01"])
        .ok();
    s.cli(&["space", "delete", "Ops Team"]).ok();
    let err = s
        .cli(&["--space", "Ops Team", "environment", "list"])
        .error();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn users_teams_roles_login_and_the_audit_log() {
    let s = start();
    let config = tempfile::tempdir().unwrap();
    s.cli(&["environment", "create", "Test"]).ok();
    let mut create = vec!["--server", s.api.as_str(), "--api-key", s.key.as_str()];
    create.extend(["user", "create", "--username", "alice", "--password-stdin"]);
    run(&[], &create, Some("correct-horse-1\n")).ok();

    // Logged in, alice holds no role: her session works, the environments do not.
    run(
        &[("XDG_CONFIG_HOME", config.path().to_str().unwrap())],
        &[
            "--server",
            &s.api,
            "login",
            "--username",
            "alice",
            "--password-stdin",
        ],
        Some("correct-horse-1\n"),
    )
    .ok();
    let sessions = config.path().join("octopus/sessions.json");
    let mode = std::fs::metadata(&sessions).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the session file is the user's alone");
    let dir_mode = std::fs::metadata(sessions.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let me = as_session(&s, config.path(), &["--output", "json", "whoami"])
        .ok()
        .json();
    assert_eq!(me["user"]["username"], "alice");
    let err = as_session(&s, config.path(), &["environment", "list"]).error();
    assert!(
        err.contains("EnvironmentView"),
        "names the permission: {err}"
    );

    // A team in the Default space with a viewer's role lets her see them.
    s.cli(&["team", "create", "Viewers"]).ok();
    s.cli(&["team", "add-member", "Viewers", "alice"]).ok();
    s.cli(&["team", "grant", "Viewers", "--role", "Environment viewer"])
        .ok();
    let shown = s.cli(&["team", "show", "Viewers"]).ok().stdout;
    assert!(
        shown.contains("alice") && shown.contains("Environment viewer"),
        "{shown}"
    );
    let envs = as_session(
        &s,
        config.path(),
        &["--output", "json", "environment", "list"],
    )
    .ok()
    .json();
    assert_eq!(envs[0]["name"], "Test");
    let err = as_session(&s, config.path(), &["environment", "create", "Prod"]).error();
    assert!(err.contains("EnvironmentCreate"), "{err}");

    // Roles: the built-in ones, and a custom one given to a team.
    let roles = s.cli(&["role", "list"]).ok().stdout;
    for r in [
        "System administrator",
        "Space manager",
        "Project deployer",
        "Package publisher",
    ] {
        assert!(roles.contains(r), "{r} in {roles}");
    }
    s.cli(&["role", "create", "Auditor", "--permission", "EventView"])
        .ok();
    let err = s
        .cli(&["role", "create", "Nope", "--permission", "NoSuchThing"])
        .error();
    assert!(
        err.contains("NoSuchThing") && err.contains("EventView"),
        "{err}"
    );
    s.cli(&["team", "grant", "Viewers", "--role", "Auditor"])
        .ok();

    // Users: list, show, disable (her session stops), enable.
    let users = s.cli(&["--output", "json", "user", "list"]).ok().json();
    assert_eq!(users.as_array().unwrap().len(), 2);
    s.cli(&["user", "disable", "alice"]).ok();
    let err = as_session(&s, config.path(), &["environment", "list"]).error();
    assert!(err.contains("session") || err.contains("API key"), "{err}");
    s.cli(&["user", "enable", "alice"]).ok();
    // The last administrator cannot be disabled.
    let err = s.cli(&["user", "disable", "admin"]).error();
    assert!(err.contains("last"), "{err}");

    // Logout revokes the session.
    let relogin = run(
        &[("XDG_CONFIG_HOME", config.path().to_str().unwrap())],
        &[
            "--server",
            &s.api,
            "login",
            "--username",
            "alice",
            "--password-stdin",
        ],
        Some("correct-horse-1\n"),
    );
    relogin.ok();
    as_session(&s, config.path(), &["environment", "list"]).ok();
    as_session(&s, config.path(), &["logout"]).ok();
    assert!(as_session(&s, config.path(), &["environment", "list"]).code != 0);

    // The audit log saw each change, with who did it; alice's filter works.
    let events = s
        .cli(&["--output", "json", "audit", "list", "--limit", "200"])
        .ok()
        .json();
    let seen: Vec<(String, String, String)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["object"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (action, kind, object) in [
        ("created", "environment", "Test"),
        ("created", "user", "alice"),
        ("created", "team", "Viewers"),
        ("disabled", "user", "alice"),
        ("enabled", "user", "alice"),
        ("created", "role", "Auditor"),
    ] {
        assert!(
            seen.iter()
                .any(|(a, k, o)| a == action && k == kind && o == object),
            "{action} {kind} {object} missing from {seen:?}"
        );
    }
    assert!(events[0]["source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1"));
    let by_alice = s
        .cli(&["--output", "json", "audit", "list", "--user", "alice"])
        .ok()
        .json();
    assert!(
        by_alice.as_array().unwrap().is_empty(),
        "alice changed nothing"
    );
    let table = s.cli(&["audit", "list", "--since", "1h"]).ok().stdout;
    assert!(
        table.contains("environment") && table.contains("admin"),
        "{table}"
    );
}

#[test]
fn names_from_the_server_never_reach_the_terminal_raw() {
    let s = start();
    let hostile = "evil\u{1b}[31mred\u{7}";
    // The server refuses control characters in names, naming the field and the rule.
    let refused = s.cli(&["environment", "create", hostile]).error();
    assert!(
        refused.contains("field `name`") && refused.contains("U+001B"),
        "{refused:?}"
    );
    assert!(!refused.contains('\u{1b}'), "{refused:?}");
    assert!(names(
        &s.cli(&["--output", "json", "environment", "list"])
            .ok()
            .json()
    )
    .is_empty());
    // An error that quotes what was asked for reaches the terminal escaped.
    let err = s.cli(&["machine", "show", hostile]).error();
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");
    assert!(
        err.contains("evil\\e[31mred"),
        "escaped, still readable: {err:?}"
    );
}
