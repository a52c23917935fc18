//! Listening sockets passed by the service manager (systemd's socket units,
//! the `LISTEN_FDS` protocol).
//!
//! A server that binds its own ports leaves a gap on every restart: from the
//! old process closing its listeners to the new one binding them, each
//! connection is refused. Polling tentacles that redial into that gap back off
//! (1 s, 2 s, 4 s, 8 s windows), and API clients fail. A socket held by
//! systemd outlives the process: connections made while the server restarts
//! wait in the kernel's accept queue and are served by the next process.
//!
//! Each passed socket is taken for the option whose port it listens on
//! (`--listen`, `--comms-listen-port`, `--web-socket-listen-port`); its
//! address must agree with that option's, so that a socket unit cannot widen
//! what the operator's flags say (a loopback-only API served on every
//! address). A passed socket no option asks for is an error, not ignored.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};

/// The sockets passed to this process, not yet taken by a listener.
#[derive(Debug, Default)]
pub struct PassedSockets {
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl PassedSockets {
    /// No sockets: the server binds its ports itself.
    pub fn none() -> Self {
        Self::default()
    }

    /// The sockets the service manager passed (`LISTEN_FDS`, for this process
    /// when `LISTEN_PID` is set), none when it passed none. The variables are
    /// removed, so that processes this server starts do not take them: call it
    /// before any other thread starts.
    pub fn from_env() -> anyhow::Result<Self> {
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::with_capacity(fds.len());
        for i in 0..fds.len() {
            let fd = i + 3;
            let listener = fds
                .take_tcp_listener(i)
                .with_context(|| format!("the socket the service manager passed as file descriptor {fd} (LISTEN_FDS) is not a listening TCP socket; pass only ListenStream= sockets to the server"))?
                .with_context(|| format!("file descriptor {fd} (LISTEN_FDS) was already taken"))?;
            sockets.push(listener);
        }
        Self::new(sockets).context("reading the sockets the service manager passed (LISTEN_FDS)")
    }

    /// These listening sockets (a test's or a benchmark's, which keeps a copy
    /// across a restart as systemd does). A socket that does not listen (a
    /// connection, as a socket unit with `Accept=yes` passes) is refused.
    pub fn new(listeners: Vec<std::net::TcpListener>) -> std::io::Result<Self> {
        let mut sockets = Vec::with_capacity(listeners.len());
        for l in listeners {
            let addr = l.local_addr()?;
            if !socket2::SockRef::from(&l).is_listener()? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("the socket on {addr} is a connection, not a listening socket; the server's socket unit must not set Accept=yes"),
                ));
            }
            sockets.push((addr, l));
        }
        Ok(Self { sockets })
    }

    /// How many are left.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The passed socket listening on `port`, for the option `flag`, whose
    /// addresses are `wanted` (an unspecified address, `0.0.0.0` or `::`,
    /// agrees with any); None when none listens on that port.
    pub(crate) fn take(
        &mut self,
        port: u16,
        wanted: &[IpAddr],
        flag: &str,
    ) -> anyhow::Result<Option<tokio::net::TcpListener>> {
        let Some(i) = self.sockets.iter().position(|(a, _)| a.port() == port) else {
            return Ok(None);
        };
        let (addr, listener) = self.sockets.swap_remove(i);
        if !address_agrees(wanted, addr.ip()) {
            let wanted: Vec<String> = wanted.iter().map(ToString::to_string).collect();
            bail!(
                "the service manager passed a socket listening on {addr}, but {flag} asks for {} port {port}; make the socket unit's ListenStream= and {flag} name the same address",
                wanted.join(" or ")
            );
        }
        listener
            .set_nonblocking(true)
            .with_context(|| format!("making the passed socket on {addr} non-blocking"))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .with_context(|| format!("serving the passed socket on {addr}"))?;
        Ok(Some(listener))
    }

    /// Fails when a passed socket was left over (no option asks for its
    /// port): it would hold connections that nothing ever accepts.
    pub(crate) fn finish(self, ports: &str) -> anyhow::Result<()> {
        if self.sockets.is_empty() {
            return Ok(());
        }
        let left: Vec<String> = self.sockets.iter().map(|(a, _)| a.to_string()).collect();
        bail!(
            "the service manager passed sockets on {} that no option of this server listens on ({ports}); remove them from the socket unit or set the option's port to theirs",
            left.join(", ")
        )
    }
}

/// Whether a passed socket's address `got` is one the option asked for.
fn address_agrees(wanted: &[IpAddr], got: IpAddr) -> bool {
    let got = got.to_canonical();
    wanted
        .iter()
        .any(|w| w.is_unspecified() || w.to_canonical() == got)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn loopback() -> std::net::TcpListener {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap()
    }

    #[test]
    fn addresses_agree_when_equal_or_the_option_says_any() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let any4: IpAddr = "0.0.0.0".parse().unwrap();
        let any6: IpAddr = "::".parse().unwrap();
        assert!(address_agrees(&[lo], lo));
        assert!(address_agrees(&[any4], lo));
        assert!(address_agrees(&[any4], any6));
        assert!(address_agrees(&[lo], "::ffff:127.0.0.1".parse().unwrap()));
        // A socket on every address for an option that asks for loopback
        // would widen the server's exposure.
        assert!(!address_agrees(&[lo], any4));
        assert!(!address_agrees(&[lo], "10.0.0.1".parse().unwrap()));
        assert!(!address_agrees(&[], lo));
    }

    #[tokio::test]
    async fn a_socket_is_taken_by_its_port_and_checked_against_the_option() {
        let (a, b) = (loopback(), loopback());
        let (pa, pb) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        let mut passed = PassedSockets::new(vec![a, b]).unwrap();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        // No socket on this port: the option binds its own.
        let free = loopback().local_addr().unwrap().port();
        assert!(passed.take(free, &[lo], "--x").unwrap().is_none());
        let taken = passed.take(pa, &[lo], "--listen").unwrap().unwrap();
        assert_eq!(taken.local_addr().unwrap().port(), pa);
        assert_eq!(passed.len(), 1);
        let err = passed
            .take(pb, &["10.1.2.3".parse().unwrap()], "--comms-listen-address")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("127.0.0.1:{pb}"))
                && err.contains("--comms-listen-address asks for 10.1.2.3"),
            "{err}"
        );
        passed.finish("none").unwrap();
    }

    #[test]
    fn a_connection_is_not_taken_for_a_listening_socket() {
        let listener = loopback();
        let addr = listener.local_addr().unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.connect(&addr.into()).unwrap();
        let local = socket.local_addr().unwrap().as_socket().unwrap();
        let err = PassedSockets::new(vec![std::net::TcpListener::from(socket)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("the socket on {local} is a connection"))
                && err.contains("Accept=yes"),
            "{err}"
        );
    }

    #[test]
    fn a_socket_no_option_asks_for_is_an_error_that_names_it() {
        let a = loopback();
        let addr = a.local_addr().unwrap();
        let passed = PassedSockets::new(vec![a]).unwrap();
        let err = passed
            .finish("--listen 127.0.0.1:8080")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&addr.to_string()) && err.contains("--listen 127.0.0.1:8080"),
            "{err}"
        );
    }
}
