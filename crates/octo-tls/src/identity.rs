//! A per-instance identity: one private key and the self-signed certificate for it.
//!
//! Identities are stored as two PEM files, a certificate (mode 0644) and a PKCS#8
//! private key (mode 0600), written atomically. An existing identity can be imported
//! from a PEM file holding both, or from a PKCS#12/PFX file such as the original
//! Octopus Tentacle exports.
//!
//! Only the end-entity certificate is kept: peers pin its SHA-256 [`Thumbprint`], so
//! chain certificates in an imported file are ignored.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::Thumbprint;

/// What to tell a person whose identity files are missing.
const CREATE_HINT: &str = "run `tentacle new-certificate` to create a new certificate, or `tentacle import-certificate --from-file FILE` to import an existing one";

/// The DNS name every generated certificate carries as its subjectAltName
/// (proto/README.md). Peers are pinned by thumbprint, never by name; the name is
/// there for standard TLS clients (gRPC-core's `grpcio`, `grpcurl`), which check a
/// host name: they set this one as the target-name override, which is also the SNI
/// they send. `.invalid` (RFC 2606) never resolves, so nobody mistakes it for an
/// address.
pub const CERTIFICATE_DNS_NAME: &str = "octopus.invalid";

/// Mode of the private key file: readable and writable by the owner only.
const KEY_FILE_MODE: u32 = 0o600;
/// Mode of the certificate file: public information.
const CERT_FILE_MODE: u32 = 0o644;
/// Mode of directories created by [`Identity::save`].
const DIR_MODE: u32 = 0o700;

/// A key pair and its certificate: what this instance presents in TLS.
///
/// `Debug` shows only the thumbprint, never key material.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    thumbprint: Thumbprint,
    certified: Arc<CertifiedKey>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            thumbprint: self.thumbprint,
            certified: Arc::clone(&self.certified),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be created, read, imported or written.
///
/// Every message says what failed, where, and what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file or directory operation failed.
    #[error("could not {action} `{}`: {source}{}", path.display(), io_hint(source))]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done, e.g. "read the certificate file".
        action: String,
        /// The operating system's error.
        source: io::Error,
    },

    /// A certificate or key file that should exist does not.
    #[error("the {what} file `{}` does not exist; {CREATE_HINT}", path.display())]
    NotFound {
        /// "certificate" or "private key" or "identity".
        what: &'static str,
        /// The missing file.
        path: PathBuf,
    },

    /// PEM text could not be parsed (for example, broken base64).
    #[error("{} is not valid PEM: {reason}; check that the file is complete and was not altered, or {CREATE_HINT}", origin(path.as_deref()))]
    InvalidPem {
        /// The file, when the PEM came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },

    /// No certificate was found where one was expected.
    #[error("no certificate was found in {}: expected a PEM block starting with `-----BEGIN CERTIFICATE-----`; {CREATE_HINT}", origin(path.as_deref()))]
    NoCertificate {
        /// The file, when the PEM came from one.
        path: Option<PathBuf>,
    },

    /// No private key was found where one was expected.
    #[error("no private key was found in {}: expected a PEM block starting with `-----BEGIN PRIVATE KEY-----`, `-----BEGIN EC PRIVATE KEY-----` or `-----BEGIN RSA PRIVATE KEY-----`; to import a certificate, give a file that holds both the certificate and its key, or a PKCS#12/PFX file", origin(path.as_deref()))]
    NoPrivateKey {
        /// The file, when the PEM came from one.
        path: Option<PathBuf>,
    },

    /// The private key is encrypted with a passphrase, which PEM import does not support.
    #[error("the private key in {} is encrypted with a passphrase, which is not supported here; decrypt it first (`openssl pkcs8 -in KEY.pem -out KEY-plain.pem`) or import a PKCS#12/PFX file with its password instead", origin(path.as_deref()))]
    EncryptedKey {
        /// The file, when the PEM came from one.
        path: Option<PathBuf>,
    },

    /// The certificate could not be parsed as X.509.
    #[error("the certificate in {} is not a valid X.509 certificate ({reason}); {CREATE_HINT}", origin(path.as_deref()))]
    InvalidCertificate {
        /// The file, when the certificate came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },

    /// The private key is not the one the certificate was issued for.
    #[error("the private key does not belong to the certificate with thumbprint {cert_thumbprint}; use the key file that was created together with this certificate, or run `tentacle new-certificate` to create a new pair")]
    KeyMismatch {
        /// Thumbprint of the certificate that was given.
        cert_thumbprint: Thumbprint,
    },

    /// A PKCS#12/PFX file could not be read.
    #[error("could not read the PKCS#12/PFX data in {}: {reason}; if the file is protected by a password, check that the password is right (a wrong password is the most common cause), or export the certificate and key again", origin(path.as_deref()))]
    Pkcs12 {
        /// The file, when the data came from one.
        path: Option<PathBuf>,
        /// What went wrong.
        reason: String,
    },

    /// A file to import is neither PEM nor PKCS#12.
    #[error("`{}` is neither a PEM file (with `-----BEGIN CERTIFICATE-----` and a private key) nor a binary PKCS#12/PFX file; export the certificate together with its private key in one of those formats (a base64 text of a PFX must be decoded first)", path.display())]
    UnrecognizedFormat {
        /// The file.
        path: PathBuf,
    },

    /// The private key is of a kind or size that cannot be used for TLS here.
    #[error("the private key cannot be used ({reason}); supported keys are ECDSA P-256 and P-384, Ed25519, and RSA of 2048 bits or more; run `tentacle new-certificate` to create a new ECDSA P-256 certificate")]
    UnsupportedKey {
        /// What the TLS library said.
        reason: String,
    },

    /// A new key pair or certificate could not be generated.
    #[error("could not generate a new certificate: {0}")]
    Generate(String),
}

/// Names where some PEM or PKCS#12 data came from.
fn origin(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!("`{}`", p.display()),
        None => "the given data".to_owned(),
    }
}

