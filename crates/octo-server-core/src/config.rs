//! The server's options (`octopus server run`).

use clap::builder::TypedValueParser;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Tasks a node runs at once unless `--task-cap` says otherwise.
pub const DEFAULT_TASK_CAP: usize = 20;

/// The longest node name (`--node-name`).
const MAX_NODE_NAME: usize = 100;

/// Options of `octopus server run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Data directory: certificate, database, admin API key.
    #[arg(long, default_value = "octopus-data")]
    pub data: PathBuf,
    /// Address of the web API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Port polling tentacles connect to (0 picks a free port).
    #[arg(long, alias = "commsListenPort", default_value_t = 10943)]
    pub comms_listen_port: u16,
    /// Address the comms port binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub comms_listen_address: String,
    /// Database URL: postgres://USER:PASSWORD@HOST:PORT/DATABASE (every node of a
    /// cluster points at the same one), or sqlite://PATH (one node only); default:
    /// SQLite in the data directory (sqlite://DATA/octopus.db).
    #[arg(long, env = "OCTOPUS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// This server's name among the nodes sharing its database (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// At most this many tasks run on this node at once; more wait, queued.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TASK_CAP)]
    pub task_cap: usize,
    /// The deployment tool binary to push to tentacles (default: `calamari`
    /// beside this binary).
    #[arg(long, env = "OCTOPUS_CALAMARI")]
    pub calamari: Option<PathBuf>,
    /// The tentacle binary that tentacles are upgraded to (default: `tentacle`
    /// beside this binary).
    #[arg(long, env = "OCTOPUS_TENTACLE")]
    pub tentacle: Option<PathBuf>,
    /// HTTP CONNECT proxy for dialling listening tentacles,
    /// `http://[USER:PASSWORD@]HOST:PORT` (default: --proxy-file, else the
    /// `OCTOPUS_PROXY` environment variable, else `HTTPS_PROXY`/`NO_PROXY`; TLS to
    /// the tentacle stays end to end through the tunnel). A password given here is
    /// visible to every user of the machine (`ps`): prefer --proxy-file or
    /// `OCTOPUS_PROXY`.
    #[arg(long, value_name = "URL", conflicts_with_all = ["no_proxy", "proxy_file"])]
    pub proxy: Option<String>,
    /// A file whose first line is the proxy URL (as --proxy), so that a password
    /// stays out of the command line; keep it readable by the server's user only.
    #[arg(long, value_name = "FILE", conflicts_with = "no_proxy")]
    pub proxy_file: Option<PathBuf>,
    /// Dial listening tentacles directly, ignoring proxy environment variables.
    #[arg(long)]
    pub no_proxy: bool,
    /// Also accept polling tentacles over WebSocket (`wss://`) on this TLS port
    /// (0 picks a free port; default: off). Binds --comms-listen-address. The
    /// same port serves the REST API (`/api`) over TLS to clients without a
    /// certificate, so one port (e.g. 443) can serve both.
    #[arg(long, value_name = "PORT")]
    pub web_socket_listen_port: Option<u16>,
    /// The path WebSocket polling tentacles connect to (`tentacle poll-server
    /// --server-web-socket wss://HOST:PORT/PATH`).
    #[arg(long, value_name = "PATH", default_value = octo_comms::websocket::DEFAULT_PATH)]
    pub web_socket_path: String,
    /// A login's session key expires after this many hours without use.
    #[arg(long, value_name = "HOURS", default_value_t = 8.0)]
    pub session_idle_hours: f64,
    /// Machines of one task that run at once, unless the task asks otherwise
    /// (its `max_parallel_steps`; `octopus run-script --max-parallel-steps`).
    #[arg(long, value_name = "N", default_value_t = octo_engine::DEFAULT_MAX_PARALLEL_STEPS,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(octo_engine::MAX_PARALLEL_STEPS_ALLOWED)).map(|n| n as usize))]
    pub max_parallel_steps: usize,
    /// Machine steps of every task together that run at once on this server;
    /// more wait (Queued) for a free slot.
    #[arg(long, value_name = "N", default_value_t = octo_engine::DEFAULT_MAX_RUNNING_STEPS,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|n| n as usize))]
    pub max_running_steps: usize,
    /// Polling tentacles' TLS handshakes that run at once; more wait their turn
    /// (a reconnect storm after a restart queues rather than fails).
    #[arg(long, value_name = "N", default_value_t = octo_comms::DEFAULT_MAX_CONCURRENT_HANDSHAKES,
          value_parser = clap::value_parser!(u32).range(1..=100_000).map(|n| n as usize))]
    pub max_concurrent_handshakes: usize,
    /// Most output one machine's part of a task stores, in MiB; past it, lines
    /// are counted and dropped (the log says how many) and the script runs on.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MAX_LOG_MIB_PER_STEP,
          value_parser = clap::value_parser!(u64).range(1..=1024 * 1024))]
    pub max_log_mib_per_step: u64,
    /// How often this node looks for machines due a scheduled health check,
    /// in milliseconds (100 to 3600000; the scheduler's cluster-wide lease
    /// lasts two scans). Hidden: for tests and tuning, not everyday use.
    #[arg(long, value_name = "MS", hide = true,
          default_value_t = DEFAULT_HEALTH_SCAN_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub health_scan_interval_ms: u64,
}

