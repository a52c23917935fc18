//! The command line itself: version, usage errors and their exit codes.
#![allow(clippy::unwrap_used)]

mod common;

use common::{run, Home};

#[test]
fn version_prints_exactly_the_version() {
    let home = Home::new();
    for args in [&["version"][..], &["--version"], &["-V"]] {
        let mut cmd = home.command();
        cmd.args(args);
        let out = run(cmd);
        out.assert_code(0);
        assert_eq!(
            out.stdout,
            format!("{}\n", octo_calamari::VERSION),
            "{args:?}"
        );
        assert_eq!(out.stdout, format!("{}\n", env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn usage_errors_exit_2() {
    let home = Home::new();
    for args in [
        &[][..],
        &["no-such-command"],
        &["deploy-package"],
        &[
            "deploy-package",
            "--package",
            "x.zip",
            "--package-id",
            "A",
            "--package-version",
            "1",
            "--environment",
            "E",
            "--bogus",
        ],
        &[
            "deploy-package",
            "--package",
            "x.zip",
            "--package-id",
            "A",
            "--package-version",
            "1",
            "--environment",
            "E",
            "--retention",
            "0",
        ],
        &[
            "deploy-package",
            "--package",
            "x.zip",
            "--package-id",
            "A",
            "--package-version",
            "1",
            "--environment",
            "E",
            "--max-entries",
            "lots",
        ],
    ] {
        let mut cmd = home.command();
        cmd.args(args);
        let out = run(cmd);
        out.assert_code(2);
        let stderr = out.stderr.to_lowercase();
        assert!(
            stderr.contains("usage") || stderr.contains("error: invalid value"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn bad_names_are_usage_errors() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    common::zip(&pkg, &[common::file("a.txt", "a")]);
    for (id, version) in [
        ("../evil", "1.0.0"),
        ("Acme", "1/2"),
        ("Acme", ".."),
        ("", "1.0.0"),
    ] {
        let out = home.deploy(&pkg, id, version, &[]);
        out.assert_code(2);
        assert!(
            out.stderr.contains("cannot be used as a folder name"),
            "{}",
            out.stderr
        );
    }
    assert!(!home.apps().exists());
}

#[test]
fn without_home_or_flags_it_says_what_to_pass() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    common::zip(&pkg, &[common::file("a.txt", "a")]);
    let mut cmd = home.command();
    cmd.env_remove("TentacleHome").args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        "A",
        "--package-version",
        "1",
        "--environment",
        "E",
    ]);
    let out = run(cmd);
    out.assert_code(2);
    assert!(out.stderr.contains("--applications"), "{}", out.stderr);

    // With both flags, no environment variable is needed.
    let mut cmd = home.command();
    let apps = home.path().join("apps");
    let journal = home.path().join("j.json");
    cmd.env_remove("TentacleHome").args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        "A",
        "--package-version",
        "1",
        "--environment",
        "E",
        "--applications",
        apps.to_str().unwrap(),
        "--journal",
        journal.to_str().unwrap(),
    ]);
    run(cmd).assert_code(0);
    assert_eq!(
        std::fs::read_to_string(apps.join("E/A/1/a.txt")).unwrap(),
        "a"
    );
    assert!(journal.exists());
}

#[test]
fn tentacle_applications_overrides_home() {
    let home = Home::new();
    let pkg = home.package_path("p.tar.gz");
    common::tar_gz(&pkg, &[common::file("a.txt", "a")]);
    let apps = home.path().join("elsewhere");
    let mut cmd = home.command();
    cmd.env("TentacleApplications", &apps).args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        "A",
        "--package-version",
        "1",
        "--environment",
        "E",
    ]);
    run(cmd).assert_code(0);
    assert!(apps.join("E/A/1/a.txt").is_file());
    assert!(!home.apps().exists());
}
