//! Comms transports.
//!
//! - [`tentacle`]: the agent side. Always the gRPC server, on connections it
//!   accepted (listening) or dialled (polling).
//! - [`server`]: the server side. Always the gRPC client, on connections it
//!   dialled (listening tentacles) or accepted (polling tentacles); callers ask
//!   for an [`Endpoint`] and get a multiplexed [`Connection`].
//! - [`registry`]: connected polling tentacles and requests waiting for them.
//! - [`proxy`]: HTTP CONNECT proxies for either side's dial (TLS stays end to end).
//! - [`websocket`]: polling over WebSocket (`wss://`): the same HTTP/2 inside
//!   binary messages, for networks where only HTTPS ports are open.
//!
//! Invariants: every socket gets TCP_NODELAY and keepalive ([`net::tune`]);
//! every TLS config comes from `octo_tls` (pinned thumbprints, signatures
//! verified, no resumption); a connection whose peer's thumbprint stops being
//! trusted is dropped; a request is never routed to a connection whose peer
//! presented a thumbprint other than the endpoint's.

use std::time::Duration;

pub mod backoff;
mod error;
pub mod h2client;
pub mod net;
pub mod page;
pub mod passed;
pub mod proxy;
pub mod registry;
pub mod rotation;
pub mod server;
mod stop;
pub mod tentacle;
pub mod websocket;

pub use backoff::Backoff;
pub use error::{is_retryable, CommsError};
pub use h2client::H2Channel;
pub use passed::{HeldListener, PassedSocketError, PassedSockets};
pub use proxy::{ProxyConfig, ProxyError, ProxySetting};
pub use registry::{PollingRegistry, Presence};
pub use rotation::{CommsEvent, TentacleRotation};
pub use server::{
    Connection, Endpoint, HttpOverTls, ServerComms, ServerCommsOptions, WebSocketListenerOptions,
    DEFAULT_MAX_CONCURRENT_HANDSHAKES,
};
pub use stop::StopSignals;
pub use tentacle::{ConnectionInfo, Direction, PollingOptions, PollingTarget, TentacleComms};

/// Sets the process's allocator up for bulk transfers. Call it first thing in
/// `main` of a binary that moves files (server, tentacle, benchmarks).
///
/// Every message of a file transfer passes through ~1 MiB buffers (tonic's
/// encode and decode buffers). glibc serves blocks that large with `mmap` and
/// trims the heap's free top back to the kernel, so each message faulted in
/// fresh zeroed pages and gave them back: about a tenth of the sender's CPU.
/// Blocks up to 4 MiB now come from the heap, and up to 32 MiB of free heap
/// top is kept for reuse. Measured: uploads 10-15% faster (BENCHMARKS.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn tune_allocator() {
    // SAFETY: `mallopt` only changes allocator parameters; it is thread-safe
    // and both values are in range. A refusal (returns 0) leaves the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Sets the process's allocator up for bulk transfers (nothing to do here).
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune_allocator() {}

/// Boxed error used where hyper reports one.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP/2 and handshake settings shared by both sides.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// Send an HTTP/2 PING after this long without traffic.
    pub keepalive_interval: Duration,
    /// Close the connection when a PING is not answered within this. Interval +
    /// timeout bounds how long a dead connection goes unnoticed (20 s by default).
    pub keepalive_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// TLS handshake (and session handshake) timeout.
    pub handshake_timeout: Duration,
    /// HTTP/2 flow-control window per stream.
    pub stream_window: u32,
    /// HTTP/2 flow-control window per connection.
    pub connection_window: u32,
    /// Largest HTTP/2 frame we accept.
    pub max_frame_size: u32,
    /// Most calls at once on one connection (served side).
    pub max_concurrent_streams: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            stream_window: 4 << 20,
            connection_window: 8 << 20,
            max_frame_size: 256 << 10,
            max_concurrent_streams: 1024,
        }
    }
}
