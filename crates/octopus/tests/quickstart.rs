//! `octopus quickstart` end to end: server, two real tentacles, registration,
//! health check and a script; exits 0.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

#[test]
fn quickstart_exits_zero_with_both_tentacles_healthy_and_the_script_run() {
    let octopus = PathBuf::from(env!("CARGO_BIN_EXE_octopus"));
    let tentacle = octopus.with_file_name("tentacle");
    assert!(
        tentacle.exists(),
        "{} is missing: build it first (`cargo build -p octo-tentacle`; `cargo test --workspace` does)",
        tentacle.display()
    );
    let child = Command::new(&octopus)
        .args(["quickstart", "--tentacle", tentacle.to_str().unwrap()])
        .env_remove("OCTOPUS_URL")
        .env_remove("OCTOPUS_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("quickstart did not finish within 120 s");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "quickstart-listening  Healthy",
        "quickstart-polling    Healthy",
        "[quickstart-listening] Hello from Listening",
        "[quickstart-polling] Hello from Polling",
        "Everything works.",
        "Web portal: http://127.0.0.1:",
        "Stopped the server and both tentacles.",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}

/// `quickstart --keep` prints the portal's address and a login that works;
/// Ctrl-C (SIGINT) stops it.
#[test]
fn quickstart_keep_prints_a_portal_login_that_works() {
    use std::io::{BufRead, BufReader};
    let octopus = PathBuf::from(env!("CARGO_BIN_EXE_octopus"));
    let tentacle = octopus.with_file_name("tentacle");
    let dir = tempfile::tempdir().unwrap();
    // Its stderr in a file of the test's own (not under --dir), for a failure's message.
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(&octopus)
        .args(["quickstart", "--keep", "--dir"])
        .arg(dir.path())
        .args(["--tentacle", tentacle.to_str().unwrap()])
        .env_remove("OCTOPUS_URL")
        .env_remove("OCTOPUS_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let interrupt = || {
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    };
    let mut login = None;
    let mut printed = Vec::new();
    loop {
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(why) => {
                interrupt();
                let _ = child.wait();
                panic!(
                    "quickstart --keep printed no portal login ({}):\n{}\nstderr:\n{}",
                    match why {
                        std::sync::mpsc::RecvTimeoutError::Timeout => "nothing within 120 s",
                        std::sync::mpsc::RecvTimeoutError::Disconnected => "it ended",
                    },
                    printed.join("\n"),
                    std::fs::read_to_string(errors.path()).unwrap_or_default()
                );
            }
        };
        printed.push(line.clone());
        if let Some(rest) = line.strip_prefix("Web portal: ") {
            // "URL  user NAME  password PASSWORD  (also in FILE)"
            let words: Vec<&str> = rest.split_whitespace().collect();
            login = Some((
                words[0].to_string(),
                words[2].to_string(),
                words[4].to_string(),
            ));
        }
        if line.starts_with("Running until Ctrl-C") {
            break;
        }
    }
    let (url, user, password) = login.expect("a 'Web portal:' line before 'Running until Ctrl-C'");
    let kept = std::fs::read_to_string(dir.path().join("server/portal-login")).unwrap();
    assert!(kept.contains(&format!("password={password}")), "{kept}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("server/portal-login"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Sign in through the login form, as a browser does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let signed_in = rt.block_on(async {
        let web = reqwest::Client::builder()
            .cookie_store(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let page = web.get(format!("{url}login")).send().await.unwrap();
        let body = page.text().await.unwrap();
        let token = body
            .split("name=\"token\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_string();
        let resp = web
            .post(format!("{url}login"))
            .form(&[
                ("username", user.as_str()),
                ("password", password.as_str()),
                ("next", "/"),
                ("token", token.as_str()),
            ])
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let dashboard = web
            .get(format!("{url}spaces/Default/targets"))
            .send()
            .await
            .unwrap();
        (
            status,
            dashboard.status().as_u16(),
            dashboard.text().await.unwrap(),
        )
    });
    interrupt();
    let (tx2, rx2) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx2.send(child.wait());
    });
    let exit = rx2
        .recv_timeout(Duration::from_secs(60))
        .expect("quickstart stops within 60 s of Ctrl-C")
        .unwrap();
    assert_eq!(signed_in.0, 303, "signing in as {user}");
    assert_eq!(signed_in.1, 200);
    assert!(
        signed_in.2.contains("quickstart-listening"),
        "{}",
        signed_in.2
    );
    assert!(exit.success(), "{exit:?}");
}
