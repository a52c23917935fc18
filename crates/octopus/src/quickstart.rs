//! `octopus quickstart`: the whole system on this machine in one command.
//!
//! In a temporary directory, on 127.0.0.1 and free ports: starts a server (in
//! this process), two real `tentacle` processes (one listening, one polling),
//! registers both with `tentacle register-with`, runs a health check and a
//! script on both, pushes a small package and deploys it to both (the server
//! pushes its `calamari` deployment tool first), all through this binary's own
//! client commands, prints the results and where to look, then stops everything
//! (or keeps running with `--keep`).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use octo_server_core::{start_with, RunArgs};

/// Options of `octopus quickstart`.
#[derive(Debug, clap::Args)]
pub(crate) struct QuickstartArgs {
    /// Work in DIR and keep it (default: a temporary directory, removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep everything running until Ctrl-C, to try the commands it prints.
    #[arg(long)]
    keep: bool,
    /// The `tentacle` binary (default: next to this one, built on demand under cargo).
    #[arg(long, value_name = "PATH")]
    tentacle: Option<PathBuf>,
    /// The `calamari` deployment tool (default: next to this one, built on demand under cargo).
    #[arg(long, value_name = "PATH")]
    calamari: Option<PathBuf>,
}

/// Child processes stopped (SIGTERM, then kill) when dropped.
struct Agents(Vec<(String, Child)>);

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for (_, c) in &mut self.0 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `bin` (of workspace package `package`): `explicit`, else next to this
/// binary, else (under `cargo run`) built with the same profile.
fn find_binary(explicit: Option<PathBuf>, bin: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let me = std::env::current_exe().context("finding this binary")?;
    let dir = me.parent().context("this binary's directory")?;
    let beside = dir.join(bin);
    if beside.exists() {
        return Ok(beside);
    }
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = dir.ends_with("release");
        println!("Building the {bin} binary (once)...");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", bin]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .with_context(|| format!("running cargo build for {bin}"))?;
        if status.success() && beside.exists() {
            return Ok(beside);
        }
    }
    bail!(
        "the {bin} binary is not next to {} ; build it with `cargo build -p {package}` or pass --{bin} PATH",
        me.display()
    )
}

