//! An instance's configuration: one TOML file, written atomically.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use octo_comms::proxy::{ProxyConfig, ProxySetting};
use octo_tls::Thumbprint;
use serde::{Deserialize, Serialize};

/// Default listening port.
pub const DEFAULT_PORT: u16 = 10933;
/// Default port of a server's polling endpoint.
pub const DEFAULT_SERVER_COMMS_PORT: u16 = 10943;

/// Everything one tentacle instance needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TentacleConfig {
    /// Identity and directories.
    pub tentacle: TentacleSection,
    /// Listening mode.
    pub listen: ListenSection,
    /// Servers trusted to call this tentacle (listening), by thumbprint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_servers: Vec<TrustedServer>,
    /// Servers this tentacle polls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub polling_servers: Vec<PollingServer>,
    /// The proxy polling connections go through (`tentacle polling-proxy`).
    /// Absent: the `HTTPS_PROXY`/`NO_PROXY` environment variables decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_proxy: Option<ProxySection>,
}

/// `[tentacle]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TentacleSection {
    /// Instance name.
    pub instance: String,
    /// Home directory: work folders, logs, received files, tools.
    pub home: PathBuf,
    /// Applications directory: deployed packages.
    pub applications: PathBuf,
    /// Certificate (PEM).
    pub certificate: PathBuf,
    /// Private key (PEM, mode 0600).
    pub private_key: PathBuf,
}

/// `[listen]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Accept connections from servers.
    pub enabled: bool,
    /// Address to bind.
    pub address: String,
    /// Port to bind.
    pub port: u16,
}

/// `[[trusted_servers]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedServer {
    /// SHA-256 thumbprint, 64 upper-case hex.
    pub thumbprint: String,
}

/// `[[polling_servers]]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollingServer {
    /// The server's polling endpoint: "host:port" (TLS over TCP), or
    /// "wss://host:port/path" (its WebSocket port). A host name is sent as TLS SNI.
    pub address: String,
    /// The server's thumbprint (trusted for this connection).
    pub thumbprint: String,
    /// The subscription id the server knows this tentacle by.
    pub subscription_id: String,
    /// Connections to keep open (calls are multiplexed; more than 1 only adds redundancy).
    #[serde(default = "one")]
    pub connections: usize,
    /// Dial this "host:port" instead of the address's (which stays the TLS
    /// server name, SNI): for SNI routers and names DNS does not resolve here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_to: Option<String>,
    /// A certificate the server is rotating to (`octopus server
    /// rotate-certificate`), trusted on these connections beside `thumbprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotating_to: Option<String>,
}

impl PollingServer {
    /// Whether this server is polled over WebSocket (`wss://`).
    pub fn is_web_socket(&self) -> bool {
        octo_comms::websocket::is_web_socket_url(&self.address)
    }

    /// What is wrong with this entry, if anything.
    pub fn problem(&self) -> Option<String> {
        if let Err(e) = self.thumbprint.parse::<Thumbprint>() {
            return Some(e.to_string());
        }
        if let Some(Err(e)) = self.rotating_to.as_deref().map(str::parse::<Thumbprint>) {
            return Some(format!("rotating_to: {e}"));
        }
        if self.is_web_socket() {
            if let Err(e) = octo_comms::websocket::WebSocketUrl::parse(&self.address) {
                return Some(e);
            }
        } else if octo_comms::net::split_host_port(&self.address).is_none() {
            return Some(format!(
                "address '{}' is not HOST:PORT (or wss://HOST:PORT/PATH)",
                self.address
            ));
        }
        if let Some(c) = &self.connect_to {
            if octo_comms::net::split_host_port(c).is_none() {
                return Some(format!(
                    "connect_to '{c}' for {} is not HOST:PORT",
                    self.address
                ));
            }
        }
        if self.connections == 0 {
            return Some(format!(
                "connections for {} must be at least 1",
                self.address
            ));
        }
        None
    }
}

