//! The client commands of the real `octopus` binary against a real `octopus
//! server run` process: output (tables and JSON), and the one-line errors for a
//! refused key, an unreachable server, API errors and bad flags.
//!
//! Task commands: without a tentacle (no machine matches, unknown task, a health
//! check of an unreachable machine), and against a tentacle with the real agent
//! services in this process (output prefixes, summaries, exit statuses, JSON
//! lines, cancel, the paged log agreeing with the followed one). The task engine
//! itself is tested in `tasks.rs`.
#![allow(clippy::unwrap_used)]
// `Server` waits for its child in `Drop`, which the lint cannot see.
#![allow(clippy::zombie_processes)]

mod common;

use common::{col, names, run, start, tp};
use serde_json::Value;

#[test]
fn environments_table_json_and_errors() {
    let s = start();
    s.cli(&["environment", "list"]).ok();
    let out = s
        .cli(&[
            "environment",
            "create",
            "Production",
            "--description",
            "Live customers",
        ])
        .ok();
    assert_eq!(out.stdout.trim(), "Created environment 'Production'.");
    s.cli(&["environment", "create", "Test"]).ok();

    // The table: header and rows aligned.
    let out = s.cli(&["environment", "list"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:#?}");
    assert!(lines[0].starts_with("NAME "), "{out:#?}");
    let desc = col(lines[0], "DESCRIPTION");
    assert_eq!(col(lines[1], "Live customers"), desc, "{out:#?}");
    assert_eq!(&lines[2][desc..desc + 1], "-", "{out:#?}");

    // JSON: the server's objects; options may come before or after the command.
    let out = run(
        &[],
        &[
            "environment",
            "list",
            "--output",
            "json",
            "--server",
            &s.api,
            "--apiKey",
            &s.key,
        ],
        None,
    )
    .ok();
    let names = names(&out.json());
    assert_eq!(names, ["Production", "Test"]);

    // The server's error text, naming what failed.
    let err = s.cli(&["environment", "create", "production"]).error();
    assert_eq!(
        err,
        "error: creating environment 'production': environment 'production' already exists"
    );

    s.cli(&["environment", "delete", "Test"]).ok();
    let err = s.cli(&["environment", "delete", "Test"]).error();
    assert!(err.contains("deleting environment 'Test'"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    let out = s.cli(&["--output", "json", "environment", "list"]).ok();
    assert_eq!(out.json().as_array().unwrap().len(), 1);
}

#[test]
fn machine_policies_list_create_update_show() {
    let s = start();
    let out = s.cli(&["policy", "list"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:#?}");
    assert!(lines[0].starts_with("NAME "), "{out:#?}");
    assert_eq!(
        &lines[1][col(lines[0], "TENTACLE UPDATE")..],
        "Manual",
        "{out:#?}"
    );

    let out = s
        .cli(&[
            "policy",
            "create",
            "Keep up",
            "--tentacle-update",
            "always",
            "--health-check-interval",
            "900",
        ])
        .ok();
    assert!(
        out.stdout.starts_with("Created machine policy 'Keep up'."),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains("Always (health checks keep tentacles up to date)"),
        "{out:#?}"
    );
    let out = s
        .cli(&[
            "--output",
            "json",
            "machine-policy",
            "update",
            "Default Machine Policy",
            "--polling-wait",
            "30",
        ])
        .ok();
    let v = out.json();
    assert_eq!(v["polling_wait_s"], 30, "{v}");
    assert_eq!(v["tentacle_update"], "Manual", "{v}");
    let out = s.cli(&["policy", "show", "keep up"]).ok();
    assert!(out.stdout.contains("900 s"), "{out:#?}");

    // The server's rule, naming the field; and nothing to change.
    let err = s
        .cli(&[
            "policy",
            "update",
            "Keep up",
            "--health-check-interval",
            "5",
        ])
        .error();
    assert!(
        err.contains("changing machine policy 'Keep up'")
            && err.contains("health_check_interval_s")
            && err.contains("from 60"),
        "{err}"
    );
    let err = s.cli(&["policy", "update", "Keep up"]).error();
    assert!(err.contains("nothing to change"), "{err}");
    let err = s.cli(&["policy", "show", "Nope"]).error();
    assert!(err.contains("'Nope' does not exist"), "{err}");
    let out = s.cli(&["--output", "json", "policy", "list"]).ok();
    assert_eq!(names(&out.json()), ["Default Machine Policy", "Keep up"]);
}

#[test]
fn machines_add_list_show_delete() {
    let s = start();
    s.cli(&["environment", "create", "Production"]).ok();
    s.cli(&["environment", "create", "Test"]).ok();
    let out = s
        .cli(&[
            "machine",
            "add-listening",
            "--name",
            "web01",
            "--url",
            "https://web01.example:10933",
            "--thumbprint",
            &tp(1),
            "--environment",
            "Production",
            "--environment",
            "Test",
            "--role",
            "web",
            "--role",
            "api",
        ])
        .ok();
    assert!(
        out.stdout
            .contains("Added listening machine 'web01' at https://web01.example:10933/"),
        "{out:#?}"
    );
    // A name with a space and a slash travels in the URL path intact.
    s.cli(&[
        "machine",
        "add-listening",
        "--name",
        "db 2/b",
        "--url",
        "db2.example:10933",
        "--thumbprint",
        &tp(2),
        "--environment",
        "Test",
        "--role",
        "db",
    ])
    .ok();

    let out = s.cli(&["machine", "list"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:#?}");
    let header = lines[0];
    let mut last = 0;
    for h in ["NAME", "KIND", "URI", "STATUS", "ENVIRONMENTS", "ROLES"] {
        let c = col(header, h);
        assert!(c >= last, "{header}");
        last = c;
    }
    let web = lines.iter().find(|l| l.starts_with("web01")).unwrap();
    for (h, v) in [
        ("KIND", "Listening"),
        ("URI", "https://web01.example:10933/"),
        ("STATUS", "Unknown"),
        ("ENVIRONMENTS", "Production,Test"),
        ("ROLES", "api,web"),
    ] {
        assert_eq!(col(web, v), col(header, h), "{h} in {out:#?}");
    }

    // Filters.
    let out = s
        .cli(&["--output", "json", "machine", "list", "--role", "db"])
        .ok();
    let names = names(&out.json());
    assert_eq!(names, ["db 2/b"]);
    let out = s
        .cli(&[
            "machine",
            "list",
            "--environment",
            "Production",
            "--role",
            "db",
        ])
        .ok();
    assert!(out.stdout.starts_with("No machines match."), "{out:#?}");

    // Show: label/value lines, or the server's JSON.
    let out = s.cli(&["machine", "show", "web01"]).ok();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("Thumbprint:") && l.ends_with(&tp(1))),
        "{out:#?}"
    );
    let out = s
        .cli(&["machine", "show", "db 2/b", "--output", "json"])
        .ok();
    let m = out.json();
    assert_eq!(m["thumbprint"], tp(2));
    assert_eq!(m["kind"], "Listening");
    assert_eq!(m["status"], "Unknown");

    // Server-side validation comes back as one line.
    let err = s
        .cli(&[
            "machine",
            "add-listening",
            "--name",
            "bad",
            "--url",
            "https://bad:10933",
            "--thumbprint",
            "nope",
            "--environment",
            "Test",
        ])
        .error();
    assert!(
        err.starts_with("error: adding machine 'bad': field `thumbprint`"),
        "{err}"
    );
    let err = s
        .cli(&[
            "machine",
            "add-listening",
            "--name",
            "clone",
            "--url",
            "https://clone:10933",
            "--thumbprint",
            &tp(1),
            "--environment",
            "Test",
        ])
        .error();
    assert!(err.contains("web01") && err.contains("cloned"), "{err}");

    // Delete.
    let out = s.cli(&["machine", "delete", "web01"]).ok();
    assert!(out.stdout.contains("Deleted machine 'web01'"), "{out:#?}");
    s.cli(&["machine", "delete", "db 2/b"]).ok();
    let err = s.cli(&["machine", "show", "web01"]).error();
    assert_eq!(
        err,
        "error: reading machine 'web01': machine 'web01' does not exist"
    );
    let out = s.cli(&["machine", "list"]).ok();
    assert!(out.stdout.starts_with("No machines match."), "{out:#?}");
}

#[test]
fn api_keys_create_list_revoke() {
    let s = start();
    let out = s.cli(&["api-key", "create", "--purpose", "ci"]).ok();
    // The key alone on stdout; the warning that it is shown once on stderr.
    let key = out.stdout.trim().to_string();
    assert_eq!(out.stdout.lines().count(), 1, "{out:#?}");
    assert!(key.starts_with("API-"), "{out:#?}");
    assert!(out.stderr.contains("shown only now"), "{out:#?}");

    // The new key works, from the environment too.
    let env = [("OCTOPUS_URL", s.api.as_str()), ("OCTOPUS_API_KEY", &key)];
    run(&env, &["environment", "list"], None).ok();

    let out = s.cli(&["api-key", "list"]).ok();
    let ci = out
        .stdout
        .lines()
        .find(|l| l.ends_with("ci"))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert!(ci.contains(&format!("{}...", &key[..8])), "{ci}");
    assert!(ci.contains("active"), "{ci}");
    let keys = s.cli(&["api-key", "list", "--output", "json"]).ok().json();
    let id = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["purpose"] == "ci")
        .unwrap()["id"]
        .as_i64()
        .unwrap()
        .to_string();

    let out = s.cli(&["api-key", "revoke", &id]).ok();
    assert!(out.stdout.contains("Revoked API key"), "{out:#?}");
    let out = s.cli(&["api-key", "list"]).ok();
    assert!(
        out.stdout
            .lines()
            .any(|l| l.ends_with("ci") && l.contains("revoked")),
        "{out:#?}"
    );

    // A revoked key is refused, with what to do.
    let err = run(&env, &["environment", "list"], None).error();
    assert_eq!(
        err,
        "error: listing environments: the server refused the API key; pass --api-key or set OCTOPUS_API_KEY (the first admin key is in DATA/admin-api-key)"
    );
    let err = s.cli(&["api-key", "revoke", "9999"]).error();
    assert!(err.starts_with("error: revoking API key 9999: "), "{err}");
}

#[test]
fn missing_and_wrong_keys_unreachable_server_and_bad_flags() {
    let s = start();
    let err = run(&[], &["environment", "list", "--server", &s.api], None).error();
    assert_eq!(
        err,
        "error: listing environments: no API key was given; pass --api-key or set OCTOPUS_API_KEY (the first admin key is in DATA/admin-api-key)"
    );
    let err = run(
        &[],
        &[
            "machine",
            "list",
            "--server",
            &s.api,
            "--api-key",
            "API-WRONG",
        ],
        None,
    )
    .error();
    assert!(
        err.starts_with("error: listing machines: the server refused the API key; pass --api-key or set OCTOPUS_API_KEY"),
        "{err}"
    );

    // No server there.
    let err = run(
        &[],
        &[
            "environment",
            "list",
            "--server",
            "http://127.0.0.1:1",
            "--api-key",
            &s.key,
        ],
        None,
    )
    .error();
    assert!(
        err.starts_with(
            "error: listing environments: cannot reach the server at http://127.0.0.1:1"
        ) && err.contains("is `octopus server run` running?"),
        "{err}"
    );
    // The address from the environment; a bare host:port means http.
    let err = run(&[("OCTOPUS_URL", "127.0.0.1:1")], &["task", "list"], None).error();
    assert!(
        err.contains("cannot reach the server at http://127.0.0.1:1"),
        "{err}"
    );
    let err = run(
        &[],
        &["environment", "list", "--server", "https://x:1"],
        None,
    )
    .error();
    assert!(err.contains("http:// only"), "{err}");

    // Bad flags: clap's usage, exit 2.
    for args in [
        &["environment", "list", "--bogus"][..],
        &["machine"],
        &["machine", "add-listening", "--name", "x"],
        &["run-script", "--script", "true"],
        &[
            "run-script",
            "--script",
            "true",
            "--machine",
            "a",
            "--environment",
            "b",
        ],
        &[
            "run-script",
            "--file",
            "x.sh",
            "--machine",
            "a",
            "--role",
            "web",
        ],
        &["environment", "list", "--output", "yaml"],
    ] {
        let out = run(&[], args, None);
        assert_eq!(out.code, 2, "{args:?}: {out:#?}");
        assert!(
            out.stderr.contains("Usage: octopus")
                || out.stderr.contains("possible values: table, json"),
            "{args:?}: {out:#?}"
        );
    }

    // Every command's help has an example.
    for args in [
        &["--help"][..],
        &["environment", "--help"],
        &["environment", "list", "--help"],
        &["environment", "create", "--help"],
        &["environment", "delete", "--help"],
        &["machine", "--help"],
        &["machine", "list", "--help"],
        &["machine", "show", "--help"],
        &["machine", "delete", "--help"],
        &["machine", "add-listening", "--help"],
        &["api-key", "--help"],
        &["api-key", "create", "--help"],
        &["api-key", "list", "--help"],
        &["api-key", "revoke", "--help"],
        &["user", "--help"],
        &["user", "create", "--help"],
        &["health-check", "--help"],
        &["run-script", "--help"],
        &["task", "--help"],
        &["task", "list", "--help"],
        &["task", "show", "--help"],
        &["task", "log", "--help"],
        &["task", "cancel", "--help"],
        &["server", "--help"],
        &["server", "run", "--help"],
        &["server", "show-thumbprint", "--help"],
    ] {
        let out = run(&[], args, None).ok();
        assert!(
            out.stdout.contains("Example"),
            "{args:?} has no example: {out:#?}"
        );
    }
}

#[test]
fn users() {
    let s = start();
    let out = run(
        &[("OCTOPUS_URL", s.api.as_str()), ("OCTOPUS_API_KEY", &s.key)],
        &[
            "user",
            "create",
            "--username",
            "alice",
            "--password-stdin",
            "--display-name",
            "Alice Smith",
        ],
        Some("correct horse battery\n"),
    );
    let out = out.ok();
    assert!(
        out.stdout.contains("Created user 'alice' (Alice Smith, id"),
        "{out:#?}"
    );
    let out = s
        .cli(&[
            "user",
            "create",
            "--username",
            "bob",
            "--admin",
            "--output",
            "json",
        ])
        .ok();
    assert_eq!(out.json()["is_admin"], true);
    let err = s
        .cli(&[
            "user",
            "create",
            "--username",
            "carol",
            "--password",
            "short",
        ])
        .error();
    assert!(
        err.starts_with("error: creating user 'carol': ") && err.contains("password"),
        "{err}"
    );
    let err = run(
        &[("OCTOPUS_URL", s.api.as_str()), ("OCTOPUS_API_KEY", &s.key)],
        &["user", "create", "--username", "dave", "--password-stdin"],
        Some(""),
    )
    .error();
    assert!(err.contains("--password-stdin"), "{err}");
}

#[test]
fn task_commands_without_tentacles() {
    let s = start();
    s.cli(&["environment", "create", "Empty"]).ok();
    let out = s.cli(&[
        "run-script",
        "--script",
        "echo hi",
        "--environment",
        "Empty",
        "--role",
        "web",
    ]);
    // No machine matches: the server's explanation, one line.
    let err = out.error();
    assert!(err.starts_with("error: starting the script: "), "{err}");
    assert!(err.contains("Empty"), "{err}");
    let err = s
        .cli(&["run-script", "--script", "echo hi", "--machine", "nope"])
        .error();
    assert!(err.contains("machine 'nope' does not exist"), "{err}");
    let err = s.cli(&["health-check", "--environment", "Empty"]).error();
    assert!(err.starts_with("error: starting a health check: "), "{err}");

    let out = s.cli(&["task", "list"]).ok();
    assert!(out.stdout.starts_with("No tasks yet."), "{out:#?}");
    let err = s.cli(&["task", "show", "ServerTasks-999"]).error();
    assert!(
        err.starts_with("error: reading task ServerTasks-999: ") && err.contains("does not exist"),
        "{err}"
    );
    let err = s
        .cli(&["task", "log", "ServerTasks-999", "--follow"])
        .error();
    assert!(err.contains("does not exist"), "{err}");

    // A health check of a machine nobody listens for: started without waiting,
    // then followed to its end through the log stream.
    s.cli(&[
        "machine",
        "add-listening",
        "--name",
        "ghost",
        "--url",
        "https://127.0.0.1:1",
        "--thumbprint",
        &tp(7),
        "--environment",
        "Empty",
    ])
    .ok();
    let out = s
        .cli(&["health-check", "--machine", "ghost", "--no-wait"])
        .ok();
    let id = out.stdout.trim().to_string();
    assert!(id.starts_with("ServerTasks-"), "{out:#?}");
    assert!(out
        .stderr
        .contains(&format!("octopus task log {id} --follow")));
    let out = s.cli(&["task", "log", &id, "--follow"]);
    assert!(matches!(out.code, 0 | 1), "{out:#?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("MACHINE") && l.contains("EXIT CODE")),
        "{out:#?}"
    );
    assert!(
        out.stdout.lines().any(|l| l.starts_with("ghost ")),
        "{out:#?}"
    );
    let out = s.cli(&["health-check", "--machine", "ghost"]);
    assert!(matches!(out.code, 0 | 1), "{out:#?}");
    let row = out
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("NAME"))
        .find(|l| l.starts_with("ghost "))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert!(row.contains("Unavailable"), "{out:#?}");

    let out = s.cli(&["task", "list"]).ok();
    assert!(out.stdout.lines().next().unwrap().starts_with("ID "));
    assert!(out.stdout.contains(&id), "{out:#?}");
    let out = s.cli(&["task", "show", &id]).ok();
    assert!(out.stdout.starts_with("Task:"), "{out:#?}");
    let out = s.cli(&["task", "show", &id, "--output", "json"]).ok();
    assert_eq!(out.json()["task"]["id"], id.as_str());
    s.cli(&["task", "log", &id]).ok();
}

/// A listening tentacle with the real agent services (scripts, capabilities),
/// served in this process on 127.0.0.1, trusting `server`.
struct Tentacle {
    addr: std::net::SocketAddr,
    thumbprint: String,
    token: tokio_util::sync::CancellationToken,
    _home: tempfile::TempDir,
}

impl Drop for Tentacle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn tentacle(name: &str, server: &str) -> Tentacle {
    use octo_agent::capabilities::CapabilitiesImpl;
    use octo_agent::scripts::ScriptServiceImpl;
    use octo_proto::v1::capabilities_server::CapabilitiesServer;
    use octo_proto::v1::script_service_server::ScriptServiceServer;

    let home = tempfile::tempdir().unwrap();
    let ctx = octo_agent::AgentContext {
        instance_name: name.to_string(),
        home: home.path().join("home"),
        applications: home.path().join("apps"),
    };
    std::fs::create_dir_all(&ctx.home).unwrap();
    std::fs::create_dir_all(&ctx.applications).unwrap();
    let identity = octo_testkit::identity(name);
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(ScriptServiceServer::new(ScriptServiceImpl::new(
                ctx.clone(),
            )));
    let comms = octo_comms::TentacleComms::new(
        identity.clone(),
        octo_tls::TrustStore::new(
            [server.parse::<octo_tls::Thumbprint>().unwrap()],
            octo_testkit::hint("tentacle"),
        ),
        routes,
        name,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    tokio::spawn({
        let token = token.clone();
        async move {
            let _ = comms.run_listening(listener, token).await;
        }
    });
    Tentacle {
        addr,
        thumbprint: identity.thumbprint().to_string(),
        token,
        _home: home,
    }
}

/// The log part of a followed run's stdout: the lines before the blank line
/// that precedes the summary.
fn log_part(stdout: &str) -> Vec<&str> {
    stdout.lines().take_while(|l| !l.is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_script_health_check_and_task_log_on_a_tentacle() {
    let s = std::sync::Arc::new(start());
    let t = tentacle("lis", &s.thumbprint).await;
    // The CLI blocks; the tentacle runs on this runtime's other threads.
    let cli = |args: Vec<String>, stdin: Option<&'static str>| {
        let s = s.clone();
        tokio::task::spawn_blocking(move || {
            let env = [("OCTOPUS_URL", s.api.as_str()), ("OCTOPUS_API_KEY", &s.key)];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&env, &args, stdin)
        })
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    cli(args(&["environment", "create", "Test"]), None)
        .await
        .unwrap()
        .ok();
    cli(
        args(&[
            "machine",
            "add-listening",
            "--name",
            "lis",
            "--url",
            &format!("https://{}", t.addr),
            "--thumbprint",
            &t.thumbprint,
            "--environment",
            "Test",
            "--role",
            "web",
        ]),
        None,
    )
    .await
    .unwrap()
    .ok();

    // Health check: waits, then the machines as the check left them.
    let out = cli(args(&["health-check", "--environment", "Test"]), None)
        .await
        .unwrap()
        .ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("NAME "))
        .unwrap_or_else(|| panic!("{out:#?}"));
    let row = lines[header + 1];
    assert!(row.starts_with("lis "), "{out:#?}");
    assert_eq!(
        col(row, "Healthy"),
        col(lines[header], "STATUS"),
        "{out:#?}"
    );
    assert_eq!(
        col(row, env!("CARGO_PKG_VERSION")),
        col(lines[header], "TENTACLE VERSION"),
        "{out:#?}"
    );

    // Success: every line once, prefixed by its machine; stderr marked; exit 0.
    let out = cli(
        args(&[
            "run-script",
            "--script",
            "echo out1; echo err1 >&2; sleep 0.2; echo out2",
            "--environment",
            "Test",
            "--role",
            "web",
        ]),
        None,
    )
    .await
    .unwrap()
    .ok();
    let log = log_part(&out.stdout);
    let pos = |l: &str| {
        log.iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("no '{l}' in {out:#?}"))
    };
    assert!(pos("[lis] out1") < pos("[lis] out2"), "{out:#?}");
    pos("[lis]! err1");
    assert!(log.iter().any(|l| l.starts_with("[server] ")), "{out:#?}");
    assert!(
        log.iter().all(|l| l.starts_with("[lis] ")
            || l.starts_with("[lis]! ")
            || l.starts_with("[server] ")),
        "{out:#?}"
    );
    let summary: Vec<&str> = out.stdout.lines().skip(log.len() + 1).collect();
    assert_eq!(
        summary[0], "MACHINE  STATE    EXIT CODE  DURATION",
        "{out:#?}"
    );
    assert!(
        summary[1].starts_with("lis      Success  0          "),
        "{out:#?}"
    );
    let id = out
        .stderr
        .split_whitespace()
        .find(|w| w.starts_with("ServerTasks-"))
        .unwrap()
        .to_string();

    // The paged log says the same as the followed one.
    let paged = cli(args(&["task", "log", &id]), None).await.unwrap().ok();
    assert_eq!(paged.stdout.lines().collect::<Vec<_>>(), log);

    // Failure: the summary, then one error line; exit 1.
    let out = cli(
        args(&[
            "run-script",
            "--script",
            "echo bye; exit 3",
            "--machine",
            "lis",
        ]),
        None,
    )
    .await
    .unwrap();
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(out.stdout.contains("[lis] bye"), "{out:#?}");
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("lis ") && l.contains("Failed") && l.contains(" 3 ")),
        "{out:#?}"
    );
    let last = out.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: task ServerTasks-") && last.contains("failed"),
        "{out:#?}"
    );

    // JSON: one log line per line, then the final task and steps. A script from stdin.
    let out = cli(
        args(&[
            "run-script",
            "--file",
            "-",
            "--syntax",
            "python3",
            "--machine",
            "lis",
            "--output",
            "json",
        ]),
        Some("print('from python')\n"),
    )
    .await
    .unwrap()
    .ok();
    let docs: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let (end, lines) = docs.split_last().unwrap();
    assert_eq!(end["task"]["state"], "Success", "{out:#?}");
    assert_eq!(end["steps"][0]["exit_code"], 0, "{out:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l["text"] == "from python" && l["stream"] == "stdout"),
        "{out:#?}"
    );

    // --no-wait, cancel, then follow to the end: exit 3.
    let out = cli(
        args(&[
            "run-script",
            "--script",
            "echo started; sleep 60",
            "--machine",
            "lis",
            "--no-wait",
        ]),
        None,
    )
    .await
    .unwrap()
    .ok();
    let id = out.stdout.trim().to_string();
    assert!(id.starts_with("ServerTasks-"), "{out:#?}");
    let out = cli(args(&["task", "cancel", &id]), None)
        .await
        .unwrap()
        .ok();
    assert!(
        out.stdout.contains(&format!("cancel task {id}")),
        "{out:#?}"
    );
    let out = cli(args(&["task", "log", &id, "--follow"]), None)
        .await
        .unwrap();
    assert_eq!(out.code, 3, "{out:#?}");
    assert_eq!(
        out.stderr.trim_end(),
        format!("error: task {id} was canceled"),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("lis ") && l.contains("Canceled")),
        "{out:#?}"
    );
    drop(t);
}
