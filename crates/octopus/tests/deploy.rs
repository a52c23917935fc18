//! Package deployments end to end, with real processes: a server (in this
//! process, from the library), two real `tentacle run` agents (one listening, one
//! polling) registered with the real `tentacle register-with`, the real
//! `calamari` binary pushed to them, and the real `octopus` CLI for `package
//! push`, `deploy`, `health-check` and `calamari upgrade`. Packages are built
//! here (zip and tar.gz). Every wait is bounded; the CLI commands block until
//! their task ends, so nothing sleeps to synchronise.
#![allow(clippy::unwrap_used)]
// `Lab` waits for its children in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};
use tokio::time::timeout;

/// Bound on any single wait of the test itself (CLI commands have their own).
const T: Duration = Duration::from_secs(120);

/// Builds (once) and returns the `tentacle` and `calamari` binaries of this
/// workspace, with the profile of this test.
fn binaries() -> &'static (PathBuf, PathBuf) {
    static BINS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BINS.get_or_init(|| {
        let me = std::env::current_exe().unwrap();
        // target/<profile>/deps/deploy-<hash>
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
        let status = cmd.status().unwrap();
        assert!(status.success(), "building tentacle and calamari failed");
        let bins = (dir.join("tentacle"), dir.join("calamari"));
        assert!(bins.0.is_file() && bins.1.is_file(), "{bins:?}");
        bins
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server, two tentacles, and the CLI pointed at the server.
struct Lab {
    server: Option<RunningServer>,
    base: String,
    key: String,
    http: reqwest::Client,
    tdir: PathBuf,
    agents: Vec<Child>,
    /// The tool the server was started with (a copy of the workspace's).
    tool: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Lab {
    /// A lab whose server keeps its data in `database_url` (None: SQLite in
    /// its data directory).
    async fn new(database_url: Option<String>) -> Lab {
        let (tentacle, calamari) = binaries().clone();
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("installed-calamari");
        std::fs::copy(&calamari, &tool).unwrap();
        let server = timeout(
            T,
            start(&RunArgs {
                data: dir.path().join("server"),
                listen: "127.0.0.1:0".parse().unwrap(),
                comms_listen_port: 0,
                comms_listen_address: "127.0.0.1".into(),
                calamari: Some(tool.clone()),
                database_url,
                ..RunArgs::default()
            }),
        )
        .await
        .unwrap()
        .unwrap();
        let mut lab = Lab {
            base: format!("http://{}", server.api_addr),
            key: server.admin_api_key.clone().unwrap(),
            http: reqwest::Client::new(),
            tdir: dir.path().join("tentacles"),
            agents: Vec::new(),
            server: Some(server),
            tool,
            dir,
        };
        lab.octopus_ok(&["environment", "create", "Test"]);
        lab.octopus_ok(&["environment", "create", "Empty"]);
        let server = lab.server.as_ref().unwrap();
        let stp = server.thumbprint.to_string();
        let comms = format!("127.0.0.1:{}", server.comms_port);
        let port = free_port().to_string();
        let tent = |args: &[&str]| {
            let mut c = Command::new(&tentacle);
            c.args(args).env("TENTACLE_CONFIG_DIR", &lab.tdir);
            c
        };
        for (inst, extra) in [
            (
                "lis",
                vec!["--port", port.as_str(), "--listen-ip", "127.0.0.1"],
            ),
            ("pol", vec!["--no-listen"]),
        ] {
            run_ok(&mut tent(&["create-instance", "--instance", inst]));
            run_ok(&mut tent(&["new-certificate", "--instance", inst]));
            let mut args = vec!["configure", "--instance", inst];
            args.extend(extra);
            run_ok(&mut tent(&args));
        }
        let common = [
            "--server",
            lab.base.as_str(),
            "--api-key",
            lab.key.as_str(),
            "--environment",
            "Test",
            "--role",
            "web",
            "--server-thumbprint",
            stp.as_str(),
        ];
        let mut reg = vec![
            "register-with",
            "--instance",
            "lis",
            "--name",
            "lis",
            "--public-hostname",
            "127.0.0.1",
        ];
        reg.extend(common);
        run_ok(&mut tent(&reg));
        let mut reg = vec![
            "register-with",
            "--instance",
            "pol",
            "--name",
            "pol",
            "--comms-style",
            "TentacleActive",
            "--server-comms-address",
            comms.as_str(),
        ];
        reg.extend(common);
        run_ok(&mut tent(&reg));
        for inst in ["lis", "pol"] {
            let log = std::fs::File::create(lab.tdir.join(format!("{inst}.out"))).unwrap();
            let child = tent(&["run", "--instance", inst])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            lab.agents.push(child);
        }
        octo_testkit::wait_for_listener(port.parse().unwrap(), T, "the listening tentacle lis");
        lab
    }

    fn home(&self, inst: &str) -> PathBuf {
        self.tdir.join(inst).join("home")
    }

    fn octopus(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_octopus"))
            .args(args)
            .env("OCTOPUS_URL", &self.base)
            .env("OCTOPUS_API_KEY", &self.key)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn octopus_ok(&self, args: &[&str]) -> String {
        let out = self.octopus(args);
        assert!(
            out.status.success(),
            "octopus {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a task-following command with `--output json`; returns its exit code,
    /// the final `{"task", "steps"}` and all of stdout.
    fn follow(&self, args: &[&str]) -> (i32, Value, String) {
        let mut all = vec!["--output", "json"];
        all.extend(args);
        let out = self.octopus(&all);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let last = stdout.lines().last().unwrap_or("null");
        let end: Value = serde_json::from_str(last).unwrap_or(Value::Null);
        assert!(
            end["task"].is_object(),
            "octopus {args:?}: no final task ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), end, stdout)
    }

    /// The task's whole log, one string per line.
    async fn log(&self, task: &Value) -> Vec<String> {
        let id = task["task"]["id"].as_str().unwrap();
        let (_, lines) = self.get(&format!("/api/tasks/{id}/log?limit=10000")).await;
        lines
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["text"].as_str().unwrap().to_string())
            .collect()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = timeout(
            T,
            self.http
                .get(format!("{}{path}", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = timeout(
            T,
            self.http
                .post(format!("{}{path}", self.base))
                .header("X-Octopus-ApiKey", &self.key)
                .json(&body)
                .send(),
        )
        .await
        .unwrap()
        .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn machine(&self, name: &str) -> Value {
        let (status, m) = self.get(&format!("/api/machines/{name}")).await;
        assert_eq!(status, 200, "{m}");
        m
    }

    fn package_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A file in a package: path, contents, unix mode.
type Entry<'a> = (&'a str, &'a str, u32);

fn write_zip(path: &Path, entries: &[Entry<'_>]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    for (name, body, mode) in entries {
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        zip.start_file(*name, opts).unwrap();
        zip.write_all(body.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
}

fn write_tar_gz(path: &Path, entries: &[Entry<'_>]) {
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

/// A tar.gz whose one entry's name is written raw (so it may escape).
fn write_evil_tar_gz(path: &Path, name: &str) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let body = b"owned\n";
    let mut header = tar::Header::new_gnu();
    {
        let raw = header.as_old_mut();
        raw.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append(&header, &body[..]).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
}

const PRE: &str = "echo \"pre $Greeting\" >> \"$TentacleHome/order-$TentacleInstanceName.txt\"\n";
const DEPLOY: &str = "echo \"deploy $Octopus_Action_Package_PackageVersion in $PWD\"\n\
echo deploy >> \"$TentacleHome/order-$TentacleInstanceName.txt\"\n\
echo \"##octopus[setVariable name='Url' value='http://$TentacleInstanceName/']\"\n\
if [ \"$FailOn\" = \"$TentacleInstanceName\" ]; then echo \"failing on purpose\" >&2; exit 3; fi\n";
const POST: &str = "echo post >> \"$TentacleHome/order-$TentacleInstanceName.txt\"\n";

fn app_entries(version: &'static str) -> Vec<Entry<'static>> {
    vec![
        ("PreDeploy.sh", PRE, 0o755),
        ("Deploy.sh", DEPLOY, 0o755),
        ("PostDeploy.sh", POST, 0o755),
        (
            "config/app.json",
            "{\"greeting\": \"#{Greeting}\", \"keep\": \"##{Greeting}\"}\n",
            0o644,
        ),
        ("bin/run", "#!/bin/sh\necho run\n", 0o755),
        ("VERSION", version, 0o644),
    ]
}

fn step<'a>(end: &'a Value, machine: &str) -> &'a Value {
    end["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["machine_name"] == machine)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_deploy_to_listening_and_polling_tentacles() {
    packages_deploy(Lab::new(None).await).await;
}

/// The same, with the server's store on PostgreSQL (a database of its own in
/// this test process's throwaway cluster): machines, health checks, the feed,
/// deployments, their logs and retention, as on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_deploy_on_postgresql() {
    let url = octo_testkit::postgres::shared().create_database();
    packages_deploy(Lab::new(Some(url)).await).await;
}

async fn packages_deploy(lab: Lab) {
    let tool_version = {
        let out = Command::new(&binaries().1).arg("version").output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };

    // The server says which tool it pushes (and that it has no WebSocket port).
    let (_, info) = lab.get("/api/server").await;
    assert_eq!(info["tool_version"], tool_version.as_str(), "{info}");
    assert!(info["web_socket_port"].is_null(), "{info}");

    // It pushes the copy it took at start (content-addressed, private), so
    // replacing the tool it was started with (an upgrade of the server's
    // package) changes nothing until it restarts.
    let original = std::fs::read(&binaries().1).unwrap();
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&original)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let tools = lab.dir.path().join("server").join("tools");
    let snapshot = tools.join(format!("calamari-{sha}"));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&tools), mode(&snapshot)), (0o700, 0o700));
        assert_eq!(std::fs::read_dir(&tools).unwrap().count(), 1);
    }
    std::fs::write(&lab.tool, b"#!/bin/sh\necho 0.0.1\n").unwrap();

    // Before any deployment the tool is missing: healthy, with a warning.
    let (code, _, _) = lab.follow(&["health-check", "--environment", "Test"]);
    assert_eq!(code, 0);
    for name in ["lis", "pol"] {
        let m = lab.machine(name).await;
        assert_eq!(m["status"], "Healthy", "{m}");
        let reason = m["status_reason"].as_str().unwrap();
        assert!(
            reason.contains("deployment tool is not installed"),
            "{reason}"
        );
        assert!(reason.contains("octopus calamari upgrade"), "{reason}");
    }

    // The feed: push from the file name; same content again is "unchanged";
    // other content under the same version is refused unless --replace.
    let zip_path = lab.package_path("Acme.Web.1.0.0.zip");
    write_zip(&zip_path, &app_entries("1.0.0"));
    let out = lab.octopus_ok(&["package", "push", zip_path.to_str().unwrap()]);
    assert!(out.contains("Acme.Web 1.0.0 pushed"), "{out}");
    let out = lab.octopus_ok(&["package", "push", zip_path.to_str().unwrap()]);
    assert!(out.contains("already in the feed"), "{out}");
    let other = lab.package_path("other.zip");
    write_zip(&other, &[("x.txt", "x", 0o644)]);
    let refused = lab.octopus(&[
        "package",
        "push",
        other.to_str().unwrap(),
        "--id",
        "Acme.Web",
        "--version",
        "1.0.0",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("already exists with different content") && err.contains("--replace"),
        "{err}"
    );
    let not_a_package = lab.package_path("notes.1.0.0.zip");
    std::fs::write(&not_a_package, "just text").unwrap();
    let refused = lab.octopus(&["package", "push", not_a_package.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("neither a zip nor a tar.gz"), "{err}");

    // Deploying to an environment without machines fails saying why.
    let refused = lab.octopus(&["deploy", "--package", "Acme.Web", "--environment", "Empty"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("environment 'Empty' has no machines"), "{err}");

    // First deployment: the tool is pushed, the package transferred, extracted,
    // substituted, and the scripts run in order with the variables.
    let vars = lab.package_path("vars.json");
    std::fs::write(
        &vars,
        r#"{"Greeting": "Hello", "Octopus.Action.SubstituteInFiles.TargetFiles": "config/*.json"}"#,
    )
    .unwrap();
    let (code, end, stdout) = lab.follow(&[
        "deploy",
        "--package",
        "Acme.Web",
        "--environment",
        "Test",
        "--variables-file",
        vars.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(end["task"]["state"], "Success");
    let log = lab.log(&end).await.join("\n");
    for name in ["lis", "pol"] {
        assert!(
            log.contains(&format!("{name}: pushing deployment tool {tool_version}")),
            "{log}"
        );
        assert!(
            log.contains(&format!("{name}: uploading package Acme.Web 1.0.0")),
            "{log}"
        );
        let home = lab.home(name);
        let tool = home.join("Tools/calamari").join(&tool_version);
        assert!(tool.join(".complete").is_file());
        assert!(
            std::fs::read(tool.join("calamari")).unwrap() == original,
            "{name} got the tool as it was at the server's start"
        );
        let app = home.join("Applications/Test/Acme.Web/1.0.0");
        let config = std::fs::read_to_string(app.join("config/app.json")).unwrap();
        assert_eq!(
            config,
            "{\"greeting\": \"Hello\", \"keep\": \"#{Greeting}\"}\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(app.join("bin/run"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let order = std::fs::read_to_string(home.join(format!("order-{name}.txt"))).unwrap();
        assert_eq!(order, "pre Hello\ndeploy\npost\n");
        let journal: Value = serde_json::from_str(
            &std::fs::read_to_string(home.join("DeploymentJournal.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(journal.as_array().unwrap().len(), 1, "{journal}");
        let s = step(&end, name);
        assert_eq!(s["state"], "Success");
        assert_eq!(
            s["output_variables"]["Url"],
            format!("http://{name}/"),
            "{s}"
        );
    }
    assert!(log.contains("deploy 1.0.0 in "), "{log}");

    // The health check now sees the tool; no warning.
    let (code, _, _) = lab.follow(&["health-check", "--environment", "Test"]);
    assert_eq!(code, 0);
    let m = lab.machine("lis").await;
    assert_eq!(m["tool_version"], tool_version.as_str());
    assert_eq!(m["status_reason"], "", "{m}");

    // Same version again: tool installed, package found in cache, a _1 folder.
    let (code, end, stdout) = lab.follow(&[
        "deploy",
        "--package",
        "Acme.Web",
        "--version",
        "1.0.0",
        "--environment",
        "Test",
        "--variable",
        "Greeting=Again",
    ]);
    assert_eq!(code, 0, "{stdout}");
    let log = lab.log(&end).await.join("\n");
    for name in ["lis", "pol"] {
        assert!(
            log.contains(&format!(
                "{name}: deployment tool {tool_version} is installed"
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!("{name}: package Acme.Web 1.0.0 found in cache")),
            "{log}"
        );
        assert!(lab
            .home(name)
            .join("Applications/Test/Acme.Web/1.0.0_1")
            .is_dir());
    }
    assert!(!log.contains("uploading package"), "{log}");

    // tar.gz versions; the latest is the default; retention keeps 3 folders.
    for v in ["1.1.0", "1.10.0"] {
        let p = lab.package_path(&format!("Acme.Web.{v}.tar.gz"));
        write_tar_gz(&p, &app_entries(v));
        lab.octopus_ok(&["package", "push", p.to_str().unwrap()]);
    }
    let p = lab.package_path("Acme.Web.1.9.0.tgz");
    write_tar_gz(&p, &app_entries("1.9.0"));
    lab.octopus_ok(&["package", "push", p.to_str().unwrap()]);
    let (code, end, stdout) =
        lab.follow(&["deploy", "--package", "Acme.Web", "--environment", "Test"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(
        end["task"]["description"]
            .as_str()
            .unwrap()
            .contains("Acme.Web 1.10.0"),
        "{end}"
    );
    // An interrupted transfer resumes: half of 1.1.0 is already on lis.
    let (_, pkg) = lab.get("/api/packages/Acme.Web/1.1.0").await;
    let sha = pkg["sha256"].as_str().unwrap();
    let whole = std::fs::read(lab.package_path("Acme.Web.1.1.0.tar.gz")).unwrap();
    let files = lab.home("lis").join("Files");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::write(
        files.join(format!("Acme.Web@1.1.0@{sha}.tar.gz.partial")),
        &whole[..whole.len() / 2],
    )
    .unwrap();
    let (code, end, stdout) = lab.follow(&[
        "deploy",
        "--package",
        "Acme.Web",
        "--version",
        "1.1.0",
        "--environment",
        "Test",
    ]);
    assert_eq!(code, 0, "{stdout}");
    let log = lab.log(&end).await.join("\n");
    assert!(
        log.contains("lis: resuming the transfer of Acme.Web 1.1.0 at"),
        "{log}"
    );
    assert!(
        log.contains("pol: uploading package Acme.Web 1.1.0"),
        "{log}"
    );
    for name in ["lis", "pol"] {
        let dir = lab.home(name).join("Applications/Test/Acme.Web");
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        left.sort();
        assert_eq!(left, ["1.0.0_1", "1.1.0", "1.10.0"], "{name}");
    }

    // A failure on one machine does not hide the other's success.
    let (code, end, _) = lab.follow(&[
        "deploy",
        "--package",
        "Acme.Web",
        "--environment",
        "Test",
        "--variable",
        "FailOn=pol",
    ]);
    assert_eq!(code, 1);
    assert_eq!(end["task"]["state"], "Failed");
    let error = end["task"]["error"].as_str().unwrap();
    assert!(
        error.contains("1 of 2 machines failed: pol; 1 succeeded"),
        "{error}"
    );
    assert_eq!(step(&end, "lis")["state"], "Success");
    assert_eq!(step(&end, "pol")["state"], "Failed");
    let log = lab.log(&end).await.join("\n");
    assert!(log.contains("failing on purpose"), "{log}");

    // A package whose entry escapes its folder is refused by the feed already
    // (calamari, which refuses it too, is tested with it on its own).
    let evil = lab.package_path("Evil.1.0.0.tar.gz");
    write_evil_tar_gz(&evil, "../../../../escaped.txt");
    let refused = lab.octopus(&["package", "push", evil.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("entry \"../../../../escaped.txt\": a path containing `..`"),
        "{err}"
    );
    let (status, _) = lab.get("/api/packages/Evil/1.0.0").await;
    assert_eq!(status, 404);

    // A package file changed on the server after the push fails the tentacle's
    // hash check: refused, not deployed.
    let (_, pkg) = lab.get("/api/packages/Acme.Web/1.9.0").await;
    let stored = lab
        .dir
        .path()
        .join("server/packages")
        .join(pkg["sha256"].as_str().unwrap());
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    let (code, end, _) = lab.follow(&[
        "deploy",
        "--package",
        "Acme.Web",
        "--version",
        "1.9.0",
        "--environment",
        "Test",
    ]);
    assert_eq!(code, 1);
    let error = step(&end, "lis")["error"].as_str().unwrap().to_string();
    assert!(error.contains("failed verification"), "{error}");
    assert!(!lab
        .home("lis")
        .join("Applications/Test/Acme.Web/1.9.0")
        .exists());

    // An older tool on a machine is a warning, and `calamari upgrade` fixes it.
    let tools = lab.home("lis").join("Tools/calamari");
    std::fs::remove_dir_all(tools.join(&tool_version)).unwrap();
    std::fs::create_dir_all(tools.join("0.0.1")).unwrap();
    std::fs::write(tools.join("0.0.1/.complete"), "").unwrap();
    let (code, _, _) = lab.follow(&["health-check", "--machine", "lis"]);
    assert_eq!(code, 0);
    let reason = lab.machine("lis").await["status_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("0.0.1 is older than the server's"),
        "{reason}"
    );
    let (code, end, stdout) = lab.follow(&["calamari", "upgrade", "--machine", "lis"]);
    assert_eq!(code, 0, "{stdout}");
    let log = lab.log(&end).await.join("\n");
    assert!(
        log.contains(&format!("lis: deployment tool {tool_version} installed")),
        "{log}"
    );
    assert!(tools.join(&tool_version).join(".complete").is_file());
    let m = lab.machine("lis").await;
    assert_eq!(m["tool_version"], tool_version.as_str(), "{m}");
    assert_eq!(m["status_reason"], "", "{m}");

    // Guided failure: pol fails and waits for a decision; a retry runs it again
    // (and fails again); "ignore" lets the deployment succeed, the failure noted.
    let (status, v) = lab
        .post(
            "/api/tasks/deploy",
            json!({
                "package_id": "Acme.Web",
                "environment": "Test",
                "variables": { "FailOn": "pol" },
                "guided_failure": true,
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_octopus"))
        .args(["task", "log", &id, "--follow"])
        .env("OCTOPUS_URL", &lab.base)
        .env("OCTOPUS_API_KEY", &lab.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut seen = Vec::new();
    let mut wait_for = async |needle: &str| {
        timeout(T, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                seen.push(l.clone());
                if l.contains(needle) {
                    return;
                }
            }
            panic!("the log ended without '{needle}': {seen:#?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no '{needle}' within {T:?}"));
    };
    wait_for("pol: the deployment failed").await;
    let refused = lab.octopus(&[
        "task",
        "guide",
        &id,
        "--machine",
        "lis",
        "--action",
        "retry",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("not waiting for a decision"), "{err}");
    lab.octopus_ok(&[
        "task",
        "guide",
        &id,
        "--machine",
        "pol",
        "--action",
        "retry",
    ]);
    wait_for("pol: retrying the deployment (run 2)").await;
    wait_for("pol: the deployment failed").await;
    lab.octopus_ok(&[
        "task",
        "guide",
        &id,
        "--machine",
        "pol",
        "--action",
        "ignore",
    ]);
    let status = timeout(T, follow.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    let (_, end) = lab.get(&format!("/api/tasks/{id}")).await;
    assert_eq!(end["task"]["state"], "Success", "{end}");
    let pol = step(&end, "pol");
    assert_eq!(pol["state"], "Success");
    assert!(
        pol["error"]
            .as_str()
            .unwrap()
            .contains("ignored by guided failure"),
        "{pol}"
    );
    let log = lab.log(&end).await;
    let failures = log
        .iter()
        .filter(|l| l.contains("failing on purpose"))
        .count();
    assert_eq!(failures, 2, "both runs' lines are kept: {log:#?}");

    // The feed lists and deletes.
    let list = lab.octopus_ok(&["package", "list", "--id", "Acme.Web"]);
    assert!(list.contains("1.10.0") && list.contains("tar.gz"), "{list}");
    lab.octopus_ok(&["package", "delete", "Acme.Web", "1.9.0"]);
    assert!(!stored.exists(), "the unused file is removed");
    // Refused and duplicate pushes left no temporary files behind.
    let leftovers: Vec<_> = std::fs::read_dir(lab.dir.path().join("server/packages"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".incoming-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (status, _) = lab.get("/api/packages/Acme.Web/1.9.0").await;
    assert_eq!(status, 404);

    // Deleting a machine cancels the script running on it at once, listening
    // and polling alike (its processes are gone), and the task says why.
    let pids = lab.dir.path().join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    let script = format!(
        "echo $$ > '{}'/\"$TentacleInstanceName\"; echo started; sleep 300",
        pids.display()
    );
    let (status, v) = lab
        .post(
            "/api/tasks/script",
            json!({ "script": script, "machines": ["lis", "pol"] }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let id = v["task"]["id"].as_str().unwrap().to_string();
    let pid_of = async |name: &str| {
        let file = pids.join(name);
        timeout(T, async {
            loop {
                if let Some(pid) = std::fs::read_to_string(&file)
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                {
                    return nix::unistd::Pid::from_raw(pid);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the script did not start on {name} within {T:?}"))
    };
    for (gone, other) in [("lis", Some("pol")), ("pol", None)] {
        let pid = pid_of(gone).await;
        let out = lab.octopus_ok(&["machine", "delete", gone]);
        assert!(out.contains(&format!("Deleted machine '{gone}'")), "{out}");
        let (_, now) = lab.get(&format!("/api/tasks/{id}")).await;
        let s = step(&now, gone);
        assert_eq!(s["state"], "Canceled", "{now}");
        assert!(
            s["error"]
                .as_str()
                .unwrap_or_default()
                .contains(&format!("machine {gone} was deleted by")),
            "{s}"
        );
        if let Some(other) = other {
            assert_eq!(step(&now, other)["state"], "Executing", "{now}");
        }
        // The script's shell is gone from the tentacle's machine.
        timeout(T, async {
            // (A zombie nobody reaped yet counts as gone: it runs nothing.)
            let zombie = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
                    .unwrap_or(false)
            };
            while nix::sys::signal::kill(pid, None).is_ok() && !zombie() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the script on {gone} (pid {pid}) still runs"));
    }
    let end = timeout(T, async {
        loop {
            let (_, t) = lab.get(&format!("/api/tasks/{id}")).await;
            if t["task"]["state"] != "Executing" && t["task"]["state"] != "Queued" {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(end["task"]["state"], "Failed", "{end}");
    let log = lab.log(&end).await.join("\n");
    for gone in ["lis", "pol"] {
        assert!(
            log.contains(&format!("{gone}: canceling: machine {gone} was deleted by")),
            "{log}"
        );
    }

    let mut lab = lab;
    timeout(T, lab.server.take().unwrap().stop()).await.unwrap();
}
