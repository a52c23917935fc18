//! `calamari deploy-package` end to end with the real binary: extraction, substitution,
//! scripts, output variables, journal, retention.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use common::{
    dir, file, file_mode, hard_link, mode, run, script, symlink, tar_gz, zip, Home, Item,
    RUN_TIMEOUT,
};
use octo_calamari::service_message::{self, ServiceMessage};
use sha2::{Digest, Sha256};

const ID: &str = "Acme.Web";

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tree_items() -> Vec<Item> {
    vec![
        dir("bin/", 0o755),
        file_mode("bin/run", 0o755, b"#!/bin/sh\necho run\n"),
        // No folder entry for conf/.
        file_mode("conf/app.conf", 0o640, b"conf"),
        file_mode("deep/er/still/f.txt", 0o600, b"deep"),
        file_mode("suid", 0o4755, b"suid"),
        dir("ro/", 0o555),
        file_mode("ro/f", 0o444, b"read only"),
        symlink("link", "conf/app.conf"),
        symlink("bin/up", "../conf"),
    ]
}

fn assert_tree(root: &Path) {
    assert_eq!(
        fs::read_to_string(root.join("bin/run")).unwrap(),
        "#!/bin/sh\necho run\n"
    );
    assert_eq!(mode(&root.join("bin/run")), 0o755);
    assert_eq!(mode(&root.join("conf/app.conf")), 0o640);
    assert_eq!(mode(&root.join("deep/er/still/f.txt")), 0o600);
    assert_eq!(mode(&root.join("suid")), 0o755, "setuid bit dropped");
    assert_eq!(mode(&root.join("ro")), 0o755, "folders keep owner rwx");
    assert_eq!(mode(&root.join("ro/f")), 0o444);
    assert_eq!(mode(root), 0o755);
    assert_eq!(
        fs::read_link(root.join("link")).unwrap(),
        Path::new("conf/app.conf")
    );
    assert_eq!(fs::read_to_string(root.join("link")).unwrap(), "conf");
    assert_eq!(
        fs::read_to_string(root.join("bin/up/app.conf")).unwrap(),
        "conf"
    );
}

#[test]
fn extracts_a_zip_with_permissions_links_and_implied_folders() {
    let home = Home::new();
    let pkg = home.package_path("Acme.Web.1.0.0.zip");
    zip(&pkg, &tree_items());
    let out = home.deploy(&pkg, ID, "1.0.0", &[]);
    out.assert_code(0);
    let root = home.package_dir("Production", ID).join("1.0.0");
    assert_tree(&root);
    assert_eq!(home.versions("Production", ID), ["1.0.0"]);

    let journal = home.journal();
    assert_eq!(journal.len(), 1);
    let e = &journal[0];
    assert_eq!(e["environment"], "Production");
    assert_eq!(e["package_id"], ID);
    assert_eq!(e["version"], "1.0.0");
    assert_eq!(e["success"], true);
    assert_eq!(e["error"], serde_json::Value::Null);
    assert_eq!(e["removed_by_retention"], false);
    assert_eq!(e["extracted_to"], root.to_str().unwrap());
    assert_eq!(e["package_file"], pkg.to_str().unwrap());
    assert_eq!(e["package_sha256"], sha256_hex(&pkg));
    let started = e["started_at"].as_str().unwrap();
    let finished = e["finished_at"].as_str().unwrap();
    assert!(started.ends_with('Z') && started.len() == 24, "{started}");
    assert!(started <= finished);

    // The last line announces the installation folder as a service message.
    let last = out.stdout.lines().last().unwrap();
    assert_eq!(
        service_message::parse(last),
        Some(ServiceMessage::set_variable(
            "Octopus.Action.Package.InstallationDirectoryPath",
            root.to_str().unwrap()
        ))
    );
    assert!(
        out.stdout
            .contains("Deployed Acme.Web 1.0.0 to Production in "),
        "{}",
        out.stdout
    );
}

