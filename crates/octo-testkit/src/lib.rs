//! Test support: start servers and tentacles on loopback with fixture services.
//!
//! Everything binds 127.0.0.1 port 0 and is stopped when its [`Guard`] drops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use octo_comms::{
    Backoff, PollingTarget, ProxySetting, ServerComms, ServerCommsOptions, TentacleComms,
};
use octo_tls::{Identity, Thumbprint, TrustHint, TrustStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod netns;
pub mod nginx;
pub mod postgres;
pub mod proxy;
pub mod raw;
pub mod services;
pub mod throttle;
pub mod tinyproxy;

/// `len` incompressible bytes (xorshift64 from a seed): package contents whose
/// size on the wire is their size.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Logs to the test's captured output; `RUST_LOG` filters (default "info").
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// A fresh identity.
pub fn identity(name: &str) -> Identity {
    Identity::generate(name).expect("generate identity")
}

/// A trust hint naming the test side.
pub fn hint(side: &'static str) -> TrustHint {
    Arc::new(move |t: &Thumbprint| format!("trust it on the {side} ({t})"))
}

/// Cancels its token when dropped, stopping whatever was started with it.
#[derive(Debug, Clone)]
pub struct Guard(pub CancellationToken);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port` (a
/// `tentacle run` process just spawned binds its port a moment later), trying
/// every 10 ms for at most `within`. The probe connects and closes at once.
///
/// # Panics
/// When nothing listens there within `within`, naming the port and `what`.
pub fn wait_for_listener(port: u16, within: Duration, what: &str) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + within;
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("{what} did not listen on {addr} within {within:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A listening tentacle on 127.0.0.1 trusting `servers`.
pub async fn listening_tentacle(
    identity: Identity,
    servers: &[Thumbprint],
) -> (SocketAddr, TentacleComms, Guard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let trust = TrustStore::new(servers.iter().copied(), hint("tentacle"));
    let comms = TentacleComms::new(identity, trust, services::routes(), "Test");
    let token = CancellationToken::new();
    let (c, t) = (comms.clone(), token.clone());
    tokio::spawn(async move { c.run_listening(listener, t).await });
    (addr, comms, Guard(token))
}

/// A server whose polling port (127.0.0.1) trusts `tentacles`.
pub async fn server(
    identity: Identity,
    tentacles: &[Thumbprint],
) -> (ServerComms, SocketAddr, Guard) {
    server_with(identity, tentacles, ServerCommsOptions::default(), None).await
}

/// A server with options, optionally on a given polling address.
pub async fn server_with(
    identity: Identity,
    tentacles: &[Thumbprint],
    options: ServerCommsOptions,
    addr: Option<SocketAddr>,
) -> (ServerComms, SocketAddr, Guard) {
    let trust = TrustStore::new(tentacles.iter().copied(), hint("server"));
    let comms = ServerComms::new(identity, trust, options);
    let (addr, guard) = serve_polling(&comms, addr).await;
    (comms, addr, guard)
}

/// Starts `comms`' polling listener (on `addr` or a free port).
pub async fn serve_polling(comms: &ServerComms, addr: Option<SocketAddr>) -> (SocketAddr, Guard) {
    let listener = TcpListener::bind(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
        .await
        .expect("bind polling port");
    let addr = listener.local_addr().expect("addr");
    let token = CancellationToken::new();
    let (c, t) = (comms.clone(), token.clone());
    tokio::spawn(async move { c.run_polling_listener(listener, t).await });
    (addr, Guard(token))
}

/// A polling tentacle keeping `connections` connections to `server_addr`.
pub fn polling_tentacle(
    identity: Identity,
    servers: &[Thumbprint],
    server_addr: SocketAddr,
    subscription_id: &str,
    connections: usize,
) -> (TentacleComms, Guard) {
    polling_tentacle_via(
        identity,
        servers,
        &server_addr.to_string(),
        subscription_id,
        connections,
        ProxySetting::default(),
    )
}

/// A polling tentacle keeping `connections` connections to `server_address`
/// ("host:port"), dialling with `proxy`.
pub fn polling_tentacle_via(
    identity: Identity,
    servers: &[Thumbprint],
    server_address: &str,
    subscription_id: &str,
    connections: usize,
    proxy: ProxySetting,
) -> (TentacleComms, Guard) {
    let trust = TrustStore::new(servers.iter().copied(), hint("tentacle"));
    let comms = TentacleComms::new(identity, trust, services::routes(), "Test").with_proxy(proxy);
    let token = CancellationToken::new();
    let target = PollingTarget {
        address: server_address.to_string(),
        subscription_id: subscription_id.to_string(),
    };
    let (c, t) = (comms.clone(), token.clone());
    // Short backoff so restarts in tests reconnect quickly; still jittered.
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    tokio::spawn(async move { c.run_polling(target, connections, backoff, t).await });
    (comms, Guard(token))
}

/// Captures log output of the current thread (use a current-thread runtime so
/// spawned tasks log here too).
#[derive(Debug, Clone, Default)]
pub struct LogCapture(Arc<(std::sync::Mutex<Vec<u8>>, tokio::sync::Notify)>);

impl LogCapture {
    /// Installs the capture for the current thread until the guard drops.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sub = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(self.clone())
            .finish();
        tracing::subscriber::set_default(sub)
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0 .0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }

    /// Waits (bounded) until a logged line contains every needle; returns it.
    pub async fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.0 .1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(l) = self
                .text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l.to_string());
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        self.0 .1.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