/// A suggestion for common I/O failures, to append to the message.
fn io_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            " (run as the user that owns the file, or fix its permissions)"
        }
        io::ErrorKind::NotFound => " (check that the path is right)",
        io::ErrorKind::StorageFull => " (free some disk space)",
        io::ErrorKind::ReadOnlyFilesystem => " (choose a writable location)",
        _ => "",
    }
}

fn io_err(path: &Path, action: &str, source: io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        action: action.to_owned(),
        source,
    }
}

impl Identity {
    /// New ECDSA P-256 key pair and self-signed certificate with the given common name
    /// and the DNS subjectAltName [`CERTIFICATE_DNS_NAME`], valid from one day ago (to
    /// tolerate clock skew) for 100 years, with a random 128-bit serial number.
    pub fn generate(common_name: &str) -> Result<Self, IdentityError> {
        let gen_err = |e: rcgen::Error| IdentityError::Generate(e.to_string());
        let key_pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;

        let mut params = rcgen::CertificateParams::new(vec![CERTIFICATE_DNS_NAME.to_owned()])
            .map_err(gen_err)?;
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.is_ca = rcgen::IsCa::NoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial()?.into());

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| {
                IdentityError::Generate(
                    "the system clock is set before 1970; correct it and try again".into(),
                )
            })?
            .as_secs();
        // Year ~8300: far beyond any sane clock, and keeps the date arithmetic below in range.
        if now > 200_000_000_000 {
            return Err(IdentityError::Generate(
                "the system clock is set thousands of years ahead; correct it and try again".into(),
            ));
        }
        let not_before = rcgen::date_time_ymd(1970, 1, 1)
            + Duration::from_secs(now.saturating_sub(24 * 60 * 60));
        let not_after = not_before
            .replace_year(not_before.year() + 100)
            // 29 February in a leap year whose centennial is not one.
            .unwrap_or_else(|_| not_before + Duration::from_secs((100 * 365 + 24) * 24 * 60 * 60));
        params.not_before = not_before;
        params.not_after = not_after;

        let cert = params.self_signed(&key_pair).map_err(gen_err)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        Self::from_parts(cert.der().clone(), vec![key], None)
    }

    /// From PEM text: one or more certificates (the first is the end-entity one; the
    /// others are ignored) and a private key in PKCS#8, SEC1 or PKCS#1 form. The two
    /// arguments may be the same text. Fails with [`IdentityError::KeyMismatch`] if
    /// the key does not belong to the certificate.
    ///
    /// SEC1 and PKCS#1 keys are converted to PKCS#8.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, IdentityError> {
        Self::from_pem_at(cert_pem, None, key_pem, None)
    }

    /// Reads a certificate PEM file and a private key PEM file (they may be the same
    /// file). Errors name the path and say what to do.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let cert_pem = read_file(cert_path, "certificate")?;
        let key_pem = if key_path == cert_path {
            cert_pem.clone()
        } else {
            read_file(key_path, "private key")?
        };
        Self::from_pem_at(&cert_pem, Some(cert_path), &key_pem, Some(key_path))
    }

    /// Writes the certificate (mode 0644) and the PKCS#8 private key (mode 0600 from
    /// the moment the file exists), each atomically: a temporary file in the same
    /// directory, flushed to disk, then renamed over the target. Missing parent
    /// directories are created with mode 0700.
    ///
    /// If both paths are the same, one file holding the certificate and the key is
    /// written with mode 0600.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        if cert_path == key_path {
            let mut both = self.cert_pem();
            both.push_str(&self.key_pem());
            return write_atomic(key_path, both.as_bytes(), KEY_FILE_MODE, "identity");
        }
        write_atomic(
            key_path,
            self.key_pem().as_bytes(),
            KEY_FILE_MODE,
            "private key",
        )?;
        write_atomic(
            cert_path,
            self.cert_pem().as_bytes(),
            CERT_FILE_MODE,
            "certificate",
        )
    }

    /// Imports an existing identity from one file: PEM text holding a certificate and
    /// its private key, or a binary PKCS#12/PFX file. The format is detected from the
    /// content. `password` is for PKCS#12 only; `None` means the empty password.
    pub fn import_file(path: &Path, password: Option<&str>) -> Result<Self, IdentityError> {
        let data = read_file(path, "certificate")?;
        if contains(&data, b"-----BEGIN ") {
            Self::from_pem_at(&data, Some(path), &data, Some(path))
        } else if data.first() == Some(&0x30) {
            Self::from_pkcs12_at(&data, password.unwrap_or(""), Some(path))
        } else {
            Err(IdentityError::UnrecognizedFormat {
                path: path.to_path_buf(),
            })
        }
    }

    /// From PKCS#12/PFX data (DER) protected by `password` (use "" for none). Takes the
    /// first private key in it and the certificate whose public key matches it.
    pub fn from_pkcs12(der: &[u8], password: &str) -> Result<Self, IdentityError> {
        Self::from_pkcs12_at(der, password, None)
    }

    /// The end-entity certificate, DER-encoded.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The private key, DER-encoded (PKCS#8 unless an imported SEC1/PKCS#1 key could
    /// not be converted).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// SHA-256 thumbprint of the certificate: what peers pin.
    pub fn thumbprint(&self) -> Thumbprint {
        self.thumbprint
    }

    /// The certificate as PEM text.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", self.cert.as_ref())
    }

    /// The private key as PEM text (`PRIVATE KEY`, i.e. PKCS#8).
    pub fn key_pem(&self) -> String {
        let label = match &self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem_encode(label, self.key.secret_der())
    }

    /// rustls signing material for this identity, for `ResolvesServerCert` /
    /// `ResolvesClientCert` or `with_single_cert`-style configuration.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, IdentityError> {
        Ok(Arc::clone(&self.certified))
    }

    pub(crate) fn certified_arc(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }

    fn from_pem_at(
        cert_pem: &[u8],
        cert_path: Option<&Path>,
        key_pem: &[u8],
        key_path: Option<&Path>,
    ) -> Result<Self, IdentityError> {
        let invalid = |path: Option<&Path>, e: io::Error| IdentityError::InvalidPem {
            path: path.map(Path::to_path_buf),
            reason: e.to_string(),
        };

        let mut cert = None;
        for item in rustls_pemfile::read_all(&mut &cert_pem[..]) {
            if let rustls_pemfile::Item::X509Certificate(der) =
                item.map_err(|e| invalid(cert_path, e))?
            {
                cert = Some(der);
                break;
            }
        }
        let cert = cert.ok_or_else(|| IdentityError::NoCertificate {
            path: cert_path.map(Path::to_path_buf),
        })?;

        let mut keys = Vec::new();
        for item in rustls_pemfile::read_all(&mut &key_pem[..]) {
            match item.map_err(|e| invalid(key_path, e))? {
                rustls_pemfile::Item::Pkcs8Key(k) => keys.push(PrivateKeyDer::Pkcs8(k)),
                rustls_pemfile::Item::Sec1Key(k) => keys.push(PrivateKeyDer::Sec1(k)),
                rustls_pemfile::Item::Pkcs1Key(k) => keys.push(PrivateKeyDer::Pkcs1(k)),
                _ => {}
            }
        }
        if keys.is_empty() {
            let path = key_path.map(Path::to_path_buf);
            return Err(
                if contains(key_pem, b"ENCRYPTED PRIVATE KEY")
                    || contains(key_pem, b"Proc-Type: 4,ENCRYPTED")
                {
                    IdentityError::EncryptedKey { path }
                } else {
                    IdentityError::NoPrivateKey { path }
                },
            );
        }
        Self::from_parts(cert, keys, cert_path)
    }

    fn from_pkcs12_at(
        der: &[u8],
        password: &str,
        path: Option<&Path>,
    ) -> Result<Self, IdentityError> {
        let fail = |reason: String| IdentityError::Pkcs12 {
            path: path.map(Path::to_path_buf),
            reason,
        };
        let archive = p12_keystore::Pkcs12Archive::from_pkcs12(der, password).map_err(|e| {
            fail(match e {
                p12_keystore::error::Error::MacError(_) => {
                    "the integrity check failed, so the password is wrong or the file is damaged"
                        .to_owned()
                }
                p12_keystore::error::Error::UnpadError => {
                    "decryption failed, so the password is probably wrong".to_owned()
                }
                other => other.to_string(),
            })
        })?;
        if archive.keys.is_empty() {
            return Err(fail(
                "it holds no private key (export the certificate *with* its private key)"
                    .to_owned(),
            ));
        }
        if archive.certs.is_empty() {
            return Err(fail("it holds no certificate".to_owned()));
        }

        // Prefer the certificate linked to each key by localKeyId, then any other;
        // the first pair whose public keys match wins.
        let mut last_err = None;
        for key in &archive.keys {
            let linked = |c: &&p12_keystore::CertificateBag| matches!((&key.local_key_id, &c.local_key_id), (Some(k), Some(c)) if k.as_ref() == c.as_slice());
            let ordered = archive
                .certs
                .iter()
                .filter(linked)
                .chain(archive.certs.iter().filter(|c| !linked(c)));
            for bag in ordered {
                let cert = CertificateDer::from(bag.cert.as_der().to_vec());
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key.as_der().to_vec()));
                match Self::from_parts(cert, vec![key], path) {
                    Ok(identity) => return Ok(identity),
                    Err(e) => last_err = Some(e),
                }
            }
        }
        Err(match last_err {
            Some(IdentityError::KeyMismatch { .. }) | None => {
                fail("none of its certificates belongs to its private key".to_owned())
            }
            Some(IdentityError::InvalidCertificate { reason, .. }) => {
                fail(format!("its certificate is not valid X.509 ({reason})"))
            }
            Some(other) => other,
        })
    }

    /// Checks that one of `keys` belongs to `cert` and builds the identity from the
    /// first that does.
    fn from_parts(
        cert: CertificateDer<'static>,
        keys: Vec<PrivateKeyDer<'static>>,
        cert_path: Option<&Path>,
    ) -> Result<Self, IdentityError> {
        let provider = crate::provider();
        let thumbprint = Thumbprint::of_der(cert.as_ref());
        let mut unsupported = None;
        for key in keys {
            let signing_key = match provider.key_provider.load_private_key(key.clone_key()) {
                Ok(k) => k,
                Err(e) => {
                    unsupported.get_or_insert(e);
                    continue;
                }
            };
            let certified = CertifiedKey::new(vec![cert.clone()], signing_key);
            match certified.keys_match() {
                // `Unknown`: the key cannot tell its public key; rustls accepts that too.
                Ok(())
                | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
                Err(rustls::Error::InconsistentKeys(_)) => continue,
                Err(e) => {
                    return Err(IdentityError::InvalidCertificate {
                        path: cert_path.map(Path::to_path_buf),
                        reason: e.to_string(),
                    })
                }
            }
            let key = normalise_to_pkcs8(key, &certified, &provider);
            return Ok(Self {
                cert,
                key,
                thumbprint,
                certified: Arc::new(certified),
            });
        }
        Err(match unsupported {
            // Every key was usable, none matched.
            None => IdentityError::KeyMismatch {
                cert_thumbprint: thumbprint,
            },
            Some(e) => IdentityError::UnsupportedKey {
                reason: e.to_string(),
            },
        })
    }
}

