//! TLS identity and trust for tentacles and servers.
//!
//! - [`Thumbprint`]: SHA-256 of a certificate's DER, the only thing that is pinned.
//! - [`Identity`]: a per-instance key pair and self-signed certificate, stored as PEM.
//! - [`TrustStore`]: the set of peer thumbprints trusted right now; it can change at
//!   run time and tells live connections when their peer stops being trusted.
//! - [`config`]: rustls client and server configs whose verifiers accept a peer only
//!   when its end-entity thumbprint is trusted *and* its handshake signature verifies.
//!
//! Invariant: no config built here accepts a certificate whose thumbprint is not in
//! the trusted set, and none skips signature verification. TLS resumption is
//! disabled so that every connection is verified afresh.

pub mod config;
pub mod identity;
mod live;
mod thumbprint;
mod trust;
mod verify;

pub use config::{
    api_client_config, client_config, client_config_live, server_config, server_config_live,
    ClientAuth, TlsSettings,
};
pub use identity::{Identity, IdentityError, CERTIFICATE_DNS_NAME};
pub use live::LiveIdentity;
pub use thumbprint::{Thumbprint, ThumbprintParseError};
pub use trust::{TrustHint, TrustStore};
pub use verify::{peer_thumbprint, rejected_by_peer, Role, UntrustedPeer};

/// The one crypto provider every config in this workspace is built with: ring's
/// defaults, with AES-128-GCM suites preferred over AES-256-GCM (about a third
/// faster with AES-NI and still 128-bit secure; both ends use this order).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // Stable sort: AES-128-GCM first, everything else keeps ring's order.
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    std::sync::Arc::new(provider)
}
