//! The deployment journal: `DeploymentJournal.json`, a JSON array of [`JournalEntry`],
//! oldest first, one per deployment.
//!
//! What this module keeps true:
//! - every change is a read-modify-write under an exclusive `flock` on
//!   `<journal>.lock` (beside the journal), so deployments running at once never lose
//!   each other's entries;
//! - the journal is replaced whole (temporary file in the same folder, synced, renamed),
//!   so a reader sees the old or the new array, never half of one;
//! - a journal that cannot be parsed is never overwritten: it is renamed to
//!   `<journal>.corrupt-<time>`, reported, and a new journal starts.
//!
//! Times are RFC 3339 UTC strings with milliseconds ([`crate::time`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::console;
use crate::error::DeployError;

/// The journal's file name in the tentacle's home folder.
pub const FILE_NAME: &str = "DeploymentJournal.json";

/// One deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Unique id: `<started unix ms>-<process id>`.
    pub id: String,
    /// The environment deployed to.
    pub environment: String,
    /// The package id.
    pub package_id: String,
    /// The package version.
    pub version: String,
    /// The package file deployed.
    pub package_file: PathBuf,
    /// SHA-256 of the package file, lowercase hex.
    pub package_sha256: String,
    /// The folder the package was extracted to; `None` when it was refused or
    /// extraction failed.
    pub extracted_to: Option<PathBuf>,
    /// When the deployment started (RFC 3339 UTC).
    pub started_at: String,
    /// When it finished (RFC 3339 UTC); `None` while it runs, or when calamari was killed
    /// before it could finish.
    pub finished_at: Option<String>,
    /// Whether it succeeded.
    pub success: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether retention removed its folder.
    #[serde(default)]
    pub removed_by_retention: bool,
}

/// The journal file at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Journal { path: path.into() }
    }

    /// Where the journal is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where its lock file is: the journal's path with `.lock` appended.
    pub fn lock_path(&self) -> PathBuf {
        with_suffix(&self.path, ".lock")
    }

    /// Reads the entries (none when the file does not exist), without locking: the file
    /// is only ever replaced whole, so this sees a consistent array.
    pub fn read(&self) -> Result<Vec<JournalEntry>, DeployError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                DeployError::other(format!(
                    "the deployment journal {} is not valid: {e}",
                    self.path.display()
                ))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(DeployError::io(
                "reading the deployment journal",
                &self.path,
                &e,
            )),
        }
    }

    /// Locks the journal, reads it, lets `f` change the entries, writes them back and
    /// unlocks. A corrupt journal is backed up and `f` starts from no entries.
    pub fn update<R>(&self, f: impl FnOnce(&mut Vec<JournalEntry>) -> R) -> Result<R, DeployError> {
        let _lock = self.lock()?;
        let mut entries = self.read_or_back_up()?;
        let result = f(&mut entries);
        self.write(&entries)?;
        Ok(result)
    }

    fn lock(&self) -> Result<Flock<File>, DeployError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .map_err(|e| DeployError::io("creating the journal's folder", dir, &e))?;
        }
        let lock_path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| DeployError::io("opening the journal lock", &lock_path, &e))?;
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((file, Errno::EWOULDBLOCK)) => file,
            Err((_, e)) => {
                return Err(DeployError::io(
                    "locking the journal",
                    &lock_path,
                    &e.into(),
                ))
            }
        };
        console::info(&format!(
            "Waiting for another deployment to release the journal lock {}",
            lock_path.display()
        ));
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| DeployError::io("locking the journal", &lock_path, &e.into()))
    }

    fn read_or_back_up(&self) -> Result<Vec<JournalEntry>, DeployError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(DeployError::io(
                    "reading the deployment journal",
                    &self.path,
                    &e,
                ))
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(entries) => Ok(entries),
            Err(parse_error) => {
                let backup = self.backup_path();
                fs::rename(&self.path, &backup).map_err(|e| {
                    DeployError::io("backing up the corrupt deployment journal", &self.path, &e)
                })?;
                console::warn(&format!(
                    "the deployment journal {} was corrupt ({parse_error}); it was moved to {} and a new journal started\nretention does not know the deployments recorded there: remove their folders by hand if needed",
                    self.path.display(),
                    backup.display()
                ));
                Ok(Vec::new())
            }
        }
    }

    fn backup_path(&self) -> PathBuf {
        let stamp = crate::time::compact(SystemTime::now());
        let base = with_suffix(&self.path, &format!(".corrupt-{stamp}"));
        let mut candidate = base.clone();
        let mut n = 1;
        while fs::symlink_metadata(&candidate).is_ok() {
            candidate = with_suffix(&base, &format!("-{n}"));
            n += 1;
        }
        candidate
    }

    fn write(&self, entries: &[JournalEntry]) -> Result<(), DeployError> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".DeploymentJournal-")
            .tempfile_in(dir)
            .map_err(|e| DeployError::io("creating a temporary journal in", dir, &e))?;
        let mut json = serde_json::to_vec_pretty(entries).map_err(|e| {
            DeployError::other(format!(
                "the deployment journal cannot be written as JSON: {e}\njournal: {}",
                self.path.display()
            ))
        })?;
        json.push(b'\n');
        tmp.write_all(&json)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| DeployError::io("writing the deployment journal", tmp.path(), &e))?;
        tmp.persist(&self.path).map_err(|e| {
            DeployError::io("replacing the deployment journal", &self.path, &e.error)
        })?;
        // Make the rename durable; failing to sync a folder is not worth failing for.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(id: &str) -> JournalEntry {
        JournalEntry {
            id: id.into(),
            environment: "Production".into(),
            package_id: "Acme.Web".into(),
            version: "1.0.0".into(),
            package_file: "/tmp/p.zip".into(),
            package_sha256: "00".into(),
            extracted_to: None,
            started_at: crate::time::now(),
            finished_at: None,
            success: false,
            error: None,
            removed_by_retention: false,
        }
    }

    #[test]
    fn appends_and_backs_up_corrupt_journals() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("sub").join(FILE_NAME));
        assert!(journal.read().unwrap().is_empty());
        journal.update(|e| e.push(entry("a"))).unwrap();
        journal.update(|e| e.push(entry("b"))).unwrap();
        let ids: Vec<_> = journal.read().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["a", "b"]);

        fs::write(journal.path(), b"[{not json").unwrap();
        assert!(journal.read().is_err());
        journal.update(|e| e.push(entry("c"))).unwrap();
        let ids: Vec<_> = journal.read().unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["c"]);
        let backups: Vec<_> = fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("DeploymentJournal.json.corrupt-"))
            .collect();
        assert_eq!(backups.len(), 1, "{backups:?}");
        let kept = fs::read(dir.path().join("sub").join(&backups[0])).unwrap();
        assert_eq!(kept, b"[{not json");
    }
}
