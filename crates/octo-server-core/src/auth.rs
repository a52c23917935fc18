//! Credentials: API keys and session keys (random, stored as SHA-256 only),
//! passwords (argon2id), and the slowing of failed logins. The gate that
//! checks them on every request is `api::guard`.

use octo_store::{ApiKey, Store};
use sha2::{Digest, Sha256};

/// SHA-256 (lower-case hex) of an API key: what the store keeps.
pub fn hash_api_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new API key: "API-" and 32 random upper-case letters and digits.
pub fn new_api_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("API-{body}")
}

/// Makes a new API key for a user and stores its hash; returns the key (to show
/// once) and what the store keeps.
pub async fn issue_api_key(
    store: &dyn Store,
    user_id: i64,
    purpose: &str,
) -> octo_store::Result<(String, ApiKey)> {
    issue(store, user_id, purpose, false).await
}

/// As [`issue_api_key`], for a login's session: the key expires after a time
/// without use.
pub async fn issue_session(
    store: &dyn Store,
    user_id: i64,
    purpose: &str,
) -> octo_store::Result<(String, ApiKey)> {
    issue(store, user_id, purpose, true).await
}

async fn issue(
    store: &dyn Store,
    user_id: i64,
    purpose: &str,
    session: bool,
) -> octo_store::Result<(String, ApiKey)> {
    let key = new_api_key();
    let stored = store
        .create_api_key(user_id, purpose, &hash_api_key(&key), &key[..8], session)
        .await?;
    Ok((key, stored))
}

/// Hashes a password with argon2id (PHC string, salted).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("making a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

/// Whether `password` matches the PHC string `phc`.
pub fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Failed logins, by user name and by source address: after
/// [`FREE_FAILURES`] failures in a row, each further attempt must wait
/// twice as long as the one before (capped at [`MAX_DELAY`]); a success
/// clears the user's count. Attempts that must wait are answered at once
/// (429 with Retry-After): nothing sleeps, so one attacker never slows other
/// users, and no password hashing is spent on them.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    failures: std::sync::Mutex<std::collections::HashMap<String, Failures>>,
}

/// Failures allowed before attempts are slowed.
pub const FREE_FAILURES: u32 = 5;
/// The longest wait between attempts.
pub const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(60);
/// Entries older than this are forgotten.
const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: std::time::Instant,
}

impl Failures {
    fn delay(&self) -> std::time::Duration {
        if self.count < FREE_FAILURES {
            return std::time::Duration::ZERO;
        }
        let exp = (self.count - FREE_FAILURES).min(16);
        std::time::Duration::from_secs(1u64 << exp).min(MAX_DELAY)
    }

    fn wait(&self) -> std::time::Duration {
        self.delay().saturating_sub(self.last.elapsed())
    }
}

impl LoginThrottle {
    fn keys(username: &str, source: &str) -> [String; 2] {
        [
            format!("user:{}", username.trim().to_lowercase()),
            format!("addr:{source}"),
        ]
    }

    /// How long this attempt must wait (zero: go ahead), and why.
    pub fn wait(
        &self,
        username: &str,
        source: &str,
    ) -> Option<(std::time::Duration, &'static str)> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let [user, addr] = Self::keys(username, source);
        let by_user = failures.get(&user).map(|f| f.wait()).unwrap_or_default();
        let by_addr = failures.get(&addr).map(|f| f.wait()).unwrap_or_default();
        if by_user.is_zero() && by_addr.is_zero() {
            None
        } else if by_user >= by_addr {
            Some((by_user, "for this user"))
        } else {
            Some((by_addr, "from your address"))
        }
    }

    /// Counts a failed attempt.
    pub fn failed(&self, username: &str, source: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.last.elapsed() < FORGET_AFTER);
        }
        let now = std::time::Instant::now();
        for key in Self::keys(username, source) {
            let f = failures.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            if f.last.elapsed() > FORGET_AFTER {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
    }

    /// A successful login clears the user's failures (not the address's).
    pub fn succeeded(&self, username: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let [user, _] = Self::keys(username, "");
        failures.remove(&user);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn logins_slow_down_after_five_failures_per_user_and_per_address() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            assert!(t.wait("alice", "10.0.0.1").is_none());
            t.failed("alice", "10.0.0.1");
        }
        let (wait, why) = t.wait("ALICE", "10.0.0.2").unwrap();
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1));
        assert_eq!(why, "for this user");
        // Another user from the same address is slowed too (the address failed).
        assert_eq!(t.wait("bob", "10.0.0.1").unwrap().1, "from your address");
        // Another user elsewhere is not.
        assert!(t.wait("bob", "10.0.0.9").is_none());
        t.succeeded("alice");
        assert!(t.wait("alice", "10.0.0.2").is_none());
        let f = Failures {
            count: 40,
            last: std::time::Instant::now(),
        };
        assert_eq!(f.delay(), MAX_DELAY);
    }
}
