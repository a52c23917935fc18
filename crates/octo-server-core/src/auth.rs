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
///
/// Attempts are counted from the moment they are let through
/// ([`LoginThrottle::begin`]), not when their password check ends: only as
/// many attempts may be checking a password at once as failures are still
/// free (one, once attempts are slowed), so a burst of concurrent guesses
/// cannot all slip in before the first failure is recorded.
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
    /// Attempts let through whose password check has not ended.
    in_flight: u32,
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

    /// Whether one more attempt may check a password now.
    fn room(&self) -> bool {
        let allowed = FREE_FAILURES.saturating_sub(self.count).max(1);
        self.in_flight < allowed
    }
}

/// A login attempt let through the throttle: counted in flight until it ends
/// with [`LoginAttempt::failed`] or [`LoginAttempt::succeeded`] (dropped
/// without either, it counts for nothing).
#[derive(Debug)]
pub struct LoginAttempt<'a> {
    throttle: &'a LoginThrottle,
    keys: [String; 2],
    ended: bool,
}

impl LoginAttempt<'_> {
    /// The password (or the user) was wrong.
    pub fn failed(mut self) {
        self.ended = true;
        let mut failures = self
            .throttle
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if failures.len() > 100_000 {
            failures.retain(|_, f| f.last.elapsed() < FORGET_AFTER || f.in_flight > 0);
        }
        let now = std::time::Instant::now();
        for key in &self.keys {
            let f = failures.entry(key.clone()).or_insert(Failures {
                count: 0,
                last: now,
                in_flight: 1,
            });
            f.in_flight = f.in_flight.saturating_sub(1);
            if f.last.elapsed() > FORGET_AFTER {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
        }
    }

    /// The login succeeded: the user's failures are cleared (not the address's).
    pub fn succeeded(mut self) {
        self.ended = true;
        let mut failures = self
            .throttle
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let [user, addr] = &self.keys;
        if let Some(f) = failures.get_mut(addr) {
            f.in_flight = f.in_flight.saturating_sub(1);
        }
        if let Some(f) = failures.get_mut(user) {
            f.in_flight = f.in_flight.saturating_sub(1);
            if f.in_flight == 0 {
                failures.remove(user);
            } else {
                f.count = 0;
            }
        }
    }
}

impl Drop for LoginAttempt<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut failures = self
            .throttle
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(f) = failures.get_mut(key) {
                f.in_flight = f.in_flight.saturating_sub(1);
            }
        }
    }
}

impl LoginThrottle {
    fn keys(username: &str, source: &str) -> [String; 2] {
        [
            format!("user:{}", username.trim().to_lowercase()),
            format!("addr:{source}"),
        ]
    }

    /// Lets an attempt check its password now, or answers how long it must
    /// wait and why. Too many attempts checking at once wait a second.
    pub fn begin(
        &self,
        username: &str,
        source: &str,
    ) -> Result<LoginAttempt<'_>, (std::time::Duration, &'static str)> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let [user, addr] = Self::keys(username, source);
        let of = |k: &str| failures.get(k).copied();
        let (by_user, by_addr) = (of(&user), of(&addr));
        let wait = |f: Option<Failures>| f.map(|f| f.wait()).unwrap_or_default();
        let (wait_user, wait_addr) = (wait(by_user), wait(by_addr));
        if !(wait_user.is_zero() && wait_addr.is_zero()) {
            return Err(if wait_user >= wait_addr {
                (wait_user, "for this user")
            } else {
                (wait_addr, "from your address")
            });
        }
        let one_second = std::time::Duration::from_secs(1);
        if by_user.is_some_and(|f| !f.room()) {
            return Err((one_second, "for this user"));
        }
        if by_addr.is_some_and(|f| !f.room()) {
            return Err((one_second, "from your address"));
        }
        let now = std::time::Instant::now();
        for key in [&user, &addr] {
            // A new entry starts with no failures, and an old one's last
            // failure time keeps its delay running.
            failures
                .entry(key.clone())
                .or_insert(Failures {
                    count: 0,
                    last: now,
                    in_flight: 0,
                })
                .in_flight += 1;
        }
        Ok(LoginAttempt {
            throttle: self,
            keys: [user, addr],
            ended: false,
        })
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
            t.begin("alice", "10.0.0.1").unwrap().failed();
        }
        let (wait, why) = t.begin("ALICE", "10.0.0.2").unwrap_err();
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1));
        assert_eq!(why, "for this user");
        // Another user from the same address is slowed too (the address failed).
        assert_eq!(
            t.begin("bob", "10.0.0.1").unwrap_err().1,
            "from your address"
        );
        // Another user elsewhere is not.
        t.begin("bob", "10.0.0.9").unwrap().succeeded();
        let f = Failures {
            count: 40,
            last: std::time::Instant::now(),
            in_flight: 0,
        };
        assert_eq!(f.delay(), MAX_DELAY);
    }

    #[test]
    fn concurrent_attempts_are_counted_before_they_end() {
        let t = LoginThrottle::default();
        // Five free failures: five attempts may check at once, not a sixth.
        let running: Vec<_> = (0..FREE_FAILURES)
            .map(|_| t.begin("carol", "10.0.0.1").unwrap())
            .collect();
        let (wait, why) = t.begin("carol", "10.0.0.7").unwrap_err();
        assert_eq!((wait.as_secs(), why), (1, "for this user"));
        assert_eq!(
            t.begin("dave", "10.0.0.1").unwrap_err().1,
            "from your address"
        );
        // One that ends without a verdict frees its place and counts nothing.
        let mut running = running.into_iter();
        drop(running.next());
        let one_more = t.begin("carol", "10.0.0.1").unwrap();
        for a in running {
            a.failed();
        }
        // Four failures: one attempt in flight (one_more) fills the last free one.
        assert!(t.begin("carol", "10.0.0.8").is_err());
        one_more.succeeded();
        t.begin("carol", "10.0.0.8").unwrap().succeeded();
    }
}
