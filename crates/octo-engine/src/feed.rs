//! Where the built-in feed keeps package files: `DATA/packages/<sha256>`, one
//! file per content, whatever the IDs and versions that use it. The feed's API
//! writes them; deployment steps read them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use octo_store::Package;

/// Pushes in progress are received as `DATA/packages/.incoming-*`.
pub const INCOMING_PREFIX: &str = ".incoming-";

/// The feed's file layout under a server's data directory, and the lock that
/// makes placing a file and recording (or deleting) its row one step.
#[derive(Debug, Clone)]
pub struct PackageFiles {
    dir: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl PartialEq for PackageFiles {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl Eq for PackageFiles {}

impl PackageFiles {
    /// The feed of the server whose data directory is `data`.
    pub fn in_data_dir(data: &Path) -> Self {
        Self {
            dir: data.join("packages"),
            lock: Arc::default(),
        }
    }

    /// The folder holding the files (and pushes in progress, `.incoming-*`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored file of a package.
    pub fn file_of(&self, p: &Package) -> PathBuf {
        self.by_sha256(&p.sha256)
    }

    /// The stored file with this content.
    pub fn by_sha256(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.to_ascii_lowercase())
    }

    /// Held while a file is placed and its row recorded, or a row deleted and
    /// its file with it: whether a file is used is then never half-decided.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Removes what pushes left when the server died during them (at start,
    /// before any push); answers how many files.
    pub fn remove_incoming(&self) -> std::io::Result<usize> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(INCOMING_PREFIX)
            {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
