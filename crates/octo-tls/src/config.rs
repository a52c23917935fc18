//! rustls configs for both ends of a comms connection.
//!
//! Every config: the one crypto provider ([`crate::provider`]), TLS 1.2 and 1.3 only,
//! our certificate always presented, the peer pinned by thumbprint, resumption off.

use std::sync::Arc;

use rustls::{ClientConfig, ServerConfig};

use crate::verify::{PinnedClientVerifier, PinnedServerVerifier, Pinning};
use crate::{Identity, IdentityError, LiveIdentity, Role, TrustStore};

/// Whether a TLS server lets clients connect without a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a trusted certificate.
    Required,
    /// A client may present no certificate (it then only gets the friendly page);
    /// a client that presents one must present a trusted one.
    Optional,
}

/// Options shared by client and server configs.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// ALPN protocols to offer, most preferred first.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            alpn: vec![b"h2".to_vec()],
        }
    }
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Config for the side that accepts TLS (a listening tentacle, the server's
/// polling port). `peer_role` names what connecting clients are.
pub fn server_config(
    identity: &Identity,
    trust: TrustStore,
    peer_role: Role,
    auth: ClientAuth,
    settings: &TlsSettings,
) -> Result<Arc<ServerConfig>, IdentityError> {
    server_config_live(
        &LiveIdentity::new(identity.clone()),
        trust,
        peer_role,
        auth,
        settings,
    )
}

/// [`server_config`] presenting whatever identity `identity` holds at each
/// handshake (certificate rotation).
pub fn server_config_live(
    identity: &LiveIdentity,
    trust: TrustStore,
    peer_role: Role,
    auth: ClientAuth,
    settings: &TlsSettings,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = crate::provider();
    let verifier = PinnedClientVerifier {
        pinning: Pinning {
            trust,
            peer_role,
            provider: provider.clone(),
        },
        mandatory: auth == ClientAuth::Required,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| IdentityError::Generate(format!("TLS configuration: {e}")))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(AlwaysResolvesServerCert(identity.clone())));
    cfg.alpn_protocols = settings.alpn.clone();
    // No resumption: a resumed session would skip the thumbprint check.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Config for the side that dials (the server dialling a listening tentacle, a
/// polling tentacle dialling the server). `peer_role` names what is dialled.
pub fn client_config(
    identity: &Identity,
    trust: TrustStore,
    peer_role: Role,
    settings: &TlsSettings,
) -> Result<Arc<ClientConfig>, IdentityError> {
    client_config_live(
        &LiveIdentity::new(identity.clone()),
        trust,
        peer_role,
        settings,
    )
}

/// [`client_config`] presenting whatever identity `identity` holds at each
/// handshake (certificate rotation).
pub fn client_config_live(
    identity: &LiveIdentity,
    trust: TrustStore,
    peer_role: Role,
    settings: &TlsSettings,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = crate::provider();
    let verifier = PinnedServerVerifier {
        pinning: Pinning {
            trust,
            peer_role,
            provider: provider.clone(),
        },
        pinned: true,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| IdentityError::Generate(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientCert(identity.clone())));
    cfg.alpn_protocols = settings.alpn.clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Config for a client of a server's HTTPS API (a tentacle registering over
/// `https://`): HTTP/1.1, no client certificate (the API authenticates by key).
/// With `trust`, the server must present a trusted thumbprint (refused with
/// [`crate::UntrustedPeer`] otherwise); without, any certificate is accepted and
/// the caller should report [`crate::peer_thumbprint`] as unverified.
pub fn api_client_config(trust: Option<TrustStore>) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = crate::provider();
    let pinned = trust.is_some();
    let trust = trust.unwrap_or_else(|| TrustStore::new([], Arc::new(|_| String::new())));
    let verifier = PinnedServerVerifier {
        pinning: Pinning {
            trust,
            peer_role: Role::Server,
            provider: provider.clone(),
        },
        pinned,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(VERSIONS)
        .map_err(|e| IdentityError::Generate(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// Presents our current certificate whatever the server asks.
#[derive(Debug)]
struct AlwaysResolvesClientCert(LiveIdentity);

impl rustls::client::ResolvesClientCert for AlwaysResolvesClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents our current certificate to every client.
#[derive(Debug)]
struct AlwaysResolvesServerCert(LiveIdentity);

impl rustls::server::ResolvesServerCert for AlwaysResolvesServerCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.certified_key())
    }
}
