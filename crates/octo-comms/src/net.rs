//! Socket plumbing shared by every connection: options, dialling, TLS names.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use tokio_rustls::rustls;

/// TCP keepalive: first probe after 15 s idle, then every 5 s, 3 probes.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// Most encrypted bytes queued before they are written to the socket (rustls'
/// default is 64 KiB). Bulk transfers then write a quarter MiB per system call;
/// nothing is allocated for it until data is sent.
pub const TLS_SEND_BUFFER: usize = 256 << 10;

/// Per-connection TLS settings, applied before the handshake.
pub fn tune_tls<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

/// Sets TCP_NODELAY and TCP keepalive on a socket we accepted or dialled.
/// Every socket in the workspace goes through here.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let ka = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// The accept queue every listening socket of the workspace asks the kernel
/// for; Linux caps it at `net.core.somaxconn` (4096 since Linux 5.4). The
/// standard library and mio ask for 128, which a fleet connecting at once
/// overflows: the kernel then drops the SYNs it has no room for, and those
/// tentacles wait out TCP's retransmissions (1 s, 3 s, 7 s, 15 s) before the
/// server sees them at all. The server's own queue (its bounded handshakes)
/// can only order connections the kernel let through.
pub const LISTEN_BACKLOG: u32 = 65_535;

/// Below this `net.core.somaxconn` a node serving a fleet warns (see
/// [`accept_queue_limit`]).
pub const SMALL_ACCEPT_QUEUE: u32 = 1024;

/// Listens on `address` ("host:port", the host a name or an IP) with
/// [`LISTEN_BACKLOG`] and `SO_REUSEADDR`, as `TcpListener::bind` would
/// otherwise: the first of the host's addresses that can be bound.
pub async fn listen(address: &str) -> io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(address).await? {
        match listen_on(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address} resolves to no address"),
        )
    }))
}

/// [`listen`] on one socket address.
pub fn listen_on(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The accept queue a listener of [`listen`] gets on this host: the kernel's
/// `net.core.somaxconn` when it is smaller than [`LISTEN_BACKLOG`]; None when
/// it cannot be read (not Linux, or /proc not mounted).
pub fn accept_queue_limit() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?;
    let somaxconn: u32 = text.trim().parse().ok()?;
    Some(somaxconn.min(LISTEN_BACKLOG))
}

/// Why a TCP connection could not be made, in words a person recognises.
pub fn describe_connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (nothing is listening on that port, or a firewall rejected it)"
                .to_string()
        }
        io::ErrorKind::TimedOut => {
            "connection timed out (no answer: a firewall or NAT drops the packets, or the host is down)"
                .to_string()
        }
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            format!("no route to host ({e})")
        }
        _ => e.to_string(),
    }
}

/// Dials `address` ("host:port"), bounded by `timeout`, and tunes the socket.
pub async fn dial(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Err(_) => {
            return Err(format!(
                "connection timed out after {} s (no answer: a firewall or NAT drops the packets, or the host is down)",
                timeout.as_secs_f32()
            ))
        }
        Ok(Err(e)) => return Err(describe_connect_error(&e)),
        Ok(Ok(s)) => s,
    };
    tune(&stream).map_err(|e| format!("setting socket options: {e}"))?;
    Ok(stream)
}

/// Splits "host:port" (IPv6 as "[::1]:port") into host and port.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

/// `HOST[:PORT]` (`[IPV6][:PORT]`) of a URI, checked: a host that is a DNS
/// name or an IP address, and a port from 1 to 65535 (`default` when none is
/// given). The error says what is wrong and what is expected.
pub fn parse_authority(authority: &str, default: u16) -> Result<(String, u16), String> {
    const EXPECTED: &str = "expected https://HOST:PORT/";
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("'[' without ']' around an IPv6 address; {EXPECTED}"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("'{host}' is not an IPv6 address"));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(format!("unexpected text after ']'; {EXPECTED}")),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((_, rest)) if rest.contains(':') => {
                return Err(format!(
                    "an IPv6 address needs brackets, e.g. https://[::1]:10933/; {EXPECTED}"
                ))
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("the host is missing; {EXPECTED}"));
    }
    server_name(host)?;
    let port = match port {
        None => default,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "port '{p}' is not a number from 1 to 65535; {EXPECTED}"
                ))
            }
        },
    };
    Ok((host.to_string(), port))
}