#[test]
fn extracts_a_tar_gz_with_hard_links() {
    let home = Home::new();
    let pkg = home.package_path("package.bin");
    let mut items = tree_items();
    items.push(hard_link("bin/run2", "bin/run"));
    tar_gz(&pkg, &items);
    home.deploy(&pkg, ID, "2.0.0", &[]).assert_code(0);
    let root = home.package_dir("Production", ID).join("2.0.0");
    assert_tree(&root);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(root.join("bin/run")).unwrap().ino(),
        fs::metadata(root.join("bin/run2")).unwrap().ino()
    );
}

#[test]
fn the_check_only_sandbox_accepts_what_extracts_and_writes_nothing() {
    use octo_calamari::extract::{check_tar_gz, check_zip};
    let home = Home::new();
    let mut items = tree_items();
    let zip_pkg = home.package_path("a.zip");
    zip(&zip_pkg, &items);
    items.push(hard_link("bin/run2", "bin/run"));
    let tgz_pkg = home.package_path("a.tar.gz");
    tar_gz(&tgz_pkg, &items);
    let before: Vec<_> = fs::read_dir(home.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let limits = octo_calamari::Limits::default();
    let z = fs::read(&zip_pkg).unwrap();
    let zc = check_zip(std::io::Cursor::new(&z), z.len() as u64, limits).unwrap();
    let t = fs::read(&tgz_pkg).unwrap();
    let tc = check_tar_gz(&t[..], t.len() as u64, limits).unwrap();
    // The hard link is one more file; the folders and links are the same.
    assert_eq!(
        (tc.files, tc.dirs, tc.symlinks),
        (zc.files + 1, zc.dirs, zc.symlinks)
    );
    assert!(zc.files > 0 && zc.dirs > 0 && zc.symlinks > 0, "{zc:?}");
    assert_eq!(
        (tc.bytes, zc.bytes),
        (file_bytes(&items), file_bytes(&items))
    );
    let after: Vec<_> = fs::read_dir(home.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(before, after, "nothing written");
}

/// Bytes of the regular files among `items` (what extracting them writes).
fn file_bytes(items: &[Item]) -> u64 {
    items
        .iter()
        .map(|i| match i {
            Item::File(_, _, data) => data.len() as u64,
            _ => 0,
        })
        .sum()
}

#[test]
fn substitutes_variables_in_the_target_files_only() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    let json = r###"{"env": "#{Octopus.Environment.Name}", "url": "#{Url}", "literal": "##{Url}", "unknown": "#{Nope}", "case": "#{url}"}"###;
    zip(
        &pkg,
        &[
            file_mode("config/app.json", 0o640, json.as_bytes()),
            file(
                "web.config",
                "<add value=\"#{Url}\" id=\"#{Octopus.Action.Package.PackageId}\"/>",
            ),
            file("other.txt", "#{Url}"),
            file("config/nested/deep.json", "#{Url}"),
        ],
    );
    let vars = home.variables(
        "vars.json",
        &[
            ("Url", "https://example.com/a?b=c&d='e'"),
            (
                "Octopus.Action.SubstituteInFiles.TargetFiles",
                "config/*.json\n*.config; missing/**",
            ),
        ],
    );
    let out = home.deploy(&pkg, ID, "1.0.0", &["--variables", vars.to_str().unwrap()]);
    out.assert_code(0);
    let root = home.package_dir("Production", ID).join("1.0.0");
    assert_eq!(
        fs::read_to_string(root.join("config/app.json")).unwrap(),
        r##"{"env": "Production", "url": "https://example.com/a?b=c&d='e'", "literal": "#{Url}", "unknown": "#{Nope}", "case": "https://example.com/a?b=c&d='e'"}"##
    );
    assert_eq!(
        mode(&root.join("config/app.json")),
        0o640,
        "permissions kept"
    );
    assert_eq!(
        fs::read_to_string(root.join("web.config")).unwrap(),
        "<add value=\"https://example.com/a?b=c&d='e'\" id=\"Acme.Web\"/>"
    );
    assert_eq!(
        fs::read_to_string(root.join("other.txt")).unwrap(),
        "#{Url}"
    );
    assert_eq!(
        fs::read_to_string(root.join("config/nested/deep.json")).unwrap(),
        "#{Url}",
        "`*` does not cross folders"
    );
    assert!(
        out.stderr.lines().any(|l| l.contains("config/app.json")
            && l.contains("#{Nope}")
            && l.contains("not defined")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("\"missing/**\"") && l.contains("matched no file")),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout
            .contains("Substituted 3 variable references in config/app.json"),
        "{}",
        out.stdout
    );
    // No temporary files left behind.
    let names: Vec<_> = fs::read_dir(root.join("config"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_target_file_that_is_not_utf8_fails_the_deployment() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[
            file_mode("data.bin", 0o644, b"ok\xff\xfe#{Url}"),
            script("Deploy.sh", "echo should not run\n"),
        ],
    );
    let vars = home.variables(
        "vars.json",
        &[("Octopus.Action.SubstituteInFiles.TargetFiles", "*.bin")],
    );
    let out = home.deploy(&pkg, ID, "1.0.0", &["--variables", vars.to_str().unwrap()]);
    out.assert_code(4);
    assert!(
        out.stderr.contains("data.bin") && out.stderr.contains("not UTF-8"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("should not run"));
    let root = home.package_dir("Production", ID).join("1.0.0");
    assert_eq!(
        fs::read(root.join("data.bin")).unwrap(),
        b"ok\xff\xfe#{Url}"
    );
    let journal = home.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0]["success"], false);
    assert_eq!(journal[0]["extracted_to"], root.to_str().unwrap());
    assert!(journal[0]["error"].as_str().unwrap().contains("not UTF-8"));
}

const RECORD: &str = r#"printf '%s|%s|%s|%s|%s|%s\n' "$STAGE" "$(pwd)" "$(printenv Octopus.Environment.Name)" "$Octopus_Environment_Name" "$Custom_Var_1" "$(printenv 'Custom.Var-1')" >> "$TentacleHome/order.log"
"#;

#[test]
fn scripts_run_in_order_in_the_package_folder_with_variables() {
    let home = Home::new();
    let pkg = home.package_path("p.tar.gz");
    tar_gz(
        &pkg,
        &[
            // Not executable: run with bash anyway.
            file("PreDeploy.sh", &format!("STAGE=PreDeploy\n{RECORD}")),
            script(
                "Deploy.sh",
                &format!("STAGE=Deploy\n{RECORD}echo 'to stderr' >&2\necho \"installed in $Octopus_Action_Package_InstallationDirectoryPath\"\n"),
            ),
            script("PostDeploy.sh", &format!("STAGE=PostDeploy\n{RECORD}")),
            script("deploy.sh", "echo wrong case must not run; exit 1\n"),
        ],
    );
    let vars = home.variables("v.json", &[("Custom.Var-1", "hello world")]);
    let out = home.deploy(&pkg, ID, "1.0.0", &["--variables", vars.to_str().unwrap()]);
    out.assert_code(0);
    let root = home.package_dir("Production", ID).join("1.0.0");
    let root = root.to_str().unwrap();
    let log = fs::read_to_string(home.path().join("order.log")).unwrap();
    let expected: String = ["PreDeploy", "Deploy", "PostDeploy"]
        .iter()
        .map(|s| format!("{s}|{root}|Production|Production|hello world|hello world\n"))
        .collect();
    assert_eq!(log, expected);
    assert!(
        out.stderr.lines().any(|l| l == "to stderr"),
        "{}",
        out.stderr
    );
    assert!(out
        .stdout
        .lines()
        .any(|l| l == format!("installed in {root}")));
    // Progress lines around each script, in order.
    let lines: Vec<&str> = out.stdout.lines().collect();
    let pos = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{}", out.stdout))
    };
    let order = [
        pos("Running PreDeploy.sh"),
        pos("PreDeploy.sh finished (exit code 0, "),
        pos("Running Deploy.sh"),
        pos(&format!("installed in {root}")),
        pos("Deploy.sh finished (exit code 0, "),
        pos("Running PostDeploy.sh"),
        pos("PostDeploy.sh finished (exit code 0, "),
        pos("Deployed Acme.Web 1.0.0"),
    ];
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{order:?}\n{}",
        out.stdout
    );
    let finished = lines[pos("Deploy.sh finished")];
    assert!(finished.ends_with(" s)"), "{finished}");
}

