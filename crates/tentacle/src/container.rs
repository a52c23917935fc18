//! `tentacle agent --from-env`: the container entrypoint.
//!
//! Reads the original Tentacle container's environment variables, creates the
//! instance when it is missing (certificate included), configures listening
//! or polling, registers with the server **once**, and returns the instance
//! for `run`. A restart on the same volume finds the instance and a
//! registration record (`HOME/container-registration.json`) that matches the
//! variables, and registers nothing: no duplicate machine. When the variables
//! change (another environment, role, server...), it registers again with
//! `--force`, which replaces the machine of the same name on the server.
//!
//! Polling when `ServerCommsAddress` or `ServerPort` is set, listening
//! otherwise (always on port 10933 inside the container; `ListeningPort` is the
//! port the server should dial, as published by the container engine).

use std::path::Path;

use anyhow::{bail, Context};
use clap::Parser;
use octo_agent::instances::Registry;
use sha2::{Digest, Sha256};

use crate::{create_instance, new_certificate, Cli, Target};

/// The file in the instance's home that records the registration done.
const RECORD: &str = "container-registration.json";
/// The port the agent listens on inside the container.
const CONTAINER_PORT: u16 = 10933;

/// The container's variables, as the original's image reads them.
#[derive(Debug, Default)]
struct Settings {
    server_url: String,
    api_key: Option<String>,
    username: Option<String>,
    password: Option<String>,
    space: Option<String>,
    environments: Vec<String>,
    roles: Vec<String>,
    worker_pools: Vec<String>,
    name: Option<String>,
    tenants: Vec<String>,
    tenant_tags: Vec<String>,
    policy: Option<String>,
    comms_address: Option<String>,
    server_port: Option<u16>,
    listening_port: Option<u16>,
    public_host: PublicHost,
}

/// `PublicHostNameConfiguration` (with `CustomPublicHostName`).
#[derive(Debug, Default, PartialEq, Eq)]
enum PublicHost {
    #[default]
    ComputerName,
    Fqdn,
    PublicIp,
    Custom(String),
}

