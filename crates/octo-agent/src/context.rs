//! What every service of one tentacle instance shares.

use std::path::PathBuf;

/// The version this crate was built as.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

static REPORTED: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The tentacle's version, reported to servers and to scripts: [`VERSION`]
/// unless the binary said otherwise with [`report_version`].
pub fn version() -> &'static str {
    REPORTED.get().copied().unwrap_or(VERSION)
}

/// Sets the version [`version`] reports, once, before any service starts (a
/// binary built as another release, e.g. the older tentacle of the upgrade
/// tests). Later calls are ignored.
pub fn report_version(version: &'static str) {
    let _ = REPORTED.set(version);
}

/// Paths and names of one running tentacle instance.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// Instance name (`--instance`, default "Tentacle").
    pub instance_name: String,
    /// Home directory: work folders, logs, received files, tools.
    pub home: PathBuf,
    /// Applications directory: where packages are deployed.
    pub applications: PathBuf,
}

impl AgentContext {
    /// `HOME/Work`: one folder per script ticket.
    pub fn work_root(&self) -> PathBuf {
        self.home.join("Work")
    }

    /// `HOME/Files`: received files (packages).
    pub fn files_root(&self) -> PathBuf {
        self.home.join("Files")
    }

    /// `HOME/Tools`: the deployment tool, by version.
    pub fn tools_root(&self) -> PathBuf {
        self.home.join("Tools")
    }

    /// `HOME/Logs`: the agent's rolling log files.
    pub fn logs_root(&self) -> PathBuf {
        self.home.join("Logs")
    }
}
