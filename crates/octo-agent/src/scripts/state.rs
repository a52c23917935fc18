//! `state.json`: what a script's work directory says about it, rewritten in place.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File names inside a work directory that belong to the tentacle.
pub(crate) const STATE_FILE: &str = "state.json";
/// Written by tentacles before 2026-12: still reserved, so that no request's
/// file takes the name of one a previous version may have left.
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

/// Writes `state.json` in `dir` in place: one `pwrite` of the whole document at
/// offset 0, padded with spaces (JSON's trailing whitespace) to at least the
/// file's length, so no truncation follows and a reader finds the old state or
/// the new one. The document is far smaller than a page, and the kernel copies a
/// write within one page at once, so a tentacle that stops at any point (killed,
/// upgraded, crashed) does not leave a torn file; if one were ever torn, it is
/// unreadable and handled like a lost one (below).
///
/// Neither a temporary file nor a rename: a script's state changes three times,
/// and on ext4 each temporary file was an inode created and one evicted (with
/// the old file's blocks written out by the rename), about a third of the
/// tentacle's CPU for a short script.
///
/// Not flushed to the disk (no fsync): the file is for a tentacle process that
/// restarts on a running machine, whose page cache holds it. After a power
/// loss every script is dead anyway, and a work directory whose state did not
/// reach the disk is reported as a script whose outcome is unknown (exit code
/// `TENTACLE_RESTARTED`), never run again, exactly as an unreadable state is.
/// An fsync costs milliseconds on virtual disks (4 ms here) and a script wrote
/// this file three times in the path of its round trip.
///
/// The file is created when missing (a new work directory); the directory
/// itself never is, so a write after the directory's removal fails rather than
/// leaving a stray file.
pub(crate) fn write(dir: &Path, state: &Persisted) -> std::io::Result<()> {
    let mut doc = serde_json::to_vec_pretty(state)?;
    doc.push(b'\n');
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(STATE_FILE))?;
    pad_to(&mut doc, file.metadata()?.len());
    file.write_all_at(&doc, 0)
}

/// Pads `doc` (ending in a newline) with spaces before that newline up to
/// `len` bytes, so it covers a longer document written before.
fn pad_to(doc: &mut Vec<u8>, len: u64) {
    let Ok(len) = usize::try_from(len) else {
        return;
    };
    if doc.len() < len {
        doc.pop();
        doc.resize(len - 1, b' ');
        doc.push(b'\n');
    }
}

/// Reads `state.json` in `dir`.
pub(crate) fn read(dir: &Path) -> Result<Persisted, String> {
    let path: PathBuf = dir.join(STATE_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ticket: &str, stage: Stage, exit_code: Option<i32>) -> Persisted {
        Persisted {
            ticket: ticket.into(),
            state: stage,
            exit_code,
            pid: Some(4242),
            created_unix_ms: 1,
            started_unix_ms: Some(2),
            finished_unix_ms: None,
            tentacle_version: "test".into(),
        }
    }

    #[test]
    fn a_shorter_state_over_a_longer_one_reads_back_whole() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let long = state(&"x".repeat(200), Stage::Running, None);
        write(dir.path(), &long).expect("first write");
        let len = fs::metadata(dir.path().join(STATE_FILE))
            .expect("state file")
            .len();
        let short = state("t", Stage::Complete, Some(3));
        write(dir.path(), &short).expect("second write");
        let back = read(dir.path()).expect("the shorter state parses");
        assert_eq!(back.ticket, "t");
        assert_eq!(back.state, Stage::Complete);
        assert_eq!(back.exit_code, Some(3));
        // Padded, not truncated: one write, the same length.
        let bytes = fs::read(dir.path().join(STATE_FILE)).expect("state file");
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(bytes.last(), Some(&b'\n'));
        // No temporary file is left beside it.
        assert!(!dir.path().join(STATE_TMP).exists());
    }

    #[test]
    fn a_longer_state_extends_the_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        write(dir.path(), &state("t", Stage::Pending, None)).expect("first write");
        write(dir.path(), &state(&"y".repeat(300), Stage::Running, None)).expect("second");
        assert_eq!(read(dir.path()).expect("parses").ticket, "y".repeat(300));
    }

    #[test]
    fn no_write_once_the_directory_is_gone() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let gone = dir.path().join("removed");
        assert!(write(&gone, &state("t", Stage::Complete, Some(0))).is_err());
        assert!(!gone.exists());
    }

    #[test]
    fn padding_keeps_the_newline_last() {
        let mut doc = b"{}\n".to_vec();
        pad_to(&mut doc, 8);
        assert_eq!(doc, b"{}     \n");
        let mut doc = b"{\"a\":1}\n".to_vec();
        pad_to(&mut doc, 3);
        assert_eq!(doc, b"{\"a\":1}\n");
    }
}
