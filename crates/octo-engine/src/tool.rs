//! The deployment tool (`calamari`) this server carries and pushes to tentacles.
//!
//! The server does not embed the tool: it finds the `calamari` binary at start
//! (`--calamari PATH`, else `OCTOPUS_CALAMARI`, else beside the `octopus`
//! binary) and copies it, hashing the copy, to `DATA/tools/calamari-<sha256>`
//! (folder 0700, file 0700): what it pushes later is that snapshot, so an
//! upgrade that replaces the original file meanwhile cannot change the bytes
//! under a push (their size and hash were announced to tentacles). It asks the
//! snapshot for its version (`calamari version`). Older snapshots are removed.
//! A server without the tool still runs; deployments and upgrades then fail
//! saying how to provide it.
//!
//! On a tentacle the tool lives in `HOME/Tools/calamari/<version>/calamari`
//! (mode 0755) and counts as installed only once `.complete` sits beside it,
//! which the server uploads after the binary's upload was verified by hash. An
//! interrupted push therefore never leaves a version that looks complete.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::binaries;

/// The file name of the tool on both sides.
pub const TOOL_FILE: &str = "calamari";
/// The marker that makes an installed version count.
pub const COMPLETE_MARKER: &str = ".complete";

/// The tool build this server pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolBuild {
    /// The server's snapshot of the binary (what it pushes).
    pub path: PathBuf,
    /// Where the binary was found at start.
    pub source: PathBuf,
    /// What `calamari version` printed, e.g. "0.1.0".
    pub version: String,
    /// SHA-256 of the binary, 64 upper-case hex (as tentacles report hashes).
    pub sha256: String,
    pub size: u64,
}

impl ToolBuild {
    /// The binary's path on a tentacle, relative to its home.
    pub fn remote_path(&self) -> String {
        format!("Tools/calamari/{}/{TOOL_FILE}", self.version)
    }

    /// The completion marker's path on a tentacle, relative to its home.
    pub fn remote_marker(&self) -> String {
        format!("Tools/calamari/{}/{COMPLETE_MARKER}", self.version)
    }

    /// Finds the tool, copies it into `snapshots` (created 0700) as
    /// `calamari-<sha256>` while hashing the copy, and runs the copy for its
    /// version. Err says what is wrong and how to fix it.
    pub async fn locate(explicit: Option<&Path>, snapshots: &Path) -> Result<ToolBuild, String> {
        let source = match explicit {
            Some(p) => {
                if !p.is_file() {
                    return Err(format!(
                        "the deployment tool {} (from --calamari or OCTOPUS_CALAMARI) does not exist",
                        p.display()
                    ));
                }
                p.to_path_buf()
            }
            None => binaries::beside_this_binary(TOOL_FILE).ok_or_else(|| {
                "the deployment tool `calamari` was not found beside the octopus binary; build it \
                 (`cargo build -p octo-calamari`) and put it there, or start the server with \
                 --calamari PATH"
                    .to_string()
            })?,
        };
        let (path, sha256, size) = {
            let (from, dir) = (source.clone(), snapshots.to_path_buf());
            tokio::task::spawn_blocking(move || snapshot(&from, &dir))
                .await
                .map_err(|e| format!("copying {}: {e}", source.display()))??
        };
        let version = run_version(&path).await?;
        Ok(ToolBuild {
            path,
            source,
            version,
            sha256,
            size,
        })
    }
}

/// Copies `source` into `dir` as `calamari-<sha256>` (0700), hashing what was
/// copied, and removes older snapshots; answers (path, SHA-256, size).
fn snapshot(source: &Path, dir: &Path) -> Result<(PathBuf, String, u64), String> {
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("making {} mode 700: {e}", dir.display()))?;
    let mut input = fs::File::open(source)
        .map_err(|e| format!("reading the deployment tool {}: {e}", source.display()))?;
    let partial = dir.join(format!(".{TOOL_FILE}-{}.partial", std::process::id()));
    let written = (|| -> std::io::Result<(String, u64)> {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&partial)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            size += n as u64;
        }
        out.sync_all()?;
        Ok((hex_upper(&hasher.finalize()), size))
    })();
    let (sha256, size) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = fs::remove_file(&partial);
            return Err(format!(
                "copying the deployment tool {} to {}: {e}",
                source.display(),
                dir.display()
            ));
        }
    };
    let name = format!("{TOOL_FILE}-{}", sha256.to_ascii_lowercase());
    let path = dir.join(&name);
    fs::rename(&partial, &path).map_err(|e| {
        let _ = fs::remove_file(&partial);
        format!(
            "moving the deployment tool's copy to {}: {e}",
            path.display()
        )
    })?;
    // Older snapshots (and copies a crash left) are of no use any more.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let other = e.file_name();
            let other = other.to_string_lossy();
            let ours = other.starts_with(&format!("{TOOL_FILE}-"))
                || (other.starts_with(&format!(".{TOOL_FILE}-")) && other.ends_with(".partial"));
            if ours && other != name.as_str() {
                if let Err(err) = fs::remove_file(e.path()) {
                    tracing::warn!(
                        "cannot remove the old tool copy {}: {err}",
                        e.path().display()
                    );
                }
            }
        }
    }
    Ok((path, sha256, size))
}

async fn run_version(path: &Path) -> Result<String, String> {
    let out = binaries::output_of(path, &["version"], "deployment tool").await?;
    let version = String::from_utf8_lossy(&out).trim().to_string();
    semver::Version::parse(&version).map_err(|e| {
        format!(
            "`{} version` printed '{version}', which is not a semantic version: {e}",
            path.display()
        )
    })?;
    Ok(version)
}

pub(crate) fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// How a machine's installed tool compares with the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStatus {
    Current,
    Missing,
    /// Installed, but older than the server's.
    Older(String),
    /// Installed, newer or not comparable.
    Different(String),
}

/// Compares what a tentacle reported with the server's version.
pub fn compare(installed: &str, server: &str) -> ToolStatus {
    if installed.is_empty() {
        return ToolStatus::Missing;
    }
    if installed == server {
        return ToolStatus::Current;
    }
    match (
        semver::Version::parse(installed),
        semver::Version::parse(server),
    ) {
        (Ok(i), Ok(s)) if i < s => ToolStatus::Older(installed.to_string()),
        _ => ToolStatus::Different(installed.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_names_missing_older_and_current() {
        assert_eq!(compare("", "0.2.0"), ToolStatus::Missing);
        assert_eq!(compare("0.2.0", "0.2.0"), ToolStatus::Current);
        assert_eq!(compare("0.1.9", "0.2.0"), ToolStatus::Older("0.1.9".into()));
        assert_eq!(
            compare("0.3.0", "0.2.0"),
            ToolStatus::Different("0.3.0".into())
        );
        assert_eq!(
            compare("junk", "0.2.0"),
            ToolStatus::Different("junk".into())
        );
    }
}
