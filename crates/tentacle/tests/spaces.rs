//! `tentacle register-with`, `register-worker` and `deregister-from` with
//! `--space`, against a real server (in this process): one tentacle in two
//! spaces, the cloned-image check per space, a space that does not exist, and
//! leaving one space while staying in another. Every wait is bounded.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use octo_server_core::{start, RunArgs, RunningServer};
use serde_json::{json, Value};

/// The longest one `tentacle` command or API call may take.
const T: Duration = Duration::from_secs(60);

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    async fn cmd(&self, args: &[&str]) -> (bool, String, String) {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tentacle"))
            .args(args)
            .env("TENTACLE_CONFIG_DIR", self.dir.path().join("etc"))
            .env_remove("OCTOPUS_API_KEY")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(T, child)
            .await
            .unwrap_or_else(|_| panic!("tentacle {args:?} did not finish within {T:?}"))
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    async fn ok(&self, args: &[&str]) -> String {
        let (ok, o, e) = self.cmd(args).await;
        assert!(ok, "tentacle {args:?}: {o}{e}");
        o
    }
    async fn fails(&self, args: &[&str]) -> String {
        let (ok, o, e) = self.cmd(args).await;
        assert!(!ok, "tentacle {args:?} should fail: {o}");
        e
    }
    async fn config(&self, instance: &str) -> Value {
        let out = self
            .ok(&[
                "show-configuration",
                "--instance",
                instance,
                "--format",
                "json",
            ])
            .await;
        serde_json::from_str(&out).unwrap()
    }
    async fn new_instance(&self, instance: &str) -> String {
        self.ok(&["create-instance", "--instance", instance]).await;
        self.ok(&["new-certificate", "--instance", instance]).await;
        self.ok(&["show-thumbprint", "--instance", instance])
            .await
            .trim()
            .to_string()
    }
}

/// The server's API, as its first administrator.
struct Api {
    base: String,
    key: String,
    http: reqwest::Client,
}

impl Api {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("X-Octopus-ApiKey", &self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }
    /// Creates a space with an environment "Test"; returns its id.
    async fn space_with_test_environment(&self, name: &str, encoded: &str) -> i64 {
        let (status, space) = self
            .call(
                reqwest::Method::POST,
                "/api/spaces",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 201, "{space}");
        let (status, e) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/spaces/{encoded}/environments"),
                Some(json!({"name": "Test"})),
            )
            .await;
        assert_eq!(status, 201, "{e}");
        space["id"].as_i64().unwrap()
    }
    /// The machines of a space (`/api/machines` for the Default space) with this thumbprint, by name.
    async fn machines_with(&self, path: &str, thumbprint: &str) -> Vec<String> {
        let (status, machines) = self.get(path).await;
        assert_eq!(status, 200, "{machines}");
        let mut names: Vec<String> = machines
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["thumbprint"] == thumbprint)
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }
}