/// The variable's value, trimmed; None when unset or blank.
fn var(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    get(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A comma-separated variable's items.
fn list(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Vec<String> {
    var(get, name)
        .map(|v| {
            v.split(',')
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn port(get: &dyn Fn(&str) -> Option<String>, name: &str) -> anyhow::Result<Option<u16>> {
    var(get, name)
        .map(|v| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("{name}='{v}' is not a port number (1-65535)"))
        })
        .transpose()
}

impl Settings {
    /// Reads and checks the variables; Err names the variable to fix.
    fn read(get: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let Some(server_url) = var(get, "ServerUrl") else {
            bail!("ServerUrl is not set: give the server's address, e.g. ServerUrl=https://octopus.example");
        };
        let api_key = var(get, "ServerApiKey");
        let username = var(get, "ServerUsername");
        let password = var(get, "ServerPassword");
        match (&api_key, &username, &password) {
            (Some(_), None, None) | (None, Some(_), Some(_)) => {}
            (Some(_), _, _) => {
                bail!("set either ServerApiKey or ServerUsername and ServerPassword, not both")
            }
            _ => bail!(
                "no credentials to register with: set ServerApiKey, or ServerUsername and ServerPassword"
            ),
        }
        let environments = list(get, "TargetEnvironment");
        let roles = list(get, "TargetRole");
        let worker_pools = list(get, "TargetWorkerPool");
        if worker_pools.is_empty() {
            if environments.is_empty() {
                bail!("TargetEnvironment is not set: a deployment target belongs to at least one environment (or set TargetWorkerPool to register a worker)");
            }
        } else {
            if !environments.is_empty() || !roles.is_empty() {
                bail!("TargetWorkerPool makes this a worker, which has no TargetEnvironment or TargetRole: set one or the other");
            }
            if worker_pools.len() > 1 {
                bail!(
                    "TargetWorkerPool lists {} pools; a worker of this server belongs to one pool",
                    worker_pools.len()
                );
            }
        }
        let public_host = match var(get, "PublicHostNameConfiguration")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("computername") => PublicHost::ComputerName,
            Some("fqdn") => PublicHost::Fqdn,
            Some("publicip") => PublicHost::PublicIp,
            Some("custom") => match var(get, "CustomPublicHostName") {
                Some(h) => PublicHost::Custom(h),
                None => bail!("PublicHostNameConfiguration=Custom needs CustomPublicHostName"),
            },
            Some(other) => bail!(
                "PublicHostNameConfiguration='{other}' is not PublicIp, FQDN, ComputerName or Custom"
            ),
        };
        Ok(Settings {
            server_url,
            api_key,
            username,
            password,
            space: var(get, "Space"),
            environments,
            roles,
            worker_pools,
            name: var(get, "TargetName"),
            tenants: list(get, "TargetTenant"),
            tenant_tags: list(get, "TargetTenantTag"),
            policy: var(get, "MachinePolicy"),
            comms_address: var(get, "ServerCommsAddress"),
            server_port: port(get, "ServerPort")?,
            listening_port: port(get, "ListeningPort")?,
            public_host,
        })
    }

    fn polling(&self) -> bool {
        self.comms_address.is_some() || self.server_port.is_some()
    }

    /// The `register-with` / `register-worker` command line (credentials last).
    fn register_args(&self, instance: &str, public_host: Option<&str>) -> Vec<String> {
        let mut a: Vec<String> = vec!["tentacle".into()];
        let worker = !self.worker_pools.is_empty();
        a.push(
            if worker {
                "register-worker"
            } else {
                "register-with"
            }
            .into(),
        );
        let mut opt = |name: &str, value: &str| {
            a.push(format!("--{name}"));
            a.push(value.to_string());
        };
        opt("instance", instance);
        opt("server", &self.server_url);
        if let Some(s) = &self.space {
            opt("space", s);
        }
        if let Some(p) = &self.policy {
            opt("policy", p);
        }
        if let Some(n) = &self.name {
            opt("name", n);
        }
        for pool in &self.worker_pools {
            opt("worker-pool", pool);
        }
        for e in &self.environments {
            opt("environment", e);
        }
        for r in &self.roles {
            opt("role", r);
        }
        for t in &self.tenants {
            opt("tenant", t);
        }
        for t in &self.tenant_tags {
            opt("tenant-tag", t);
        }
        if self.polling() {
            opt("comms-style", "TentacleActive");
            if let Some(c) = &self.comms_address {
                opt("server-comms-address", c);
            }
            if let Some(p) = self.server_port {
                opt("server-comms-port", &p.to_string());
            }
        } else {
            opt("comms-style", "TentaclePassive");
            if let Some(h) = public_host {
                opt("public-hostname", h);
            }
            if let Some(p) = self.listening_port.filter(|p| *p != CONTAINER_PORT) {
                opt("tentacle-comms-port", &p.to_string());
            }
        }
        if let Some(k) = &self.api_key {
            opt("api-key", k);
        }
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            opt("username", u);
            opt("password", p);
        }
        a.push("--force".into());
        a
    }

    /// What a registration depends on, hashed (credentials left out): a
    /// restart with the same settings registers nothing.
    fn fingerprint(&self, public_host: Option<&str>) -> String {
        let mut args = self.register_args("", public_host);
        // Drop the credentials' values from what is hashed.
        for i in 1..args.len() {
            if ["--api-key", "--username", "--password"].contains(&args[i - 1].as_str()) {
                args[i].clear();
            }
        }
        let digest = Sha256::digest(args.join("\n").as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The host name the server should dial a listening container at.
fn resolve_public_host(how: &PublicHost) -> anyhow::Result<String> {
    let hostname = || {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .context("reading this container's host name")
    };
    match how {
        PublicHost::ComputerName => hostname(),
        PublicHost::Custom(h) => Ok(h.clone()),
        PublicHost::Fqdn => {
            let out = std::process::Command::new("hostname")
                .arg("--fqdn")
                .output()
                .context("running `hostname --fqdn` (PublicHostNameConfiguration=FQDN)")?;
            let fqdn = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || fqdn.is_empty() {
                bail!("`hostname --fqdn` gave no name; set PublicHostNameConfiguration=Custom and CustomPublicHostName");
            }
            Ok(fqdn)
        }
        PublicHost::PublicIp => {
            let api = crate::api::ApiClient::new("https://api.ipify.org", &[])?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (status, text) = rt
                .block_on(api.call(hyper::Method::GET, "/", None, None))
                .context("asking https://api.ipify.org for this container's public address (PublicHostNameConfiguration=PublicIp); set ComputerName or Custom where there is no Internet access")?;
            let ip = text.trim();
            if !status.is_success() || ip.parse::<std::net::IpAddr>().is_err() {
                bail!("https://api.ipify.org answered {status} '{ip}', not an IP address; set PublicHostNameConfiguration=Custom and CustomPublicHostName");
            }
            Ok(ip.to_string())
        }
    }
}

/// Prepares the instance from the environment (see the module documentation)
/// and returns it, ready to run.
pub(crate) fn prepare(instance: &str, config: Option<&Path>) -> anyhow::Result<Target> {
    let settings = Settings::read(&|name| std::env::var(name).ok())?;
    let target = match Registry::locate().get(instance) {
        Ok(_) => Target::resolve(instance, config)?,
        Err(_) if config.is_some_and(Path::exists) => Target::resolve(instance, config)?,
        Err(_) => {
            println!("Creating instance '{instance}' (first start of this container)");
            create_instance(instance, config, None, None)?
        }
    };
    new_certificate(&target, true)?;
    let mut cfg = target.load()?;
    let polling = settings.polling();
    if polling {
        cfg.listen.enabled = false;
    } else {
        cfg.listen.enabled = true;
        cfg.listen.port = CONTAINER_PORT;
        cfg.listen.address = "0.0.0.0".into();
    }
    target.save(&cfg)?;
    let public_host = if polling {
        None
    } else {
        Some(resolve_public_host(&settings.public_host)?)
    };
    let fingerprint = settings.fingerprint(public_host.as_deref());
    let record = cfg.tentacle.home.join(RECORD);
    let done = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["fingerprint"].as_str().map(str::to_string));
    if done.as_deref() == Some(fingerprint.as_str()) {
        println!(
            "Instance '{}' is already registered with {} as these variables say ({}); not registering again.",
            target.name,
            settings.server_url,
            record.display()
        );
        return Ok(target);
    }
    if done.is_some() {
        println!("The registration settings changed since the last start: registering again (replacing the machine of the same name).");
    }
    let args = settings.register_args(&target.name, public_host.as_deref());
    let cli = Cli::try_parse_from(&args).context("building the registration command")?;
    crate::dispatch(cli).context("registering with the server from the container's variables")?;
    let text = serde_json::json!({
        "fingerprint": fingerprint,
        "server": settings.server_url,
        "registered_at_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    octo_agent::config::write_atomic(&record, format!("{text:#}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", record.display()))?;
    Ok(target)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::read(&move |n| map.get(n).cloned())
    }

    #[test]
    fn variables_are_checked_and_name_what_to_fix() {
        let err = |vars: &[(&str, &str)]| read(vars).unwrap_err().to_string();
        assert!(err(&[]).contains("ServerUrl"));
        assert!(err(&[("ServerUrl", "http://o")]).contains("ServerApiKey"));
        let base = [("ServerUrl", "http://o"), ("ServerApiKey", "API-1")];
        assert!(err(&base).contains("TargetEnvironment"));
        let mut v = base.to_vec();
        v.extend([("TargetWorkerPool", "P"), ("TargetRole", "web")]);
        assert!(err(&v).contains("TargetWorkerPool"));
        let mut v = base.to_vec();
        v.extend([("TargetEnvironment", "Test"), ("ServerPort", "x")]);
        assert!(err(&v).contains("ServerPort='x'"));
        let mut v = base.to_vec();
        v.extend([
            ("TargetEnvironment", "Test"),
            ("PublicHostNameConfiguration", "Custom"),
        ]);
        assert!(err(&v).contains("CustomPublicHostName"));
    }

    #[test]
    fn listening_and_polling_command_lines() {
        let s = read(&[
            ("ServerUrl", "http://o:8080"),
            ("ServerApiKey", "API-1"),
            ("TargetEnvironment", "Test, Prod"),
            ("TargetRole", "web server"),
            ("ListeningPort", "10934"),
            ("Space", "Ops"),
        ])
        .unwrap();
        assert!(!s.polling());
        let a = s.register_args("Tentacle", Some("box")).join(" ");
        assert!(
            a.starts_with(
                "tentacle register-with --instance Tentacle --server http://o:8080 --space Ops"
            ),
            "{a}"
        );
        assert!(
            a.contains("--environment Test --environment Prod --role web server"),
            "{a}"
        );
        assert!(
            a.contains(
                "--comms-style TentaclePassive --public-hostname box --tentacle-comms-port 10934"
            ),
            "{a}"
        );
        assert!(a.ends_with("--api-key API-1 --force"), "{a}");
        let p = read(&[
            ("ServerUrl", "http://o:8080"),
            ("ServerUsername", "u"),
            ("ServerPassword", "p"),
            ("TargetWorkerPool", "Pool"),
            ("ServerPort", "10943"),
        ])
        .unwrap();
        assert!(p.polling());
        let a = p.register_args("Tentacle", None).join(" ");
        assert!(
            a.contains("register-worker") && a.contains("--worker-pool Pool"),
            "{a}"
        );
        assert!(
            a.contains("--comms-style TentacleActive --server-comms-port 10943"),
            "{a}"
        );
        // Credentials do not change the fingerprint; anything else does.
        let q = read(&[
            ("ServerUrl", "http://o:8080"),
            ("ServerUsername", "u"),
            ("ServerPassword", "other"),
            ("TargetWorkerPool", "Pool"),
            ("ServerPort", "10943"),
        ])
        .unwrap();
        assert_eq!(p.fingerprint(None), q.fingerprint(None));
        assert_ne!(p.fingerprint(None), s.fingerprint(Some("box")));
    }
}