#[test]
fn a_failing_deploy_script_stops_the_deployment_with_exit_code_1() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[
            script("PreDeploy.sh", "echo pre > \"$TentacleHome/pre\"\n"),
            script("Deploy.sh", "echo failing; exit 7\n"),
            script("PostDeploy.sh", "echo post > \"$TentacleHome/post\"\n"),
        ],
    );
    let out = home.deploy(&pkg, ID, "1.0.0", &[]);
    out.assert_code(1);
    assert!(home.path().join("pre").exists());
    assert!(
        !home.path().join("post").exists(),
        "PostDeploy must not run"
    );
    assert!(
        out.stdout.contains("Deploy.sh finished (exit code 7, "),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("error: Deploy.sh exited with code 7"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stdout.contains("##octopus[setVariable"),
        "no success announcement"
    );
    let journal = home.journal();
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0]["success"], false);
    assert!(journal[0]["finished_at"].is_string());
    assert!(journal[0]["error"]
        .as_str()
        .unwrap()
        .contains("Deploy.sh exited with code 7"));
    // The folder stays (it is a version like any other).
    assert!(home
        .package_dir("Production", ID)
        .join("1.0.0/Deploy.sh")
        .exists());
}

#[test]
fn a_script_killed_by_a_signal_says_which() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(&pkg, &[script("Deploy.sh", "kill -KILL $$\n")]);
    let out = home.deploy(&pkg, ID, "1.0.0", &[]);
    out.assert_code(1);
    assert!(
        out.stderr
            .contains("Deploy.sh was killed by signal 9 (SIGKILL)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout
            .contains("Deploy.sh finished (killed by signal 9 (SIGKILL), "),
        "{}",
        out.stdout
    );
}

