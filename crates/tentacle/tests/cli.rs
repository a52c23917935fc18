//! The `tentacle` binary, driven as a person or their automation would.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use octo_tls::{Identity, Thumbprint};

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tentacle"));
        c.args(args)
            .env("TENTACLE_CONFIG_DIR", self.config_dir())
            .env("TENTACLE_SYSTEMD_DIR", self.dir.path().join("systemd"))
            .env_remove("RUST_LOG");
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "tentacle {args:?} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            !out.status.success(),
            "tentacle {args:?} should fail:\n{}",
            text(&out.stdout)
        );
        let err = text(&out.stderr);
        assert!(err.starts_with("error: ") || err.contains("Usage"), "{err}");
        err
    }
    fn instance(&self, name: &str) -> String {
        self.ok(&["create-instance", "--instance", name]);
        self.ok(&["new-certificate", "--instance", name]);
        self.ok(&["show-thumbprint", "--instance", name])
            .trim()
            .to_string()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tp(n: u8) -> String {
    Thumbprint::of_der(&[n]).to_string()
}

#[test]
fn instances_lifecycle() {
    let env = Env::new();
    assert!(env.ok(&["list-instances"]).contains("No instances"));
    let out = env.ok(&["create-instance", "--instance", "Web"]);
    assert!(out.contains("Created instance 'Web'"), "{out}");
    let custom = env.dir.path().join("custom.toml");
    env.ok(&[
        "create-instance",
        "--instance",
        "Db",
        "--config",
        custom.to_str().unwrap(),
        "--home",
        env.dir.path().join("dbhome").to_str().unwrap(),
    ]);
    assert!(custom.exists());
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["list-instances", "--format", "json"])).unwrap();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["Db", "Web"]);
    let err = env.fails(&["create-instance", "--instance", "Web"]);
    assert!(
        err.contains("already exists") && err.contains("delete-instance"),
        "{err}"
    );
    env.ok(&["delete-instance", "--instance", "Db"]);
    assert!(!custom.exists());
    let err = env.fails(&["show-configuration", "--instance", "Db"]);
    assert!(
        err.contains("no tentacle instance named 'Db'")
            && err.contains("create-instance --instance Db"),
        "{err}"
    );
    let err = env.fails(&["create-instance", "--instance", "../evil"]);
    assert!(err.contains("not a valid instance name"), "{err}");
}

#[test]
fn certificates_and_thumbprints() {
    let env = Env::new();
    env.ok(&["create-instance"]);
    let err = env.fails(&["show-thumbprint"]);
    assert!(
        err.contains("tentacle new-certificate --instance Tentacle"),
        "{err}"
    );
    env.ok(&["new-certificate"]);
    let t1 = env.ok(&["show-thumbprint"]).trim().to_string();
    assert!(
        t1.parse::<Thumbprint>().is_ok() && t1.len() == 64 && t1 == t1.to_uppercase(),
        "{t1}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-thumbprint", "--format", "json"])).unwrap();
    assert_eq!(json["thumbprint"], t1);
    // --if-blank keeps the existing certificate; without it, a new one.
    env.ok(&["new-certificate", "--if-blank"]);
    assert_eq!(env.ok(&["show-thumbprint"]).trim(), t1);
    env.ok(&["new-certificate"]);
    let t2 = env.ok(&["show-thumbprint"]).trim().to_string();
    assert_ne!(t1, t2);
    // Key mode 0600.
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    let key = PathBuf::from(cfg["tentacle"]["private_key"].as_str().unwrap());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Import a PEM with certificate and key.
    let id = Identity::generate("imported").unwrap();
    let pem = env.dir.path().join("both.pem");
    std::fs::write(&pem, format!("{}{}", id.cert_pem(), id.key_pem())).unwrap();
    env.ok(&["import-certificate", "--from-file", pem.to_str().unwrap()]);
    assert_eq!(
        env.ok(&["show-thumbprint"]).trim(),
        id.thumbprint().to_string()
    );
    let err = env.fails(&[
        "import-certificate",
        "--from-file",
        env.dir.path().join("nope.pem").to_str().unwrap(),
    ]);
    assert!(err.contains("nope.pem"), "{err}");
}

