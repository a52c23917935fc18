//! Secret values: encrypted at rest with the server's master key, and masked
//! in every log line.
//!
//! [`MasterKey`]: 256 bits, AES-256-GCM with a random 96-bit nonce per value;
//! a stored value is `v1:` then hex of nonce, ciphertext and tag. Its
//! fingerprint (a hash of the key, not the key) tells a server whether a
//! database's values were encrypted with the key it has.
//!
//! [`Masker`]: the secret values of one task; every line stored for the task
//! has each of them replaced by [`MASK`].

use std::sync::RwLock;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

/// What a secret value is replaced with wherever it would be shown.
pub const MASK: &str = "********";

const PREFIX: &str = "v1:";

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the master key is not valid: {0}")]
    BadKey(String),
    #[error("a stored secret is damaged or was encrypted with another master key")]
    Undecryptable,
    #[error("the system's random number generator failed")]
    Random,
}

/// The server's master key.
pub struct MasterKey {
    key: LessSafeKey,
    fingerprint: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey(fingerprint {})", self.fingerprint)
    }
}

impl MasterKey {
    /// A new random key, and its text to keep (64 hex digits).
    pub fn generate() -> Result<(MasterKey, String), SecretError> {
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| SecretError::Random)?;
        let text = hex(&bytes);
        Ok((Self::from_bytes(&bytes)?, text))
    }

    /// The key from its text (64 hex digits, surrounding space ignored).
    pub fn from_text(text: &str) -> Result<MasterKey, SecretError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(SecretError::BadKey(format!(
                "expected 64 hex digits, found {} characters",
                text.len()
            )));
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| SecretError::BadKey("it is not hexadecimal".into()))?;
        }
        Self::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8; 32]) -> Result<MasterKey, SecretError> {
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| SecretError::BadKey("AES-256 refused it".into()))?;
        let digest =
            Sha256::digest([b"octopus master key fingerprint:".as_slice(), bytes].concat());
        Ok(MasterKey {
            key: LessSafeKey::new(key),
            fingerprint: hex(&digest[..8]),
        })
    }

    /// Identifies the key without revealing it (16 hex digits).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Encrypts a value for storage.
    pub fn encrypt(&self, plain: &str) -> Result<String, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Random)?;
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(PREFIX.as_bytes()),
                &mut data,
            )
            .map_err(|_| SecretError::Undecryptable)?;
        Ok(format!("{PREFIX}{}{}", hex(&nonce), hex(&data)))
    }

    /// Decrypts a stored value.
    pub fn decrypt(&self, stored: &str) -> Result<String, SecretError> {
        let body = stored
            .strip_prefix(PREFIX)
            .ok_or(SecretError::Undecryptable)?;
        let bytes = unhex(body).ok_or(SecretError::Undecryptable)?;
        if bytes.len() < NONCE_LEN {
            return Err(SecretError::Undecryptable);
        }
        let (nonce, data) = bytes.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Undecryptable)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(PREFIX.as_bytes()), &mut data)
            .map_err(|_| SecretError::Undecryptable)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretError::Undecryptable)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The secret values of one task, masked in its lines.
#[derive(Debug, Default)]
pub struct Masker {
    /// Longest first, so a secret containing another is masked whole.
    values: RwLock<Vec<String>>,
}

impl Masker {
    /// A masker of these values.
    pub fn new(values: impl IntoIterator<Item = String>) -> Masker {
        let m = Masker::default();
        for v in values {
            m.add(&v);
        }
        m
    }

    /// Masks `value` from now on (and each of its lines, for a value of
    /// several); whether anything was new.
    pub fn add(&self, value: &str) -> bool {
        let mut values = self.values.write().unwrap_or_else(|p| p.into_inner());
        let mut added = false;
        for v in std::iter::once(value).chain(value.lines()) {
            let v = v.trim_end_matches('\r');
            if !v.is_empty() && !values.iter().any(|x| x == v) {
                values.push(v.to_string());
                added = true;
            }
        }
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        added
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// `text` with every secret replaced by [`MASK`].
    pub fn mask(&self, text: &str) -> String {
        let values = self.values.read().unwrap_or_else(|p| p.into_inner());
        let mut out = text.to_string();
        for v in values.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_other_keys_cannot_read_them() {
        let (key, text) = MasterKey::generate().unwrap();
        let again = MasterKey::from_text(&format!(" {text}\n")).unwrap();
        assert_eq!(key.fingerprint(), again.fingerprint());
        let stored = key.encrypt("hunter2").unwrap();
        assert!(stored.starts_with("v1:") && !stored.contains("hunter2"));
        assert_ne!(
            stored,
            key.encrypt("hunter2").unwrap(),
            "a fresh nonce each time"
        );
        assert_eq!(again.decrypt(&stored).unwrap(), "hunter2");
        let (other, _) = MasterKey::generate().unwrap();
        assert_ne!(other.fingerprint(), key.fingerprint());
        assert!(other.decrypt(&stored).is_err());
        let mut damaged = stored.clone();
        damaged.pop();
        damaged.push('0');
        assert!(key.decrypt(&damaged).is_err() || damaged == stored);
        assert!(MasterKey::from_text("abc").is_err());
        assert!(!format!("{key:?}").contains(&text));
    }

    #[test]
    fn every_secret_is_masked_whole() {
        let m = Masker::new(["pa55".to_string(), "pa55word".into(), "line1\nline2".into()]);
        assert_eq!(m.mask("x pa55word y pa55"), "x ******** y ********");
        assert_eq!(m.mask("got line2 here"), "got ******** here");
        assert_eq!(m.mask("nothing"), "nothing");
        m.add("later");
        assert_eq!(m.mask("later on"), "******** on");
        assert!(!m.is_empty() && Masker::default().is_empty());
    }
}