#[test]
fn output_variables_reach_later_scripts() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[
            script(
                "Deploy.sh",
                "echo \"##octopus[setVariable name='Url' value='http://x/|[1|]?q=|'a|'']\"\n",
            ),
            script(
                "PostDeploy.sh",
                "printf '%s\\n%s\\n' \"$Octopus_Action_Output_Url\" \"$(printenv Octopus.Action.Output.Url)\" > \"$TentacleHome/out\"\n",
            ),
        ],
    );
    let out = home.deploy(&pkg, ID, "1.0.0", &[]);
    out.assert_code(0);
    assert_eq!(
        fs::read_to_string(home.path().join("out")).unwrap(),
        "http://x/[1]?q='a'\nhttp://x/[1]?q='a'\n"
    );
    // Forwarded unchanged for the server.
    assert!(out
        .stdout
        .lines()
        .any(|l| l == "##octopus[setVariable name='Url' value='http://x/|[1|]?q=|'a|'']"));
    assert!(out
        .stdout
        .contains("Output variable Octopus.Action.Output.Url set by Deploy.sh"));
}

#[test]
fn python_scripts_run_after_shell_scripts_when_python3_exists() {
    if !common::python3_available() {
        return;
    }
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[
            script("Deploy.sh", "echo sh >> \"$TentacleHome/order\"\n"),
            file(
                "Deploy.py",
                "import os\nwith open(os.path.join(os.environ['TentacleHome'], 'order'), 'a') as f:\n    f.write('py %s %s %s\\n' % (os.environ['Octopus.Environment.Name'], os.environ['Octopus_Action_Package_PackageId'], os.getcwd()))\nprint('from python')\n",
            ),
            file("PostDeploy.py", "import sys\nsys.exit(3)\n"),
        ],
    );
    let out = home.deploy(&pkg, ID, "1.0.0", &[]);
    out.assert_code(1);
    let root = home.package_dir("Production", ID).join("1.0.0");
    assert_eq!(
        fs::read_to_string(home.path().join("order")).unwrap(),
        format!("sh\npy Production Acme.Web {}\n", root.display())
    );
    assert!(out.stdout.lines().any(|l| l == "from python"));
    assert!(
        out.stderr.contains("PostDeploy.py exited with code 3"),
        "{}",
        out.stderr
    );
}

