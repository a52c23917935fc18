//! Running an instance as a systemd service.

use std::path::{Path, PathBuf};

/// What goes into an instance's unit.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    /// Instance name.
    pub instance: String,
    /// Absolute path of the `tentacle` binary.
    pub binary: PathBuf,
    /// Configuration file, when the instance is not in the default registry.
    pub config: Option<PathBuf>,
    /// Registry directory to pass through (`TENTACLE_CONFIG_DIR`), if set.
    pub config_dir: Option<PathBuf>,
    /// Run as this user (and its group).
    pub user: Option<String>,
    /// Another unit to start after (`service --dependOn`).
    pub after: Option<String>,
}

/// The unit's name for an instance: `tentacle-<instance>.service` (lower case).
pub fn unit_name(instance: &str) -> String {
    format!("tentacle-{}.service", instance.to_ascii_lowercase())
}

/// Where units go: `$TENTACLE_SYSTEMD_DIR` (tests) or /etc/systemd/system.
pub fn unit_dir() -> PathBuf {
    std::env::var_os("TENTACLE_SYSTEMD_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/systemd/system"))
}

/// Is systemd the running init system here?
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Whether systemd runs here and would load units from `dir` (one of its
/// system unit folders): only then can `systemctl` enable and start them.
pub fn systemd_manages(dir: &Path) -> bool {
    const UNIT_DIRS: [&str; 4] = [
        "/etc/systemd/system",
        "/run/systemd/system",
        "/usr/lib/systemd/system",
        "/lib/systemd/system",
    ];
    systemd_running() && UNIT_DIRS.iter().any(|d| Path::new(d) == dir)
}

fn quote(arg: &str) -> String {
    // systemd command-line quoting: wrap in double quotes when needed.
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=:".contains(c))
    {
        arg.to_string()
    } else {
        format!(
            "\"{}\"",
            arg.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
        )
    }
}

/// The unit file text.
pub fn render(spec: &UnitSpec) -> String {
    let mut exec = vec![
        quote(&spec.binary.to_string_lossy()),
        "run".to_string(),
        "--instance".to_string(),
        quote(&spec.instance),
    ];
    if let Some(c) = &spec.config {
        exec.push("--config".into());
        exec.push(quote(&c.to_string_lossy()));
    }
    let mut s = String::new();
    s.push_str("# Written by `tentacle service --install`; regenerate rather than edit.\n");
    s.push_str("[Unit]\n");
    s.push_str(&format!(
        "Description=Octopus Tentacle (instance {})\n",
        spec.instance
    ));
    s.push_str("After=network-online.target");
    if let Some(after) = &spec.after {
        s.push(' ');
        s.push_str(&quote(after));
    }
    s.push_str("\nWants=network-online.target\n\n");
    s.push_str("[Service]\nType=simple\n");
    s.push_str(&format!("ExecStart={}\n", exec.join(" ")));
    if let Some(d) = &spec.config_dir {
        s.push_str(&format!(
            "Environment={}\n",
            quote(&format!("TENTACLE_CONFIG_DIR={}", d.to_string_lossy()))
        ));
    }
    if let Some(u) = &spec.user {
        s.push_str(&format!("User={u}\n"));
    }
    s.push_str("Restart=always\nRestartSec=5\n");
    s.push_str(
        "# Scripts run in process groups of their own; stopping the service stops them all.\n",
    );
    s.push_str("KillMode=control-group\nTimeoutStopSec=30\n");
    s.push_str("LimitNOFILE=65536\n\n");
    s.push_str("[Install]\nWantedBy=multi-user.target\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_essentials() {
        let u = render(&UnitSpec {
            instance: "Web 1".into(),
            binary: "/usr/bin/tentacle".into(),
            config: Some("/etc/my conf.toml".into()),
            config_dir: None,
            user: Some("octopus".into()),
            after: Some("postgresql.service".into()),
        });
        assert!(
            u.contains("After=network-online.target postgresql.service\n"),
            "{u}"
        );
        assert!(u.contains("ExecStart=/usr/bin/tentacle run --instance \"Web 1\" --config \"/etc/my conf.toml\"\n"), "{u}");
        assert!(
            u.contains("Restart=always\n")
                && u.contains("KillMode=control-group\n")
                && u.contains("User=octopus\n")
        );
        assert_eq!(unit_name("Web1"), "tentacle-web1.service");
    }
}