/// The environment variable that may carry the server's proxy URL.
pub const PROXY_ENV: &str = "OCTOPUS_PROXY";

/// The default of `--health-scan-interval-ms`.
pub const DEFAULT_HEALTH_SCAN_INTERVAL_MS: u64 = 30_000;

/// The default of `--max-log-mib-per-step`.
pub const DEFAULT_MAX_LOG_MIB_PER_STEP: u64 = 100;

impl RunArgs {
    /// How listening tentacles are dialled: --no-proxy, else --proxy, else
    /// --proxy-file, else [`PROXY_ENV`], else `HTTPS_PROXY`/`NO_PROXY`. Warns
    /// (one log line) when --proxy carries a password, which `ps` shows.
    pub fn proxy_setting(&self) -> anyhow::Result<octo_comms::ProxySetting> {
        self.proxy_setting_with(|name| std::env::var(name).ok())
    }

    /// As [`Self::proxy_setting`], with the environment given.
    pub fn proxy_setting_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<octo_comms::ProxySetting> {
        use octo_comms::ProxySetting;
        if self.no_proxy {
            return Ok(ProxySetting::Direct);
        }
        let parse = |url: &str, from: &str| {
            octo_comms::proxy::parse_proxy_url(url)
                .map_err(|e| anyhow::anyhow!("{from} {}: {e}", redact_url(url)))
        };
        if let Some(url) = &self.proxy {
            let config = parse(url, "--proxy")?;
            if config.password.is_some() {
                tracing::warn!(
                    "--proxy carries a password, which every user of this machine can read on the command line (`ps`); give the URL with --proxy-file FILE or the {PROXY_ENV} environment variable instead"
                );
            }
            return Ok(ProxySetting::Explicit(config));
        }
        if let Some(path) = &self.proxy_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("--proxy-file {}: cannot read it: {e}", path.display())
            })?;
            let url = text.lines().map(str::trim).find(|l| !l.is_empty()).ok_or_else(|| {
                anyhow::anyhow!(
                    "--proxy-file {}: the file is empty; write the proxy URL (http://[USER:PASSWORD@]HOST:PORT) on its first line",
                    path.display()
                )
            })?;
            let config = parse(url, &format!("--proxy-file {}:", path.display()))?;
            warn_if_readable_by_others(path, config.password.is_some());
            return Ok(ProxySetting::Explicit(config));
        }
        if let Some(url) = env(PROXY_ENV).filter(|u| !u.trim().is_empty()) {
            return Ok(ProxySetting::Explicit(parse(url.trim(), PROXY_ENV)?));
        }
        Ok(ProxySetting::FromEnvironment)
    }
}

/// A proxy file holding a password should be the server user's alone.
fn warn_if_readable_by_others(path: &std::path::Path, has_password: bool) {
    use std::os::unix::fs::PermissionsExt;
    if !has_password {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "--proxy-file {} holds a password and is readable by other users (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
}

/// A proxy URL with any password replaced, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl RunArgs {
    /// This node's name: `--node-name`, or the host name; checked.
    pub fn node_name(&self) -> anyhow::Result<String> {
        let name = match &self.node_name {
            Some(n) => n.trim().to_string(),
            None => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "the host name cannot be read; name this node with --node-name NAME"
                    )
                })?,
        };
        if name.is_empty()
            || name.chars().count() > MAX_NODE_NAME
            || name.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            anyhow::bail!(
                "--node-name must be 1 to {MAX_NODE_NAME} characters without spaces or control characters (such as node-1), not {name:?}"
            );
        }
        Ok(name)
    }

    /// A server on 127.0.0.1 with free ports (API and comms), data in `data`:
    /// for tests, benchmarks and `octopus quickstart`.
    pub fn loopback(data: &std::path::Path) -> RunArgs {
        RunArgs {
            data: data.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            comms_listen_port: 0,
            comms_listen_address: "127.0.0.1".into(),
            ..RunArgs::default()
        }
    }
}