#[test]
fn python_scripts_are_skipped_with_a_warning_without_python3() {
    let home = Home::new();
    let bin = home.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let bash = common::which("bash");
    std::os::unix::fs::symlink(&bash, bin.join("bash")).unwrap();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[
            script("Deploy.sh", "echo from-bash\n"),
            file("Deploy.py", "print('from python')\n"),
        ],
    );
    let mut cmd = home.command();
    cmd.env("PATH", &bin).args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        ID,
        "--package-version",
        "1.0.0",
        "--environment",
        "Production",
    ]);
    let out = run(cmd);
    out.assert_code(0);
    assert!(out.stdout.lines().any(|l| l == "from-bash"));
    assert!(!out.stdout.contains("from python"));
    assert!(
        out.stderr
            .contains("Deploy.py skipped: python3 is not on PATH"),
        "{}",
        out.stderr
    );
}

/// Output reaches calamari's stdout while the script is still running: the script
/// blocks on a fifo until the test has seen its first line.
#[test]
fn script_output_is_forwarded_live() {
    let home = Home::new();
    let fifo = home.path().join("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[script(
            "Deploy.sh",
            "echo ready\nread answer < \"$TentacleHome/go\"\necho \"got $answer\"\n",
        )],
    );
    let mut cmd = home.command();
    cmd.args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        ID,
        "--package-version",
        "1.0.0",
        "--environment",
        "Production",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let wait_for = |wanted: &str| loop {
        match rx.recv_timeout(RUN_TIMEOUT) {
            Ok(line) if line == wanted => return,
            Ok(_) => continue,
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                panic!("no line {wanted:?}: {e}");
            }
        }
    };
    wait_for("ready");
    // Only now does the script get its answer.
    let mut w = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(b"go\n").unwrap();
    drop(w);
    wait_for("got go");
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done_rx.recv_timeout(RUN_TIMEOUT).unwrap().unwrap();
    assert!(status.success());
}

/// A background process that keeps the script's output open does not keep calamari
/// waiting.
#[test]
fn a_background_process_holding_the_output_does_not_block() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[script(
            "Deploy.sh",
            "sleep 300 &\necho $! > \"$TentacleHome/bg.pid\"\necho started\n",
        )],
    );
    let out_path = home.path().join("stdout");
    let err_path = home.path().join("stderr");
    let mut cmd = home.command();
    cmd.args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        ID,
        "--package-version",
        "1.0.0",
        "--environment",
        "Production",
    ])
    .stdout(fs::File::create(&out_path).unwrap())
    .stderr(fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx.recv_timeout(Duration::from_secs(60));
    // Whatever happened, stop the background process.
    if let Ok(bg) = fs::read_to_string(home.path().join("bg.pid")) {
        let bg: i32 = bg.trim().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(bg),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let status = match status {
        Ok(s) => s.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("calamari waited for the background process");
        }
    };
    assert!(status.success());
    let stdout = fs::read_to_string(&out_path).unwrap();
    let stderr = fs::read_to_string(&err_path).unwrap();
    assert!(stdout.lines().any(|l| l == "started"), "{stdout}");
    assert!(stderr.contains("still holds its output open"), "{stderr}");
}

