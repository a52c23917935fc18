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
mod thumbprint;
mod trust;
mod verify;

pub use config::{client_config, server_config, ClientAuth, TlsSettings};
pub use identity::{Identity, IdentityError};
pub use thumbprint::{Thumbprint, ThumbprintParseError};
pub use trust::{TrustHint, TrustStore};
pub use verify::{peer_thumbprint, rejected_by_peer, Role, UntrustedPeer};

/// The one crypto provider every config in this workspace is built with.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
