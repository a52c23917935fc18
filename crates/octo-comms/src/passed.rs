//! Listening sockets passed to this process (systemd's socket units and the
//! `LISTEN_FDS` protocol), and a listening socket kept across this process's
//! own re-execution.
//!
//! A program that binds its own ports leaves a gap on every restart: from the
//! old process closing its listener to the new one binding it, each
//! connection is refused, and whoever dialled backs off (a polling tentacle,
//! a server reaching a listening tentacle, an API client). A socket held
//! across the restart (by systemd, or by the process itself through `exec`)
//! stays open: connections made meanwhile wait in the kernel's accept queue
//! and are served by the next process.
//!
//! Each passed socket is taken for the option whose port it listens on; its
//! address must agree with that option's, so that a socket unit cannot widen
//! what the operator configured (a loopback-only port served on every
//! address). A passed socket no option asks for is an error, not ignored.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Why passed sockets cannot be used. Each says which socket and what to do.
#[derive(Debug, thiserror::Error)]
pub enum PassedSocketError {
    #[error("the socket passed as file descriptor {fd} (LISTEN_FDS) is not a listening TCP socket ({source}); pass only ListenStream= sockets")]
    NotTcp { fd: usize, source: std::io::Error },
    #[error("file descriptor {fd} (LISTEN_FDS) was already taken")]
    AlreadyTaken { fd: usize },
    #[error("the passed socket {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("the socket on {addr} is a connection, not a listening socket; the socket unit must not set Accept=yes")]
    Connection { addr: SocketAddr },
    #[error("the service manager passed a socket listening on {addr}, but {flag} asks for {wanted} port {port}; make the socket unit's ListenStream= and {flag} name the same address")]
    Disagrees {
        addr: SocketAddr,
        flag: String,
        wanted: String,
        port: u16,
    },
    #[error("the service manager passed sockets on {left} that no option of this program listens on ({ports}); remove them from the socket unit or set the option's port to theirs")]
    Stray { left: String, ports: String },
}

/// The sockets passed to this process, not yet taken by a listener.
#[derive(Debug, Default)]
pub struct PassedSockets {
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
}

impl PassedSockets {
    /// No sockets: the program binds its ports itself.
    pub fn none() -> Self {
        Self::default()
    }

    /// The sockets passed to this process (`LISTEN_FDS`, for this process
    /// when `LISTEN_PID` is set; from `LISTEN_FDS_FIRST_FD` when set, else
    /// from 3), none when none was passed. Taken sockets are closed on exec,
    /// and the variables are removed, so that processes this one starts (a
    /// tentacle's scripts) neither inherit nor claim them: call it before any
    /// other thread starts.
    pub fn from_env() -> Result<Self, PassedSocketError> {
        let first = std::env::var("LISTEN_FDS_FIRST_FD")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(3);
        let mut fds = listenfd::ListenFd::from_env();
        for var in ["LISTEN_FDS_FIRST_FD", "LISTEN_FDNAMES"] {
            std::env::remove_var(var);
        }
        let mut sockets = Vec::with_capacity(fds.len());
        for i in 0..fds.len() {
            let fd = first + i;
            let listener = fds
                .take_tcp_listener(i)
                .map_err(|source| PassedSocketError::NotTcp { fd, source })?
                .ok_or(PassedSocketError::AlreadyTaken { fd })?;
            sockets.push(listener);
        }
        Self::new(sockets)
    }

