//! The tentacle side: serve the RPC contract on connections either side dialled.
//!
//! A tentacle is always the gRPC *server*. In listening mode it accepts TLS and
//! serves; in polling mode it dials the server, completes TLS as the client, and
//! then serves HTTP/2 on that same stream so the server's requests flow down it.
//! Both paths end in [`serve_connection`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use octo_proto::v1::session_server::{Session, SessionServer};
use octo_proto::v1::{HelloReply, HelloRequest};
use octo_tls::{
    ClientAuth, Identity, LiveIdentity, Role, Thumbprint, TlsSettings, TrustStore, UntrustedPeer,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tower::Service;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::proxy::{self, ProxySetting};
use crate::{net, page, BoxError, CommsError, H2Settings};

/// Which side dialled a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The server dialled this listening tentacle.
    Listening,
    /// This tentacle dialled the server (polling).
    Polling,
}

/// Facts about the connection a request arrived on. Inserted into every request's
/// extensions, so services can read it with `request.extensions().get()`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The other end of the TCP connection (the proxy, when polling through one).
    pub remote_addr: SocketAddr,
    /// Thumbprint of the server's certificate; it was trusted at the handshake.
    pub peer_thumbprint: Thumbprint,
    /// Who dialled.
    pub direction: Direction,
    /// The subscription this connection serves (polling only).
    pub subscription_id: Option<String>,
    /// Cancelled when this tentacle starts closing the connection gracefully
    /// (it stops, or it presents another certificate): streams that would
    /// otherwise last the connection's life (`WatchRotation`) end then, so
    /// that the close does not wait for them.
    pub closing: CancellationToken,
    /// Cancelled when the tentacle stops (after `closing`): streams that last
    /// as long as a script (its log) end then. Not on a certificate switch:
    /// there a script's log is read to its end on the old connection, since
    /// the server reaches the tentacle by the thumbprint the step started with.
    pub stopping: CancellationToken,
}

/// Everything a tentacle's connections share.
#[derive(Clone)]
pub struct TentacleComms {
    identity: LiveIdentity,
    trust: TrustStore,
    routes: Routes,
    instance_name: String,
    h2: H2Settings,
    /// Proxy for polling connections; shared by clones, read at each dial.
    proxy: Arc<std::sync::RwLock<ProxySetting>>,
}

impl std::fmt::Debug for TentacleComms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TentacleComms")
            .field("thumbprint", &self.identity.thumbprint())
            .field("instance_name", &self.instance_name)
            .finish_non_exhaustive()
    }
}

/// How long a connection made with a certificate the tentacle has rotated away
/// from may still finish its calls (HTTP/2 GOAWAY) before it is closed.
pub const ROTATION_DRAIN: Duration = Duration::from_secs(300);

/// A server this tentacle polls.
#[derive(Debug, Clone)]
pub struct PollingTarget {
    /// Where the server is: "host:port" of its polling port (TLS over TCP), or
    /// `wss://host[:port][/path]` of its WebSocket port (TLS, then a WebSocket
    /// upgrade; see [`crate::websocket`]). A host name is sent as TLS SNI.
    pub address: String,
    /// The subscription id the server knows this tentacle by.
    pub subscription_id: String,
}

/// How polling connections to one server are made, beyond its address.
#[derive(Debug, Clone, Default)]
pub struct PollingOptions {
    /// Dial this "host:port" instead of the address's host and port, like
    /// curl's `--connect-to`: the address's host stays the TLS server name
    /// (SNI) and the WebSocket `Host`. Through a proxy, this is what the
    /// CONNECT asks for. For SNI routers reached under another name, and for
    /// names DNS does not know.
    pub connect_to: Option<String>,
    /// Accept only this server thumbprint on these connections (and only while
    /// the tentacle's trust store trusts it). None: any trusted thumbprint.
    pub server_thumbprint: Option<Thumbprint>,
    /// With `server_thumbprint`: a certificate that server is rotating to,
    /// accepted too.
    pub rotating_to: Option<Thumbprint>,
}

