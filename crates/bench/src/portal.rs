//! `bench portal`: how fast the portal's big lists answer.
//!
//! The server (`octo_server_core::start_with` with the portal, SQLite in a
//! temporary data directory) runs in this process with `--machines` listening
//! machines (5,000 by default) spread over 5 environments and 10 roles, and
//! `--tasks` finished health-check tasks. A user signs in through the login
//! form; then pages of 50 are fetched: the first page of the targets list,
//! pages deep into it, a filtered page (name contains, environment, role), and
//! the tasks list. Each figure is the server's own time for the request (the
//! portal's `Server-Timing` header), p50 and p99 over `--runs` requests after
//! a warm-up; the client's round trip on loopback is reported beside it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_server_core::{start_with, RunArgs};
use serde_json::{json, Value};

/// Bound on any single request.
const WAIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Machines in the space.
    #[arg(long, default_value_t = 5000)]
    machines: usize,
    /// Finished tasks in the space.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Timed requests per page kind (after the warm-up).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Untimed requests first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 100.0).round() / 100.0
}

/// The server's time (`Server-Timing: app;dur=MS`) of a response.
fn server_ms(resp: &reqwest::Response) -> anyhow::Result<f64> {
    let v = resp
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .context("no Server-Timing header")?;
    v.split("dur=")
        .nth(1)
        .and_then(|d| d.trim().parse::<f64>().ok())
        .with_context(|| format!("Server-Timing '{v}'"))
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = start_with(
        &RunArgs::loopback(&dir.path().join("data")),
        octo_portal::router,
    )
    .await
    .context("starting the server")?;
    let base = format!("http://{}", server.api_addr);
    let key = server.admin_api_key.clone().context("no admin key")?;
    let api = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Value| {
        let req = api
            .request(method, format!("{base}{path}"))
            .header("X-Octopus-ApiKey", &key)
            .timeout(WAIT)
            .json(&body);
        async move {
            let resp = req.send().await?;
            let status = resp.status();
            let text = resp.text().await?;
            if !status.is_success() {
                bail!("{status}: {text}");
            }
            anyhow::Ok(text)
        }
    };
    let post = reqwest::Method::POST;
    for e in 0..5 {
        call(
            post.clone(),
            "/api/environments".into(),
            json!({"name": format!("Env-{e}")}),
        )
        .await?;
    }
    eprintln!("adding {} machines…", o.machines);
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    use futures_util::StreamExt;
    for i in 0..o.machines {
        let body = json!({
            "name": format!("machine-{i:05}"),
            "comms_style": "TentaclePassive",
            // Nothing listens there: health checks fail at once.
            "uri": "https://127.0.0.1:1/",
            "thumbprint": format!("{:064X}", i + 1),
            "environments": [format!("Env-{}", i % 5)],
            "roles": [format!("role-{}", i % 10), "web"],
        });
        pending.push(call(post.clone(), "/api/machines".into(), body));
        if pending.len() >= 16 {
            pending.next().await.context("a machine")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    eprintln!("  in {:.1} s", started.elapsed().as_secs_f64());
    eprintln!("adding {} tasks…", o.tasks);
    for i in 0..o.tasks {
        // Health checks of one machine each: refused, they fail fast.
        let body = json!({"machines": [format!("machine-{:05}", i % o.machines)]});
        pending.push(call(post.clone(), "/api/tasks/health".into(), body));
        if pending.len() >= 16 {
            pending.next().await.context("a task")??;
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    // Until every task has finished (bounded).
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = api
            .get(format!("{base}/api/tasks?state=Queued,Executing&limit=1"))
            .header("X-Octopus-ApiKey", &key)
            .timeout(WAIT)
            .send()
            .await?;
        let open = resp
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .context("no X-Total-Count")?;
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{open} tasks still running after {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A user who signs in through the form.
    call(
        post.clone(),
        "/api/users".into(),
        json!({"username": "bench", "password": "bench-password-1"}),
    )
    .await?;
    call(
        post.clone(),
        "/api/teams/Octopus%20Administrators/members".into(),
        json!({"username": "bench"}),
    )
    .await?;
    let web = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()?;
    let login = web
        .get(format!("{base}/login"))
        .send()
        .await?
        .text()
        .await?;
    let token = login
        .split("name=\"token\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no login token")?
        .to_string();
    let resp = web
        .post(format!("{base}/login"))
        .form(&[
            ("username", "bench"),
            ("password", "bench-password-1"),
            ("next", "/"),
            ("token", token.as_str()),
        ])
        .send()
        .await?;
    if resp.status() != 303 {
        bail!("signing in: {}", resp.status());
    }

    let last_page = o.machines.div_ceil(50);
    let pages = [
        ("targets_first", "/spaces/Default/targets".to_string()),
        (
            "targets_last",
            format!("/spaces/Default/targets?page={last_page}"),
        ),
        (
            "targets_filtered",
            "/spaces/Default/targets?name=machine-0&environment=Env-3&role=role-3".to_string(),
        ),
        ("tasks_first", "/spaces/Default/tasks".to_string()),
        (
            "tasks_filtered",
            "/spaces/Default/tasks?state=Failed&machine=machine-00042".to_string(),
        ),
    ];
    let mut out = serde_json::Map::new();
    out.insert("bench".into(), json!("portal"));
    out.insert("machines".into(), json!(o.machines));
    out.insert("tasks".into(), json!(o.tasks));
    for (name, path) in pages {
        let mut times = Vec::with_capacity(o.runs);
        let mut client = Vec::with_capacity(o.runs);
        for i in 0..o.warmup + o.runs {
            let t = Instant::now();
            let resp = web.get(format!("{base}{path}")).send().await?;
            let ms = server_ms(&resp)?;
            let status = resp.status();
            let body = resp.text().await?;
            let took = t.elapsed().as_secs_f64() * 1e3;
            if status != 200 {
                bail!("GET {path}: {status}");
            }
            if name.starts_with("targets") && !body.contains("<tr data-name=") {
                bail!("GET {path}: no rows");
            }
            if i >= o.warmup {
                times.push(ms);
                client.push(took);
            }
        }
        times.sort_by(f64::total_cmp);
        client.sort_by(f64::total_cmp);
        eprintln!(
            "{name}: server p50 {:.2} ms, p99 {:.2} ms; round trip p50 {:.2} ms",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            percentile(&client, 0.5)
        );
        out.insert(
            format!("{name}_server_p50_ms"),
            json!(percentile(&times, 0.5)),
        );
        out.insert(
            format!("{name}_server_p99_ms"),
            json!(percentile(&times, 0.99)),
        );
        out.insert(
            format!("{name}_roundtrip_p50_ms"),
            json!(percentile(&client, 0.5)),
        );
    }
    server.stop().await;
    println!("{}", Value::Object(out));
    Ok(())
}