/// Converts a SEC1 or PKCS#1 key into PKCS#8, using the algorithm identifier of the
/// key's public key. Returns the key unchanged if it is PKCS#8 already or if the
/// converted key does not load back as the same key.
fn normalise_to_pkcs8(
    key: PrivateKeyDer<'static>,
    certified: &CertifiedKey,
    provider: &rustls::crypto::CryptoProvider,
) -> PrivateKeyDer<'static> {
    let inner = match &key {
        PrivateKeyDer::Sec1(k) => k.secret_sec1_der(),
        PrivateKeyDer::Pkcs1(k) => k.secret_pkcs1_der(),
        _ => return key,
    };
    let Some(spki) = certified.key.public_key() else {
        return key;
    };
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm AlgorithmIdentifier, subjectPublicKey BIT STRING }
    let Some(alg_id) = der_tlv(spki.as_ref())
        .filter(|t| t.tag == 0x30)
        .and_then(|spki| der_tlv(spki.contents))
        .filter(|a| a.tag == 0x30)
        .map(|a| a.whole)
    else {
        return key;
    };
    // PrivateKeyInfo ::= SEQUENCE { version INTEGER (0), algorithm, privateKey OCTET STRING }
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend_from_slice(alg_id);
    body.extend_from_slice(&der_wrap(0x04, inner));
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der_wrap(0x30, &body)));

    let same = provider
        .key_provider
        .load_private_key(pkcs8.clone_key())
        .ok()
        .and_then(|k| k.public_key().map(|p| p.as_ref() == spki.as_ref()))
        .unwrap_or(false);
    if same {
        pkcs8
    } else {
        key
    }
}

