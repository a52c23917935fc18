//! Certificate verifiers that pin thumbprints and still verify handshake signatures.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::{Thumbprint, TrustStore};

/// Who the peer of a connection is, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An Octopus server.
    Server,
    /// A tentacle.
    Tentacle,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Tentacle => "tentacle",
        })
    }
}

/// A peer presented a certificate whose thumbprint is not trusted. Carried inside
/// the rustls error so the side that refused and the side that dialled can both
/// report it precisely; see [`UntrustedPeer::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UntrustedPeer {
    /// Thumbprint of the certificate the peer presented.
    pub presented: Thumbprint,
    /// What was trusted at the time (empty when nothing is trusted yet).
    pub expected: Vec<Thumbprint>,
    /// What the peer is.
    pub peer_role: Role,
    /// How to trust the presented thumbprint on this side.
    pub hint: String,
}

impl fmt::Display for UntrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} presented thumbprint {} but ",
            self.peer_role, self.presented
        )?;
        match self.expected.as_slice() {
            [] => write!(f, "no thumbprint is trusted yet")?,
            [one] => write!(f, "{one} was expected")?,
            many => {
                write!(f, "one of ")?;
                for (i, t) in many.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{t}")?;
                }
                write!(f, " was expected")?;
            }
        }
        write!(
            f,
            "; if {} is the right {}, {}",
            self.presented, self.peer_role, self.hint
        )
    }
}

impl StdError for UntrustedPeer {}

impl UntrustedPeer {
    /// Finds an `UntrustedPeer` anywhere in an error's source chain (an `io::Error`
    /// from a TLS handshake, a hyper error, ...).
    pub fn find(err: &(dyn StdError + 'static)) -> Option<UntrustedPeer> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(u) = e.downcast_ref::<UntrustedPeer>() {
                return Some(u.clone());
            }
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
                e.downcast_ref::<rustls::Error>()
            {
                if let Some(u) = other.0.downcast_ref::<UntrustedPeer>() {
                    return Some(u.clone());
                }
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if let Some(inner) = io.get_ref() {
                    if let Some(u) = UntrustedPeer::find(inner) {
                        return Some(u);
                    }
                }
            }
            cur = e.source();
        }
        None
    }
}

/// Did the peer refuse our certificate? True when the error chain holds a TLS alert
/// the peer sent about our certificate.
pub fn rejected_by_peer(err: &(dyn StdError + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::AlertReceived(
            A::BadCertificate
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied
            | A::UnknownCA
            | A::CertificateRequired
            | A::DecryptError,
        )) = e.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if rejected_by_peer(inner) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}

/// Thumbprint of the end-entity certificate the peer presented, if any.
pub fn peer_thumbprint(conn: &rustls::CommonState) -> Option<Thumbprint> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Thumbprint::of_der(c.as_ref()))
}

/// Shared logic of both verifiers.
#[derive(Debug)]
pub(crate) struct Pinning {
    pub(crate) trust: TrustStore,
    pub(crate) peer_role: Role,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl Pinning {
    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let presented = Thumbprint::of_der(end_entity.as_ref());
        if self.trust.is_trusted(&presented) {
            return Ok(());
        }
        let err = UntrustedPeer {
            presented,
            expected: self.trust.snapshot(),
            peer_role: self.peer_role,
            hint: self.trust.hint(&presented),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(err)),
        )))
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Used by TLS *clients*: accepts the server's certificate only when its thumbprint
/// is trusted. Host names, CAs and expiry are deliberately not checked: the pin is
/// the trust. Handshake signatures are verified with the provider, which proves the
/// peer holds the certificate's private key.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pub(crate) pinning: Pinning,
    /// False only for clients of a server's HTTPS API without a thumbprint to
    /// pin (trust on first use: the caller reports what was presented).
    pub(crate) pinned: bool,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pinned {
            self.pinning.check(end_entity)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinning.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinning.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.pinning.schemes()
    }
}

/// Used by TLS *servers*: asks every client for a certificate and accepts one only
/// when its thumbprint is trusted. When `mandatory` is false a client may present
/// no certificate at all; such connections are only ever shown the friendly page.
#[derive(Debug)]
pub(crate) struct PinnedClientVerifier {
    pub(crate) pinning: Pinning,
    pub(crate) mandatory: bool,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.pinning
            .check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinning.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pinning.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.pinning.schemes()
    }
}