/// A polling target, parsed: what is dialled, the TLS name, the transport.
#[derive(Debug, Clone)]
struct Route {
    /// "host:port" dialled (directly or through the proxy).
    dial_host: String,
    dial_port: u16,
    /// For messages: the address, plus " (dialled at X)" with connect-to.
    label: String,
    /// Some: upgrade to a WebSocket at this URL after TLS.
    web_socket: Option<crate::websocket::WebSocketUrl>,
}

impl Route {
    fn parse(
        target: &PollingTarget,
        options: &PollingOptions,
    ) -> Result<(Self, rustls::pki_types::ServerName<'static>), CommsError> {
        let invalid = |endpoint: &str, reason: String| CommsError::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            reason,
        };
        let address = target.address.trim();
        let (host, port, web_socket) = if crate::websocket::is_web_socket_url(address) {
            let url = crate::websocket::WebSocketUrl::parse(address)
                .map_err(|reason| invalid(address, reason))?;
            (url.host.clone(), url.port, Some(url))
        } else {
            let (h, p) = net::split_host_port(address).ok_or_else(|| {
                invalid(
                    address,
                    "expected host:port, or wss://host[:port]/path for a WebSocket".into(),
                )
            })?;
            (h.to_string(), p, None)
        };
        let server_name = net::server_name(&host).map_err(|reason| invalid(address, reason))?;
        let (dial_host, dial_port, label) = match options.connect_to.as_deref().map(str::trim) {
            None | Some("") => (host, port, address.to_string()),
            Some(c) => {
                let (h, p) = net::split_host_port(c).ok_or_else(|| {
                    invalid(
                        c,
                        "--connect-to expects HOST:PORT (the address actually dialled)".into(),
                    )
                })?;
                (h.to_string(), p, format!("{address} (dialled at {c})"))
            }
        };
        Ok((
            Self {
                dial_host,
                dial_port,
                label,
                web_socket,
            },
            server_name,
        ))
    }
}