/// One DER tag-length-value.
struct Tlv<'a> {
    tag: u8,
    /// Tag, length and contents.
    whole: &'a [u8],
    contents: &'a [u8],
}

/// Splits the first DER TLV off `input`, or `None` if it is malformed.
fn der_tlv(input: &[u8]) -> Option<Tlv<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = (len << 8) | usize::from(*b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some(Tlv {
        tag,
        whole: input.get(..end)?,
        contents: input.get(header..end)?,
    })
}

/// DER-encodes `contents` under `tag`.
fn der_wrap(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// 16 random bytes, positive and without a leading zero byte, for a serial number.
fn random_serial() -> Result<Vec<u8>, IdentityError> {
    let mut serial = vec![0u8; 16];
    crate::provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| IdentityError::Generate("the system random number generator failed".into()))?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    Ok(serial)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            IdentityError::NotFound {
                what,
                path: path.to_path_buf(),
            }
        } else {
            io_err(path, &format!("read the {what} file"), e)
        }
    })
}

/// Writes `contents` to `path` through a temporary file in the same directory that is
/// created with `mode`, synced, and renamed over `path`.
fn write_atomic(path: &Path, contents: &[u8], mode: u32, what: &str) -> Result<(), IdentityError> {
    let file_name = path.file_name().ok_or_else(|| {
        io_err(
            path,
            &format!("write the {what} file"),
            io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file"),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|e| io_err(dir, "create the directory", e))?;
    }

    // Unique per call, so concurrent saves and stale leftovers cannot collide.
    let mut nonce = [0u8; 8];
    crate::provider()
        .secure_random
        .fill(&mut nonce)
        .map_err(|_| {
            io_err(
                path,
                &format!("write the {what} file"),
                io::Error::other("the system random number generator failed"),
            )
        })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{:016x}.tmp", u64::from_be_bytes(nonce)));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let action = format!("write the {what} file");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, &action, e))?;
        // The umask may have removed bits from `mode`; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_err(&tmp, &action, e))?;
        file.write_all(contents)
            .map_err(|e| io_err(&tmp, &action, e))?;
        file.sync_all().map_err(|e| io_err(&tmp, &action, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| io_err(path, &format!("replace the {what} file"), e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable. Not every file system supports syncing a
    // directory; the file is in place either way.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// PEM with 64-character lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 0x3f]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rustls::SignatureScheme;

    /// DER of the prime256v1 (P-256) curve OID.
    const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn p12(identity: &Identity, password: &str, legacy: bool) -> Vec<u8> {
        use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
        let PrivateKeyDer::Pkcs8(key) = identity.key_der() else {
            panic!("generated keys are PKCS#8");
        };
        let chain = PrivateKeyChain::new(
            b"1".as_slice(),
            PrivateKey::from_der(key.secret_pkcs8_der()).unwrap(),
            [Certificate::from_der(identity.cert_der()).unwrap()],
        );
        let mut store = KeyStore::new();
        store.add_entry("tentacle", KeyStoreEntry::PrivateKeyChain(chain));
        let writer = store.writer(password);
        let writer = if legacy {
            writer
                .encryption_algorithm(
                    p12_keystore::EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc,
                )
                .mac_algorithm(p12_keystore::MacAlgorithm::HmacSha1)
        } else {
            writer
        };
        writer.write().unwrap()
    }

    #[test]
    fn generate_makes_p256_identity_with_der_thumbprint() {
        let id = Identity::generate("Tentacle test").unwrap();
        assert_eq!(id.thumbprint(), Thumbprint::of_der(id.cert_der()));
        assert_eq!(id.thumbprint().to_string().len(), 64);

        let PrivateKeyDer::Pkcs8(key) = id.key_der() else {
            panic!("expected PKCS#8");
        };
        assert!(contains(key.secret_pkcs8_der(), P256_OID));
        assert!(contains(id.cert_der(), P256_OID));
        assert!(contains(id.cert_der(), b"Tentacle test"));
        // subjectAltName (2.5.29.17) holding dNSName [2] CERTIFICATE_DNS_NAME.
        assert!(contains(id.cert_der(), &[0x06, 0x03, 0x55, 0x1d, 0x11]));
        let mut dns = vec![0x82, CERTIFICATE_DNS_NAME.len() as u8];
        dns.extend_from_slice(CERTIFICATE_DNS_NAME.as_bytes());
        assert!(contains(id.cert_der(), &dns));

        let ck = id.certified_key().unwrap();
        assert_eq!(ck.end_entity_cert().unwrap(), id.cert_der());
        assert!(ck
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP384_SHA384])
            .is_none());
        let signer = ck
            .key
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        assert!(!signer.sign(b"hello").unwrap().is_empty());

        // Fresh key and serial each time.
        let other = Identity::generate("Tentacle test").unwrap();
        assert_ne!(other.thumbprint(), id.thumbprint());
        assert_ne!(other.key_der().secret_der(), id.key_der().secret_der());
    }

    #[test]
    fn pem_round_trips_and_is_pkcs8() {
        let id = Identity::generate("pem").unwrap();
        assert!(id.key_pem().starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert!(id.cert_pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(id.cert_pem().lines().all(|l| l.len() <= 64));
        let back = Identity::from_pem(id.cert_pem().as_bytes(), id.key_pem().as_bytes()).unwrap();
        assert_eq!(back.cert_der(), id.cert_der());
        assert_eq!(back.key_der().secret_der(), id.key_der().secret_der());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("new/sub/tentacle.crt");
        let key = dir.path().join("new/sub/tentacle.key");
        let id = Identity::generate("round trip").unwrap();
        id.save(&cert, &key).unwrap();

        let loaded = Identity::load(&cert, &key).unwrap();
        assert_eq!(loaded.thumbprint(), id.thumbprint());
        assert_eq!(loaded.cert_der(), id.cert_der());
        assert_eq!(loaded.key_der().secret_der(), id.key_der().secret_der());

        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(cert.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn save_sets_modes_and_replaces_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tentacle.crt");
        let key = dir.path().join("tentacle.key");
        // A stale, world-readable key must not keep its mode.
        fs::write(&key, "old").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o666)).unwrap();

        let id = Identity::generate("modes").unwrap();
        id.save(&cert, &key).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(
            Identity::load(&cert, &key).unwrap().thumbprint(),
            id.thumbprint()
        );

        // Saving again over the files works and keeps the modes.
        let id2 = Identity::generate("modes 2").unwrap();
        id2.save(&cert, &key).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(
            Identity::load(&cert, &key).unwrap().thumbprint(),
            id2.thumbprint()
        );
    }

    #[test]
    fn save_to_one_path_writes_a_private_combined_file() {
        let dir = tempfile::tempdir().unwrap();
        let both = dir.path().join("identity.pem");
        let id = Identity::generate("combined").unwrap();
        id.save(&both, &both).unwrap();
        assert_eq!(mode(&both), 0o600);
        assert_eq!(
            Identity::load(&both, &both).unwrap().thumbprint(),
            id.thumbprint()
        );
        assert_eq!(
            Identity::import_file(&both, None).unwrap().thumbprint(),
            id.thumbprint()
        );
    }

    #[test]
    fn load_of_missing_files_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("missing.crt");
        let e = Identity::load(&cert, &dir.path().join("missing.key")).unwrap_err();
        assert!(
            matches!(
                e,
                IdentityError::NotFound {
                    what: "certificate",
                    ..
                }
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&cert.display().to_string()), "{msg}");
        assert!(msg.contains("tentacle new-certificate"), "{msg}");

        let id = Identity::generate("half").unwrap();
        fs::write(&cert, id.cert_pem()).unwrap();
        let e = Identity::load(&cert, &dir.path().join("missing.key")).unwrap_err();
        assert!(e.to_string().contains("private key file"), "{e}");
    }

    #[test]
    fn import_file_reads_pem_with_cert_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("both.pem");
        let id = Identity::generate("import pem").unwrap();
        // Key first, then the certificate and an unrelated extra certificate.
        let extra = Identity::generate("ca").unwrap();
        fs::write(
            &path,
            format!("{}{}{}", id.key_pem(), id.cert_pem(), extra.cert_pem()),
        )
        .unwrap();
        let imported = Identity::import_file(&path, None).unwrap();
        assert_eq!(imported.thumbprint(), id.thumbprint());
        assert_eq!(imported.key_der().secret_der(), id.key_der().secret_der());
    }

    #[test]
    fn sec1_key_is_accepted_and_converted_to_pkcs8() {
        let id = Identity::generate("sec1").unwrap();
        let pkcs8 = id.key_der();
        // PrivateKeyInfo { version, algorithm, privateKey OCTET STRING { ECPrivateKey } }
        let info = der_tlv(pkcs8.secret_der()).unwrap();
        let version = der_tlv(info.contents).unwrap();
        let rest = &info.contents[version.whole.len()..];
        let alg = der_tlv(rest).unwrap();
        let octets = der_tlv(&rest[alg.whole.len()..]).unwrap();
        assert_eq!(octets.tag, 0x04);
        let sec1_pem = pem_encode("EC PRIVATE KEY", octets.contents);

        let back = Identity::from_pem(id.cert_pem().as_bytes(), sec1_pem.as_bytes()).unwrap();
        assert_eq!(back.thumbprint(), id.thumbprint());
        assert!(matches!(back.key_der(), PrivateKeyDer::Pkcs8(_)));
        assert_eq!(back.key_der().secret_der(), pkcs8.secret_der());
        assert!(back.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn mismatched_key_is_key_mismatch() {
        let a = Identity::generate("A").unwrap();
        let b = Identity::generate("B").unwrap();
        let e = Identity::from_pem(a.cert_pem().as_bytes(), b.key_pem().as_bytes()).unwrap_err();
        match &e {
            IdentityError::KeyMismatch { cert_thumbprint } => {
                assert_eq!(*cert_thumbprint, a.thumbprint())
            }
            other => panic!("expected KeyMismatch, got {other:?}"),
        }
        assert!(e.to_string().contains(&a.thumbprint().to_string()), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("a.crt"), dir.path().join("b.key"));
        fs::write(&cert, a.cert_pem()).unwrap();
        fs::write(&key, b.key_pem()).unwrap();
        assert!(matches!(
            Identity::load(&cert, &key),
            Err(IdentityError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn garbage_gives_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("garbage.bin");

        fs::write(&path, b"\x00\x01\x02 this is not a certificate \xff\xfe").unwrap();
        let e = Identity::import_file(&path, None).unwrap_err();
        assert!(
            matches!(e, IdentityError::UnrecognizedFormat { .. }),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("PKCS#12"),
            "{msg}"
        );

        fs::write(&path, b"").unwrap();
        assert!(matches!(
            Identity::import_file(&path, None),
            Err(IdentityError::UnrecognizedFormat { .. })
        ));

        // Looks like DER, is not PKCS#12.
        fs::write(&path, b"\x30\x82\x01\x00garbage").unwrap();
        let e = Identity::import_file(&path, Some("pw")).unwrap_err();
        assert!(matches!(e, IdentityError::Pkcs12 { .. }), "{e:?}");
        assert!(e.to_string().contains("password"), "{e}");

        // PEM with broken base64.
        fs::write(
            &path,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = Identity::import_file(&path, None).unwrap_err();
        assert!(matches!(e, IdentityError::InvalidPem { .. }), "{e:?}");

        // A certificate without a key.
        let id = Identity::generate("no key").unwrap();
        fs::write(&path, id.cert_pem()).unwrap();
        let e = Identity::import_file(&path, None).unwrap_err();
        assert!(matches!(e, IdentityError::NoPrivateKey { .. }), "{e:?}");

        // A key without a certificate.
        fs::write(&path, id.key_pem()).unwrap();
        let e = Identity::import_file(&path, None).unwrap_err();
        assert!(matches!(e, IdentityError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");

        // An encrypted key.
        let enc = format!(
            "{}-----BEGIN ENCRYPTED PRIVATE KEY-----\nMAA=\n-----END ENCRYPTED PRIVATE KEY-----\n",
            id.cert_pem()
        );
        fs::write(&path, enc).unwrap();
        let e = Identity::import_file(&path, None).unwrap_err();
        assert!(matches!(e, IdentityError::EncryptedKey { .. }), "{e:?}");

        // A key that is not a key.
        let bad_key = pem_encode("PRIVATE KEY", b"\x30\x03\x02\x01\x00");
        let e = Identity::from_pem(id.cert_pem().as_bytes(), bad_key.as_bytes()).unwrap_err();
        assert!(matches!(e, IdentityError::UnsupportedKey { .. }), "{e:?}");

        // A certificate that is not a certificate.
        let bad_cert = pem_encode("CERTIFICATE", b"\x30\x03\x02\x01\x00");
        let e = Identity::from_pem(bad_cert.as_bytes(), id.key_pem().as_bytes()).unwrap_err();
        assert!(
            matches!(e, IdentityError::InvalidCertificate { .. }),
            "{e:?}"
        );
    }

    #[test]
    fn pkcs12_import_works_and_wrong_password_fails() {
        let id = Identity::generate("pfx").unwrap();
        let dir = tempfile::tempdir().unwrap();

        for legacy in [false, true] {
            let der = p12(&id, "s3cret", legacy);
            let imported = Identity::from_pkcs12(&der, "s3cret").unwrap();
            assert_eq!(imported.thumbprint(), id.thumbprint());
            assert_eq!(imported.key_der().secret_der(), id.key_der().secret_der());

            let path = dir.path().join(format!("tentacle-{legacy}.pfx"));
            fs::write(&path, &der).unwrap();
            let imported = Identity::import_file(&path, Some("s3cret")).unwrap();
            assert_eq!(imported.thumbprint(), id.thumbprint());

            let e = Identity::import_file(&path, Some("wrong")).unwrap_err();
            assert!(matches!(e, IdentityError::Pkcs12 { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(
                msg.contains("password") && msg.contains(&path.display().to_string()),
                "{msg}"
            );
            assert!(Identity::import_file(&path, None).is_err());
        }

        // No password means the empty password.
        let path = dir.path().join("open.p12");
        fs::write(&path, p12(&id, "", false)).unwrap();
        assert_eq!(
            Identity::import_file(&path, None).unwrap().thumbprint(),
            id.thumbprint()
        );
    }

    #[test]
    fn debug_shows_only_the_thumbprint() {
        let id = Identity::generate("debug").unwrap();
        let copy = id.clone();
        assert_eq!(copy.key_der().secret_der(), id.key_der().secret_der());
        let shown = format!("{copy:?}");
        assert!(shown.contains(&id.thumbprint().to_string()), "{shown}");
        assert!(!shown.to_lowercase().contains("key"), "{shown}");
        assert!(shown.len() < 120, "{shown}");
    }
}
