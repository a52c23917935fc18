//! The portal in a real browser (headless Chromium over WebDriver) against a
//! real server with real tentacles: the flows a person walks through, with
//! screenshots of the main pages saved under `target/screenshots/`.
#![allow(clippy::unwrap_used)]

mod browser;

use browser::lab::Lab;
use browser::Chrome;
use serde_json::json;

/// The Default space's pages.
const D: &str = "/spaces/Default";

/// Signs in, checks health of all targets and sees both Healthy; adds a
/// listening tentacle through Discover; checks its health from its
/// Connectivity section and watches the task reach Success without a reload;
/// cancels a running task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_health_discover_and_tasks() {
    let mut lab = Lab::new().await;
    let (disc_port, disc_tp) = lab.tentacle("db-1", true, false);
    let web = Chrome::start(&lab.base).await;
    let (user, password) = lab.admin.clone();

    // Signed out: the login page, then back where we were going.
    web.open(&format!("{D}/targets")).await;
    web.wait_path("/login").await;
    web.fill("#username", &user).await;
    web.fill("#password", &password).await;
    web.click("#sign-in").await;
    web.wait_path(&format!("{D}/targets")).await;

    // A fresh tentacle has no deployment tool: its health has a warning that
    // says so. Upgrade the tool on all, then check health of all: the task
    // pages go live to Success, and both targets are Healthy.
    let health = web.text("#targets tr[data-name=\"web-1\"] .health").await;
    assert!(health.ends_with("Unknown"), "before any check: {health}");
    web.click("#upgrade-all").await;
    web.accept_dialog().await;
    web.wait_path(&format!("{D}/tasks/ServerTasks-")).await;
    web.wait_text("#task-state", "Success", |t| t == "Success")
        .await;
    web.open(&format!("{D}/targets")).await;
    web.click("#check-all").await;
    web.wait_path(&format!("{D}/tasks/ServerTasks-")).await;
    web.wait_text("#task-state", "Success", |t| t == "Success")
        .await;
    web.open(&format!("{D}/targets")).await;
    for name in ["web-1", "web-2"] {
        let health = web
            .text(&format!("#targets tr[data-name=\"{name}\"] .health"))
            .await;
        assert!(health.ends_with(" Healthy"), "{name}: {health}");
    }
    web.screenshot("targets").await;
    web.open(&format!("{D}/")).await;
    web.wait_text("main", "the dashboard", |t| t.contains("2 Healthy"))
        .await;
    web.screenshot("dashboard").await;

    // Add a listening tentacle: thumbprint and commands, Discover, confirm, save.
    web.open(&format!("{D}/targets")).await;
    web.click("#add-target").await;
    web.click("#listening-linux").await;
    let server_tp = web.text("#server-thumbprint").await;
    assert_eq!(server_tp, lab.server.thumbprint.to_string());
    let commands = web.text("#listening-commands").await;
    assert!(
        commands.contains(&format!("--trust {server_tp}")),
        "{commands}"
    );
    web.fill("#host", "127.0.0.1").await;
    web.fill("#port", &disc_port.to_string()).await;
    web.click("#discover").await;
    let shown = web.text("#discovered-thumbprint").await;
    assert_eq!(shown, disc_tp, "the thumbprint the tentacle presents");
    web.fill("#name", "db-1").await;
    web.click("input[name=environments][value=Test]").await;
    web.fill("#roles", "db, web").await;
    web.screenshot("add-listening-target").await;
    web.click("#save").await;
    web.wait_path(&format!("{D}/targets/db-1?added=1")).await;
    web.find("#added").await;
    let (s, m) = lab.api("GET", "/api/machines/db-1", None).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["thumbprint"], json!(disc_tp));
    assert_eq!(m["roles"], json!(["db", "web"]));

    // Its Connectivity: Check health; the task page reaches Success live.
    web.click("#check-health").await;
    web.wait_path(&format!("{D}/tasks/ServerTasks-")).await;
    web.mark().await;
    web.wait_text("#task-state", "Success", |t| t == "Success")
        .await;
    web.wait_text("#log", "the health line", |t| t.contains("db-1: Healthy"))
        .await;
    assert!(web.same_page().await, "the task page reloaded");
    web.screenshot("task").await;

    // The target page now knows its OS and free disk.
    web.open(&format!("{D}/targets/db-1")).await;
    let facts = web.text("dl.facts").await;
    assert!(facts.contains("linux"), "{facts}");
    assert!(facts.contains("GiB") || facts.contains("MiB"), "{facts}");
    web.screenshot("target").await;

    // Cancel a running task from its page.
    let (s, b) = lab
        .api(
            "POST",
            "/api/tasks/script",
            Some(json!({"machines": ["web-1"], "script": "echo started; sleep 120"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let id = b["task"]["id"].as_str().unwrap().to_string();
    web.open(&format!("{D}/tasks/{id}")).await;
    web.wait_text("#log", "the script's first line", |t| t.contains("started"))
        .await;
    web.click("#cancel").await;
    web.accept_dialog().await;
    web.wait_text("#task-state", "Canceled", |t| t == "Canceled")
        .await;
    let v = lab.wait_task(&id).await;
    assert_eq!(v["task"]["state"], json!("Canceled"));

    // The tasks list, newest first.
    web.open(&format!("{D}/tasks")).await;
    let first = web.text("#tasks tbody tr th").await;
    assert_eq!(first, id);
    web.screenshot("tasks").await;
}

/// Adds a polling tentacle from its page: the command, with a key made for
/// it, works as printed, and the page notices the tentacle connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_tentacle_registers_with_the_printed_command() {
    let mut lab = Lab::new().await;
    let web = Chrome::start(&lab.base).await;
    web.sign_in(&lab.admin.0, &lab.admin.1).await;
    web.open(&format!("{D}/targets/new")).await;
    web.click("#polling-linux").await;
    web.wait_path(&format!("{D}/targets/new/polling")).await;
    let before = web.text("#polling-command").await;
    assert!(before.contains("--api-key API-KEY"), "{before}");
    web.click("#make-key").await;
    web.find("#key-notice").await;
    let command = web.text("#polling-command").await;
    assert!(
        !command.contains("API-KEY"),
        "no key in the command: {command}"
    );
    assert!(
        command.contains(&lab.server.thumbprint.to_string()),
        "{command}"
    );
    assert!(
        command.contains(&format!(":{}", lab.server.comms_port)),
        "{command}"
    );
    web.screenshot("add-polling-target").await;
    web.mark().await;

    // The commands as printed, for an instance of our own (not the service:
    // the lab runs it).
    let script: String = command
        .replace("\\\n", " ")
        .lines()
        .filter(|l| !l.contains(" service "))
        .map(|l| {
            l.replace("--instance Tentacle", "--instance edge-1")
                .replace(
                    "--environment ENVIRONMENT",
                    "--environment Test --name edge-1",
                )
                .replace("--role ROLE", "--role edge")
        })
        .collect::<Vec<_>>()
        .join("\n");
    lab.shell(&script);
    lab.run_agent("edge-1");
    let done = web
        .wait_text("#polling-wait", "connected", |t| {
            t.contains("registered and connected")
        })
        .await;
    assert!(done.contains("edge-1"), "{done}");
    assert!(web.same_page().await, "the page reloaded");
    web.click("#polling-wait a").await;
    web.wait_path(&format!("{D}/targets/edge-1")).await;
    let (s, m) = lab.api("GET", "/api/machines/edge-1", None).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["roles"], json!(["edge"]));
}

/// Runs a script from the console and sees its lines arrive while it runs;
/// uploads a package (with its progress) and deploys it to both tentacles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_upload_and_deploy() {
    let lab = Lab::new().await;
    let web = Chrome::start(&lab.base).await;
    web.sign_in(&lab.admin.0, &lab.admin.1).await;

    // The script prints a line, then waits for this test's word to go on: the
    // first line must be on the page while the task still runs.
    let go = lab.dir.path().join("go");
    web.open(&format!("{D}/console")).await;
    web.select("#c-environment", "Test").await;
    web.fill("#c-role", "web").await;
    web.fill(
        "#c-script",
        &format!(
            "echo first-line-from-$(hostname)\nwhile [ ! -e {go} ]; do sleep 0.05; done\necho second-line",
            go = go.display()
        ),
    )
    .await;
    web.screenshot("console").await;
    web.click("#run").await;
    web.wait_path(&format!("{D}/tasks/ServerTasks-")).await;
    web.mark().await;
    web.wait_text("#log", "two first lines", |t| {
        t.matches("first-line-from-").count() == 2
    })
    .await;
    assert_eq!(web.text("#task-state").await, "Executing");
    assert!(!web.text("#log").await.contains("second-line"));
    std::fs::write(&go, b"go").unwrap();
    web.wait_text("#task-state", "Success", |t| t == "Success")
        .await;
    web.wait_text("#log", "both second lines", |t| {
        t.matches("second-line").count() == 2
    })
    .await;
    assert!(web.same_page().await, "the task page reloaded");
    // Line numbers link to their line.
    let href = web
        .find("#log li.line a.n")
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap();
    assert!(href.starts_with("#L"), "{href}");
    web.screenshot("task-live").await;

    // Upload a package from the packages page.
    let pkg_dir = lab.dir.path().join("pkg");
    std::fs::create_dir_all(pkg_dir.join("site")).unwrap();
    std::fs::write(pkg_dir.join("site/index.html"), "<h1>Acme</h1>").unwrap();
    let file = lab.dir.path().join("Acme.Web.1.2.3.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&file)
        .arg("-C")
        .arg(pkg_dir.join("site"))
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    web.open(&format!("{D}/packages")).await;
    web.find("#p-file")
        .await
        .send_keys(file.to_str().unwrap())
        .await
        .unwrap();
    web.click("#upload").await;
    web.wait_text("main", "the package listed", |t| {
        t.contains("Acme.Web") && t.contains("1.2.3")
    })
    .await;
    web.screenshot("packages").await;

    // Deploy it to Test.
    web.click("a[href*=\"/deploy\"]").await;
    web.wait_path(&format!("{D}/deploy")).await;
    web.select("#d-environment", "Test").await;
    web.click("#deploy").await;
    web.wait_path(&format!("{D}/tasks/ServerTasks-")).await;
    web.wait_text("#task-state", "Success", |t| t == "Success")
        .await;
    let steps = web.text("#steps").await;
    assert!(
        steps.contains("web-1") && steps.contains("web-2"),
        "{steps}"
    );
}

/// A viewer sees no Run, Check health or Delete, and a request crafted from
/// their session is refused; names with markup show as text; a form posted
/// from another site without the token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_hostile_names_and_cross_site_forms() {
    let lab = Lab::new().await;
    lab.health_check().await;
    let evil_env = "<img src=x onerror=alert(1)>";
    let evil_machine = "<script>alert(2)</script>";
    let (s, b) = lab
        .api("POST", "/api/environments", Some(json!({"name": evil_env})))
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = lab
        .api(
            "POST",
            "/api/machines",
            Some(json!({
                "name": evil_machine,
                "comms_style": "TentaclePassive",
                "uri": "https://127.0.0.1:1/",
                "thumbprint": "AB".repeat(32),
                "environments": [evil_env],
                "roles": ["<b>bold</b>"],
            })),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    lab.user("victor", "victor-password-1", Some("Environment viewer"))
        .await;

    let web = Chrome::start(&lab.base).await;
    web.sign_in("victor", "victor-password-1").await;
    let nav = web.text("header nav").await;
    assert!(nav.contains("Deployment targets"), "{nav}");
    assert!(
        !nav.contains("Script console"),
        "a viewer is offered the console: {nav}"
    );
    web.open(&format!("{D}/targets/web-1")).await;
    web.find("#connectivity").await;
    for action in [
        "#check-health",
        "#delete",
        "#save-settings",
        "#upgrade-tool",
    ] {
        assert!(!web.has(action).await, "a viewer sees {action}");
    }
    web.open(&format!("{D}/targets")).await;
    for action in ["#check-all", "#upgrade-all", "#add-target"] {
        assert!(!web.has(action).await, "a viewer sees {action}");
    }
    // Crafted requests from the viewer's own session, with a valid token: 403.
    for (path, body) in [
        (format!("{D}/targets/web-1/delete"), ""),
        (format!("{D}/targets/check-health"), ""),
        (format!("{D}/targets/web-1/settings"), "roles=x"),
    ] {
        let status = web.fetch_status("POST", &path, body, true).await;
        assert_eq!(status, 403, "POST {path} as a viewer");
    }
    let (s, _) = lab.api("GET", "/api/machines/web-1", None).await;
    assert_eq!(s, 200, "web-1 is still there");

    // Markup in names is text: no dialog, no element made of it.
    for page in [
        format!("{D}/"),
        format!("{D}/targets"),
        format!("{D}/targets?environment={}", urlencode(evil_env)),
        format!("{D}/targets/{}", urlencode(evil_machine)),
    ] {
        web.open(&page).await;
        web.find("main").await;
        assert!(!web.dialog_open().await, "a dialog opened on {page}");
        assert!(!web.has("main img").await, "an <img> was made on {page}");
        assert!(!web.has("main b").await, "a <b> was made on {page}");
        let text = web.text("main").await;
        assert!(
            text.contains(evil_env) || text.contains(evil_machine),
            "{page} does not show the names as text: {text}"
        );
    }
    web.screenshot("hostile-names").await;

    // A form on another site that posts to the portal without the token.
    let (attacker, _guard) = attacker_page(&format!(
        "<form method=post action=\"{}{D}/targets/web-1/delete\"><button id=go>Win a prize</button></form>",
        lab.base
    ))
    .await;
    let admin = Chrome::start(&lab.base).await;
    admin.sign_in(&lab.admin.0, &lab.admin.1).await;
    admin.c.goto(&attacker).await.unwrap();
    admin.click("#go").await;
    admin
        .wait_text("body", "the refusal", |t| t.contains("security token"))
        .await;
    let (s, _) = lab.api("GET", "/api/machines/web-1", None).await;
    assert_eq!(s, 200, "web-1 was deleted by a cross-site form");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Serves `html` at `http://127.0.0.1:PORT/` (another origin than the portal).
async fn attacker_page(html: &str) -> (String, tokio_util::sync::DropGuard) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let page = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
        html.len()
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let guard = stop.clone().drop_guard();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                () = stop.cancelled() => return,
            };
            let Ok((mut sock, _)) = conn else { continue };
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock.write_all(page.as_bytes()).await;
            });
        }
    });
    (url, guard)
}