#[test]
fn redeploying_a_version_uses_a_suffixed_folder() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(&pkg, &[file("a.txt", "one")]);
    home.deploy(&pkg, ID, "1.0.0", &[]).assert_code(0);
    zip(&pkg, &[file("a.txt", "two")]);
    home.deploy(&pkg, ID, "1.0.0", &[]).assert_code(0);
    home.deploy(&pkg, ID, "1.0.0", &[]).assert_code(0);
    assert_eq!(
        home.versions("Production", ID),
        ["1.0.0", "1.0.0_1", "1.0.0_2"]
    );
    let dir = home.package_dir("Production", ID);
    assert_eq!(fs::read_to_string(dir.join("1.0.0/a.txt")).unwrap(), "one");
    assert_eq!(
        fs::read_to_string(dir.join("1.0.0_1/a.txt")).unwrap(),
        "two"
    );
    let journal = home.journal();
    let folders: Vec<_> = journal
        .iter()
        .map(|e| e["extracted_to"].as_str().unwrap())
        .collect();
    assert_eq!(
        folders,
        ["1.0.0", "1.0.0_1", "1.0.0_2"].map(|v| dir.join(v).to_string_lossy().into_owned())
    );
    let mut ids: Vec<_> = journal.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 3);
}

#[test]
fn retention_keeps_the_newest_versions() {
    let home = Home::new();
    let pkg = home.package_path("p.tar.gz");
    tar_gz(
        &pkg,
        &[
            file("a.txt", "a"),
            dir("ro/", 0o555),
            file_mode("ro/x", 0o444, b"x"),
        ],
    );
    // Another package and another environment are not affected.
    home.deploy(&pkg, "Other", "1.0.0", &["--retention", "1"])
        .assert_code(0);
    let mut cmd = home.command();
    cmd.args([
        "deploy-package",
        "--package",
        pkg.to_str().unwrap(),
        "--package-id",
        ID,
        "--package-version",
        "0.9.0",
        "--environment",
        "Staging",
    ]);
    run(cmd).assert_code(0);
    for v in 1..=5 {
        let out = home.deploy(&pkg, ID, &format!("{v}.0.0"), &["--retention", "3"]);
        out.assert_code(0);
        if v > 3 {
            let removed = format!("{}.0.0", v - 3);
            assert!(
                out.stdout
                    .lines()
                    .any(|l| l.starts_with("Retention: removed Acme.Web ") && l.contains(&removed)),
                "{}",
                out.stdout
            );
        } else {
            assert!(!out.stdout.contains("Retention: removed"), "{}", out.stdout);
        }
    }
    assert_eq!(home.versions("Production", ID), ["3.0.0", "4.0.0", "5.0.0"]);
    assert_eq!(home.versions("Production", "Other"), ["1.0.0"]);
    assert_eq!(home.versions("Staging", ID), ["0.9.0"]);
    let journal = home.journal();
    let removed: Vec<_> = journal
        .iter()
        .filter(|e| e["removed_by_retention"] == true)
        .map(|e| e["version"].as_str().unwrap())
        .collect();
    assert_eq!(removed, ["1.0.0", "2.0.0"]);

    // --retention 1 keeps only the one just deployed.
    home.deploy(&pkg, ID, "6.0.0", &["--retention", "1"])
        .assert_code(0);
    assert_eq!(home.versions("Production", ID), ["6.0.0"]);
}

#[test]
fn failed_deployments_count_as_versions_and_are_not_followed_by_retention() {
    let home = Home::new();
    let ok = home.package_path("ok.zip");
    zip(&ok, &[file("a.txt", "a")]);
    let bad = home.package_path("bad.zip");
    zip(&bad, &[script("Deploy.sh", "exit 1\n")]);
    home.deploy(&ok, ID, "1", &["--retention", "2"])
        .assert_code(0);
    home.deploy(&ok, ID, "2", &["--retention", "2"])
        .assert_code(0);
    // A failure applies no retention.
    home.deploy(&bad, ID, "3", &["--retention", "1"])
        .assert_code(1);
    assert_eq!(home.versions("Production", ID), ["1", "2", "3"]);
    // The next success keeps itself and the failed 3.
    home.deploy(&ok, ID, "4", &["--retention", "2"])
        .assert_code(0);
    assert_eq!(home.versions("Production", ID), ["3", "4"]);
}