/// A server on loopback with the spaces Default, "Ops Team" and "Staging",
/// each with an environment "Test".
async fn server(env: &Env) -> (RunningServer, Api, i64) {
    let server = start(&RunArgs {
        data: env.dir.path().join("server"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let api = Api {
        base: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().unwrap(),
        http: reqwest::Client::builder().timeout(T).build().unwrap(),
    };
    let (status, e) = api
        .call(
            reqwest::Method::POST,
            "/api/environments",
            Some(json!({"name": "Test"})),
        )
        .await;
    assert_eq!(status, 201, "{e}");
    api.space_with_test_environment("Ops Team", "Ops%20Team")
        .await;
    let staging = api.space_with_test_environment("Staging", "Staging").await;
    (server, api, staging)
}

/// `register-with` arguments for a listening tentacle.
fn register<'a>(api: &'a Api, instance: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "register-with",
        "--instance",
        instance,
        "--server",
        &api.base,
        "--api-key",
        &api.key,
        "--environment",
        "Test",
        "--name",
        name,
        "--public-hostname",
        "127.0.0.1",
    ]
}

fn with<'a>(mut args: Vec<&'a str>, more: &[&'a str]) -> Vec<&'a str> {
    args.extend_from_slice(more);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tentacle_in_two_spaces_and_the_cloned_image_check_per_space() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let (server, api, staging) = server(&env).await;
    let tp = env.new_instance("A").await;

    // The same tentacle in the Default space and in "Ops Team" (a name with a
    // space: the path segment is percent-encoded).
    let out = env.ok(&register(&api, "A", "a1")).await;
    assert!(out.contains("Registered 'a1'"), "{out}");
    assert!(!out.contains("in space"), "{out}");
    let out = env
        .ok(&with(register(&api, "A", "a1"), &["--space", "Ops Team"]))
        .await;
    assert!(
        out.contains("Registered 'a1'") && out.contains("in space 'Ops Team'"),
        "{out}"
    );
    assert_eq!(api.machines_with("/api/machines", &tp).await, ["a1"]);
    assert_eq!(
        api.machines_with("/api/spaces/Ops%20Team/machines", &tp)
            .await,
        ["a1"]
    );
    let (_, in_default) = api.get("/api/machines/a1").await;
    let (_, in_ops) = api.get("/api/spaces/Ops%20Team/machines/a1").await;
    assert_eq!(in_default["thumbprint"], tp);
    assert_eq!(in_ops["thumbprint"], tp);
    assert_ne!(
        in_default["space_id"], in_ops["space_id"],
        "one machine record per space"
    );
    assert_eq!(
        api.machines_with("/api/spaces/Staging/machines", &tp).await,
        Vec::<String>::new()
    );
    // The tentacle trusts the server once, however many spaces it is in.
    let trusted = env.config("A").await["trusted_servers"].clone();
    assert_eq!(trusted.as_array().unwrap().len(), 1, "{trusted}");
    assert_eq!(trusted[0]["thumbprint"], server.thumbprint.to_string());

    // A cloned image (another instance with A's certificate) is refused in a
    // space where that thumbprint is in use (the space's name matched in any
    // case), and accepted in another (named by id, through the `--Space` alias).
    env.ok(&["create-instance", "--instance", "B"]).await;
    let (a, b) = (env.config("A").await, env.config("B").await);
    for file in ["certificate", "private_key"] {
        let to = std::path::Path::new(b["tentacle"][file].as_str().unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(a["tentacle"][file].as_str().unwrap(), to).unwrap();
    }
    let b_tp = env.ok(&["show-thumbprint", "--instance", "B"]).await;
    assert_eq!(b_tp.trim(), tp);
    for space in [None, Some("ops team")] {
        let args = match space {
            None => register(&api, "B", "b1"),
            Some(s) => with(register(&api, "B", "b1"), &["--space", s]),
        };
        let err = env.fails(&args).await;
        assert!(
            err.contains("already used by machine a1") && err.contains("cloned"),
            "{space:?}: {err}"
        );
    }
    let staging_id = format!("Spaces-{staging}");
    let out = env
        .ok(&with(register(&api, "B", "b1"), &["--Space", &staging_id]))
        .await;
    assert!(out.contains("Registered 'b1'"), "{out}");
    assert_eq!(
        api.machines_with("/api/spaces/Staging/machines", &tp).await,
        ["b1"]
    );
    assert_eq!(api.machines_with("/api/machines", &tp).await, ["a1"]);
    assert_eq!(
        api.machines_with("/api/spaces/Ops%20Team/machines", &tp)
            .await,
        ["a1"]
    );

    // A space that does not exist: nothing registered, and the message names
    // the space and how to list or create spaces.
    let err = env
        .fails(&with(register(&api, "A", "a1"), &["--space", "Nope"]))
        .await;
    assert!(
        err.contains("space 'Nope' does not exist")
            && err.contains("octopus space list")
            && err.contains("octopus space create Nope"),
        "{err}"
    );
    let err = env
        .fails(&with(register(&api, "A", "a1"), &["--space", "No Such"]))
        .await;
    assert!(
        err.contains("space 'No Such'") && err.contains("octopus space create 'No Such'"),
        "{err}"
    );
    let err = env
        .fails(&with(register(&api, "A", "a1"), &["--space", " "]))
        .await;
    assert!(err.contains("--space is empty"), "{err}");

    // Leaving "Ops Team": the machine goes from that space only, and the
    // tentacle keeps trusting the server it is still registered with.
    let (status, _) = api
        .call(
            reqwest::Method::DELETE,
            "/api/spaces/Staging/machines/b1",
            None,
        )
        .await;
    assert_eq!(status, 204);
    let err = env
        .fails(&[
            "deregister-from",
            "--instance",
            "A",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "--space",
            "Nope",
        ])
        .await;
    assert!(
        err.contains("space 'Nope' does not exist") && err.contains("octopus space list"),
        "{err}"
    );
    let out = env
        .ok(&[
            "deregister-from",
            "--instance",
            "A",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "--space",
            "Ops Team",
        ])
        .await;
    assert!(
        out.contains("Removed a1") && out.contains("in space 'Ops Team'"),
        "{out}"
    );
    assert!(
        out.contains("still registered") && out.contains("'a1' in space 'Default'"),
        "{out}"
    );
    assert_eq!(
        api.machines_with("/api/spaces/Ops%20Team/machines", &tp)
            .await,
        Vec::<String>::new()
    );
    assert_eq!(api.machines_with("/api/machines", &tp).await, ["a1"]);
    let trusted = env.config("A").await["trusted_servers"].clone();
    assert_eq!(trusted.as_array().unwrap().len(), 1, "{trusted}");

    // Leaving the Default space too: now the tentacle stops trusting the server.
    let out = env
        .ok(&[
            "deregister-from",
            "--instance",
            "A",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
        ])
        .await;
    assert!(
        out.contains("Removed a1") && out.contains("no longer trusts"),
        "{out}"
    );
    assert_eq!(
        api.machines_with("/api/machines", &tp).await,
        Vec::<String>::new()
    );
    let trusted = env.config("A").await["trusted_servers"].clone();
    assert!(trusted.as_array().is_none_or(Vec::is_empty), "{trusted}");

    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_polling_tentacles_in_a_space() {
    let env = Env {
        dir: tempfile::tempdir().unwrap(),
    };
    let (server, api, _) = server(&env).await;

    // A worker in "Ops Team": there, and not in the Default space.
    let tp = env.new_instance("W").await;
    let worker = |space: &'static str| {
        vec![
            "register-worker",
            "--instance",
            "W",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "--worker-pool",
            "Builders",
            "--name",
            "w1",
            "--public-hostname",
            "127.0.0.1",
            "--space",
            space,
        ]
    };
    let err = env.fails(&worker("Nope")).await;
    assert!(
        err.contains("space 'Nope' does not exist") && err.contains("octopus space create Nope"),
        "{err}"
    );
    let out = env.ok(&worker("Ops Team")).await;
    assert!(out.contains("in space 'Ops Team'"), "{out}");
    let (status, m) = api.get("/api/spaces/Ops%20Team/machines/w1").await;
    assert_eq!(status, 200, "{m}");
    assert_eq!(m["worker_pool"], "Builders");
    assert_eq!(m["thumbprint"], tp);
    assert_eq!(m["environments"], json!([]));
    let (status, _) = api.get("/api/machines/w1").await;
    assert_eq!(status, 404, "the worker is not in the Default space");

    // A polling tentacle in two spaces polls the server once, with one
    // subscription the server knows in both.
    let tp = env.new_instance("P").await;
    let polling = |space: Option<&'static str>| {
        let mut args = vec![
            "register-with",
            "--instance",
            "P",
            "--server",
            &api.base,
            "--api-key",
            &api.key,
            "--environment",
            "Test",
            "--name",
            "p1",
            "--comms-style",
            "TentacleActive",
        ];
        if let Some(s) = space {
            args.extend(["--space", s]);
        }
        args
    };
    env.ok(&polling(None)).await;
    env.ok(&polling(Some("Ops Team"))).await;
    let cfg = env.config("P").await;
    let polls = cfg["polling_servers"].as_array().unwrap();
    assert_eq!(polls.len(), 1, "{cfg}");
    let uri = format!("poll://{}/", polls[0]["subscription_id"].as_str().unwrap());
    for path in ["/api/machines/p1", "/api/spaces/Ops%20Team/machines/p1"] {
        let (status, m) = api.get(path).await;
        assert_eq!(status, 200, "{path}: {m}");
        assert_eq!(m["uri"], uri, "{path}");
        assert_eq!(m["thumbprint"], tp, "{path}");
    }

    server.stop().await;
}