impl TentacleComms {
    /// `routes` holds the tentacle's services; the session handshake and gRPC
    /// reflection are added here. `trust` holds the server thumbprints trusted.
    pub fn new(identity: Identity, trust: TrustStore, routes: Routes, instance_name: &str) -> Self {
        let identity = LiveIdentity::new(identity);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(octo_proto::FILE_DESCRIPTOR_SET)
        };
        let mut routes = routes.add_service(SessionServer::new(SessionService {
            identity: identity.clone(),
            instance_name: instance_name.to_string(),
        }));
        // Both reflection versions: v1, and v1alpha, which many clients still
        // use (Python's grpcio-reflection, older grpcurl).
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
            _ => warn!("gRPC reflection unavailable: the embedded descriptor set did not load"),
        }
        Self {
            identity,
            trust,
            routes,
            instance_name: instance_name.to_string(),
            h2: H2Settings::default(),
            proxy: Arc::default(),
        }
    }

    /// Serves the `Certificates` service (certificate rotation) from `rotation`.
    pub fn with_rotation(mut self, rotation: Arc<dyn crate::rotation::TentacleRotation>) -> Self {
        self.routes = self
            .routes
            .add_service(crate::rotation::service(rotation, self.identity.clone()));
        self
    }

    /// Presents `identity` in every handshake from now on; every connection
    /// made with the previous one is closed gracefully (HTTP/2 GOAWAY: calls in
    /// flight may finish for up to [`ROTATION_DRAIN`]), and polling connections
    /// are dialled again at once. Returns false when it is the current one.
    pub fn switch_identity(&self, identity: Identity) -> bool {
        let from = self.identity.thumbprint();
        let to = identity.thumbprint();
        let switched = self.identity.replace(identity);
        if switched {
            info!("now presenting certificate {to} (was {from}); connections made with the old one close once their calls finish");
        }
        switched
    }

    /// How polling connections reach servers: directly or through an HTTP
    /// CONNECT proxy. The default reads `HTTPS_PROXY`/`NO_PROXY`.
    pub fn with_proxy(self, proxy: ProxySetting) -> Self {
        self.set_proxy(proxy);
        self
    }

    /// Changes the proxy for polling connections dialled from now on (this
    /// object and its clones); open connections are kept.
    pub fn set_proxy(&self, proxy: ProxySetting) {
        *self.proxy.write().unwrap_or_else(|p| p.into_inner()) = proxy;
    }

    /// The proxy setting for polling connections.
    pub fn proxy(&self) -> ProxySetting {
        self.proxy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Overrides HTTP/2 settings (keepalive, windows).
    pub fn with_h2(mut self, h2: H2Settings) -> Self {
        self.h2 = h2;
        self
    }

    /// The trusted server thumbprints; changes apply to live connections.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// This tentacle's thumbprint (of the certificate new handshakes present).
    pub fn thumbprint(&self) -> Thumbprint {
        self.identity.thumbprint()
    }

    /// Listening mode: accept connections on `listener` until `shutdown`.
    /// Clients without a certificate get the friendly page; clients presenting an
    /// untrusted one are refused in the handshake and logged.
    pub async fn run_listening(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), CommsError> {
        let settings = TlsSettings {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let cfg = octo_tls::server_config_live(
            &self.identity,
            self.trust.clone(),
            Role::Server,
            ClientAuth::Optional,
            &settings,
        )
        .map_err(|e| CommsError::Tls {
            address: "local listener".into(),
            peer_role: Role::Server,
            reason: e.to_string(),
        })?;
        let acceptor = TlsAcceptor::from(cfg);
        let local = listener.local_addr().ok();
        info!(address = ?local, thumbprint = %self.thumbprint(), "listening for servers");
        // Connections are waited for when the listener stops, so that each
        // closes gracefully (its log streams told to read on later, its other
        // calls finished) rather than being cut when the process exits.
        let connections = tokio_util::task::TaskTracker::new();
        while let Some((tcp, remote)) = net::accept(&listener, &shutdown, "connection").await {
            let this = self.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                this.handle_accepted(tcp, remote, acceptor, shutdown).await;
            });
        }
        connections.close();
        // Each is bounded by CLOSE_GRACE from the stop; a handshake still
        // under way is not waited for beyond that.
        let _ =
            tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), connections.wait()).await;
        Ok(())
    }

    async fn handle_accepted(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) {
        if let Err(e) = net::tune(&tcp) {
            debug!("socket options on connection from {remote}: {e}");
        }
        // Taken before the handshake: a switch during it closes this connection
        // too, at worst needlessly, never leaving an old one open.
        let presented = self.identity.thumbprint();
        let accept = acceptor
            .accept_with(tcp, |c| net::tune_tls(c))
            .into_fallible();
        // A stop does not wait for a handshake: nothing was asked of us yet.
        let handshake = tokio::select! {
            r = tokio::time::timeout(self.h2.handshake_timeout, accept) => r,
            () = shutdown.cancelled() => return,
        };
        let tls = match handshake {
            Err(_) => {
                debug!("TLS handshake from {remote} timed out");
                return;
            }
            Ok(Err((e, tcp))) => {
                if let Some(u) = UntrustedPeer::find(&e) {
                    warn!("refused connection from {remote}: {u}");
                } else {
                    debug!("TLS handshake from {remote} failed: {e}");
                }
                net::linger_close(tcp, Duration::from_secs(2)).await;
                return;
            }
            Ok(Ok(tls)) => tls,
        };
        let peer = octo_tls::peer_thumbprint(tls.get_ref().1);
        let info = peer.map(|peer_thumbprint| ConnectionInfo {
            remote_addr: remote,
            peer_thumbprint,
            direction: Direction::Listening,
            subscription_id: None,
            closing: CancellationToken::new(),
            stopping: CancellationToken::new(),
        });
        if let Some(info) = &info {
            debug!(thumbprint = %info.peer_thumbprint, "server connected from {remote}");
        }
        let result = self
            .serve(
                tls,
                info,
                page::Listener::Tentacle,
                None,
                presented,
                shutdown,
            )
            .await;
        if let Err(e) = result {
            debug!("connection from {remote} ended: {e}");
        }
    }

    /// Serves one established TLS stream until it closes, the peer's trust is
    /// removed, or `shutdown`. `info` is None when the client presented no
    /// certificate: such a client only ever gets the friendly page.
    async fn serve<IO>(
        &self,
        io: IO,
        info: Option<ConnectionInfo>,
        listener: page::Listener,
        served_one: Option<Arc<AtomicBool>>,
        presented: Thumbprint,
        shutdown: CancellationToken,
    ) -> Result<(), BoxError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let kill = CancellationToken::new();
        let end = net::EndSlot::default();
        let io = net::Watched::new(io, kill.clone(), end.clone());
        let routes = self.routes.clone();
        let conn_info = info.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let routes = routes.clone();
            let info = conn_info.clone();
            let served_one = served_one.clone();
            async move { dispatch(req, routes, info, listener, served_one).await }
        });
        let revoked = async {
            match &info {
                Some(i) => self.trust.revoked(i.peer_thumbprint).await,
                None => std::future::pending().await,
            }
        };
        let moved = self.identity.moved_from(presented);
        let (closing, stopping) = info.as_ref().map_or_else(
            || (CancellationToken::new(), CancellationToken::new()),
            |i| (i.closing.clone(), i.stopping.clone()),
        );
        let tokens = (&closing, &stopping);
        let h2 = &self.h2;
        let result = if info.is_some() {
            // A trusted peer speaks gRPC, so HTTP/2 only. hyper's HTTP/2 server
            // sends its SETTINGS at once, which is what a dialling server waits
            // for before writing anything (see `server::read_first`).
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(h2.keepalive_interval)
                .keep_alive_timeout(h2.keepalive_timeout)
                .initial_stream_window_size(h2.stream_window)
                .initial_connection_window_size(h2.connection_window)
                .max_frame_size(h2.max_frame_size)
                .max_concurrent_streams(h2.max_concurrent_streams);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            drive(conn, revoked, moved, &kill, &shutdown, tokens).await
        } else {
            // No certificate: a browser or curl, HTTP/1.1 or HTTP/2; the page only.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            drive(conn, revoked, moved, &kill, &shutdown, tokens).await
        };
        match result {
            Drive::Ended(r) => {
                let rejected = end
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .filter(|e| e.rejected_by_peer)
                    .map(|e| e.message.clone());
                match (r, rejected) {
                    (Err(_), Some(message)) => Err(Box::new(RejectedByPeerEnd(message))),
                    (r, _) => r,
                }
            }
            Drive::Revoked => {
                if let Some(i) = &info {
                    warn!(
                        "dropping connection from {}: thumbprint {} is no longer trusted",
                        i.remote_addr, i.peer_thumbprint
                    );
                }
                Ok(())
            }
            Drive::Shutdown { drained: true } => Ok(()),
            Drive::Shutdown { drained: false } => {
                if let Some(i) = &info {
                    warn!(
                        "stopping: calls from the server at {} were still in flight {} s after the tentacle asked it to go away; the connection was closed under them",
                        i.remote_addr,
                        CLOSE_GRACE.as_secs()
                    );
                }
                Ok(())
            }
            Drive::Rotated => {
                if let Some(i) = &info {
                    info!(
                        "closing the connection from {} gracefully: it was made with certificate {presented}, which this tentacle no longer presents",
                        i.remote_addr
                    );
                }
                Ok(())
            }
        }
    }

    /// Polling mode: keep `connections` connections to `target` open until
    /// `shutdown`, redialling with jittered exponential backoff. Each dial goes
    /// through the proxy setting in force at that moment ([`Self::with_proxy`]).
    pub async fn run_polling(
        &self,
        target: PollingTarget,
        connections: usize,
        backoff: Backoff,
        shutdown: CancellationToken,
    ) -> Result<(), CommsError> {
        self.run_polling_with(
            target,
            PollingOptions::default(),
            connections,
            backoff,
            shutdown,
        )
        .await
    }

    /// [`Self::run_polling`] with options: a connect-to address, a pinned
    /// server thumbprint. Fails at once (before dialling) when the address or
    /// options cannot be used.
    pub async fn run_polling_with(
        &self,
        target: PollingTarget,
        options: PollingOptions,
        connections: usize,
        backoff: Backoff,
        shutdown: CancellationToken,
    ) -> Result<(), CommsError> {
        let (route, server_name) = Route::parse(&target, &options)?;
        let trust = match options.server_thumbprint {
            Some(tp) => {
                let store = self.trust.clone();
                TrustStore::new(
                    std::iter::once(tp).chain(options.rotating_to),
                    Arc::new(move |t: &Thumbprint| store.hint(t)),
                )
            }
            None => self.trust.clone(),
        };
        // A WebSocket starts as HTTP/1.1; a TCP polling connection is HTTP/2 at once.
        let settings = if route.web_socket.is_some() {
            TlsSettings {
                alpn: vec![b"http/1.1".to_vec()],
            }
        } else {
            TlsSettings::default()
        };
        let cfg = octo_tls::client_config_live(&self.identity, trust, Role::Server, &settings)
            .map_err(|e| CommsError::Tls {
                address: target.address.clone(),
                peer_role: Role::Server,
                reason: e.to_string(),
            })?;
        let connector = TlsConnector::from(cfg);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..connections.max(1) {
            let this = self.clone();
            let (target, route, connector, server_name) = (
                target.clone(),
                route.clone(),
                connector.clone(),
                server_name.clone(),
            );
            let (mut backoff, shutdown) = (backoff.clone(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    let served = this
                        .poll_once(
                            &target,
                            &route,
                            &connector,
                            server_name.clone(),
                            shutdown.clone(),
                        )
                        .await;
                    if shutdown.is_cancelled() {
                        return;
                    }
                    if served {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    debug!("reconnecting to {} in {delay:?}", route.label);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// One polling connection, from dial to close. Returns whether the server
    /// accepted us and sent at least one request (a "good" connection).
    async fn poll_once(
        &self,
        target: &PollingTarget,
        route: &Route,
        connector: &TlsConnector,
        server_name: rustls::pki_types::ServerName<'static>,
        shutdown: CancellationToken,
    ) -> bool {
        let address = &route.label;
        let proxy = self.proxy();
        let presented = self.identity.thumbprint();
        let dialled = tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = proxy::connect(&proxy, &route.dial_host, route.dial_port, self.h2.connect_timeout) => match r {
                Ok(d) => d,
                Err(e) => {
                    let retryable = e.is_retryable();
                    let e = e.into_comms(address, Role::Server);
                    if retryable { warn!("{e}") } else { error!("{e}") }
                    return false;
                }
            }
        };
        if let Some(p) = &dialled.proxy {
            debug!("connected to {address} through the proxy {p}");
        }
        let (tcp, remote) = (dialled.stream, dialled.peer_addr);
        let tls = match tokio::time::timeout(
            self.h2.handshake_timeout,
            connector.connect_with(server_name, tcp, |c| net::tune_tls(c)),
        )
        .await
        {
            Err(_) => {
                warn!("TLS handshake with the server at {address} timed out");
                return false;
            }
            Ok(Err(e)) => {
                let failure = self.classify_tls_error(address, &e);
                if cut_mid_handshake(&e) {
                    warn!("{failure}");
                } else {
                    error!("{failure}");
                }
                return false;
            }
            Ok(Ok(t)) => t,
        };
        let Some(peer_thumbprint) = octo_tls::peer_thumbprint(tls.get_ref().1) else {
            error!("the server at {address} presented no certificate");
            return false;
        };
        let info = ConnectionInfo {
            remote_addr: remote,
            peer_thumbprint,
            direction: Direction::Polling,
            subscription_id: Some(target.subscription_id.clone()),
            closing: CancellationToken::new(),
            stopping: CancellationToken::new(),
        };
        let served_one = Arc::new(AtomicBool::new(false));
        let listener = page::Listener::Tentacle;
        // Served in a task of its own: when this tentacle's certificate changes
        // the connection drains there while this loop dials again at once.
        let mut served = match &route.web_socket {
            None => {
                let (this, served_one, shutdown) =
                    (self.clone(), served_one.clone(), shutdown.clone());
                tokio::spawn(async move {
                    this.serve(
                        tls,
                        Some(info),
                        listener,
                        Some(served_one),
                        presented,
                        shutdown,
                    )
                    .await
                })
            }
            Some(url) => {
                let upgrade = tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    r = tokio::time::timeout(
                        self.h2.handshake_timeout,
                        crate::websocket::client_upgrade(tls, url),
                    ) => r,
                };
                let ws = match upgrade {
                    Err(_) => {
                        warn!(
                            "{}",
                            CommsError::WebSocket {
                                address: address.clone(),
                                reason: format!(
                                    "no answer to the upgrade request within {} s",
                                    self.h2.handshake_timeout.as_secs()
                                ),
                            }
                        );
                        return false;
                    }
                    Ok(Err(crate::websocket::UpgradeError::Io(e))) => {
                        // TLS 1.3: a server refusing our certificate says so
                        // only now, in answer to the upgrade request.
                        let e = if octo_tls::rejected_by_peer(&e) {
                            self.classify_tls_error(address, &e)
                        } else {
                            CommsError::WebSocket {
                                address: address.clone(),
                                reason: format!("the connection failed during the upgrade: {e}"),
                            }
                        };
                        error!("{e}");
                        return false;
                    }
                    Ok(Err(crate::websocket::UpgradeError::Refused(reason))) => {
                        error!(
                            "{}",
                            CommsError::WebSocket {
                                address: address.clone(),
                                reason,
                            }
                        );
                        return false;
                    }
                    Ok(Ok(ws)) => ws,
                };
                debug!("WebSocket to {address} open");
                let (this, served_one, shutdown) =
                    (self.clone(), served_one.clone(), shutdown.clone());
                tokio::spawn(async move {
                    this.serve(
                        ws,
                        Some(info),
                        listener,
                        Some(served_one),
                        presented,
                        shutdown,
                    )
                    .await
                })
            }
        };
        let result = tokio::select! {
            r = &mut served => r.unwrap_or_else(|e| Err(Box::new(e) as BoxError)),
            _ = self.identity.moved_from(presented) => {
                info!("dialling {address} again with the new certificate; the old connection finishes its calls");
                return true;
            }
        };
        let good = served_one.load(Ordering::Relaxed);
        match result {
            Ok(()) => info!("polling connection to {address} closed"),
            Err(e) if e.is::<RejectedByPeerEnd>() => {
                error!(
                    "{}",
                    CommsError::RejectedByPeer {
                        address: address.clone(),
                        peer_role: Role::Server,
                        our_role: Role::Tentacle,
                        ours: self.thumbprint(),
                        hint: "register this tentacle with the server (`tentacle register-with`), or add its thumbprint to the machine on the server".into(),
                    }
                )
            }
            Err(e) => warn!("polling connection to {address} ended: {e}"),
        }
        good
    }

    fn classify_tls_error(&self, address: &str, e: &std::io::Error) -> CommsError {
        if let Some(u) = UntrustedPeer::find(e) {
            return CommsError::Untrusted {
                address: address.to_string(),
                source: u,
            };
        }
        if octo_tls::rejected_by_peer(e) {
            return CommsError::RejectedByPeer {
                address: address.to_string(),
                peer_role: Role::Server,
                our_role: Role::Tentacle,
                ours: self.thumbprint(),
                hint: "register this tentacle with the server (`tentacle register-with`)".into(),
            };
        }
        let reason = if cut_mid_handshake(e) {
            format!(
                "the connection was cut during the handshake ({e}): the server may be restarting (this tentacle tries again), or a firewall or proxy in the path resets it"
            )
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            format!(
                "the connection was closed before the handshake finished ({e}): a proxy, load balancer or SNI router in the path may have nowhere to send it (check the host name, which is sent as SNI), or the port is not the server's comms port"
            )
        } else {
            e.to_string()
        };
        CommsError::Tls {
            address: address.to_string(),
            peer_role: Role::Server,
            reason,
        }
    }
}

/// A TLS handshake cut by a reset (a server restarting resets the
/// connections still waiting in its accept queue): transient, so logged as a
/// warning and retried, where a refused certificate or a closed connection
/// (a proxy with nowhere to send it) is an error someone has to fix.
fn cut_mid_handshake(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// How long a stopping tentacle lets the calls in flight on a connection
/// finish before it closes the connection anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How [`drive`] ended.
enum Drive {
    /// The connection ended by itself.
    Ended(Result<(), BoxError>),
    /// The peer's trust was removed; the connection was killed.
    Revoked,
    /// We are shutting down; the connection was closed gracefully, within
    /// [`CLOSE_GRACE`] (`drained`) or cut after it.
    Shutdown { drained: bool },
    /// Our certificate changed: the connection was told to go away and has
    /// drained (or was closed after [`ROTATION_DRAIN`]).
    Rotated,
}

/// Drives a served connection until it ends, its peer's trust is revoked (kill
/// it at once), shutdown (close gracefully, at most [`CLOSE_GRACE`]), or our certificate
/// changes (`moved`: GOAWAY, calls in flight finish within [`ROTATION_DRAIN`]).
/// A graceful close cancels `closing` first, which ends the streams that
/// would last the connection's life, and a stop `stopping` too, which ends
/// the scripts' log streams: only calls that end by themselves are waited for.
async fn drive<C>(
    conn: C,
    revoked: impl std::future::Future<Output = ()>,
    moved: impl std::future::Future<Output = ()>,
    kill: &CancellationToken,
    shutdown: &CancellationToken,
    (closing, stopping): (&CancellationToken, &CancellationToken),
) -> Drive
where
    C: hyper_util::server::graceful::GracefulConnection,
    C::Error: Into<BoxError>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = moved => {
            conn.as_mut().graceful_shutdown();
            closing.cancel();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = tokio::time::sleep(ROTATION_DRAIN) => kill.cancel(),
                _ = shutdown.cancelled() => {
                    stopping.cancel();
                    let _ = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await;
                    kill.cancel();
                }
            }
            Drive::Rotated
        }
        r = conn.as_mut() => Drive::Ended(r.map_err(Into::into)),
        _ = revoked => {
            kill.cancel();
            Drive::Revoked
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            closing.cancel();
            stopping.cancel();
            let drained = tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.is_ok();
            Drive::Shutdown { drained }
        }
    }
}