#[test]
fn retention_never_removes_folders_outside_the_applications_root() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(&pkg, &[file("a.txt", "a")]);
    home.deploy(&pkg, ID, "1", &[]).assert_code(0);
    // Tamper with the journal: point the entry somewhere else.
    let victim = home.path().join("precious");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("keep.txt"), "keep").unwrap();
    let mut journal = home.journal();
    journal[0]["extracted_to"] = victim.to_str().unwrap().into();
    fs::write(home.journal_path(), serde_json::to_vec(&journal).unwrap()).unwrap();
    let out = home.deploy(&pkg, ID, "2", &["--retention", "1"]);
    out.assert_code(0);
    assert!(victim.join("keep.txt").exists());
    assert!(
        out.stderr.contains("retention: not removing"),
        "{}",
        out.stderr
    );
    assert_eq!(home.journal()[0]["removed_by_retention"], false);
}

#[test]
fn concurrent_deployments_are_all_journaled() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(
        &pkg,
        &[file("a.txt", "a"), script("Deploy.sh", "echo deploying\n")],
    );
    let versions = ["1", "2", "3", "1", "2", "3", "4", "4"];
    let children: Vec<_> = versions
        .iter()
        .map(|v| {
            let mut cmd = home.command();
            cmd.args([
                "deploy-package",
                "--package",
                pkg.to_str().unwrap(),
                "--package-id",
                ID,
                "--package-version",
                v,
                "--environment",
                "Production",
                "--retention",
                "100",
            ]);
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(common::run(cmd));
            });
            rx
        })
        .collect();
    for rx in children {
        rx.recv_timeout(RUN_TIMEOUT).unwrap().assert_code(0);
    }
    assert_eq!(
        home.versions("Production", ID),
        ["1", "1_1", "2", "2_1", "3", "3_1", "4", "4_1"]
    );
    let journal = home.journal();
    assert_eq!(journal.len(), versions.len());
    assert!(journal.iter().all(|e| e["success"] == true));
    let mut folders: Vec<_> = journal
        .iter()
        .map(|e| e["extracted_to"].as_str().unwrap())
        .collect();
    folders.sort();
    folders.dedup();
    assert_eq!(folders.len(), versions.len());
}

#[test]
fn a_corrupt_journal_is_backed_up_not_overwritten() {
    let home = Home::new();
    fs::write(home.journal_path(), "this is not json").unwrap();
    let pkg = home.package_path("p.zip");
    zip(&pkg, &[file("a.txt", "a")]);
    let out = home.deploy(&pkg, ID, "1", &[]);
    out.assert_code(0);
    assert!(out.stderr.contains("was corrupt"), "{}", out.stderr);
    assert_eq!(home.journal().len(), 1);
    let backups: Vec<_> = fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("DeploymentJournal.json.corrupt-")
        })
        .collect();
    assert_eq!(backups.len(), 1);
    assert_eq!(fs::read_to_string(&backups[0]).unwrap(), "this is not json");
}

#[test]
fn a_bad_variables_file_is_refused_before_anything_is_extracted() {
    let home = Home::new();
    let pkg = home.package_path("p.zip");
    zip(&pkg, &[file("a.txt", "a")]);
    for (name, content, why) in [
        ("array.json", "[\"a\"]", "an array"),
        ("number.json", "{\"A\": 1}", "\"A\" is a number"),
        ("broken.json", "{", "not JSON"),
    ] {
        let path = home.path().join(name);
        fs::write(&path, content).unwrap();
        let out = home.deploy(&pkg, ID, "1", &["--variables", path.to_str().unwrap()]);
        out.assert_code(4);
        assert!(
            out.stderr.contains(path.to_str().unwrap()),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains(why), "{}", out.stderr);
    }
    let out = home.deploy(&pkg, ID, "1", &["--variables", "/nonexistent/vars.json"]);
    out.assert_code(4);
    assert!(
        out.stderr.contains("/nonexistent/vars.json"),
        "{}",
        out.stderr
    );
    assert!(!home.apps().exists());
}

#[test]
fn a_missing_package_is_an_error_naming_it() {
    let home = Home::new();
    let out = home.deploy(&home.path().join("nope.zip"), ID, "1", &[]);
    out.assert_code(4);
    assert!(out.stderr.contains("nope.zip"), "{}", out.stderr);
}
