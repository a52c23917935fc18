//! The server's options (`octopus server run`).

use clap::builder::TypedValueParser;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Database URL; default: SQLite in the data directory (sqlite://DATA/octopus.db).
    #[arg(long)]
    pub database_url: Option<String>,
    /// The deployment tool binary to push to tentacles (default: `calamari`
    /// beside this binary).
    #[arg(long, env = "OCTOPUS_CALAMARI")]
    pub calamari: Option<PathBuf>,
    /// HTTP CONNECT proxy for dialling listening tentacles,
    /// `http://[USER:PASSWORD@]HOST:PORT` (default: `HTTPS_PROXY`/`NO_PROXY` from the
    /// environment; TLS to the tentacle stays end to end through the tunnel).
    #[arg(long, value_name = "URL", conflicts_with = "no_proxy")]
    pub proxy: Option<String>,
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
}

/// The default of `--max-log-mib-per-step`.
pub const DEFAULT_MAX_LOG_MIB_PER_STEP: u64 = 100;

impl RunArgs {
    /// How listening tentacles are dialled.
    pub fn proxy_setting(&self) -> anyhow::Result<octo_comms::ProxySetting> {
        use octo_comms::ProxySetting;
        Ok(match (&self.proxy, self.no_proxy) {
            (_, true) => ProxySetting::Direct,
            (Some(url), false) => ProxySetting::Explicit(
                octo_comms::proxy::parse_proxy_url(url)
                    .map_err(|e| anyhow::anyhow!("--proxy {}: {e}", redact_url(url)))?,
            ),
            (None, false) => ProxySetting::FromEnvironment,
        })
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
            calamari: None,
            proxy: None,
            no_proxy: false,
            web_socket_listen_port: None,
            web_socket_path: octo_comms::websocket::DEFAULT_PATH.into(),
            session_idle_hours: 8.0,
            max_parallel_steps: octo_engine::DEFAULT_MAX_PARALLEL_STEPS,
            max_running_steps: octo_engine::DEFAULT_MAX_RUNNING_STEPS,
            max_concurrent_handshakes: octo_comms::DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            max_log_mib_per_step: DEFAULT_MAX_LOG_MIB_PER_STEP,
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
}
