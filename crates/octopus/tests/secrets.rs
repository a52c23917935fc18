//! Secret values end to end, with real processes: the `octopus` server binary
//! (its log captured at debug level), a real `tentacle` (listening), the real
//! `calamari`, and the `octopus` CLI. A script and a deployment get secret
//! variables; the deployment's script also sets a sensitive output variable
//! (derived at run time, so it exists nowhere before), which a later script
//! prints. Afterwards every secret is searched for, as bytes, in the server's
//! data directory (database, journals, keys), every API answer, the task logs,
//! the CLI's output, the server's log and the tentacle's log files and work
//! folder: found nowhere. The task shows each secret as set, never its value.
#![allow(clippy::unwrap_used)]
// `Lab` waits for its children in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Secrets no file or program of the test holds before the tasks run.
const SCRIPT_SECRET: &str = "Scr1pt-Wh1sper-5e8c0a";
const DEPLOY_SECRET: &str = "Dep1oy-Pa55word-9d4b71";
/// The output variable's value: the deployment secret reversed, at run time.
fn token() -> String {
    DEPLOY_SECRET.chars().rev().collect()
}

fn binaries() -> (PathBuf, PathBuf) {
    let me = std::env::current_exe().unwrap();
    let dir = me.parent().unwrap().parent().unwrap().to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "-q",
        "-p",
        "octo-tentacle",
        "--bin",
        "tentacle",
        "-p",
        "octo-calamari",
        "--bin",
        "calamari",
    ]);
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "building tentacle and calamari failed"
    );
    (dir.join("tentacle"), dir.join("calamari"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Lab {
    base: String,
    key: String,
    thumbprint: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Lab {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn tentacles(&self) -> PathBuf {
        self.dir.path().join("tentacles")
    }

    fn server_log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn octopus(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_octopus"));
        cmd.args(args)
            .env("OCTOPUS_URL", &self.base)
            .env("OCTOPUS_API_KEY", &self.key)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn octopus_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.octopus(args, env);
        assert!(
            out.status.success(),
            "octopus {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // stdout, then stderr after a marker line (the last line of stdout
        // stays the last before it).
        format!(
            "{}\u{0}stderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    async fn get(&self, path: &str) -> String {
        let resp = tokio::time::timeout(
            Duration::from_secs(60),
            reqwest::Client::new()
                .get(format!("{}{path}", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.text().await.unwrap()
    }
}

fn start(tentacle: &Path, calamari: &Path) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args(["server", "run", "--data"])
        .arg(dir.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--comms-listen-port",
            "0",
            "--comms-listen-address",
            "127.0.0.1",
            "--calamari",
        ])
        .arg(calamari)
        // Everything the server logs, at the most talkative level it has.
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (mut key, base, thumbprint) = (None, String::new(), String::new());
    let mut lab = Lab {
        base,
        key: String::new(),
        thumbprint,
        children: vec![child],
        dir,
    };
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server's ready line");
        if let Some(k) = line.trim().strip_prefix("API-") {
            key = Some(format!("API-{k}"));
        }
        if let Some(rest) = line.strip_prefix("Octopus server ready: API http://") {
            lab.base = format!("http://{}", rest.split("/api").next().unwrap());
            lab.thumbprint = line.rsplit(' ').next().unwrap().to_string();
            break;
        }
    }
    lab.key = key.expect("the first admin key");
    // A listening tentacle, registered with the real register-with.
    let tdir = lab.tentacles();
    let tent = |args: &[&str]| {
        let mut c = Command::new(tentacle);
        c.args(args).env("TENTACLE_CONFIG_DIR", &tdir);
        c
    };
    let ok = |c: &mut Command| {
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{c:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let port = free_port().to_string();
    ok(&mut tent(&["create-instance", "--instance", "lis"]));
    ok(&mut tent(&["new-certificate", "--instance", "lis"]));
    ok(&mut tent(&[
        "configure",
        "--instance",
        "lis",
        "--port",
        &port,
        "--listen-ip",
        "127.0.0.1",
    ]));
    lab.octopus_ok(&["environment", "create", "Test"], &[]);
    ok(&mut tent(&[
        "register-with",
        "--instance",
        "lis",
        "--name",
        "lis",
        "--public-hostname",
        "127.0.0.1",
        "--server",
        &lab.base,
        "--api-key",
        &lab.key,
        "--environment",
        "Test",
        "--role",
        "web",
        "--server-thumbprint",
        &lab.thumbprint,
    ]));
    let out = std::fs::File::create(lab.dir.path().join("tentacle.out")).unwrap();
    let agent = tent(&["run", "--instance", "lis"])
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    lab.children.push(agent);
    octo_testkit::wait_for_listener(
        port.parse().unwrap(),
        Duration::from_secs(60),
        "the tentacle lis",
    );
    lab
}

fn write_tar_gz(path: &Path, entries: &[(&str, &str, u32)]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (name, body, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        tar.append_data(&mut header, name, body.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// Every file under `dir` (following no links), with its bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                todo.push(p);
            } else if t.is_file() {
                if let Ok(bytes) = std::fs::read(&p) {
                    out.push((p, bytes));
                }
            }
        }
    }
    out
}

/// The last line of a command's stdout (see `Lab::octopus_ok`).
fn last_json(output: &str) -> Value {
    let stdout = output.split("\u{0}stderr:").next().unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Fails naming every place that holds a secret.
fn assert_nowhere(places: &[(String, Vec<u8>)]) {
    let secrets = [SCRIPT_SECRET.to_string(), DEPLOY_SECRET.into(), token()];
    let mut found = Vec::new();
    for (what, bytes) in places {
        for s in &secrets {
            if contains(bytes, s) {
                found.push(format!("{s} in {what}"));
            }
        }
    }
    assert!(found.is_empty(), "secrets found: {found:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_values_are_found_nowhere_after_a_script_and_a_deployment() {
    let (tentacle, calamari) = binaries();
    let lab = start(&tentacle, &calamari);
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    let mut record = |what: &str, text: String| places.push((what.to_string(), text.into_bytes()));

    // The tentacle answers (a health check that succeeds).
    let health = lab.octopus_ok(&["health-check", "--machine", "lis"], &[]);
    record("health-check output", health);

    // A script with a secret from the environment (not on the command line)
    // and an ordinary variable.
    let out = lab.octopus_ok(
        &[
            "--output",
            "json",
            "run-script",
            "--machine",
            "lis",
            "--variable",
            "GREETING=hello",
            "--sensitive-variable",
            "SCRIPT_PW",
            "--script",
            "echo \"$GREETING, the password is $SCRIPT_PW\"; echo \"again: $SCRIPT_PW\" >&2",
        ],
        &[("SCRIPT_PW", SCRIPT_SECRET)],
    );
    assert!(
        out.contains("hello, the password is ********"),
        "the script ran with both variables, the secret masked:\n{out}"
    );
    let script_task = last_json(&out);
    let script_id = script_task["task"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        script_task["task"]["arguments"]["sensitive_variables"]["SCRIPT_PW"], "********",
        "shown as set, not as its value"
    );
    assert_eq!(
        script_task["task"]["arguments"]["variables"]["GREETING"],
        "hello"
    );
    record("run-script output", out);

    // A deployment with a secret variable; its Deploy script prints it and
    // sets a sensitive output variable derived from it; PostDeploy prints that.
    let package = lab.dir.path().join("Acme.Secret.1.0.0.tar.gz");
    write_tar_gz(
        &package,
        &[
            ("app.txt", "app\n", 0o644),
            (
                "Deploy.sh",
                "echo \"db password: $DB_PASSWORD\"\n\
                 t=$(printf %s \"$DB_PASSWORD\" | rev)\n\
                 echo \"##octopus[setVariable name='Token' value='$t' sensitive='True']\"\n",
                0o755,
            ),
            (
                "PostDeploy.sh",
                "echo \"token: $Octopus_Action_Output_Token\"\n",
                0o755,
            ),
        ],
    );
    record(
        "package push",
        lab.octopus_ok(&["package", "push", package.to_str().unwrap()], &[]),
    );
    let cmd = format!("DB_PASSWORD={DEPLOY_SECRET}");
    let out = lab.octopus_ok(
        &[
            "--output",
            "json",
            "deploy",
            "--package",
            "Acme.Secret",
            "--environment",
            "Test",
            "--sensitive-variable",
            &cmd,
        ],
        &[],
    );
    assert!(out.contains("db password: ********"), "{out}");
    assert!(
        out.contains("token: ********"),
        "a later script's use of it is masked:\n{out}"
    );
    let deploy_task = last_json(&out);
    assert_eq!(deploy_task["task"]["state"], "Success", "{out}");
    let deploy_id = deploy_task["task"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        deploy_task["task"]["arguments"]["sensitive_variables"],
        serde_json::json!(["DB_PASSWORD"]),
        "only the name is kept with the task"
    );
    record("deploy output", out);

    // Every API answer about them.
    for path in [
        format!("/api/tasks/{script_id}"),
        format!("/api/tasks/{script_id}/log?limit=10000"),
        format!("/api/tasks/{deploy_id}"),
        format!("/api/tasks/{deploy_id}/log?limit=10000"),
        "/api/tasks".to_string(),
        "/api/audit?limit=1000".to_string(),
        "/api/machines".to_string(),
    ] {
        let body = lab.get(&path).await;
        record(&format!("GET {path}"), body);
    }
    // The live stream of a finished task replays its log.
    let stream = lab.octopus_ok(&["task", "log", &deploy_id, "--follow"], &[]);
    assert!(stream.contains("db password: ********"), "{stream}");
    record("task log --follow", stream);

    // The work folder holds nothing of the tasks any more: the tentacle
    // removes a script's folder when the server completes the script, which
    // a task's end does not wait for when nothing was left to fetch (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let work: Vec<PathBuf> = files_under(&lab.tentacles())
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.to_string_lossy().contains("/Work/"))
            .collect();
        if work.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left in the work folder: {work:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The server's log, then every file of the server and of the tentacle
    // (logs, work folder; the applications folder holds only the package).
    let server_log = std::fs::read(lab.server_log()).unwrap();
    assert!(!server_log.is_empty(), "the server logged at debug level");
    places.push(("the server's log".into(), server_log));
    places.push((
        "the tentacle's stderr".into(),
        std::fs::read(lab.dir.path().join("tentacle.out")).unwrap(),
    ));
    let data_files = files_under(&lab.data());
    assert!(
        data_files.iter().any(|(p, _)| p.ends_with("octopus.db")),
        "the database is among the files searched"
    );
    let tentacle_files = files_under(&lab.tentacles());
    assert!(
        tentacle_files
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains("/Logs/")),
        "the tentacle's log files are among those searched"
    );
    for (p, bytes) in data_files.into_iter().chain(tentacle_files) {
        places.push((p.display().to_string(), bytes));
    }
    assert_nowhere(&places);

    // The master key that encrypts them is the server's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(lab.data().join("master-key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
