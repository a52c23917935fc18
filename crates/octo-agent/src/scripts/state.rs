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

/// Writes `state.json` in `dir` atomically (temporary file, rename): a
/// tentacle that stops at any point (killed, upgraded, crashed) finds the old
/// state or the new one, never a torn file.
///
/// Not flushed to the disk (no fsync): the file is for a tentacle process that
/// restarts on a running machine, whose page cache holds it. After a power
/// loss every script is dead anyway, and a work directory whose state did not
/// reach the disk is reported as a script whose outcome is unknown (exit code
/// `TENTACLE_RESTARTED`), never run again, exactly as an unreadable state is.
/// An fsync costs milliseconds on virtual disks (4 ms here) and a script wrote
/// this file three times in the path of its round trip.
pub(crate) fn write(dir: &Path, state: &Persisted) -> std::io::Result<()> {
    let tmp = dir.join(STATE_TMP);
    let mut f = std::io::BufWriter::new(File::create(&tmp)?);
    serde_json::to_writer_pretty(&mut f, state)?;
    f.write_all(b"\n")?;
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    fs::rename(&tmp, dir.join(STATE_FILE))
}

/// Reads `state.json` in `dir`.
pub(crate) fn read(dir: &Path) -> Result<Persisted, String> {
    let path: PathBuf = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}