#[test]
fn configure_trust_listen_and_aliases() {
    let env = Env::new();
    env.instance("Tentacle");
    env.ok(&[
        "configure",
        "--trust",
        &tp(1),
        "--trust",
        &tp(2).to_lowercase(),
        "--port",
        "10999",
        "--listenIpAddress",
        "127.0.0.1",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    let trusted: Vec<&str> = cfg["trusted_servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["thumbprint"].as_str().unwrap())
        .collect();
    assert_eq!(trusted, vec![tp(1), tp(2)]);
    assert_eq!(cfg["listen"]["port"], 10999);
    assert_eq!(cfg["listen"]["address"], "127.0.0.1");
    env.ok(&["configure", "--remove-trust", &tp(1), "--noListen"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    assert_eq!(cfg["trusted_servers"].as_array().unwrap().len(), 1);
    assert_eq!(cfg["listen"]["enabled"], false);
    env.ok(&["configure", "--reset-trust", "--listen"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    assert!(cfg
        .get("trusted_servers")
        .is_none_or(|t| t.as_array().is_some_and(|a| a.is_empty())));
    // Bad input: one line, says what is wrong, changes nothing.
    let before = env.ok(&["show-configuration"]);
    let err = env.fails(&["configure", "--trust", "ABC", "--port", "1"]);
    assert!(err.contains("not a certificate thumbprint"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(env.ok(&["show-configuration"]), before);
    let err = env.fails(&["configure", "--remove-trust", &tp(9)]);
    assert!(err.contains("is not a trusted server"), "{err}");
    // A bad flag gets usage.
    let out = env.cmd(&["configure", "--bogus"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("Usage"), "{}", text(&out.stderr));
}

#[test]
fn config_that_does_not_parse_is_reported() {
    let env = Env::new();
    env.instance("Tentacle");
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    let path = PathBuf::from(cfg["config_file"].as_str().unwrap());
    std::fs::write(&path, "[tentacle\nhome = 3").unwrap();
    let err = env.fails(&["show-configuration"]);
    assert!(
        err.contains("does not parse") && err.contains(path.to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn poll_server_add_and_remove() {
    let env = Env::new();
    env.instance("Tentacle");
    let err = env.fails(&["poll-server", "--server-comms-address", "octopus.example"]);
    assert!(err.contains("--server-thumbprint is required"), "{err}");
    let out = env.ok(&[
        "poll-server",
        "--server",
        "https://octopus.example/",
        "--server-thumbprint",
        &tp(3),
        "--connections",
        "2",
    ]);
    assert!(
        out.contains("octopus.example:10943") && out.contains("poll://"),
        "{out}"
    );
    env.ok(&[
        "poll-server",
        "--serverCommsAddress",
        "10.0.0.1:443",
        "--thumbprint",
        &tp(4),
        "--subscription-id",
        "mysub",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    let servers = cfg["polling_servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert_eq!(servers[0]["connections"], 2);
    assert_eq!(servers[1]["subscription_id"], "mysub");
    env.ok(&[
        "poll-server",
        "--server-comms-address",
        "10.0.0.1:443",
        "--remove",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_str(&env.ok(&["show-configuration", "--format", "json"])).unwrap();
    assert_eq!(cfg["polling_servers"].as_array().unwrap().len(), 1);
}

#[test]
fn polling_proxy_is_saved_0600_and_shown_without_the_password() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config = env.dir.path().join("proxy.toml");
    env.ok(&[
        "create-instance",
        "--instance",
        "Px",
        "--config",
        config.to_str().unwrap(),
    ]);
    let show = || env.ok(&["show-configuration", "--instance", "Px"]);
    let json = || -> serde_json::Value {
        serde_json::from_str(&env.ok(&[
            "show-configuration",
            "--instance",
            "Px",
            "--format",
            "json",
        ]))
        .unwrap()
    };
    // Not configured: the environment decides.
    assert!(show().contains("# polling proxy: from HTTPS_PROXY/NO_PROXY if set"));
    assert!(json()["polling_proxy"].is_null());

    let out = env.ok(&[
        "polling-proxy",
        "--instance",
        "Px",
        "--proxy-enable",
        "true",
        "--proxy-host",
        "proxy.example",
        "--proxy-port",
        "3128",
        "--proxy-username",
        "octo",
        "--proxy-password",
        "hunter2",
    ]);
    assert!(
        out.contains("through the proxy http://octo@proxy.example:3128 (password set)")
            && out.contains("mode 0600"),
        "{out}"
    );
    assert!(!out.contains("hunter2"), "{out}");
    // Stored (the agent needs it) in a file only its owner can read.
    let stored = std::fs::read_to_string(&config).unwrap();
    assert!(
        stored.contains("[polling_proxy]") && stored.contains("password = \"hunter2\""),
        "{stored}"
    );
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Shown without it.
    let text = show();
    assert!(
        text.contains("# polling proxy: http://octo@proxy.example:3128 (password set)")
            && text.contains("password = \"(set)\"")
            && text.contains("host = \"proxy.example\"")
            && text.contains("port = 3128"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    let v = json();
    assert_eq!(v["polling_proxy"]["password"], "(set)");
    assert_eq!(v["polling_proxy"]["username"], "octo");
    assert!(!v.to_string().contains("hunter2"));

    // The original's spellings; --proxyEnable alone means true; default port 80.
    env.ok(&[
        "polling-proxy",
        "--instance",
        "Px",
        "--proxyEnable",
        "--proxyHost",
        "10.1.2.3",
    ]);
    let text = show();
    assert!(
        text.contains("# polling proxy: http://10.1.2.3:80\n"),
        "{text}"
    );
    assert!(!text.contains("password"), "{text}");
    // Enabled without a host: the environment's proxy.
    env.ok(&[
        "polling-proxy",
        "--instance",
        "Px",
        "--proxy-enable",
        "true",
    ]);
    assert!(show().contains("# polling proxy: from HTTPS_PROXY/NO_PROXY if set"));
    assert_eq!(json()["polling_proxy"]["enabled"], true);
    // Disabled: direct, the environment ignored; empty values are ignored.
    let out = env.ok(&[
        "polling-proxy",
        "--instance",
        "Px",
        "--proxyEnable=false",
        "--proxyHost=",
    ]);
    assert!(out.contains("directly"), "{out}");
    let text = show();
    assert!(
        text.contains("# polling proxy: direct") && text.contains("enabled = false"),
        "{text}"
    );

    // Refused, with what to do; nothing changed.
    for (args, expect) in [
        (
            vec!["--proxy-enable", "false", "--proxy-host", "p"],
            "--proxy-enable false means no proxy",
        ),
        (
            vec!["--proxy-enable", "true", "--proxy-host", "http://p:3128"],
            "--proxy-port",
        ),
        (
            vec![
                "--proxy-enable",
                "true",
                "--proxy-host",
                "p",
                "--proxy-password",
                "x",
            ],
            "without a user name",
        ),
        (
            vec!["--proxy-enable", "true", "--proxy-port", "3128"],
            "without a proxy host",
        ),
        (vec!["--proxy-host", "p"], "--proxy-enable"),
        (vec!["--proxy-enable", "maybe"], "maybe"),
    ] {
        let mut all = vec!["polling-proxy", "--instance", "Px"];
        all.extend(args);
        let err = env.fails(&all);
        assert!(err.contains(expect), "{all:?}: {err}");
    }
    assert!(show().contains("# polling proxy: direct"));
}

#[test]
fn service_install_writes_a_unit_that_systemd_accepts() {
    let env = Env::new();
    env.instance("Web");
    let out = env.ok(&["service", "--instance", "Web", "--install"]);
    let unit = env.dir.path().join("systemd/tentacle-web.service");
    assert!(out.contains(unit.to_str().unwrap()), "{out}");
    let body = std::fs::read_to_string(&unit).unwrap();
    assert!(
        body.contains(&format!(
            "ExecStart={} run --instance Web",
            env!("CARGO_BIN_EXE_tentacle")
        )),
        "{body}"
    );
    assert!(
        body.contains("Restart=always") && body.contains("KillMode=control-group"),
        "{body}"
    );
    if !Path::new("/run/systemd/system").is_dir() {
        assert!(
            out.contains("systemd is not running") && out.contains("tentacle run --instance Web"),
            "{out}"
        );
    }
    let verify = Command::new("systemd-analyze")
        .args(["verify", unit.to_str().unwrap()])
        .output()
        .expect("systemd-analyze is installed by scripts/test.sh");
    assert!(
        verify.status.success(),
        "systemd-analyze verify:\n{}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    let err = env.fails(&[
        "service",
        "--instance",
        "Web",
        "--install",
        "--username",
        "no-such-user-xyz",
    ]);
    assert!(err.contains("no user 'no-such-user-xyz'"), "{err}");
    env.ok(&["service", "--instance", "Web", "--uninstall"]);
    assert!(!unit.exists());
    let err = env.fails(&["service", "--instance", "Web"]);
    assert!(err.contains("--install"), "{err}");
}

fn setup(env: &Env, answers: &str) -> String {
    let mut child = env
        .cmd(&["setup"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answers.as_bytes())
        .unwrap();
    let out: Output = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "setup failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn setup_wizard_with_piped_answers() {
    let env = Env::new();
    // Listening: defaults for port and address, one wrong thumbprint then a right one.
    let out = setup(
        &env,
        &format!("Web\nlistening\n\n127.0.0.1\nnot-a-thumbprint\n{}\n", tp(5)),
    );
    assert!(out.contains("not a certificate thumbprint"), "{out}");
    assert!(
        out.contains("Next: tentacle service --instance Web --install"),
        "{out}"
    );
    let cfg: serde_json::Value = serde_json::from_str(&env.ok(&[
        "show-configuration",
        "--instance",
        "Web",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(cfg["listen"]["port"], 10933);
    assert_eq!(cfg["listen"]["address"], "127.0.0.1");
    assert_eq!(cfg["trusted_servers"][0]["thumbprint"], tp(5));
    assert!(cfg["thumbprint"].as_str().is_some());
    // Polling.
    let out = setup(
        &env,
        &format!("Edge\npolling\noctopus.example\n{}\n", tp(6)),
    );
    assert!(out.contains("octopus.example:10943 as poll://"), "{out}");
    let cfg: serde_json::Value = serde_json::from_str(&env.ok(&[
        "show-configuration",
        "--instance",
        "Edge",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(cfg["listen"]["enabled"], false);
    assert_eq!(cfg["polling_servers"][0]["thumbprint"], tp(6));
    // Input that ends early is an error, not a hang.
    let out = env.cmd(&["setup"]).stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("input ended"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn version_and_help() {
    let env = Env::new();
    assert!(env.ok(&["version"]).starts_with("tentacle "));
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["version", "--format", "json"])).unwrap();
    assert_eq!(v["protocol"], 2);
    // What an upgrade to this binary may rely on.
    assert_eq!(v["features"], serde_json::json!(["passed-sockets"]), "{v}");
    for cmd in [
        "create-instance",
        "configure",
        "poll-server",
        "service",
        "run",
        "setup",
        "import-certificate",
    ] {
        let help = env.ok(&[cmd, "--help"]);
        assert!(
            help.contains("Example") || help.contains("e.g."),
            "{cmd} --help has no example:\n{help}"
        );
    }
}

#[test]
fn errors_reach_the_terminal_escaped() {
    let env = Env::new();
    // The error names the instance asked for: its escape sequence is shown, not run.
    let err = env.fails(&["show-configuration", "--instance", "evil\u{1b}[31mred\u{7}"]);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");
    assert!(err.contains("evil\\e[31mred\\x07"), "{err:?}");
}
