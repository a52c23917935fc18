//! The deployment tool (`calamari`) this server carries and pushes to tentacles.
//!
//! The server does not embed the tool: it finds the `calamari` binary at start
//! (`--calamari PATH`, else `OCTOPUS_CALAMARI`, else beside the `octopus`
//! binary), asks it for its version (`calamari version`) and hashes it. A server
//! without the tool still runs; deployments and upgrades then fail saying how to
//! provide it.
//!
//! On a tentacle the tool lives in `HOME/Tools/calamari/<version>/calamari`
//! (mode 0755) and counts as installed only once `.complete` sits beside it,
//! which the server uploads after the binary's upload was verified by hash. An
//! interrupted push therefore never leaves a version that looks complete.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// The file name of the tool on both sides.
pub const TOOL_FILE: &str = "calamari";
/// The marker that makes an installed version count.
pub const COMPLETE_MARKER: &str = ".complete";
/// How long `calamari version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The tool build this server pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolBuild {
    /// Where the binary is on the server.
    pub path: PathBuf,
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

    /// Finds, runs and hashes the tool. Err says what is wrong and how to fix it.
    pub async fn locate(explicit: Option<&Path>) -> Result<ToolBuild, String> {
        let path = match explicit {
            Some(p) => {
                if !p.is_file() {
                    return Err(format!(
                        "the deployment tool {} (from --calamari or OCTOPUS_CALAMARI) does not exist",
                        p.display()
                    ));
                }
                p.to_path_buf()
            }
            None => beside_this_binary().ok_or_else(|| {
                "the deployment tool `calamari` was not found beside the octopus binary; build it \
                 (`cargo build -p octo-calamari`) and put it there, or start the server with \
                 --calamari PATH"
                    .to_string()
            })?,
        };
        let version = run_version(&path).await?;
        let (sha256, size) = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || hash_file(&p))
                .await
                .map_err(|e| format!("hashing {}: {e}", path.display()))?
                .map_err(|e| format!("reading the deployment tool {}: {e}", path.display()))?
        };
        Ok(ToolBuild {
            path,
            version,
            sha256,
            size,
        })
    }
}

/// `calamari` next to the running binary, or one level up (test binaries run
/// from `target/<profile>/deps/`).
fn beside_this_binary() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(TOOL_FILE))
        .find(|p| p.is_file());
    found
}

async fn run_version(path: &Path) -> Result<String, String> {
    let run = tokio::process::Command::new(path)
        .arg("version")
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(format!(
                "cannot run the deployment tool {}: {e}",
                path.display()
            ))
        }
        Err(_) => {
            return Err(format!(
                "`{} version` did not answer within {} s",
                path.display(),
                VERSION_TIMEOUT.as_secs()
            ))
        }
    };
    if !out.status.success() {
        return Err(format!(
            "`{} version` failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    semver::Version::parse(&version).map_err(|e| {
        format!(
            "`{} version` printed '{version}', which is not a semantic version: {e}",
            path.display()
        )
    })?;
    Ok(version)
}

/// SHA-256 (upper-case hex) and length of a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex_upper(&hasher.finalize()), size))
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