fn one() -> usize {
    1
}

/// Default port of a proxy given without one (as the original Tentacle).
pub const DEFAULT_PROXY_PORT: u16 = 80;

/// `[polling_proxy]`: like the original's `polling-proxy` settings.
///
/// `enabled = false`: connect directly, ignoring proxy environment variables.
/// `enabled = true` with a `host`: use that HTTP CONNECT proxy. `enabled = true`
/// without a host: use the proxy from the environment (`HTTPS_PROXY`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// Use a proxy at all.
    pub enabled: bool,
    /// The proxy's host name or IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The proxy's port (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// User name for the proxy's Basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for the proxy (this file is mode 0600; never shown or logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for ProxySection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySection")
            .field("enabled", &self.enabled)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .finish()
    }
}

impl ProxySection {
    /// What the comms layer does with this section.
    pub fn setting(&self) -> ProxySetting {
        if !self.enabled {
            return ProxySetting::Direct;
        }
        match self
            .host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())
        {
            None => ProxySetting::FromEnvironment,
            Some(host) => ProxySetting::Explicit(ProxyConfig {
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                port: self.port.unwrap_or(DEFAULT_PROXY_PORT),
                username: self.username.clone().filter(|u| !u.is_empty()),
                password: self.password.clone(),
            }),
        }
    }

    /// A copy fit for showing: the password replaced by "(set)".
    pub fn redacted(&self) -> Self {
        Self {
            password: self.password.as_ref().map(|_| "(set)".to_string()),
            ..self.clone()
        }
    }

    /// What is wrong with this section, if anything.
    pub fn problem(&self) -> Option<String> {
        let host = self.host.as_deref().map(str::trim).unwrap_or_default();
        if !host.is_empty() {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if host.contains("://")
                || host.contains(['/', '@', ' '])
                || (bare.contains(':') && bare.parse::<std::net::IpAddr>().is_err())
            {
                return Some(format!(
                    "proxy host '{host}' must be a host name or IP address only (the port goes in --proxy-port)"
                ));
            }
        } else if self.port.is_some() {
            return Some("a proxy port is set without a proxy host".into());
        }
        if self.port == Some(0) {
            return Some("the proxy port must not be 0".into());
        }
        if self.password.is_some() && self.username.as_deref().unwrap_or_default().is_empty() {
            return Some("a proxy password is set without a user name".into());
        }
        if self.username.as_deref().is_some_and(|u| u.contains(':')) {
            return Some("a proxy user name cannot contain ':' (Basic authentication)".into());
        }
        if (self.username.is_some() || self.password.is_some()) && host.is_empty() {
            return Some(
                "proxy credentials are set without a proxy host (a proxy from HTTPS_PROXY takes its credentials from the URL)"
                    .into(),
            );
        }
        None
    }
}

/// A configuration problem, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("cannot {action} configuration file {}: {source}", path.display())]
    Io {
        /// "read", "write", ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or not a tentacle configuration.
    #[error("configuration file {} does not parse: {message}; fix the file or recreate it with `tentacle create-instance`", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's words (line and column included).
        message: String,
    },
    /// A value in the file is wrong.
    #[error("configuration file {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        message: String,
    },
}

