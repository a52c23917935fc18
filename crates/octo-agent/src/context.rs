//! What every service of one tentacle instance shares.

use std::path::PathBuf;

/// The tentacle's version, reported to servers and to scripts.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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
