//! Certificate thumbprints: SHA-256 of the certificate's DER encoding.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// SHA-256 of a certificate's DER encoding. Displayed as 64 upper-case hex characters.
///
/// This is the only thing either side pins: no CA, no host name, no expiry check.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Thumbprint([u8; 32]);

impl Thumbprint {
    /// Thumbprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Upper-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({self})")
    }
}

/// Why a string is not a thumbprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{input}' is not a certificate thumbprint: {reason}. Expected the SHA-256 of the certificate as 64 hexadecimal characters (upper or lower case, optionally separated by colons); `tentacle show-thumbprint` or `octopus server show-thumbprint` prints it")]
pub struct ThumbprintParseError {
    /// The text that was given (truncated when very long).
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Thumbprint {
    type Err = ThumbprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(100).collect();
        let fail = |reason: String| ThumbprintParseError {
            input: shown.clone(),
            reason,
        };
        let trimmed = s.trim();
        let mut digits = Vec::with_capacity(64);
        for (i, c) in trimmed.chars().enumerate() {
            match c {
                ':' => continue,
                c if c.is_ascii_hexdigit() => digits.push(c as u8),
                c => {
                    return Err(fail(format!(
                        "character {:?} at position {} is not a hexadecimal digit",
                        c,
                        i + 1
                    )))
                }
            }
        }
        if trimmed.contains(':')
            && (trimmed.starts_with(':') || trimmed.ends_with(':') || trimmed.contains("::"))
        {
            return Err(fail("colons must separate pairs of digits".into()));
        }
        match digits.len() {
            64 => {}
            40 => {
                return Err(fail(
                    "it has 40 digits, which is a SHA-1 thumbprint as the original Octopus shows; this system pins SHA-256 thumbprints (64 digits)".into(),
                ))
            }
            0 => return Err(fail("it is empty".into())),
            n => return Err(fail(format!("it has {n} hexadecimal digits, not 64"))),
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0);
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0);
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF";

    #[test]
    fn round_trips_upper_case() {
        let t: Thumbprint = HEX.parse().expect("valid");
        assert_eq!(t.to_string(), HEX);
    }

    #[test]
    fn accepts_lower_case_and_colons() {
        let lower = HEX.to_ascii_lowercase();
        let colons: Vec<String> = HEX
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let colons = colons.join(":");
        assert_eq!(lower.parse::<Thumbprint>(), HEX.parse());
        assert_eq!(colons.parse::<Thumbprint>(), HEX.parse());
        assert_eq!(format!("  {HEX}\n").parse::<Thumbprint>(), HEX.parse());
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let e = "xyz".parse::<Thumbprint>().expect_err("invalid");
        assert!(e.to_string().contains("'x'"), "{e}");
        let e = HEX[..40].parse::<Thumbprint>().expect_err("sha1");
        assert!(e.to_string().contains("SHA-1"), "{e}");
        let e = HEX[..10].parse::<Thumbprint>().expect_err("short");
        assert!(e.to_string().contains("10 hexadecimal digits"), "{e}");
        assert!("".parse::<Thumbprint>().is_err());
        assert!(format!("{HEX}00").parse::<Thumbprint>().is_err());
        assert!(format!(":{HEX}").parse::<Thumbprint>().is_err());
    }

    #[test]
    fn of_der_is_sha256() {
        // SHA-256("abc")
        let t = Thumbprint::of_der(b"abc");
        assert_eq!(
            t.to_string(),
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"
        );
    }
}
