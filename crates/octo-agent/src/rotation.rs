//! Certificate rotation on the tentacle: the state `tentacle rotate-certificate`
//! stages and the agent carries out (proto/.../certificates.proto).
//!
//! `HOME/certificate-rotation.json` (0600, written atomically) records the
//! certificate being replaced, the staged one (its files beside the old ones),
//! which servers accepted it, and when the agent switched. The rules are here,
//! apart from IO: the agent switches once every server it trusts has accepted
//! (or when forced), and never twice.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use octo_tls::Thumbprint;
use serde::{Deserialize, Serialize};

/// The state file's name in the instance's home.
pub const STATE_FILE: &str = "certificate-rotation.json";

/// A rotation, staged or done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationState {
    /// The certificate being replaced.
    pub previous_thumbprint: String,
    /// The staged certificate.
    pub next_thumbprint: String,
    /// Its certificate file (PEM).
    pub next_certificate: PathBuf,
    /// Its private key file (PEM, 0600).
    pub next_private_key: PathBuf,
    /// When it was staged (ms since the epoch).
    pub started_at_ms: u64,
    /// Server thumbprints that accepted the staged certificate.
    #[serde(default)]
    pub accepted_by: BTreeSet<String>,
    /// Switch without waiting for every server.
    #[serde(default)]
    pub force: bool,
    /// When the agent switched to it (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_at_ms: Option<u64>,
}

impl RotationState {
    /// The staged certificate's thumbprint.
    pub fn next(&self) -> Option<Thumbprint> {
        self.next_thumbprint.parse().ok()
    }

    /// Whether the agent has switched to the staged certificate.
    pub fn switched(&self) -> bool {
        self.switched_at_ms.is_some()
    }

    /// Records that the server answering to `server` accepted `next`. Fails
    /// when `next` is not the staged certificate. Returns whether anything new
    /// was recorded.
    pub fn record_acceptance(
        &mut self,
        next: &Thumbprint,
        server: &[Thumbprint],
    ) -> Result<bool, String> {
        if self.next().as_ref() != Some(next) {
            return Err(format!(
                "{next} is not the certificate this tentacle is rotating to ({})",
                self.next_thumbprint
            ));
        }
        let mut changed = false;
        for s in server {
            changed |= self.accepted_by.insert(s.to_string());
        }
        Ok(changed)
    }

    /// Trusted servers that have not accepted yet.
    pub fn waiting_for(&self, trusted: &[Thumbprint]) -> Vec<Thumbprint> {
        trusted
            .iter()
            .filter(|t| !self.accepted_by.contains(&t.to_string()))
            .copied()
            .collect()
    }

    /// Whether to switch now: not switched yet, and every trusted server
    /// accepted (or forced).
    pub fn should_switch(&self, trusted: &[Thumbprint]) -> bool {
        !self.switched() && (self.force || self.waiting_for(trusted).is_empty())
    }

    /// Where the state of the instance with `home` lives.
    pub fn path(home: &Path) -> PathBuf {
        home.join(STATE_FILE)
    }

    /// Reads the state; `Ok(None)` when there is none.
    pub fn load(home: &Path) -> Result<Option<Self>, String> {
        let path = Self::path(home);
        match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).map(Some).map_err(|e| {
                format!(
                    "{} is damaged ({e}); remove it and run `tentacle rotate-certificate` again",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Writes the state atomically, 0600.
    pub fn save(&self, home: &Path) -> Result<(), String> {
        let path = Self::path(home);
        let data = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::config::write_atomic(&path, &data, 0o600)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}

/// File names for a staged certificate: beside `current`, named after the
/// thumbprint, so they never collide with the files in use.
pub fn staged_paths(current_certificate: &Path, next: &Thumbprint) -> (PathBuf, PathBuf) {
    let dir = current_certificate.parent().unwrap_or(Path::new("."));
    let short = &next.to_string()[..16];
    (
        dir.join(format!("tentacle-{short}.crt")),
        dir.join(format!("tentacle-{short}.key")),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tp(n: u8) -> Thumbprint {
        Thumbprint::of_der(&[n])
    }

    fn state() -> RotationState {
        RotationState {
            previous_thumbprint: tp(1).to_string(),
            next_thumbprint: tp(2).to_string(),
            next_certificate: "/h/next.crt".into(),
            next_private_key: "/h/next.key".into(),
            started_at_ms: 5,
            accepted_by: BTreeSet::new(),
            force: false,
            switched_at_ms: None,
        }
    }

    #[test]
    fn switches_once_every_trusted_server_accepted() {
        let mut s = state();
        let (a, b, b_old) = (tp(10), tp(11), tp(12));
        let trusted = [a, b, b_old];
        assert!(!s.should_switch(&trusted));
        assert!(s.record_acceptance(&tp(2), &[a]).unwrap());
        assert!(!s.record_acceptance(&tp(2), &[a]).unwrap());
        assert_eq!(s.waiting_for(&trusted), vec![b, b_old]);
        // One server answering to two thumbprints (it rotated its own).
        s.record_acceptance(&tp(2), &[b, b_old]).unwrap();
        assert!(s.waiting_for(&trusted).is_empty());
        assert!(s.should_switch(&trusted));
        s.switched_at_ms = Some(9);
        assert!(!s.should_switch(&trusted));
    }

    #[test]
    fn refuses_an_acceptance_of_another_certificate_and_force_skips_waiting() {
        let mut s = state();
        let e = s.record_acceptance(&tp(3), &[tp(10)]).unwrap_err();
        assert!(e.contains(&tp(3).to_string()), "{e}");
        assert!(s.accepted_by.is_empty());
        assert!(!s.should_switch(&[tp(10)]));
        s.force = true;
        assert!(s.should_switch(&[tp(10)]));
        // Nobody to tell: switch at once.
        assert!(state().should_switch(&[]));
    }

    #[test]
    fn saves_and_loads_privately() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RotationState::load(dir.path()).unwrap(), None);
        let mut s = state();
        s.accepted_by.insert(tp(10).to_string());
        s.save(dir.path()).unwrap();
        assert_eq!(RotationState::load(dir.path()).unwrap(), Some(s));
        let mode = std::fs::metadata(RotationState::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(RotationState::path(dir.path()), "{").unwrap();
        assert!(RotationState::load(dir.path())
            .unwrap_err()
            .contains("rotate-certificate"));
    }

    #[test]
    fn staged_files_sit_beside_the_current_ones() {
        let (c, k) = staged_paths(Path::new("/home/t/tentacle.crt"), &tp(2));
        assert_eq!(c.parent(), Some(Path::new("/home/t")));
        assert!(c.to_string_lossy().ends_with(".crt") && k.to_string_lossy().ends_with(".key"));
        assert_ne!(c, Path::new("/home/t/tentacle.crt"));
    }
}
