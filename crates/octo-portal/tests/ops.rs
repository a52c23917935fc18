//! The portal's operations pages, over HTTP against a real server:
//! environments (add, rename, move, delete, and the refusal while a machine
//! uses one), workers, the script console (a run, and a scoped deployer's
//! refusal with no task created), the package feed (upload with the CSRF
//! header, list, delete), the deploy form, escaping, and a viewer who sees no
//! controls and whose crafted posts are refused.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Browser, Portal, T};
use serde_json::{json, Value};

const ENVS: &str = "/spaces/Default/environments";

/// A made-up thumbprint, one per name.
fn thumbprint(name: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(name.as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// A listening machine that does not exist (nothing listens on port 1).
async fn fake_machine(p: &Portal, name: &str, environments: &[&str], pool: Option<&str>) {
    let (status, body) = p
        .api(
            "POST",
            "/api/machines",
            Some(json!({
                "name": name,
                "comms_style": "TentaclePassive",
                "uri": "https://127.0.0.1:1/",
                "thumbprint": thumbprint(name),
                "environments": environments,
                "roles": ["web"],
                "worker_pool": pool,
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

async fn env_names(p: &Portal) -> Vec<String> {
    let (status, body) = p.api("GET", "/api/environments", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

async fn task_count(p: &Portal) -> usize {
    let (status, body) = p.api("GET", "/api/tasks", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().len()
}

async fn add_env(b: &Browser, name: &str) {
    let r = b.submit(ENVS, ENVS, &[("name", name)]).await;
    assert_eq!(r.status, 303, "adding {name}: {}", r.body);
    assert_eq!(r.location.as_deref(), Some(ENVS));
}

/// A path segment as the portal encodes it.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_added_renamed_moved_and_deleted() {
    let p = Portal::start().await;
    let password = p.user("manager", Some("Space manager")).await;
    let b = p.browser("manager", &password).await;

    let page = b.get(ENVS).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("No environment yet"), "{}", page.body);
    assert!(page.body.contains("Add an environment"));

    for name in ["Test", "Production", "Staging"] {
        add_env(&b, name).await;
    }
    assert_eq!(env_names(&p).await, ["Test", "Production", "Staging"]);

    // A duplicate: the refusal on the page, the field kept.
    let dup = b.submit(ENVS, ENVS, &[("name", "Test")]).await;
    assert_eq!(dup.status, 409, "{}", dup.body);
    assert!(dup.body.contains("role=\"alert\""), "{}", dup.body);
    assert_eq!(dup.input("name").as_deref(), Some("Test"));
    let empty = b.submit(ENVS, ENVS, &[("name", "  ")]).await;
    assert_eq!(empty.status, 400, "{}", empty.body);

    // Rename, then move up and down.
    let r = b
        .submit(
            ENVS,
            &format!("{ENVS}/Staging/rename"),
            &[("name", "Stage")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(env_names(&p).await, ["Test", "Production", "Stage"]);
    let r = b
        .submit(ENVS, &format!("{ENVS}/Stage/move"), &[("direction", "up")])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(env_names(&p).await, ["Test", "Stage", "Production"]);
    let r = b
        .submit(ENVS, &format!("{ENVS}/Test/move"), &[("direction", "down")])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(env_names(&p).await, ["Stage", "Test", "Production"]);
    // The first cannot go further up: nothing changes.
    let r = b
        .submit(ENVS, &format!("{ENVS}/Stage/move"), &[("direction", "up")])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(env_names(&p).await, ["Stage", "Test", "Production"]);
    let page = b.get(ENVS).await;
    let (s, t, pr) = (
        page.body.find(">Stage</a>").unwrap(),
        page.body.find(">Test</a>").unwrap(),
        page.body.find(">Production</a>").unwrap(),
    );
    assert!(s < t && t < pr, "the page follows the space's order");
    assert!(page
        .body
        .contains("href=\"/spaces/Default/targets?environment=Production\""));

    // In use: the refusal names the machine; the count and health show.
    fake_machine(&p, "web-1", &["Production"], None).await;
    let page = b.get(ENVS).await;
    assert!(page.body.contains("1 Unknown"), "{}", page.body);
    let refused = b
        .submit(ENVS, &format!("{ENVS}/Production/delete"), &[])
        .await;
    assert_eq!(refused.status, 422, "{}", refused.body);
    assert!(
        refused.body.contains("role=\"alert\"") && refused.body.contains("web-1"),
        "{}",
        refused.body
    );
    assert!(env_names(&p).await.contains(&"Production".to_string()));
    let gone = b.submit(ENVS, &format!("{ENVS}/Stage/delete"), &[]).await;
    assert_eq!(gone.status, 303, "{}", gone.body);
    assert_eq!(env_names(&p).await, ["Test", "Production"]);

    // A name that is markup stays text; its links are encoded.
    let evil = "<img src=x onerror=alert(1)>";
    add_env(&b, evil).await;
    let page = b.get(ENVS).await;
    assert!(!page.body.contains("<img src=x"), "{}", page.body);
    assert!(
        page.body.contains("&#60;img src=x onerror=alert(1)&#62;")
            || page.body.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{}",
        page.body
    );
    assert!(page.body.contains(&format!("{ENVS}/{}/rename", enc(evil))));
    let r = b
        .submit(ENVS, &format!("{ENVS}/{}/delete", enc(evil)), &[])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(env_names(&p).await, ["Test", "Production"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_listed_with_their_pools() {
    let p = Portal::start().await;
    let password = p.user("viewer", Some("Environment viewer")).await;
    fake_machine(&p, "builder-1", &[], Some("Builders")).await;
    let (s, b) = p
        .api("POST", "/api/environments", Some(json!({"name": "Test"})))
        .await;
    assert_eq!(s, 201, "{b}");
    fake_machine(&p, "web-1", &["Test"], None).await;
    let b = p.browser("viewer", &password).await;
    let page = b.get("/spaces/Default/workers").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("Builders"), "{}", page.body);
    assert!(page
        .body
        .contains("href=\"/spaces/Default/targets/builder-1\""));
    assert!(page.body.contains("Unknown") && page.body.contains("Listening"));
    assert!(!page.body.contains("web-1"), "a target is no worker");
    let none = b.get("/spaces/Default/workers?name=nothing").await;
    assert!(none.body.contains("No worker matches"), "{}", none.body);
    let bad = b.get("/spaces/Default/workers?health=purple").await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("role=\"alert\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_scripts_within_the_callers_scope() {
    let p = Portal::start().await;
    for env in ["Test", "Production"] {
        let (s, b) = p
            .api("POST", "/api/environments", Some(json!({"name": env})))
            .await;
        assert_eq!(s, 201, "{b}");
    }
    fake_machine(&p, "test-1", &["Test"], None).await;
    fake_machine(&p, "prod-1", &["Production"], None).await;

    // An administrator runs a script: to the task's page.
    let password = p.user("admin2", Some("System administrator")).await;
    let admin = p.browser("admin2", &password).await;
    let form = admin.get("/spaces/Default/console").await;
    assert_eq!(form.status, 200, "{}", form.body);
    assert!(form.body.contains("prod-1") && form.body.contains("test-1"));
    assert!(
        form.body.contains("<option value=\"web\">"),
        "roles offered"
    );
    let run = admin
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "machines"),
                ("machines", "prod-1"),
                ("machines", "test-1"),
                ("syntax", "bash"),
                ("script", "echo hello"),
                ("variables", "GREETING=hi"),
                ("secret_name", "TOKEN"),
                ("secret_value", "s3cret-value"),
            ],
        )
        .await;
    assert_eq!(run.status, 303, "{}", run.body);
    let to = run.location.unwrap();
    assert!(to.starts_with("/spaces/Default/tasks/ServerTasks-"), "{to}");
    let id = to.rsplit('/').next().unwrap();
    let (s, task) = p.api("GET", &format!("/api/tasks/{id}"), None).await;
    assert_eq!(s, 200, "{task}");
    assert_eq!(task["task"]["kind"], "Script", "{task}");
    assert!(!task.to_string().contains("s3cret-value"));
    // By environment and role.
    let run = admin
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "filter"),
                ("environment", "Test"),
                ("role", "web"),
                ("syntax", "sh"),
                ("script", "true"),
            ],
        )
        .await;
    assert_eq!(run.status, 303, "{}", run.body);
    // No machine matches: the API's reason, the fields kept.
    let none = admin
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "filter"),
                ("role", "db"),
                ("syntax", "python3"),
                ("script", "print('kept')"),
                ("secret_name", "TOKEN"),
                ("secret_value", "never-shown-again"),
            ],
        )
        .await;
    assert_eq!(none.status, 422, "{}", none.body);
    assert!(none.body.contains("no machine has role"), "{}", none.body);
    assert!(none.body.contains("print(&#39;kept&#39;)"), "{}", none.body);
    assert!(
        none.body.contains("value=\"python3\" checked"),
        "{}",
        none.body
    );
    assert!(none.body.contains("value=\"TOKEN\""));
    assert!(!none.body.contains("never-shown-again"));

    // A deployer scoped to Test: Production is out of reach; nothing starts.
    p.user("deployer", None).await;
    for (method, path, body) in [
        ("POST", "/api/teams", json!({"name": "deployers"})),
        (
            "POST",
            "/api/teams/deployers/members",
            json!({"username": "deployer"}),
        ),
        (
            "POST",
            "/api/teams/deployers/grants",
            json!({"role": "Project deployer", "environments": ["Test"]}),
        ),
    ] {
        let (s, b) = p.api(method, path, Some(body)).await;
        assert!(s == 200 || s == 201, "{path}: {b}");
    }
    let deployer = p.browser("deployer", "deployer-password-1").await;
    let form = deployer.get("/spaces/Default/console").await;
    assert_eq!(form.status, 200, "{}", form.body);
    assert!(form.body.contains("test-1") && !form.body.contains("prod-1"));
    let before = task_count(&p).await;
    let refused = deployer
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "filter"),
                ("environment", "Production"),
                ("syntax", "bash"),
                ("script", "rm -rf /tmp/x"),
            ],
        )
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("role=\"alert\"") && refused.body.contains("Nothing was started"),
        "{}",
        refused.body
    );
    assert!(refused.body.contains("rm -rf /tmp/x"), "the script is kept");
    let by_name = deployer
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "machines"),
                ("machines", "prod-1"),
                ("syntax", "bash"),
                ("script", "true"),
            ],
        )
        .await;
    assert_eq!(by_name.status, 404, "{}", by_name.body);
    assert!(by_name.body.contains("role=\"alert\""));
    assert_eq!(task_count(&p).await, before, "no task was created");
    // Within scope it runs.
    let ok = deployer
        .submit(
            "/spaces/Default/console",
            "/spaces/Default/console",
            &[
                ("target", "machines"),
                ("machines", "test-1"),
                ("syntax", "bash"),
                ("script", "true"),
            ],
        )
        .await;
    assert_eq!(ok.status, 303, "{}", ok.body);
}