impl TentacleConfig {
    /// A new configuration: listening on 0.0.0.0:10933, trusting nobody yet.
    pub fn new(instance: &str, home: &Path, applications: Option<&Path>) -> Self {
        Self {
            tentacle: TentacleSection {
                instance: instance.to_string(),
                home: home.to_path_buf(),
                applications: applications
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| home.join("Applications")),
                certificate: home.join("tentacle.crt"),
                private_key: home.join("tentacle.key"),
            },
            listen: ListenSection {
                enabled: true,
                address: "0.0.0.0".into(),
                port: DEFAULT_PORT,
            },
            trusted_servers: Vec::new(),
            polling_servers: Vec::new(),
            polling_proxy: None,
        }
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: TentacleConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        for t in &self.trusted_servers {
            t.thumbprint
                .parse::<Thumbprint>()
                .map_err(|e| invalid(format!("trusted_servers: {e}")))?;
        }
        for p in &self.polling_servers {
            if let Some(problem) = p.problem() {
                return Err(invalid(format!("polling_servers: {problem}")));
            }
        }
        if let Some(problem) = self.polling_proxy.as_ref().and_then(ProxySection::problem) {
            return Err(invalid(format!(
                "polling_proxy: {problem}; fix it with `tentacle polling-proxy`"
            )));
        }
        Ok(())
    }

    /// How polling connections reach servers: not configured means the
    /// environment (`HTTPS_PROXY`/`NO_PROXY`) decides.
    pub fn polling_proxy_setting(&self) -> ProxySetting {
        self.polling_proxy
            .as_ref()
            .map_or(ProxySetting::FromEnvironment, ProxySection::setting)
    }

    /// A copy fit for showing: secrets (the proxy password) replaced by "(set)".
    pub fn redacted(&self) -> Self {
        Self {
            polling_proxy: self.polling_proxy.as_ref().map(ProxySection::redacted),
            ..self.clone()
        }
    }

    /// Every thumbprint this tentacle trusts: listening servers and polled servers.
    pub fn trusted_thumbprints(&self) -> Vec<Thumbprint> {
        let mut out: Vec<Thumbprint> = self
            .trusted_servers
            .iter()
            .map(|t| t.thumbprint.as_str())
            .chain(self.polling_servers.iter().map(|p| p.thumbprint.as_str()))
            .chain(
                self.polling_servers
                    .iter()
                    .filter_map(|p| p.rotating_to.as_deref()),
            )
            .filter_map(|t| t.parse().ok())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Adds a trusted server; false if it was already trusted.
    pub fn trust(&mut self, t: Thumbprint) -> bool {
        let s = t.to_string();
        if self.trusted_servers.iter().any(|x| x.thumbprint == s) {
            return false;
        }
        self.trusted_servers.push(TrustedServer { thumbprint: s });
        true
    }

    /// Removes a trusted server; false if it was not trusted.
    pub fn remove_trust(&mut self, t: Thumbprint) -> bool {
        let s = t.to_string();
        let before = self.trusted_servers.len();
        self.trusted_servers.retain(|x| x.thumbprint != s);
        before != self.trusted_servers.len()
    }

    /// Writes atomically (temporary file, fsync, rename): a crash leaves the old
    /// file or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = format!(
            "# Tentacle instance configuration, written by `tentacle`; safe to edit by hand.\n{}",
            toml::to_string_pretty(self).map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        );
        write_atomic(path, text.as_bytes(), 0o600).map_err(|source| ConfigError::Io {
            action: "write",
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Writes `data` to `path` atomically with `mode`, creating parent directories.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        let mut cfg = TentacleConfig::new("T", dir.path(), None);
        let tp = Thumbprint::of_der(b"x");
        assert!(cfg.trust(tp));
        assert!(!cfg.trust(tp));
        cfg.polling_servers.push(PollingServer {
            address: "octopus.example:10943".into(),
            thumbprint: Thumbprint::of_der(b"y").to_string(),
            subscription_id: "abc".into(),
            connections: 2,
            connect_to: None,
            rotating_to: None,
        });
        cfg.polling_servers.push(PollingServer {
            address: "wss://octopus.example:443/tentacle".into(),
            thumbprint: Thumbprint::of_der(b"z").to_string(),
            subscription_id: "def".into(),
            connections: 1,
            connect_to: Some("10.0.0.1:8443".into()),
            rotating_to: None,
        });
        assert!(!cfg.polling_servers[0].is_web_socket() && cfg.polling_servers[1].is_web_socket());
        cfg.save(&path).expect("save");
        let back = TentacleConfig::load(&path).expect("load");
        assert_eq!(back, cfg);
        assert_eq!(back.trusted_thumbprints().len(), 3);
        for (field, bad, says) in [
            ("address", "ws://h/x", "wss://"),
            ("address", "nohost", "not HOST:PORT"),
            ("connect_to", "x", "connect_to 'x'"),
        ] {
            let mut broken = cfg.clone();
            match field {
                "address" => broken.polling_servers[1].address = bad.into(),
                _ => broken.polling_servers[1].connect_to = Some(bad.into()),
            }
            broken.save(&path).expect("save");
            let e = TentacleConfig::load(&path).expect_err(bad).to_string();
            assert!(e.contains("polling_servers") && e.contains(says), "{e}");
        }
        cfg.save(&path).expect("save");
        assert!(cfg.remove_trust(tp));

        std::fs::write(&path, "[tentacle\n").expect("write");
        let e = TentacleConfig::load(&path)
            .expect_err("bad toml")
            .to_string();
        assert!(e.contains("does not parse") && e.contains("t.toml"), "{e}");
        std::fs::write(
            &path,
            toml::to_string(&cfg)
                .expect("ser")
                .replace(&Thumbprint::of_der(b"y").to_string(), "nope"),
        )
        .expect("write");
        let e = TentacleConfig::load(&path)
            .expect_err("bad thumbprint")
            .to_string();
        assert!(e.contains("polling_servers") && e.contains("'nope'"), "{e}");
    }

    #[test]
    fn polling_proxy_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.toml");
        let mut cfg = TentacleConfig::new("T", dir.path(), None);
        assert_eq!(cfg.polling_proxy_setting(), ProxySetting::FromEnvironment);
        let section = |enabled, host: Option<&str>| ProxySection {
            enabled,
            host: host.map(str::to_string),
            port: None,
            username: None,
            password: None,
        };
        cfg.polling_proxy = Some(section(false, None));
        assert_eq!(cfg.polling_proxy_setting(), ProxySetting::Direct);
        cfg.polling_proxy = Some(section(true, None));
        assert_eq!(cfg.polling_proxy_setting(), ProxySetting::FromEnvironment);
        cfg.polling_proxy = Some(ProxySection {
            port: Some(3128),
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..section(true, Some("proxy.example"))
        });
        assert_eq!(
            cfg.polling_proxy_setting(),
            ProxySetting::Explicit(
                ProxyConfig::new("proxy.example", 3128).with_credentials("u", "hunter2")
            )
        );
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let shown = toml::to_string(&cfg.redacted()).expect("ser");
        assert!(
            shown.contains("password = \"(set)\"") && !shown.contains("hunter2"),
            "{shown}"
        );
        cfg.save(&path).expect("save");
        assert_eq!(TentacleConfig::load(&path).expect("load"), cfg);
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        cfg.polling_proxy = Some(section(true, Some("http://proxy:3128")));
        cfg.save(&path).expect("save");
        let e = TentacleConfig::load(&path)
            .expect_err("bad host")
            .to_string();
        assert!(
            e.contains("polling_proxy") && e.contains("--proxy-port"),
            "{e}"
        );
        cfg.polling_proxy = Some(ProxySection {
            password: Some("p".into()),
            ..section(true, Some("proxy"))
        });
        assert!(cfg
            .polling_proxy
            .as_ref()
            .and_then(ProxySection::problem)
            .is_some());
        cfg.polling_proxy = Some(ProxySection {
            port: Some(1),
            ..section(true, None)
        });
        assert!(cfg
            .polling_proxy
            .as_ref()
            .and_then(ProxySection::problem)
            .is_some());
        cfg.polling_proxy = Some(section(true, Some("::1")));
        assert!(cfg
            .polling_proxy
            .as_ref()
            .and_then(ProxySection::problem)
            .is_none());
    }
}