/// The connection ended because the peer refused our certificate.
#[derive(Debug)]
struct RejectedByPeerEnd(String);

impl std::fmt::Display for RejectedByPeerEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the peer refused our certificate: {}", self.0)
    }
}

impl std::error::Error for RejectedByPeerEnd {}

async fn dispatch(
    mut req: Request<Incoming>,
    mut routes: Routes,
    info: Option<ConnectionInfo>,
    listener: page::Listener,
    served_one: Option<Arc<AtomicBool>>,
) -> Result<Response<tonic::body::Body>, Infallible> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    match (is_grpc, info) {
        (true, Some(info)) => {
            if let Some(flag) = served_one {
                flag.store(true, Ordering::Relaxed);
            }
            req.extensions_mut().insert(info);
            routes.call(req).await
        }
        (true, None) => Ok(tonic::Status::unauthenticated(
            "this endpoint requires a client certificate whose thumbprint the tentacle trusts",
        )
        .into_http()),
        (false, _) => Ok(page::response(listener).map(tonic::body::Body::new)),
    }
}

/// Answers the session handshake from the connection's facts.
#[derive(Debug)]
struct SessionService {
    identity: LiveIdentity,
    instance_name: String,
}

#[tonic::async_trait]
impl Session for SessionService {
    async fn hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let subscription_id = request
            .extensions()
            .get::<ConnectionInfo>()
            .and_then(|i| i.subscription_id.clone())
            .unwrap_or_default();
        Ok(tonic::Response::new(HelloReply {
            protocol_version: octo_proto::PROTOCOL_VERSION,
            subscription_id,
            thumbprint: self.identity.thumbprint().to_string(),
            instance_name: self.instance_name.clone(),
            tentacle_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::cut_mid_handshake;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_handshake_cut_by_a_reset_is_transient_and_a_closed_one_is_not() {
        for kind in [
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::BrokenPipe,
        ] {
            assert!(cut_mid_handshake(&Error::from(kind)), "{kind:?}");
        }
        // Closed before the handshake ended (a proxy with nowhere to send
        // it), or a certificate refused: someone has to act.
        for kind in [
            ErrorKind::UnexpectedEof,
            ErrorKind::InvalidData,
            ErrorKind::Other,
        ] {
            assert!(!cut_mid_handshake(&Error::from(kind)), "{kind:?}");
        }
    }
}