    /// These listening sockets (a test's or a benchmark's, which keeps a copy
    /// across a restart as systemd does). A socket that does not listen (a
    /// connection, as a socket unit with `Accept=yes` passes) is refused.
    pub fn new(listeners: Vec<std::net::TcpListener>) -> Result<Self, PassedSocketError> {
        let mut sockets = Vec::with_capacity(listeners.len());
        for l in listeners {
            let addr = l.local_addr().map_err(|source| PassedSocketError::Io {
                what: "has no local address".into(),
                source,
            })?;
            let listening = socket2::SockRef::from(&l).is_listener().map_err(|source| {
                PassedSocketError::Io {
                    what: format!("on {addr} cannot be inspected"),
                    source,
                }
            })?;
            if !listening {
                return Err(PassedSocketError::Connection { addr });
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

    /// The addresses of those left.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|(a, _)| *a).collect()
    }

    /// The passed socket listening on `port`, for the option `flag`, whose
    /// addresses are `wanted` (an unspecified address, `0.0.0.0` or `::`,
    /// agrees with any); None when none listens on that port. Call it within
    /// a tokio runtime.
    pub fn take(
        &mut self,
        port: u16,
        wanted: &[IpAddr],
        flag: &str,
    ) -> Result<Option<tokio::net::TcpListener>, PassedSocketError> {
        let Some(i) = self.sockets.iter().position(|(a, _)| a.port() == port) else {
            return Ok(None);
        };
        let (addr, listener) = self.sockets.swap_remove(i);
        if !address_agrees(wanted, addr.ip()) {
            let wanted: Vec<String> = wanted.iter().map(ToString::to_string).collect();
            return Err(PassedSocketError::Disagrees {
                addr,
                flag: flag.to_string(),
                wanted: wanted.join(" or "),
                port,
            });
        }
        let io = |what: &str| {
            let what = format!("on {addr} {what}");
            move |source| PassedSocketError::Io { what, source }
        };
        listener
            .set_nonblocking(true)
            .map_err(io("cannot be made non-blocking"))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io("cannot be served"))?;
        Ok(Some(listener))
    }

    /// Fails when a passed socket was left over (no option asks for its
    /// port): it would hold connections that nothing ever accepts. `ports`
    /// says what the options listen on.
    pub fn finish(self, ports: &str) -> Result<(), PassedSocketError> {
        if self.sockets.is_empty() {
            return Ok(());
        }
        let left: Vec<String> = self.sockets.iter().map(|(a, _)| a.to_string()).collect();
        Err(PassedSocketError::Stray {
            left: left.join(", "),
            ports: ports.to_string(),
        })
    }
}

/// Whether a passed socket's address `got` is one the option asked for.
pub fn address_agrees(wanted: &[IpAddr], got: IpAddr) -> bool {
    let got = got.to_canonical();
    wanted
        .iter()
        .any(|w| w.is_unspecified() || w.to_canonical() == got)
}

/// A listening socket kept open while this process stops its listener and
/// executes itself again (a tentacle's upgrade), handed to the new program
/// as a passed socket ([`PassedSockets::from_env`]). Until the new program
/// accepts, connections wait in the socket's queue instead of being refused.
#[derive(Debug)]
pub struct HeldListener {
    fd: OwnedFd,
    addr: SocketAddr,
}

impl HeldListener {
    /// A second descriptor of `listener`'s socket (closed on exec until
    /// [`HeldListener::pass_to`]), which keeps it listening after the
    /// listener is dropped.
    pub fn of(listener: &tokio::net::TcpListener) -> std::io::Result<Self> {
        Ok(Self {
            fd: listener.as_fd().try_clone_to_owned()?,
            addr: listener.local_addr()?,
        })
    }

    /// The address the socket listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes `cmd`, about to replace this process (`exec`, which keeps its
    /// pid), receive the socket as `LISTEN_FDS`: the descriptor stays open
    /// across the exec. Keep `self` until the exec.
    pub fn pass_to(&self, cmd: &mut std::process::Command) -> std::io::Result<()> {
        socket2::SockRef::from(&self.fd).set_cloexec(false)?;
        cmd.env("LISTEN_FDS", "1")
            .env("LISTEN_FDS_FIRST_FD", self.fd.as_raw_fd().to_string())
            .env("LISTEN_PID", std::process::id().to_string())
            .env_remove("LISTEN_FDNAMES");
        Ok(())
    }
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
        // would widen the program's exposure.
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

    #[tokio::test]
    async fn a_held_listener_keeps_accepting_into_its_queue_and_survives_an_exec() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let held = HeldListener::of(&listener).unwrap();
        let addr = held.local_addr();
        assert_eq!(addr, listener.local_addr().unwrap());
        // Closed on exec until it is passed on.
        let flags = |h: &HeldListener| {
            nix::fcntl::fcntl(&h.fd, nix::fcntl::FcntlArg::F_GETFD).unwrap()
                & nix::fcntl::FdFlag::FD_CLOEXEC.bits()
        };
        assert_ne!(flags(&held), 0);
        // The listener is gone, its socket is not: a connection is queued,
        // not refused.
        drop(listener);
        let conn = std::net::TcpStream::connect(addr).unwrap();
        let mut cmd = std::process::Command::new("true");
        held.pass_to(&mut cmd).unwrap();
        assert_eq!(flags(&held), 0, "the socket must survive the exec");
        let envs: Vec<(String, String)> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.into(), v?.to_str()?.into())))
            .collect();
        let has = |k: &str, v: &str| envs.iter().any(|(a, b)| a == k && b == v);
        assert!(has("LISTEN_FDS", "1"), "{envs:?}");
        assert!(
            has("LISTEN_PID", &std::process::id().to_string()),
            "{envs:?}"
        );
        assert!(
            has("LISTEN_FDS_FIRST_FD", &held.fd.as_raw_fd().to_string()),
            "{envs:?}"
        );
        // The queued connection is accepted from the held socket.
        let again = std::net::TcpListener::from(held.fd.try_clone().unwrap());
        let (accepted, peer) = again.accept().unwrap();
        assert_eq!(peer, conn.local_addr().unwrap());
        drop(accepted);
    }
}
