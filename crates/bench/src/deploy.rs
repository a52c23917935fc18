//! `bench deploy`: a 100 MiB package deployed through the server to one
//! listening and one polling tentacle (real `tentacle` processes, the real
//! `calamari` tool), cold (the package is transferred) and warm (found in the
//! tentacle's cache), timed from `POST /api/tasks/deploy` to the task's `end`
//! event. The tool is pushed first (an upgrade task), so cold runs time the
//! package alone. For comparison, the same file is copied with `scp` over
//! loopback to a private `sshd` this benchmark starts, when sshd is installed.
//!
//! The package holds incompressible data (gzip level 0), so extraction writes
//! the full 100 MiB each time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_server_core::{start, RunArgs};
use serde_json::{json, Value};

use crate::scripts::{start as start_agent, tentacle, Agent};
use crate::tasks::Api;

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Size of the package's payload in MiB.
    #[arg(long, default_value_t = 100)]
    mib: usize,
    /// Warm deployments per mode (the median is reported).
    #[arg(long, default_value_t = 3)]
    warm_runs: usize,
}

/// Deterministic incompressible bytes (xorshift64*).
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn build_package(path: &Path, mib: usize) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let data = payload(mib << 20);
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "payload.bin", &data[..])?;
    let script = b"echo \"deployed $(stat -c %s payload.bin) bytes\"\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(script.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    tar.append_data(&mut h, "Deploy.sh", &script[..])?;
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}

async fn push(api: &Api, path: &Path) -> anyhow::Result<()> {
    let body = tokio::fs::read(path).await?;
    let resp = api
        .http
        .post(format!(
            "{}/api/packages?file_name=Bench.Payload.1.0.0.tar.gz",
            api.base
        ))
        .header("X-Octopus-ApiKey", &api.key)
        .body(body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!(
            "pushing the package: {} {}",
            resp.status(),
            resp.text().await?
        );
    }
    Ok(())
}

/// Runs a task to its end; returns (seconds from the POST to `end`, end).
async fn timed(api: &Api, path: &str, body: Value) -> anyhow::Result<(f64, Value)> {
    let t = Instant::now();
    let id = api.create(path, body).await?;
    let end = api.wait_end(&id).await?;
    let secs = t.elapsed().as_secs_f64();
    if end["task"]["state"] != "Success" {
        bail!("task {id} ended {}: {end}", end["task"]["state"]);
    }
    Ok((secs, end))
}

/// The "package uploaded in X s" figure of a task's log, when it has one.
async fn transfer_secs(api: &Api, end: &Value) -> anyhow::Result<Option<f64>> {
    let id = end["task"]["id"].as_str().context("task id")?;
    let lines: Value = api
        .http
        .get(format!("{}/api/tasks/{id}/log?limit=10000", api.base))
        .header("X-Octopus-ApiKey", &api.key)
        .send()
        .await?
        .json()
        .await?;
    Ok(lines
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["text"].as_str())
        .find_map(|t| {
            let rest = t.split("package uploaded in ").nth(1)?;
            rest.split(' ').next()?.parse::<f64>().ok()
        }))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A private sshd on loopback, stopped when dropped.
pub(crate) struct Sshd {
    child: std::process::Child,
    pub(crate) port: u16,
    pub(crate) key: PathBuf,
    /// The authorized public key, in a directory every account may read
    /// (sshd reads it as the user logging in).
    _public: tempfile::TempDir,
}

/// The account to measure ssh commands with: [`SSH_USER`] (made when
/// missing, which needs root), whose login shell `/bin/sh` reads no start-up
/// files, so that ssh is timed without this machine's shell set-up (root's
/// `.bashrc` on the development VM runs `pyenv init`, 110 ms per command).
/// Otherwise the current user, and the note says so.
pub(crate) fn ssh_user() -> (String, Option<String>) {
    ssh_account(SSH_USER, "/bin/sh")
}

