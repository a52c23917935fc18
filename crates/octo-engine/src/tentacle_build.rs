//! The tentacle binary this server carries, to upgrade tentacles with.
//!
//! As with the deployment tool ([`crate::tool`]), the server finds it at start
//! (`--tentacle PATH`, else `OCTOPUS_TENTACLE`, else `tentacle` beside the
//! `octopus` binary), asks it for its version (`tentacle version --format
//! json`) and hashes it. Without one the server runs, health checks say
//! nothing about upgrades, and upgrade requests are refused saying how to
//! provide it.
//!
//! On a tentacle the binary is uploaded to `HOME/Upgrade/<version>/tentacle`
//! (hash-verified by the file service) before the upgrade service swaps it in.

use std::path::{Path, PathBuf};

use crate::binaries;

/// The tentacle build this server upgrades tentacles to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TentacleBuild {
    /// Where the binary is on the server.
    pub path: PathBuf,
    /// The version it reports, e.g. "0.1.0".
    pub version: String,
    /// SHA-256 of the binary, 64 upper-case hex.
    pub sha256: String,
    pub size: u64,
}

impl TentacleBuild {
    /// Where the binary goes on a tentacle, relative to its home.
    pub fn remote_path(&self) -> String {
        format!("Upgrade/{}/tentacle", self.version)
    }

    /// Finds, runs and hashes the binary. Err says what is wrong and how to fix it.
    pub async fn locate(explicit: Option<&Path>) -> Result<TentacleBuild, String> {
        let path = match explicit {
            Some(p) if p.is_file() => p.to_path_buf(),
            Some(p) => {
                return Err(format!(
                    "the tentacle binary {} (from --tentacle or OCTOPUS_TENTACLE) does not exist",
                    p.display()
                ))
            }
            None => binaries::beside_this_binary("tentacle").ok_or_else(|| {
                "no `tentacle` binary beside the octopus binary, so tentacles cannot be upgraded \
                 from this server; put it there (the server packages do), or start the server \
                 with --tentacle PATH"
                    .to_string()
            })?,
        };
        let version = run_version(&path).await?;
        let (sha256, size) = {
            let p = path.clone();
            tokio::task::spawn_blocking(move || hash_file(&p))
                .await
                .map_err(|e| format!("hashing {}: {e}", path.display()))?
                .map_err(|e| format!("reading the tentacle binary {}: {e}", path.display()))?
        };
        Ok(TentacleBuild {
            path,
            version,
            sha256,
            size,
        })
    }
}

/// SHA-256 (upper-case hex) and size of a file. (Not snapshotted like the
/// deployment tool: a binary replaced after the start is refused by the
/// tentacle's hash check, not sent half-changed.)
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02X}")).collect();
    Ok((hex, size))
}

async fn run_version(path: &Path) -> Result<String, String> {
    let args = ["version", "--format", "json"];
    let out = binaries::output_of(path, &args, "tentacle binary").await?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
        format!(
            "`{} version --format json` did not print JSON: {e}",
            path.display()
        )
    })?;
    let version = v["version"]
        .as_str()
        .ok_or_else(|| {
            format!(
                "`{} version --format json` printed no version",
                path.display()
            )
        })?
        .to_string();
    semver::Version::parse(&version).map_err(|e| {
        format!(
            "the tentacle binary {} reports '{version}', which is not a semantic version: {e}",
            path.display()
        )
    })?;
    Ok(version)
}

/// Whether a tentacle reporting `running` is older than `carried` (both
/// semantic versions; anything unparsable is not called older).
pub fn is_older(running: &str, carried: &str) -> bool {
    match (
        semver::Version::parse(running.trim()),
        semver::Version::parse(carried.trim()),
    ) {
        (Ok(r), Ok(c)) => r < c,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_is_semantic() {
        assert!(is_older("0.0.1", "0.1.0"));
        assert!(is_older("0.9.0", "0.10.0"));
        assert!(is_older("1.0.0-beta", "1.0.0"));
        assert!(!is_older("0.1.0", "0.1.0"));
        assert!(!is_older("0.2.0", "0.1.0"));
        assert!(!is_older("test", "0.1.0"));
    }
}