fn run_ok(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) async fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let tentacle = find_binary(args.tentacle.clone(), "tentacle", "octo-tentacle")?;
    let calamari = find_binary(args.calamari.clone(), "calamari", "octo-calamari")?;
    let (dir, _temp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("octopus-quickstart-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    println!("Octopus quickstart in {}", dir.display());

    // 1. The server.
    let server = start_with(
        &RunArgs {
            calamari: Some(calamari),
            ..RunArgs::loopback(&dir.join("server"))
        },
        octo_portal::router,
    )
    .await?;
    let url = format!("http://{}", server.api_addr);
    let key = match &server.admin_api_key {
        Some(k) => k.clone(),
        None => std::fs::read_to_string(dir.join("server/admin-api-key"))?
            .trim()
            .to_string(),
    };
    println!(
        "1. Server: API {url}, polling port {}, thumbprint {}",
        server.comms_port, server.thumbprint
    );
    let login = portal_login(&dir.join("server"), &url, &key).await?;
    println!(
        "   Web portal: {url}/ (user {}, password {})",
        login.0, login.1
    );

    let result = scenario(&dir, &tentacle, &url, &key, &server).await;
    if args.keep && result.is_ok() {
        println!();
        println!(
            "Web portal: {url}/  user {}  password {}  (also in {})",
            login.0,
            login.1,
            dir.join("server").join(LOGIN_FILE).display()
        );
        println!("Running until Ctrl-C. Try:");
        println!("  export OCTOPUS_URL={url} OCTOPUS_API_KEY={key}");
        println!("  octopus machine list");
        println!("  octopus run-script --environment Quickstart --script 'uname -a'");
        println!(
            "  octopus deploy --package Hello --environment Quickstart --variable Greeting=Hi"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    let outcome = result.map(drop);
    server.stop().await;
    println!("Stopped the server and both tentacles.");
    outcome
}

/// Where the portal's quickstart login is kept (0600, in the server's data).
const LOGIN_FILE: &str = "portal-login";

/// A portal administrator `admin` with a new random password (created, or its
/// password reset when `--dir` holds an earlier run's server); the login is
/// also written to `LOGIN_FILE` (0600).
async fn portal_login(data: &Path, url: &str, key: &str) -> anyhow::Result<(String, String)> {
    use rand::distr::{Alphanumeric, SampleString};
    use std::io::Write;
    let user = "admin".to_string();
    let password = Alphanumeric.sample_string(&mut rand::rng(), 20);
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{url}/api/users"))
        .header("X-Octopus-ApiKey", key)
        .json(&serde_json::json!({"username": user, "password": password, "is_admin": true}))
        .send()
        .await
        .context("creating the portal user")?;
    let resp = if resp.status() == reqwest::StatusCode::CONFLICT {
        http.put(format!("{url}/api/users/{user}/password"))
            .header("X-Octopus-ApiKey", key)
            .json(&serde_json::json!({"password": password}))
            .send()
            .await
            .context("resetting the portal user's password")?
    } else {
        resp
    };
    if !resp.status().is_success() {
        bail!(
            "making the portal user: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(data.join(LOGIN_FILE))
        .with_context(|| format!("writing {}", data.join(LOGIN_FILE).display()))?;
    writeln!(f, "url={url}/\nuser={user}\npassword={password}")?;
    Ok((user, password))
}

async fn scenario(
    dir: &Path,
    tentacle: &Path,
    url: &str,
    key: &str,
    server: &octo_server_core::RunningServer,
) -> anyhow::Result<Agents> {
    let me = std::env::current_exe()?;
    let octopus = |args: &[&str]| {
        let mut c = Command::new(&me);
        c.args(args)
            .env("OCTOPUS_URL", url)
            .env("OCTOPUS_API_KEY", key);
        c
    };
    run_ok(
        &mut octopus(&["environment", "create", "Quickstart"]),
        "octopus environment create",
    )?;

    // 2. Two tentacles, configured and registered with the real CLI.
    let tdir = dir.join("tentacles");
    let tent = |args: &[&str]| {
        let mut c = Command::new(tentacle);
        c.args(args).env("TENTACLE_CONFIG_DIR", &tdir);
        c
    };
    let listen_port = free_port()?;
    let port = listen_port.to_string();
    let stp = server.thumbprint.to_string();
    let comms = format!("127.0.0.1:{}", server.comms_port);
    for (inst, extra) in [
        (
            "Listening",
            vec![
                "configure",
                "--instance",
                "Listening",
                "--port",
                &port,
                "--listen-ip",
                "127.0.0.1",
            ],
        ),
        (
            "Polling",
            vec!["configure", "--instance", "Polling", "--no-listen"],
        ),
    ] {
        run_ok(
            &mut tent(&["create-instance", "--instance", inst]),
            "tentacle create-instance",
        )?;
        run_ok(
            &mut tent(&["new-certificate", "--instance", inst]),
            "tentacle new-certificate",
        )?;
        run_ok(&mut tent(&extra), "tentacle configure")?;
    }
    let common = [
        "--server",
        url,
        "--api-key",
        key,
        "--environment",
        "Quickstart",
        "--role",
        "demo",
        "--server-thumbprint",
        &stp,
    ];
    let mut reg = vec![
        "register-with",
        "--instance",
        "Listening",
        "--name",
        "quickstart-listening",
        "--public-hostname",
        "127.0.0.1",
    ];
    reg.extend(common);
    print!(
        "2. {}",
        run_ok(&mut tent(&reg), "tentacle register-with (listening)")?
    );
    let mut reg = vec![
        "register-with",
        "--instance",
        "Polling",
        "--name",
        "quickstart-polling",
        "--comms-style",
        "TentacleActive",
        "--server-comms-address",
        &comms,
    ];
    reg.extend(common);
    print!(
        "   {}",
        run_ok(&mut tent(&reg), "tentacle register-with (polling)")?
    );

    let mut agents = Agents(Vec::new());
    for inst in ["Listening", "Polling"] {
        let log = std::fs::File::create(tdir.join(format!("{inst}.out")))?;
        let child = tent(&["run", "--instance", inst])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting tentacle {inst}"))?;
        agents.0.push((inst.to_string(), child));
    }
    // `tentacle run` binds its port a moment after it starts: a health
    // check before that finds nothing listening.
    wait_listening(&mut agents, "Listening", listen_port, &tdir).await?;
    println!(
        "3. Started both tentacles (`tentacle run`); their logs: {}/*/home/Logs",
        tdir.display()
    );

    // 3. Health check and a script, through the client commands.
    println!("4. octopus health-check --environment Quickstart");
    let status = octopus(&["health-check", "--environment", "Quickstart"]).status()?;
    if !status.success() {
        bail!("the health check did not pass (see above)");
    }
    let script = "echo \"Hello from $TentacleInstanceName, running in $PWD\"; uname -sr";
    println!("5. octopus run-script --environment Quickstart --script '{script}'");
    let status = octopus(&[
        "run-script",
        "--environment",
        "Quickstart",
        "--script",
        script,
    ])
    .status()?;
    if !status.success() {
        bail!("the script task failed (see above)");
    }

    // 4. A package, pushed to the feed and deployed to both.
    let package = demo_package(dir)?;
    println!("6. octopus package push {}", package.display());
    run_ok(
        &mut octopus(&["package", "push", &package.to_string_lossy()]),
        "octopus package push",
    )?;
    println!("7. octopus deploy --package Hello --environment Quickstart --variable Greeting='Hello, world' --variable Octopus.Action.SubstituteInFiles.TargetFiles=index.html");
    let status = octopus(&[
        "deploy",
        "--package",
        "Hello",
        "--environment",
        "Quickstart",
        "--variable",
        "Greeting=Hello, world",
        "--variable",
        "Octopus.Action.SubstituteInFiles.TargetFiles=index.html",
    ])
    .status()?;
    if !status.success() {
        bail!("the deployment failed (see above)");
    }
    println!();
    println!("Everything works. Where to look:");
    println!(
        "  server data:    {}/server (database octopus.db, admin-api-key)",
        dir.display()
    );
    println!(
        "  tentacles:      {} (configuration, certificates, Work/ and Logs/)",
        tdir.display()
    );
    println!(
        "  deployed app:   {}/*/home/Applications/Quickstart/Hello/1.0.0",
        tdir.display()
    );
    println!("  task history:   octopus task list --server {url} --api-key <key in admin-api-key>");
    Ok(agents)
}

/// How long a started listening tentacle may take to accept connections.
const LISTEN_WAIT: Duration = Duration::from_secs(30);

/// Waits until tentacle instance `inst` (just started) accepts connections on
/// 127.0.0.1:`port`, or says why it does not: its process ended, or
/// [`LISTEN_WAIT`] passed.
async fn wait_listening(
    agents: &mut Agents,
    inst: &str,
    port: u16,
    tdir: &Path,
) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let output = tdir.join(format!("{inst}.out"));
    let deadline = tokio::time::Instant::now() + LISTEN_WAIT;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some((_, child)) = agents.0.iter_mut().find(|(name, _)| name == inst) {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "`tentacle run --instance {inst}` stopped ({status}) before listening on {addr}; its output is in {}",
                    output.display()
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "`tentacle run --instance {inst}` did not accept connections on {addr} within {} s; its output is in {}",
                LISTEN_WAIT.as_secs(),
                output.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A small package `Hello.1.0.0.tar.gz` (built with the system's `tar`): a page
/// with a `#{Greeting}` to substitute, and a Deploy.sh that shows it.
fn demo_package(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = dir.join("hello-package");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("index.html"),
        "<h1>#{Greeting} from #{Octopus.Environment.Name}</h1>\n",
    )?;
    std::fs::write(
        src.join("Deploy.sh"),
        "echo \"Deployed $Octopus_Action_Package_PackageId $Octopus_Action_Package_PackageVersion to $PWD\"\n\
         echo \"index.html: $(cat index.html)\"\n\
         echo \"##octopus[setVariable name='PageUrl' value='file://$PWD/index.html']\"\n",
    )?;
    let package = dir.join("Hello.1.0.0.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("czf")
            .arg(&package)
            .arg("-C")
            .arg(&src)
            .args(["index.html", "Deploy.sh"]),
        "tar (building the demo package)",
    )?;
    Ok(package)
}