/// A gzip stream of nothing: enough for the feed to see a tar.gz.
fn tiny_tar_gz() -> Vec<u8> {
    vec![
        0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03, 0x03, 0x00, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

async fn upload(b: &Browser, file_name: &str, csrf: Option<&str>) -> (u16, Value) {
    let mut req = b
        .http
        .post(format!(
            "{}/spaces/Default/packages/upload?file_name={file_name}",
            b.base
        ))
        .header("Content-Type", "application/octet-stream")
        .body(tiny_tar_gz())
        .timeout(T);
    if let Some(token) = csrf {
        req = req.header("X-CSRF-Token", token);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packages_are_uploaded_listed_deployed_and_deleted() {
    let p = Portal::start().await;
    let (s, body) = p
        .api("POST", "/api/environments", Some(json!({"name": "Test"})))
        .await;
    assert_eq!(s, 201, "{body}");
    let password = p.user("publisher", Some("Space manager")).await;
    let b = p.browser("publisher", &password).await;
    let page = b.get("/spaces/Default/packages").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page
        .body
        .contains("data-upload=\"/spaces/Default/packages/upload\""));
    assert!(page.body.contains("<progress") && page.body.contains("data-upload-status"));
    let csrf = page.csrf();
    // The upload form sent without the script: no file, a notice instead.
    let no_js = b
        .get("/spaces/Default/packages?file=Acme.Web.1.0.0.tar.gz")
        .await;
    assert_eq!(no_js.status, 200);
    assert!(
        no_js.body.contains("The file was not sent"),
        "{}",
        no_js.body
    );

    // Without the token: refused, nothing stored.
    let (s, _) = upload(&b, "Acme.Web.1.0.0.tar.gz", None).await;
    assert_eq!(s, 403);
    let (s, _) = upload(
        &b,
        "Acme.Web.1.0.0.tar.gz",
        Some("0123456789abcdef0123456789abcdef"),
    )
    .await;
    assert_eq!(s, 403);
    let (_, list) = p.api("GET", "/api/packages", None).await;
    assert_eq!(list.as_array().unwrap().len(), 0);

    // With it: stored, the API's answer.
    let (s, reply) = upload(&b, "Acme.Web.1.0.0.tar.gz", Some(&csrf)).await;
    assert_eq!(s, 201, "{reply}");
    assert_eq!(reply["outcome"], "created");
    assert_eq!(reply["package"]["package_id"], "Acme.Web");
    let (s, again) = upload(&b, "Acme.Web.1.0.0.tar.gz", Some(&csrf)).await;
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["outcome"], "unchanged");
    let (s, bad) = upload(&b, "notes.txt", Some(&csrf)).await;
    assert_eq!(s, 400, "{bad}");
    assert!(bad["error"].is_string(), "{bad}");

    let page = b.get("/spaces/Default/packages").await;
    assert!(
        page.body.contains("Acme.Web") && page.body.contains("1.0.0"),
        "{}",
        page.body
    );
    assert!(page.body.contains("tar.gz"));
    let sha = reply["package"]["sha256"].as_str().unwrap();
    assert!(page.body.contains(&sha[..12]));
    assert!(page
        .body
        .contains("href=\"/spaces/Default/deploy?package=Acme.Web\""));

    // The deploy form offers it; a deployment either starts or says why not.
    let form = b.get("/spaces/Default/deploy?package=Acme.Web").await;
    assert_eq!(form.status, 200, "{}", form.body);
    assert!(
        form.body.contains("value=\"Acme.Web\" selected"),
        "{}",
        form.body
    );
    assert!(form.body.contains("<option value=\"Test\""));
    let missing = b
        .submit(
            "/spaces/Default/deploy",
            "/spaces/Default/deploy",
            &[("package", ""), ("environment", "Test")],
        )
        .await;
    assert_eq!(missing.status, 400, "{}", missing.body);
    assert!(missing.body.contains("role=\"alert\""));
    let deploy = b
        .submit(
            "/spaces/Default/deploy",
            "/spaces/Default/deploy",
            &[
                ("package", "Acme.Web"),
                ("version", "latest"),
                ("environment", "Test"),
                ("retention", "2"),
                ("variables", "A=1"),
            ],
        )
        .await;
    // No machine is in Test: the API's reason, on the form.
    assert_eq!(deploy.status, 422, "{}", deploy.body);
    assert!(deploy.body.contains("role=\"alert\""), "{}", deploy.body);
    assert!(deploy.body.contains("A=1"));

    // Deleted from the page.
    let del = b
        .submit(
            "/spaces/Default/packages",
            "/spaces/Default/packages/Acme.Web/1.0.0/delete",
            &[],
        )
        .await;
    assert_eq!(del.status, 303, "{}", del.body);
    assert_eq!(del.location.as_deref(), Some("/spaces/Default/packages"));
    let (_, list) = p.api("GET", "/api/packages", None).await;
    assert_eq!(list.as_array().unwrap().len(), 0);
    let page = b.get("/spaces/Default/packages").await;
    assert!(page.body.contains("The feed is empty"));
    let again = b
        .submit(
            "/spaces/Default/packages",
            "/spaces/Default/packages/Acme.Web/1.0.0/delete",
            &[],
        )
        .await;
    assert_eq!(again.status, 404, "{}", again.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_controls_and_is_refused() {
    let p = Portal::start().await;
    let (s, body) = p
        .api("POST", "/api/environments", Some(json!({"name": "Test"})))
        .await;
    assert_eq!(s, 201, "{body}");
    fake_machine(&p, "test-1", &["Test"], None).await;
    let password = p.user("viewer", Some("Environment viewer")).await;
    let b = p.browser("viewer", &password).await;

    let page = b.get(ENVS).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains(">Test</a>"));
    for control in [
        "Add an environment",
        "Rename",
        "Move ",
        "Delete",
        "/delete",
        "/rename",
    ] {
        assert!(!page.body.contains(control), "{control}: {}", page.body);
    }
    assert!(
        !page.body.contains("/console\""),
        "no console in the navigation"
    );
    let console = b.get("/spaces/Default/console").await;
    assert_eq!(console.status, 403);
    let packages = b.get("/spaces/Default/packages").await;
    assert_eq!(packages.status, 403);
    let deploy = b.get("/spaces/Default/deploy").await;
    assert_eq!(deploy.status, 403);

    // Crafted posts, with a valid token: refused.
    let before = task_count(&p).await;
    for (action, fields) in [
        (ENVS.to_string(), vec![("name", "Sneaky")]),
        (format!("{ENVS}/Test/rename"), vec![("name", "Renamed")]),
        (format!("{ENVS}/Test/move"), vec![("direction", "down")]),
        (format!("{ENVS}/Test/delete"), vec![]),
        (
            "/spaces/Default/console".to_string(),
            vec![
                ("target", "machines"),
                ("machines", "test-1"),
                ("script", "true"),
            ],
        ),
        (
            "/spaces/Default/deploy".to_string(),
            vec![("package", "Acme.Web"), ("environment", "Test")],
        ),
        (
            "/spaces/Default/packages/Acme.Web/1.0.0/delete".to_string(),
            vec![],
        ),
    ] {
        let r = b.submit(ENVS, &action, &fields).await;
        assert_eq!(r.status, 403, "{action}: {}", r.body);
    }
    let (s, _) = upload(&b, "Acme.Web.1.0.0.tar.gz", Some(&page.csrf())).await;
    assert_eq!(s, 403);
    assert_eq!(env_names(&p).await, ["Test"]);
    assert_eq!(task_count(&p).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_form_says_which_policies_keep_tentacles_up_to_date() {
    let p = Portal::start().await;
    let (s, b) = p
        .api(
            "POST",
            "/api/machine-policies",
            Some(json!({"name": "Keep up", "tentacle_update": "Always"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    fake_machine(&p, "builder-1", &[], Some("Builders")).await;
    let password = p.user("manager", Some("Space manager")).await;
    let b = p.browser("manager", &password).await;
    let page = b.get("/spaces/Default/targets/builder-1").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains("<option value=\"Keep up\">Keep up (keeps tentacles up to date)</option>"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(">Default Machine Policy</option>"),
        "{}",
        page.body
    );
}

/// The target page's "Upgrade tentacle" form starts a tentacle upgrade task
/// for that machine (the server carries a stand-in tentacle binary that
/// reports version 9.9.9); a viewer's crafted post is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_tentacle_form_starts_an_upgrade_task() {
    let p = Portal::start_configured(|args, dir| {
        let fake = dir.join("tentacle");
        std::fs::write(&fake, "#!/bin/sh\necho '{\"version\":\"9.9.9\"}'\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        args.tentacle = Some(fake);
    })
    .await;
    let (s, body) = p
        .api("POST", "/api/environments", Some(json!({"name": "Test"})))
        .await;
    assert_eq!(s, 201, "{body}");
    fake_machine(&p, "web-1", &["Test"], None).await;
    let page = "/spaces/Default/targets/web-1";
    let action = "/spaces/Default/targets/web-1/upgrade-tentacle";

    let password = p.user("viewer", Some("Environment viewer")).await;
    let viewer = p.browser("viewer", &password).await;
    let before = task_count(&p).await;
    assert_eq!(viewer.submit(page, action, &[]).await.status, 403);
    assert_eq!(task_count(&p).await, before);

    let password = p.user("manager", Some("Space manager")).await;
    let b = p.browser("manager", &password).await;
    let r = b.submit(page, action, &[]).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let location = r.location.clone().unwrap();
    let id = location.rsplit('/').next().unwrap().to_string();
    assert!(location.starts_with("/spaces/Default/tasks/"), "{location}");
    let (s, task) = p.api("GET", &format!("/api/tasks/{id}"), None).await;
    assert_eq!(s, 200, "{task}");
    assert_eq!(task["task"]["kind"], "TentacleUpgrade", "{task}");
    assert_eq!(task["task"]["arguments"]["version"], "9.9.9", "{task}");
    assert_eq!(task_count(&p).await, before + 1);
}
