//! A real browser for the portal's tests: Debian's `chromium`, headless,
//! driven over WebDriver (`chromedriver`, started here on a free loopback port)
//! with fantoccini. Every wait is bounded and says what it waited for; pages
//! can be saved as screenshots under `target/screenshots/`.
#![allow(dead_code, clippy::unwrap_used)]

pub mod lab;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// Bound on any one wait for the page.
pub const WAIT: Duration = Duration::from_secs(60);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);

/// A headless Chromium and the chromedriver that drives it.
pub struct Chrome {
    pub c: Client,
    driver: Child,
    _profile: tempfile::TempDir,
    /// The portal's address, `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Drop for Chrome {
    /// Stops chromedriver and the Chromium it started: they share a process
    /// group of their own (killing chromedriver alone left every Chromium
    /// running, orphaned, after the tests).
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.driver.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Where screenshots go: `<target>/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    // target/<profile>/deps/<test>-<hash>
    let me = std::env::current_exe().unwrap();
    let target = me.ancestors().nth(3).unwrap().to_path_buf();
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Chrome {
    /// Starts chromedriver and a headless Chromium session for `base`.
    pub async fn start(base: &str) -> Chrome {
        let driver_bin = which("chromedriver").unwrap_or_else(|| {
            panic!("chromedriver is not installed: `apt-get install chromium chromium-driver` (scripts/test.sh does)")
        });
        let browser_bin = which("chromium").unwrap_or_else(|| {
            panic!("chromium is not installed: `apt-get install chromium chromium-driver` (scripts/test.sh does)")
        });
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        // Ready when its status says so (it starts in well under a second).
        let http = reqwest::Client::new();
        let deadline = Instant::now() + WAIT;
        loop {
            let ready = http
                .get(format!("{url}/status"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()
                .map(|r| r.json::<Value>());
            if let Some(body) = ready {
                if body.await.is_ok_and(|v| v["value"]["ready"] == true) {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not get ready at {url} within {WAIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": browser_bin,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-extensions",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let c = tokio::time::timeout(
            WAIT,
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&url),
        )
        .await
        .expect("a Chromium session within the bound")
        .unwrap_or_else(|e| panic!("starting Chromium through chromedriver: {e}"));
        Chrome {
            c,
            driver,
            _profile: profile,
            base: base.to_string(),
        }
    }

    /// Opens a page of the portal (`path` from `/`).
    pub async fn open(&self, path: &str) {
        self.c.goto(&format!("{}{path}", self.base)).await.unwrap();
    }

    /// The current URL's path and query.
    pub async fn path(&self) -> String {
        let u = self.c.current_url().await.unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        }
    }

    /// The element `css` once it is there.
    pub async fn find(&self, css: &str) -> Element {
        let found = self
            .c
            .wait()
            .at_most(WAIT)
            .every(POLL)
            .for_element(Locator::Css(css))
            .await;
        match found {
            Ok(e) => e,
            Err(e) => panic!("no `{css}` on {} within {WAIT:?}: {e}", self.path().await),
        }
    }

    /// Whether `css` is on the page now.
    pub async fn has(&self, css: &str) -> bool {
        self.c.find(Locator::Css(css)).await.is_ok()
    }

    /// Types `text` into the field `css` (cleared first).
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        e.clear().await.unwrap();
        e.send_keys(text).await.unwrap();
    }

    /// Chooses the option with `value` in the select `css`.
    pub async fn select(&self, css: &str, value: &str) {
        self.find(css).await.select_by_value(value).await.unwrap();
    }

    /// Clicks `css`.
    pub async fn click(&self, css: &str) {
        self.find(css).await.click().await.unwrap();
    }

    /// The visible text of `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap()
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                if let Ok(t) = e.text().await {
                    if ok(&t) {
                        return t;
                    }
                    last = t;
                }
            }
            assert!(
                Instant::now() < deadline,
                "`{css}` did not become {what} within {WAIT:?} (last: {last:?}) on {}",
                self.path().await
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the page's path starts with `prefix`.
    pub async fn wait_path(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = self.path().await;
            if p.starts_with(prefix) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "the browser did not reach {prefix} within {WAIT:?} (at {p})"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Runs `script` in the page and returns its value.
    pub async fn js(&self, script: &str) -> Value {
        self.c.execute(script, vec![]).await.unwrap()
    }

    /// Marks this page (a value on `window`): [`Chrome::same_page`] then
    /// tells whether the browser has not loaded another page since.
    pub async fn mark(&self) {
        self.js("window.__octoMark = 'still-here'; return null;")
            .await;
    }

    pub async fn same_page(&self) -> bool {
        self.js("return window.__octoMark === 'still-here';").await == json!(true)
    }

    /// Whether a dialog (alert, confirm) is open.
    pub async fn dialog_open(&self) -> bool {
        self.c.get_alert_text().await.is_ok()
    }

    /// Accepts the open confirmation dialog, waiting for it to open.
    pub async fn accept_dialog(&self) {
        let deadline = Instant::now() + WAIT;
        while self.c.accept_alert().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "no dialog opened within {WAIT:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Signs in through the login form.
    pub async fn sign_in(&self, user: &str, password: &str) {
        self.open("/login").await;
        self.fill("#username", user).await;
        self.fill("#password", password).await;
        self.click("#sign-in").await;
        self.wait_path("/spaces/").await;
    }

    /// Saves the page as `target/screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) {
        self.js("window.scrollTo(0, 0); return null;").await;
        let png = self.c.screenshot().await.unwrap();
        std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
    }

    /// Sends a request from the page itself (its cookies, its origin) and
    /// returns the status: what a crafted request of a signed-in user gets.
    pub async fn fetch_status(
        &self,
        method: &str,
        path: &str,
        body: &str,
        with_token: bool,
    ) -> u16 {
        let script = r#"
            const [method, path, body, withToken, done] = arguments;
            const headers = { "Content-Type": "application/x-www-form-urlencoded" };
            let data = body;
            if (withToken) {
              const t = document.querySelector('meta[name="csrf-token"]').content;
              data = body + (body ? "&" : "") + "csrf=" + encodeURIComponent(t);
            }
            fetch(path, { method, headers, body: data, credentials: "same-origin", redirect: "manual" })
              .then((r) => done(r.status), () => done(-1));
        "#;
        let v = self
            .c
            .execute_async(
                script,
                vec![json!(method), json!(path), json!(body), json!(with_token)],
            )
            .await
            .unwrap();
        u16::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0)
    }
}
