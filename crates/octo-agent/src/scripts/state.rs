//! `state.json`: what a script's work directory says about it, written atomically.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File names inside a work directory that belong to the tentacle.
pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const STATE_TMP: &str = "state.json.tmp";
pub(crate) const LOG_FILE: &str = "output.log";

/// The lifecycle stage recorded on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stage {
    Pending,
    Running,
    Complete,
}

/// Contents of `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub(crate) ticket: String,
    pub(crate) state: Stage,
    /// Final when `state` is complete.
    pub(crate) exit_code: Option<i32>,
    /// Process id of the script, which is also its process group id.
    pub(crate) pid: Option<i32>,
    pub(crate) created_unix_ms: i64,
    pub(crate) started_unix_ms: Option<i64>,
    pub(crate) finished_unix_ms: Option<i64>,
    /// Version of the tentacle that wrote the file.
    pub(crate) tentacle_version: String,
}

/// Writes `state.json` in `dir` atomically (temporary file, fsync, rename).
pub(crate) fn write(dir: &Path, state: &Persisted) -> std::io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    let mut f = File::create(&tmp)?;
    serde_json::to_writer_pretty(&mut f, state)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Reads `state.json` in `dir`.
pub(crate) fn read(dir: &Path) -> Result<Persisted, String> {
    let path: PathBuf = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}
