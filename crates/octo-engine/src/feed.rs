//! Where the built-in feed keeps package files: `DATA/packages/<sha256>`, one
//! file per content, whatever the IDs and versions that use it. The feed's API
//! writes them; deployment steps read them.

use std::path::{Path, PathBuf};

use octo_store::Package;

/// The feed's file layout under a server's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageFiles {
    dir: PathBuf,
}

impl PackageFiles {
    /// The feed of the server whose data directory is `data`.
    pub fn in_data_dir(data: &Path) -> Self {
        Self {
            dir: data.join("packages"),
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
}
