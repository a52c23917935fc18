//! Errors of the comms layer, each naming what failed, where, and what to do.

use std::time::Duration;

use octo_tls::{Role, Thumbprint, UntrustedPeer};

/// Why a call could not reach a tentacle (or a tentacle could not reach a server).
#[derive(Debug, thiserror::Error)]
pub enum CommsError {
    /// No TCP connection could be made.
    #[error("could not connect to the {peer_role} at {address}: {reason}")]
    Connect {
        /// What was dialled.
        address: String,
        /// What is at that address.
        peer_role: Role,
        /// "connection refused", "connection timed out after 10 s", ...
        reason: String,
    },
    /// No connection through the proxy (or the proxy setting is unusable).
    #[error("could not reach the {peer_role} at {address}: {source}")]
    Proxy {
        /// What was dialled (through the proxy).
        address: String,
        /// What is at that address.
        peer_role: Role,
        /// What the proxy answered, naming the proxy.
        #[source]
        source: crate::proxy::ProxyError,
    },
    /// The peer presented a certificate whose thumbprint we do not trust.
    #[error("{address}: {source}")]
    Untrusted {
        /// Where the peer is.
        address: String,
        /// What it presented and what was expected.
        #[source]
        source: UntrustedPeer,
    },
    /// The peer refused our certificate: it does not trust our thumbprint.
    #[error("the {peer_role} at {address} refused our certificate (thumbprint {ours}): it does not trust this {our_role}; {hint}")]
    RejectedByPeer {
        /// Where the peer is.
        address: String,
        /// What the peer is.
        peer_role: Role,
        /// What we are.
        our_role: Role,
        /// Our thumbprint, which the peer must trust.
        ours: Thumbprint,
        /// How to make the peer trust us.
        hint: String,
    },
    /// The TLS handshake failed for another reason.
    #[error("TLS handshake with the {peer_role} at {address} failed: {reason}")]
    Tls {
        /// Where the peer is.
        address: String,
        /// What the peer is.
        peer_role: Role,
        /// What went wrong.
        reason: String,
    },
    /// The TLS and HTTP/2 connection came up but the session handshake did not.
    #[error("the {peer_role} at {address} did not complete the session handshake: {reason}")]
    Handshake {
        /// Where the peer is.
        address: String,
        /// What the peer is.
        peer_role: Role,
        /// What went wrong.
        reason: String,
    },
    /// TLS came up but the WebSocket upgrade did not (wrong path, not an
    /// Octopus server's WebSocket endpoint, a proxy in the way, ...).
    #[error("the WebSocket upgrade at {address} failed: {reason}")]
    WebSocket {
        /// The wss:// URL (and where it was dialled).
        address: String,
        /// What the server answered, and what to do.
        reason: String,
    },
    /// A polling tentacle did not connect in time.
    #[error("polling tentacle poll://{subscription_id}/ (thumbprint {thumbprint}) did not connect within {} s{detail}; check that it runs (`tentacle run`) and can reach this server's polling port", waited.as_secs())]
    PollingTimeout {
        /// Which tentacle.
        subscription_id: String,
        /// The thumbprint it must present.
        thumbprint: Thumbprint,
        /// How long the request waited.
        waited: Duration,
        /// Extra detail (e.g. a connection of that subscription with another thumbprint).
        detail: String,
    },
    /// An endpoint value that cannot be used.
    #[error("invalid endpoint '{endpoint}': {reason}")]
    InvalidEndpoint {
        /// What was given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
}

impl CommsError {
    /// Whether trying again later may succeed without anyone changing configuration.
    /// Through a proxy: when it was unreachable, timed out or could not reach
    /// the peer (500/502/503/504), not when it refused (407, 403).
    pub fn is_retryable(&self) -> bool {
        match self {
            CommsError::Proxy { source, .. } => source.is_retryable(),
            other => matches!(
                other,
                CommsError::Connect { .. }
                    | CommsError::PollingTimeout { .. }
                    | CommsError::Handshake { .. }
                    | CommsError::Tls { .. }
            ),
        }
    }
}

/// Is this RPC failure the kind that happens when a connection drops mid-call?
/// Such calls fail at once with `Unavailable`; the contract makes them safe to
/// retry (script start is idempotent on its ticket, uploads resume).
pub fn is_retryable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
}