/// [`ssh_user`] for an account `name` with login shell `shell`, made when
/// missing: a system account with no password (`*`: key login only) and the
/// home `/`, where no shell start-up file is.
pub(crate) fn ssh_account(name: &str, shell: &str) -> (String, Option<String>) {
    let exists = |u: &str| {
        Command::new("id")
            .arg(u)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let current = std::env::var("USER").unwrap_or_else(|_| "root".into());
    if !exists(name) {
        let made = Command::new("useradd")
            .args(["--system", "--shell", shell])
            .args(["--home-dir", "/", "--no-create-home"])
            .args(["--password", "*", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            return (
                current.clone(),
                Some(format!(
                    "ssh logs in as {current}: the account {name} is missing and could not be made (run as root); {current}'s shell start-up files are in the ssh times"
                )),
            );
        }
    }
    (name.to_string(), None)
}

/// See [`ssh_user`].
const SSH_USER: &str = "octo-bench-ssh";
/// An account like [`SSH_USER`] whose login shell is bash.
pub(crate) const SSH_BASH_USER: &str = "octo-bench-bash";

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn start_sshd(dir: &Path) -> anyhow::Result<Option<Sshd>> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    for name in ["host_key", "client_key"] {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(dir.join(name))
            .status()?;
        if !status.success() {
            bail!("ssh-keygen failed");
        }
    }
    let public = tempfile::Builder::new()
        .prefix("octo-bench-ssh")
        .tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755))?;
        let keys = public.path().join("authorized_keys");
        std::fs::copy(dir.join("client_key.pub"), &keys)?;
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644))?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("sshd_config");
    // `AcceptEnv` as in Debian's stock sshd_config: a command gets the locale
    // of the ssh that sent it, as a tentacle's script gets the tentacle's.
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin yes\nPasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile {}\n\
             Subsystem sftp internal-sftp\nAcceptEnv LANG LC_*\n",
            dir.join("host_key").display(),
            public.path().join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let server = Sshd {
        child,
        port,
        key: dir.join("client_key"),
        _public: public,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("sshd did not listen on port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(server))
}

/// Seconds to copy `file` with scp to loopback (median of `runs`).
fn scp_secs(sshd: &Sshd, file: &Path, target: &Path, runs: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let status = Command::new("scp")
            .args([
                "-q",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .arg("-i")
            .arg(&sshd.key)
            .arg("-P")
            .arg(sshd.port.to_string())
            .arg(file)
            .arg(format!("root@127.0.0.1:{}", target.display()))
            .status()?;
        if !status.success() {
            bail!("scp failed ({status})");
        }
        times.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(target).ok();
    }
    Ok(median(times))
}

pub async fn run(o: Options) -> anyhow::Result<()> {
    if o.mib == 0 || o.warm_runs == 0 {
        bail!("--mib and --warm-runs must be at least 1");
    }
    let tentacle_bin = crate::release_binary("octo-tentacle", "tentacle")?;
    let calamari = crate::release_binary("octo-calamari", "calamari")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let server = start(&RunArgs {
        calamari: Some(calamari),
        ..RunArgs::loopback(&dir.join("server"))
    })
    .await?;
    let api = Api {
        base: format!("http://{}", server.api_addr),
        key: server.admin_api_key.clone().context("admin key")?,
        http: reqwest::Client::new(),
    };
    for env in ["BenchL", "BenchP"] {
        let (status, v) = api
            .post("/api/environments", json!({ "name": env }))
            .await?;
        if status != 201 {
            bail!("creating environment {env}: {status} {v}");
        }
    }

    // Two real tentacles, registered with the real CLI.
    let tdir = dir.join("tentacles");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port()
        .to_string();
    let stp = server.thumbprint.to_string();
    let comms = format!("127.0.0.1:{}", server.comms_port);
    let t = |args: &[&str]| tentacle(&tentacle_bin, &tdir, args);
    for inst in ["lis", "pol"] {
        t(&["create-instance", "--instance", inst])?;
        t(&["new-certificate", "--instance", inst])?;
    }
    t(&[
        "configure",
        "--instance",
        "lis",
        "--port",
        &port,
        "--listen-ip",
        "127.0.0.1",
    ])?;
    t(&["configure", "--instance", "pol", "--no-listen"])?;
    let common = [
        "--server",
        &api.base,
        "--api-key",
        &api.key,
        "--server-thumbprint",
        &stp,
    ];
    let mut reg = vec![
        "register-with",
        "--instance",
        "lis",
        "--name",
        "lis",
        "--environment",
        "BenchL",
        "--public-hostname",
        "127.0.0.1",
    ];
    reg.extend(common);
    t(&reg)?;
    let mut reg = vec![
        "register-with",
        "--instance",
        "pol",
        "--name",
        "pol",
        "--environment",
        "BenchP",
        "--comms-style",
        "TentacleActive",
        "--server-comms-address",
        &comms,
    ];
    reg.extend(common);
    t(&reg)?;
    let mut agents: Vec<Agent> = Vec::new();
    for inst in ["lis", "pol"] {
        agents.push(start_agent(&tentacle_bin, &tdir, inst)?.0);
    }

    // The tool first, so cold deployments time the package alone.
    timed(&api, "/api/tasks/upgrade", json!({})).await?;

    let package = dir.join("Bench.Payload.1.0.0.tar.gz");
    build_package(&package, o.mib)?;
    let size_mib = std::fs::metadata(&package)?.len() as f64 / (1 << 20) as f64;
    push(&api, &package).await?;
    println!(
        "package: {size_mib:.1} MiB (payload {} MiB, not compressible)",
        o.mib
    );

    let mut result = serde_json::Map::new();
    result.insert("bench".into(), json!("deploy"));
    result.insert("package_mib".into(), json!(round3(size_mib)));
    for (mode, env) in [("listening", "BenchL"), ("polling", "BenchP")] {
        let body = json!({ "package_id": "Bench.Payload", "environment": env });
        let (cold, end) = timed(&api, "/api/tasks/deploy", body.clone()).await?;
        let transfer = transfer_secs(&api, &end).await?;
        let mut warm = Vec::new();
        for _ in 0..o.warm_runs {
            warm.push(timed(&api, "/api/tasks/deploy", body.clone()).await?.0);
        }
        let warm = median(warm);
        println!(
            "{mode}: cold {cold:.3} s ({:.0} MiB/s; transfer alone {}), warm {warm:.3} s ({:.0} MiB/s)",
            size_mib / cold,
            transfer.map_or("-".into(), |t| format!("{t:.3} s, {:.0} MiB/s", size_mib / t)),
            size_mib / warm
        );
        result.insert(format!("{mode}_cold_s"), json!(round3(cold)));
        result.insert(format!("{mode}_warm_s"), json!(round3(warm)));
        result.insert(
            format!("{mode}_cold_deploy_mib_s"),
            json!((size_mib / cold).round()),
        );
        result.insert(
            format!("{mode}_warm_deploy_mib_s"),
            json!((size_mib / warm).round()),
        );
        if let Some(t) = transfer {
            result.insert(format!("{mode}_transfer_s"), json!(round3(t)));
        }
    }
    let listening_cold = result["listening_cold_s"].as_f64().unwrap_or(f64::NAN);
    result.insert(
        "deploy_100mib_s".into(),
        json!(round3(listening_cold * 100.0 / size_mib)),
    );

    match start_sshd(&dir.join("ssh")) {
        Ok(Some(sshd)) => match scp_secs(&sshd, &package, &dir.join("scp-copy.tar.gz"), 3) {
            Err(e) => {
                println!("scp: skipped ({e:#})");
                result.insert("scp_s".into(), Value::Null);
            }
            Ok(scp) => {
                println!(
                "scp to loopback: {scp:.3} s ({:.0} MiB/s); cold listening deploy / scp = {:.2}",
                size_mib / scp,
                listening_cold / scp
            );
                result.insert("scp_s".into(), json!(round3(scp)));
                result.insert(
                    "cold_deploy_over_scp".into(),
                    json!(round3(listening_cold / scp)),
                );
                if let Some(t) = result.get("listening_transfer_s").and_then(Value::as_f64) {
                    result.insert("transfer_over_scp".into(), json!(round3(t / scp)));
                }
            }
        },
        Ok(None) => {
            println!("scp: skipped (no /usr/sbin/sshd; install openssh-server to compare)");
            result.insert("scp_s".into(), Value::Null);
        }
        Err(e) => {
            println!("scp: skipped ({e:#})");
            result.insert("scp_s".into(), Value::Null);
        }
    }
    drop(agents);
    server.stop().await;
    println!("{}", Value::Object(result));
    Ok(())
}