/// The TLS server name for a host: a DNS name (sent as SNI, so proxies that route
/// by SNI work) or an IP address (rustls sends no SNI for those). The pinning
/// verifier ignores the name either way.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_string()).map_err(|_| format!("'{host}' is not a valid host name"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn authorities_are_checked() {
        assert_eq!(
            parse_authority("a.example", 10933).unwrap(),
            ("a.example".into(), 10933)
        );
        assert_eq!(
            parse_authority("127.0.0.1:1", 10933).unwrap(),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(
            parse_authority("[::1]:65535", 10933).unwrap(),
            ("::1".into(), 65535)
        );
        assert_eq!(parse_authority("[::1]", 7).unwrap(), ("::1".into(), 7));
        for (bad, why) in [
            (
                "127.0.0.1:99999",
                "port '99999' is not a number from 1 to 65535",
            ),
            ("127.0.0.1:0", "port '0'"),
            ("127.0.0.1:", "port ''"),
            ("h:x", "port 'x'"),
            ("::1", "brackets"),
            ("[::1", "without ']'"),
            ("[nope]:1", "not an IPv6"),
            ("[::1]x", "after ']'"),
            (":10933", "host is missing"),
            ("", "host is missing"),
            ("a b:1", "not a valid host name"),
        ] {
            let e = parse_authority(bad, 10933).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn host_port() {
        assert_eq!(
            split_host_port("a.example:10933"),
            Some(("a.example", 10933))
        );
        assert_eq!(split_host_port("[::1]:1"), Some(("::1", 1)));
        assert_eq!(split_host_port("nohost"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("h:99999"), None);
    }

    #[test]
    fn names() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("octopus.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("bad name!").is_err());
    }
}

/// Where a watched stream records how it ended.
pub type EndSlot = std::sync::Arc<std::sync::Mutex<Option<IoEnd>>>;

/// How a watched stream ended.
#[derive(Debug, Clone)]
pub struct IoEnd {
    /// The peer sent a TLS alert refusing our certificate.
    pub rejected_by_peer: bool,
    /// The I/O error, in words.
    pub message: String,
}

/// A stream whose life is tied to a token, both ways: cancelling the token makes
/// every pending and future read or write fail at once (waking a blocked reader),
/// and EOF or an I/O error cancels the token, so whoever watches the token learns
/// the connection is gone. The first I/O error is recorded.
///
/// hyper's HTTP/2 client drives the socket in a task of its own; this is how we
/// close such a connection for certain and how we know when it has closed.
pub struct Watched<IO> {
    io: IO,
    token: tokio_util::sync::CancellationToken,
    killed: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    end: EndSlot,
    activity: Option<std::sync::Arc<crate::h2client::Activity>>,
}

impl<IO> std::fmt::Debug for Watched<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("cancelled", &self.token.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl<IO> Watched<IO> {
    /// Wraps `io`; `end` receives the first I/O error.
    pub fn new(io: IO, token: tokio_util::sync::CancellationToken, end: EndSlot) -> Self {
        let killed = Box::pin(token.clone().cancelled_owned());
        Self {
            io,
            token,
            killed,
            end,
            activity: None,
        }
    }

    /// Records every read in `activity` (for keepalive).
    pub(crate) fn with_activity(
        mut self,
        activity: std::sync::Arc<crate::h2client::Activity>,
    ) -> Self {
        self.activity = Some(activity);
        self
    }

    fn check_killed(&mut self, cx: &mut std::task::Context<'_>) -> Option<io::Error> {
        use std::future::Future;
        if self.killed.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed",
            ));
        }
        None
    }

    fn failed(&self, e: &io::Error) {
        let end = IoEnd {
            rejected_by_peer: octo_tls::rejected_by_peer(e),
            message: e.to_string(),
        };
        let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
        // Keep the first error, unless a later one says the peer refused our
        // certificate: that is the cause, whatever failed first.
        if slot
            .as_ref()
            .is_none_or(|old| !old.rejected_by_peer && end.rejected_by_peer)
        {
            *slot = Some(end);
        }
        drop(slot);
        self.token.cancel();
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        match std::pin::Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if wanted && buf.filled().len() == before {
                    self.token.cancel(); // EOF
                } else if let Some(activity) = &self.activity {
                    activity.touch();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.failed(&e);
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        match std::pin::Pin::new(&mut self.io).poll_write(cx, data) {
            Poll::Ready(Err(e)) => {
                self.failed(&e);
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if let Some(e) = self.check_killed(cx) {
            return Poll::Ready(Err(e));
        }
        match std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) => {
                self.failed(&e);
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if let Some(e) = self.check_killed(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The next connection on `listener`, or None once `shutdown` is cancelled.
/// A failed accept (out of file descriptors, say) is logged with `what` and
/// retried after a pause rather than in a busy loop.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    let local = listener.local_addr().ok();
                    tracing::error!("accepting a {what} on {local:?} failed: {e}; trying again in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Closes a connection we refused without losing our last words: half-close
/// (FIN after the TLS alert already sent), then read and discard until the peer
/// closes or `within` passes. Dropping a socket with unread data would send RST,
/// and an RST can overtake the alert, leaving the peer with "connection reset"
/// instead of "your certificate is not trusted".
pub async fn linger_close(mut stream: TcpStream, within: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Vec<u8>,
    pos: usize,
    io: IO,
}

impl<IO> Prefixed<IO> {
    /// `prefix` is returned by reads before anything from `io`.
    pub fn new(prefix: Vec<u8>, io: IO) -> Self {
        Self { prefix, pos: 0, io }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Bytes put back in front that have not been read yet.
    pub fn pending(&self) -> &[u8] {
        &self.prefix[self.pos..]
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