impl Default for RunArgs {
    /// The defaults of `octopus server run`.
    fn default() -> Self {
        RunArgs {
            data: PathBuf::from("octopus-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            comms_listen_port: 10943,
            comms_listen_address: "0.0.0.0".into(),
            database_url: None,
            node_name: None,
            task_cap: DEFAULT_TASK_CAP,
            calamari: None,
            tentacle: None,
            proxy: None,
            proxy_file: None,
            no_proxy: false,
            web_socket_listen_port: None,
            web_socket_path: octo_comms::websocket::DEFAULT_PATH.into(),
            session_idle_hours: 8.0,
            max_parallel_steps: octo_engine::DEFAULT_MAX_PARALLEL_STEPS,
            max_running_steps: octo_engine::DEFAULT_MAX_RUNNING_STEPS,
            max_concurrent_handshakes: octo_comms::DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            max_log_mib_per_step: DEFAULT_MAX_LOG_MIB_PER_STEP,
            health_scan_interval_ms: DEFAULT_HEALTH_SCAN_INTERVAL_MS,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proxy_flags_map_to_settings_and_hide_passwords() {
        use octo_comms::ProxySetting;
        let args = |proxy: Option<&str>, no_proxy| RunArgs {
            proxy: proxy.map(str::to_string),
            no_proxy,
            ..RunArgs::default()
        };
        assert_eq!(
            args(None, false).proxy_setting().unwrap(),
            ProxySetting::FromEnvironment
        );
        assert_eq!(
            args(None, true).proxy_setting().unwrap(),
            ProxySetting::Direct
        );
        match args(Some("http://u:secret@proxy:3128"), false)
            .proxy_setting()
            .unwrap()
        {
            ProxySetting::Explicit(c) => {
                assert_eq!((c.host.as_str(), c.port), ("proxy", 3128));
            }
            other => panic!("{other:?}"),
        }
        let e = args(Some("socks5://u:secret@proxy:1080"), false)
            .proxy_setting()
            .unwrap_err()
            .to_string();
        assert!(e.contains("socks5") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn the_proxy_comes_from_a_file_or_the_environment_too() {
        use octo_comms::ProxySetting;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("proxy");
        std::fs::write(&file, "\n  http://u:secret@file-proxy:3128  \n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let env = |name: &str| (name == PROXY_ENV).then(|| "http://env-proxy:8080".to_string());
        let no_env = |_: &str| None;
        let host = |s: ProxySetting| match s {
            ProxySetting::Explicit(c) => (c.host, c.port, c.password),
            other => panic!("{other:?}"),
        };
        let from_file = RunArgs {
            proxy_file: Some(file.clone()),
            ..RunArgs::default()
        };
        assert_eq!(
            host(from_file.proxy_setting_with(env).unwrap()),
            ("file-proxy".into(), 3128, Some("secret".into()))
        );
        assert_eq!(
            host(RunArgs::default().proxy_setting_with(env).unwrap()),
            ("env-proxy".into(), 8080, None)
        );
        assert_eq!(
            RunArgs::default().proxy_setting_with(no_env).unwrap(),
            ProxySetting::FromEnvironment
        );
        let direct = RunArgs {
            no_proxy: true,
            ..RunArgs::default()
        };
        assert_eq!(
            direct.proxy_setting_with(env).unwrap(),
            ProxySetting::Direct
        );
        // Errors name the file and never show the password.
        std::fs::write(&file, "socks5://u:secret@p:1\n").unwrap();
        let e = from_file
            .proxy_setting_with(no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--proxy-file") && !e.contains("secret"), "{e}");
        std::fs::write(&file, "\n\n").unwrap();
        let e = from_file
            .proxy_setting_with(no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let missing = RunArgs {
            proxy_file: Some(dir.path().join("nope")),
            ..RunArgs::default()
        };
        let e = missing.proxy_setting_with(no_env).unwrap_err().to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }
}
