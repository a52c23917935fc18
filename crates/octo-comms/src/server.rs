//! The server side: reach tentacles by endpoint, whichever side dials.
//!
//! The server is always the gRPC *client*. For a listening tentacle it dials,
//! completes TLS as the client and speaks HTTP/2 as the client. For a polling
//! tentacle it accepts TLS on its polling port and then speaks HTTP/2 as the
//! client on the accepted stream. Either way the result is a [`Connection`]: a
//! multiplexed HTTP/2 client on which any number of calls run at once.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use octo_proto::v1::capabilities_client::CapabilitiesClient;
use octo_proto::v1::certificates_client::CertificatesClient;
use octo_proto::v1::file_service_client::FileServiceClient;
use octo_proto::v1::script_service_client::ScriptServiceClient;
use octo_proto::v1::session_client::SessionClient;
use octo_proto::v1::upgrade_service_client::UpgradeServiceClient;
use octo_proto::v1::{HelloReply, HelloRequest};
use octo_tls::{
    ClientAuth, Identity, LiveIdentity, Role, Thumbprint, TlsSettings, TrustHint, TrustStore,
    UntrustedPeer,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::h2client::{self, H2Channel};
use crate::proxy::{self, ProxySetting};
use crate::registry::PollingRegistry;
use crate::rotation::CommsEvent;
use crate::{net, page, websocket, CommsError, H2Settings};

/// How the server reaches one tentacle.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The tentacle listens; the server dials `address` ("host:port").
    Listening {
        /// "host:port" (from `https://host:port/`).
        address: String,
        /// The thumbprint the tentacle must present.
        thumbprint: Thumbprint,
        /// A certificate the tentacle is rotating to, accepted too.
        next: Option<Thumbprint>,
    },
    /// The tentacle polls; requests wait for a connection of this subscription.
    Polling {
        /// Subscription id the tentacle connects with.
        subscription_id: String,
        /// The thumbprint the tentacle must present.
        thumbprint: Thumbprint,
        /// A certificate the tentacle is rotating to, accepted too.
        next: Option<Thumbprint>,
    },
}

impl Endpoint {
    /// A listening endpoint from `https://host:port[/]` or `host:port`.
    pub fn listening(url: &str, thumbprint: Thumbprint) -> Result<Self, CommsError> {
        let invalid = |reason: &str| CommsError::InvalidEndpoint {
            endpoint: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = match url.split_once("://") {
            Some(("https", rest)) => rest,
            Some((scheme, _)) => {
                return Err(invalid(&format!(
                    "scheme '{scheme}' is not supported; use https://HOST:PORT/"
                )))
            }
            None => url,
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = net::parse_authority(authority, 10933).map_err(|why| invalid(&why))?;
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Endpoint::Listening {
            address,
            thumbprint,
            next: None,
        })
    }

    /// A polling endpoint from `poll://SUBSCRIPTION/` or the bare subscription id.
    pub fn polling(uri: &str, thumbprint: Thumbprint) -> Result<Self, CommsError> {
        let id = uri
            .strip_prefix("poll://")
            .unwrap_or(uri)
            .trim_end_matches('/');
        if id.is_empty() || id.contains('/') {
            return Err(CommsError::InvalidEndpoint {
                endpoint: uri.to_string(),
                reason: "expected poll://SUBSCRIPTION-ID/".into(),
            });
        }
        Ok(Endpoint::Polling {
            subscription_id: id.to_string(),
            thumbprint,
            next: None,
        })
    }

    /// Also accepts `next` (a certificate the tentacle is rotating to).
    pub fn with_next(mut self, next: Option<Thumbprint>) -> Self {
        let next = next.filter(|n| *n != self.thumbprint());
        match &mut self {
            Endpoint::Listening { next: n, .. } | Endpoint::Polling { next: n, .. } => *n = next,
        }
        self
    }

    /// Every thumbprint the tentacle may present: its own, and the one it is
    /// rotating to.
    pub fn accepted(&self) -> Vec<Thumbprint> {
        match self {
            Endpoint::Listening {
                thumbprint, next, ..
            }
            | Endpoint::Polling {
                thumbprint, next, ..
            } => std::iter::once(*thumbprint).chain(*next).collect(),
        }
    }

    /// The thumbprint the tentacle must present.
    pub fn thumbprint(&self) -> Thumbprint {
        match self {
            Endpoint::Listening { thumbprint, .. } | Endpoint::Polling { thumbprint, .. } => {
                *thumbprint
            }
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Listening { address, .. } => write!(f, "https://{address}/"),
            Endpoint::Polling {
                subscription_id, ..
            } => write!(f, "poll://{subscription_id}/"),
        }
    }
}

/// Tunables of the server side.
#[derive(Debug, Clone)]
pub struct ServerCommsOptions {
    /// How long a request for a polling tentacle waits for it to connect.
    pub polling_wait: Duration,
    /// HTTP/2 and handshake settings.
    pub h2: H2Settings,
    /// How listening tentacles are dialled: directly or through an HTTP
    /// CONNECT proxy (default: `HTTPS_PROXY`/`NO_PROXY` from the environment).
    pub proxy: ProxySetting,
    /// Incoming polling connections whose TLS and HTTP/2 handshakes run at once
    /// (TCP and WebSocket together). More wait their turn, so a reconnect storm
    /// after a restart queues rather than starves every handshake of CPU until
    /// they all time out.
    pub max_concurrent_handshakes: usize,
}

/// The default of [`ServerCommsOptions::max_concurrent_handshakes`].
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 128;

impl Default for ServerCommsOptions {
    fn default() -> Self {
        Self {
            polling_wait: Duration::from_secs(120),
            h2: H2Settings::default(),
            proxy: ProxySetting::default(),
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
        }
    }
}

/// The server's comms: finds or makes the connection for an endpoint.
#[derive(Clone)]
pub struct ServerComms {
    inner: Arc<ServerInner>,
}

/// The cached connection to one listening endpoint; its lock serialises dials.
type ListeningSlot = Arc<tokio::sync::Mutex<Option<Connection>>>;

struct ServerInner {
    identity: LiveIdentity,
    polling_trust: TrustStore,
    registry: PollingRegistry,
    listening: Mutex<HashMap<(String, Vec<Thumbprint>), ListeningSlot>>,
    events: Mutex<Option<tokio::sync::mpsc::UnboundedSender<CommsEvent>>>,
    tentacle_hint: TrustHint,
    /// Bounds the polling handshakes in progress (see
    /// [`ServerCommsOptions::max_concurrent_handshakes`]).
    handshakes: Arc<tokio::sync::Semaphore>,
    options: ServerCommsOptions,
}

impl fmt::Debug for ServerComms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerComms")
            .field("thumbprint", &self.inner.identity.thumbprint())
            .field("polling", &self.inner.registry)
            .finish_non_exhaustive()
    }
}

impl ServerComms {
    /// `polling_trust`: thumbprints of polling tentacles allowed to connect (its
    /// hint tells people how to add one). Listening tentacles are pinned per
    /// endpoint.
    pub fn new(identity: Identity, polling_trust: TrustStore, options: ServerCommsOptions) -> Self {
        let tentacle_hint = Arc::new(|t: &Thumbprint| {
            format!("add it to the machine's record on the server (e.g. `octopus machine add-listening --thumbprint {t} ...`)")
        });
        Self {
            inner: Arc::new(ServerInner {
                identity: LiveIdentity::new(identity),
                polling_trust,
                registry: PollingRegistry::default(),
                listening: Mutex::new(HashMap::new()),
                events: Mutex::new(None),
                tentacle_hint,
                handshakes: Arc::new(tokio::sync::Semaphore::new(
                    options.max_concurrent_handshakes.max(1),
                )),
                options,
            }),
        }
    }

    /// This server's thumbprint, which tentacles must trust (of the certificate
    /// new handshakes present).
    pub fn thumbprint(&self) -> Thumbprint {
        self.inner.identity.thumbprint()
    }

    /// The identity new handshakes present.
    pub fn identity(&self) -> Identity {
        self.inner.identity.current()
    }

    /// Presents `identity` in every handshake from now on (dials, the polling
    /// and WebSocket ports). Established connections keep theirs. Returns
    /// false when it is the current one already.
    pub fn switch_identity(&self, identity: Identity) -> bool {
        self.inner.identity.replace(identity)
    }

    /// From now on every new connection (after `Session/Hello`) and every
    /// rotation offer a tentacle makes is sent here; a receiver taken earlier
    /// gets nothing more. Without a receiver, offers are not watched.
    pub fn events(&self) -> tokio::sync::mpsc::UnboundedReceiver<CommsEvent> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.inner.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn event_sender(&self) -> Option<tokio::sync::mpsc::UnboundedSender<CommsEvent>> {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|tx| !tx.is_closed())
    }

    /// Tells the listener of [`Self::events`] about a new connection, and
    /// watches it for rotation offers.
    fn announce(&self, conn: &Connection, subscription_id: Option<String>) {
        let Some(tx) = self.event_sender() else {
            return;
        };
        let _ = tx.send(CommsEvent::Connected {
            conn: conn.clone(),
            subscription_id: subscription_id.clone(),
        });
        let conn = conn.clone();
        tokio::spawn(async move {
            let mut client = conn.certificates();
            let stream = tokio::select! {
                _ = conn.closed() => return,
                r = client.watch_rotation(octo_proto::v1::WatchRotationRequest {}) => r,
            };
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    return debug!(
                        "{} does not offer certificate rotation (an older tentacle)",
                        conn.inner.label
                    );
                }
                Err(status) => {
                    return debug!(
                        "watching {} for certificate rotation: {}",
                        conn.inner.label,
                        status.message()
                    );
                }
            };
            loop {
                let offer = tokio::select! {
                    _ = conn.closed() => return,
                    m = stream.message() => m,
                };
                match offer {
                    Ok(Some(offer)) => match offer.next_thumbprint.parse::<Thumbprint>() {
                        Ok(next) => {
                            let _ = tx.send(CommsEvent::Offer {
                                conn: conn.clone(),
                                subscription_id: subscription_id.clone(),
                                next,
                            });
                        }
                        Err(e) => warn!(
                            "{} offered an unusable next certificate thumbprint: {e}",
                            conn.inner.label
                        ),
                    },
                    Ok(None) => return,
                    Err(status) => {
                        return debug!(
                            "rotation watch on {} ended: {}",
                            conn.inner.label,
                            status.message()
                        )
                    }
                }
            }
        });
    }

    /// Thumbprints of polling tentacles allowed to connect.
    pub fn polling_trust(&self) -> &TrustStore {
        &self.inner.polling_trust
    }

    /// Connected polling tentacles.
    pub fn polling(&self) -> &PollingRegistry {
        &self.inner.registry
    }

    /// The connection for `endpoint`: a cached or new one for a listening
    /// tentacle; for a polling one, a live connection, waiting up to the polling
    /// wait for the tentacle to connect.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Connection, CommsError> {
        match endpoint {
            Endpoint::Polling {
                subscription_id, ..
            } => {
                self.inner
                    .registry
                    .wait_for(
                        subscription_id,
                        &endpoint.accepted(),
                        self.inner.options.polling_wait,
                    )
                    .await
            }
            Endpoint::Listening { address, .. } => {
                let slot = {
                    let mut map = self
                        .inner
                        .listening
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    map.entry((address.clone(), endpoint.accepted()))
                        .or_default()
                        .clone()
                };
                // One dial at a time per endpoint; callers arriving meanwhile share it.
                let mut slot = slot.lock().await;
                if let Some(c) = slot.as_ref().filter(|c| c.is_usable()) {
                    return Ok(c.clone());
                }
                let conn = self.dial(address, &endpoint.accepted()).await?;
                *slot = Some(conn.clone());
                Ok(conn)
            }
        }
    }

    /// Closes any cached connection to a listening endpoint (e.g. the machine
    /// was deleted or its thumbprint changed).
    pub fn forget(&self, endpoint: &Endpoint) {
        if let Endpoint::Listening { address, .. } = endpoint {
            let slot = self
                .inner
                .listening
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(address.clone(), endpoint.accepted()));
            if let Some(slot) = slot {
                if let Ok(guard) = slot.try_lock() {
                    if let Some(c) = guard.as_ref() {
                        c.close();
                    }
                }
            }
        }
    }

    /// Discovers a listening tentacle: dials it (through the proxy, as a task
    /// would), completes TLS without presenting a certificate (a tentacle
    /// answers such a client only with its friendly page, so nothing is asked
    /// of it), and returns its normalised endpoint (`https://HOST:PORT/`) and
    /// the thumbprint of the certificate it presented, for a person to confirm
    /// before it is trusted.
    pub async fn discover(&self, url: &str) -> Result<(String, Thumbprint), CommsError> {
        let placeholder = Thumbprint::of_der(b"discover");
        let Endpoint::Listening { address, .. } = Endpoint::listening(url.trim(), placeholder)?
        else {
            return Err(CommsError::InvalidEndpoint {
                endpoint: url.to_string(),
                reason: "expected https://HOST:PORT/".into(),
            });
        };
        let h2 = &self.inner.options.h2;
        let (host, port) =
            net::split_host_port(&address).ok_or_else(|| CommsError::InvalidEndpoint {
                endpoint: address.clone(),
                reason: "expected host:port".into(),
            })?;
        let name = net::server_name(host).map_err(|reason| CommsError::InvalidEndpoint {
            endpoint: address.clone(),
            reason,
        })?;
        let cfg = octo_tls::api_client_config(None).map_err(|e| CommsError::Tls {
            address: address.clone(),
            peer_role: Role::Tentacle,
            reason: e.to_string(),
        })?;
        let dialled = proxy::connect(&self.inner.options.proxy, host, port, h2.connect_timeout)
            .await
            .map_err(|e| e.into_comms(&address, Role::Tentacle))?;
        let tls = match tokio::time::timeout(
            h2.handshake_timeout,
            TlsConnector::from(cfg).connect(name, dialled.stream),
        )
        .await
        {
            Err(_) => {
                return Err(CommsError::Tls {
                    address,
                    peer_role: Role::Tentacle,
                    reason: format!("no answer within {} s", h2.handshake_timeout.as_secs()),
                })
            }
            Ok(Err(e)) => return Err(self.classify(&address, &e)),
            Ok(Ok(tls)) => tls,
        };
        let thumbprint =
            octo_tls::peer_thumbprint(tls.get_ref().1).ok_or_else(|| CommsError::Handshake {
                address: address.clone(),
                peer_role: Role::Tentacle,
                reason: "it presented no certificate".into(),
            })?;
        drop(tls);
        Ok((format!("https://{address}/"), thumbprint))
    }

    async fn dial(&self, address: &str, accepted: &[Thumbprint]) -> Result<Connection, CommsError> {
        let h2 = &self.inner.options.h2;
        let (host, port) =
            net::split_host_port(address).ok_or_else(|| CommsError::InvalidEndpoint {
                endpoint: address.to_string(),
                reason: "expected host:port".into(),
            })?;
        let name = net::server_name(host).map_err(|reason| CommsError::InvalidEndpoint {
            endpoint: address.to_string(),
            reason,
        })?;
        let trust = TrustStore::new(accepted.iter().copied(), self.inner.tentacle_hint.clone());
        let cfg = octo_tls::client_config_live(
            &self.inner.identity,
            trust.clone(),
            Role::Tentacle,
            &TlsSettings::default(),
        )
        .map_err(|e| CommsError::Tls {
            address: address.to_string(),
            peer_role: Role::Tentacle,
            reason: e.to_string(),
        })?;
        // Directly or through the proxy; either way TLS runs end to end on the
        // socket, with the configured host name as the server name.
        let dialled = proxy::connect(&self.inner.options.proxy, host, port, h2.connect_timeout)
            .await
            .map_err(|e| e.into_comms(address, Role::Tentacle))?;
        if let Some(p) = &dialled.proxy {
            debug!("dialled {address} through the proxy {p}");
        }
        let (tcp, remote) = (dialled.stream, dialled.peer_addr);
        let tls = match tokio::time::timeout(
            h2.handshake_timeout,
            TlsConnector::from(cfg).connect_with(name, tcp, |c| net::tune_tls(c)),
        )
        .await
        {
            Err(_) => {
                return Err(CommsError::Tls {
                    address: address.to_string(),
                    peer_role: Role::Tentacle,
                    reason: format!("no answer within {} s", h2.handshake_timeout.as_secs()),
                })
            }
            Ok(Err(e)) => return Err(self.classify(address, &e)),
            Ok(Ok(tls)) => tls,
        };
        let Some(thumbprint) = octo_tls::peer_thumbprint(tls.get_ref().1) else {
            return Err(CommsError::Handshake {
                address: address.to_string(),
                peer_role: Role::Tentacle,
                reason: "it presented no certificate".into(),
            });
        };
        let io = self.read_first(tls, address).await?;
        let conn =
            Connection::handshake(io, remote, thumbprint, address.to_string(), h2, None).await?;
        self.hello(&conn, address).await?;
        self.announce(&conn, None);
        Ok(conn)
    }

    /// Waits for the tentacle's first bytes before writing anything: its HTTP/2
    /// SETTINGS when it accepted our certificate, or a TLS alert when it refused
    /// it (TLS 1.3 reports a refused client certificate only after the client's
    /// handshake is over). Writing first would race the refusal: a peer that
    /// closes with our data unread sends RST, which can destroy the alert.
    async fn read_first<IO>(
        &self,
        mut tls: IO,
        address: &str,
    ) -> Result<net::Prefixed<IO>, CommsError>
    where
        IO: AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let h2 = &self.inner.options.h2;
        let mut first = vec![0u8; 4096];
        match tokio::time::timeout(h2.handshake_timeout, tls.read(&mut first)).await {
            Err(_) => Err(CommsError::Handshake {
                address: address.to_string(),
                peer_role: Role::Tentacle,
                reason: format!(
                    "it sent nothing within {} s after TLS",
                    h2.handshake_timeout.as_secs()
                ),
            }),
            Ok(Err(e)) => Err(self.classify(address, &e)),
            Ok(Ok(0)) => Err(CommsError::Handshake {
                address: address.to_string(),
                peer_role: Role::Tentacle,
                reason: "it closed the connection right after TLS (is this a tentacle?)".into(),
            }),
            Ok(Ok(n)) => {
                first.truncate(n);
                Ok(net::Prefixed::new(first, tls))
            }
        }
    }

    /// Runs the session handshake on a new connection; maps a refusal of our
    /// certificate (which TLS 1.3 reports only now) to a typed error.
    async fn hello(&self, conn: &Connection, address: &str) -> Result<HelloReply, CommsError> {
        let h2 = &self.inner.options.h2;
        let mut session = conn.session();
        let call = session.hello(HelloRequest {
            protocol_version: octo_proto::PROTOCOL_VERSION,
        });
        let result = tokio::time::timeout(h2.handshake_timeout, call).await;
        match result {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                let _ = conn.inner.hello.set(reply.clone());
                Ok(reply)
            }
            other => {
                // Give the connection driver a moment to record why it ended.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close();
                if conn.rejected_by_peer() {
                    return Err(CommsError::RejectedByPeer {
                        address: address.to_string(),
                        peer_role: Role::Tentacle,
                        our_role: Role::Server,
                        ours: self.thumbprint(),
                        hint: format!(
                            "trust it on the tentacle: `tentacle configure --trust {}`",
                            self.thumbprint()
                        ),
                    });
                }
                let mut reason = match other {
                    Err(_) => format!("no answer within {} s", h2.handshake_timeout.as_secs()),
                    Ok(Err(status)) => status.message().to_string(),
                    Ok(Ok(_)) => String::new(),
                };
                if let Some(end) = conn.end_message() {
                    reason.push_str(&format!(" (the connection ended with: {end})"));
                }
                Err(CommsError::Handshake {
                    address: address.to_string(),
                    peer_role: Role::Tentacle,
                    reason,
                })
            }
        }
    }

    fn classify(&self, address: &str, e: &std::io::Error) -> CommsError {
        if let Some(u) = UntrustedPeer::find(e) {
            return CommsError::Untrusted {
                address: address.to_string(),
                source: u,
            };
        }
        if octo_tls::rejected_by_peer(e) {
            return CommsError::RejectedByPeer {
                address: address.to_string(),
                peer_role: Role::Tentacle,
                our_role: Role::Server,
                ours: self.thumbprint(),
                hint: format!(
                    "trust it on the tentacle: `tentacle configure --trust {}`",
                    self.thumbprint()
                ),
            };
        }
        CommsError::Tls {
            address: address.to_string(),
            peer_role: Role::Tentacle,
            reason: e.to_string(),
        }
    }

    /// TLS for polling tentacles (their port and the WebSocket port): this
    /// server's identity, the polling trust set (live), a client certificate
    /// optional so that a browser gets the friendly page; `address` names the
    /// listener in an error.
    fn polling_acceptor(&self, address: &str) -> Result<TlsAcceptor, CommsError> {
        let settings = TlsSettings {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let cfg = octo_tls::server_config_live(
            &self.inner.identity,
            self.inner.polling_trust.clone(),
            Role::Tentacle,
            ClientAuth::Optional,
            &settings,
        )
        .map_err(|e| CommsError::Tls {
            address: address.into(),
            peer_role: Role::Tentacle,
            reason: e.to_string(),
        })?;
        Ok(TlsAcceptor::from(cfg))
    }

    /// Accepts polling tentacles on `listener` until `shutdown`. Clients without a
    /// certificate get the friendly page; untrusted ones are refused and logged.
    pub async fn run_polling_listener(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), CommsError> {
        let acceptor = self.polling_acceptor("polling listener")?;
        let local = listener.local_addr().ok();
        info!(address = ?local, thumbprint = %self.thumbprint(), accept_queue = ?net::accept_queue_limit(), "listening for polling tentacles");
        while let Some((tcp, remote)) =
            net::accept(&listener, &shutdown, "polling connection").await
        {
            let this = self.clone();
            let acceptor = acceptor.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.accept_polling(tcp, remote, acceptor, shutdown).await });
        }
        Ok(())
    }

    async fn accept_polling(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) {
        let Some((tls, turn)) = self
            .handshake(tcp, remote, acceptor, &shutdown, "polling connection")
            .await
        else {
            return;
        };
        let Some(thumbprint) = octo_tls::peer_thumbprint(tls.get_ref().1) else {
            drop(turn);
            // No certificate: a browser or curl. Show the page and nothing else.
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(page::response(page::Listener::ServerPolling))
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!("friendly page connection from {remote}: {e}") },
                _ = shutdown.cancelled() => {}
            }
            return;
        };
        self.register_polling(tls, remote, thumbprint, shutdown)
            .await;
        drop(turn);
    }

    /// A polling tentacle's TLS handshake (`what` names the connection in the
    /// log), in its turn among the node's handshakes: the stream and the turn
    /// (dropped once the CPU-bound part is done), or None when it timed out,
    /// failed or was refused (a refusal recorded for `machine refusals`), or
    /// the node shuts down.
    async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        shutdown: &CancellationToken,
        what: &str,
    ) -> Option<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        tokio::sync::OwnedSemaphorePermit,
    )> {
        if let Err(e) = net::tune(&tcp) {
            debug!("socket options on connection from {remote}: {e}");
        }
        // Queued here, the connection waits in the kernel's buffers; its
        // handshake timeout starts when its turn comes.
        let turn = self.handshake_turn(shutdown).await?;
        let accept = acceptor
            .accept_with(tcp, |c| net::tune_tls(c))
            .into_fallible();
        let timeout = self.inner.options.h2.handshake_timeout;
        match tokio::time::timeout(timeout, accept).await {
            Err(_) => {
                debug!("TLS handshake from {remote} timed out");
                None
            }
            Ok(Err((e, tcp))) => {
                if let Some(u) = UntrustedPeer::find(&e) {
                    warn!("refused {what} from {remote}: {u}");
                    self.inner
                        .registry
                        .record_refusal(u.presented, remote.ip().to_string());
                } else {
                    debug!("TLS handshake from {remote} failed: {e}");
                }
                net::linger_close(tcp, Duration::from_secs(2)).await;
                None
            }
            Ok(Ok(tls)) => Some((tls, turn)),
        }
    }

    /// Waits for a free handshake slot (None when the server stops first).
    async fn handshake_turn(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = self.inner.handshakes.clone();
        tokio::select! {
            p = slots.acquire_owned() => p.ok(),
            _ = shutdown.cancelled() => None,
        }
    }

    /// A polling tentacle's stream, TLS done and its thumbprint trusted (over
    /// TCP, or inside a WebSocket): HTTP/2 client, `Session/Hello` for the
    /// subscription, then into the registry. One code path for both transports.
    async fn register_polling<IO>(
        &self,
        io: IO,
        remote: SocketAddr,
        thumbprint: Thumbprint,
        shutdown: CancellationToken,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let h2 = &self.inner.options.h2;
        let conn = match Connection::handshake(
            io,
            remote,
            thumbprint,
            remote.to_string(),
            h2,
            Some(self.inner.polling_trust.clone()),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return warn!("polling connection from {remote}: {e}"),
        };
        let hello = match self.hello(&conn, &remote.to_string()).await {
            Ok(h) => h,
            Err(e) => return warn!("polling connection from {remote}: {e}"),
        };
        if hello.subscription_id.is_empty() {
            conn.close();
            return warn!("a tentacle connected from {remote} (thumbprint {thumbprint}) without a subscription id; it is configured for listening, not polling");
        }
        let closer = conn.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            closer.close();
        });
        self.inner
            .registry
            .register(hello.subscription_id.clone(), conn.clone());
        self.announce(&conn, Some(hello.subscription_id));
    }

    /// Accepts polling tentacles over WebSocket on `listener` until `shutdown`:
    /// TLS with this server's identity and the polling trust set (as the
    /// polling port), then an HTTP/1.1 WebSocket upgrade on `options.path` with
    /// subprotocol [`websocket::SUBPROTOCOL`], then the same path as a TCP
    /// polling connection. Clients without a certificate get the friendly page
    /// (or `options`' HTTP service for its prefix); wrong paths, missing
    /// upgrades and other subprotocols get an HTTP error saying what is expected.
    pub async fn run_web_socket_listener(
        &self,
        listener: TcpListener,
        options: WebSocketListenerOptions,
        shutdown: CancellationToken,
    ) -> Result<(), CommsError> {
        let acceptor = self.polling_acceptor("WebSocket listener")?;
        let local = listener.local_addr().ok();
        info!(address = ?local, path = %options.path, thumbprint = %self.thumbprint(), "listening for polling tentacles over WebSocket");
        let options = Arc::new(options);
        while let Some((tcp, remote)) =
            net::accept(&listener, &shutdown, "WebSocket connection").await
        {
            let this = self.clone();
            let (acceptor, options, shutdown) =
                (acceptor.clone(), options.clone(), shutdown.clone());
            tokio::spawn(async move {
                this.accept_web_socket(tcp, remote, acceptor, options, shutdown)
                    .await
            });
        }
        Ok(())
    }

    async fn accept_web_socket(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: TlsAcceptor,
        options: Arc<WebSocketListenerOptions>,
        shutdown: CancellationToken,
    ) {
        let what = "polling connection (WebSocket port)";
        let Some((tls, turn)) = self.handshake(tcp, remote, acceptor, &shutdown, what).await else {
            return;
        };
        // The WebSocket upgrade and HTTP/2 inside it follow at the client's
        // pace; only the TLS handshake (the CPU-bound part) holds a slot.
        drop(turn);
        let thumbprint = octo_tls::peer_thumbprint(tls.get_ref().1);
        let this = self.clone();
        let upgrades = shutdown.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let (this, options, shutdown) = (this.clone(), options.clone(), upgrades.clone());
            async move {
                Ok::<_, std::convert::Infallible>(
                    this.web_socket_request(req, remote, thumbprint, &options, shutdown)
                        .await,
                )
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.inner.options.h2.handshake_timeout);
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => if let Err(e) = r {
                debug!("HTTP connection on the WebSocket port from {remote}: {e}");
            },
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
            }
        }
    }

    /// One HTTP request on the WebSocket port.
    async fn web_socket_request(
        &self,
        mut req: http::Request<Incoming>,
        remote: SocketAddr,
        thumbprint: Option<Thumbprint>,
        options: &WebSocketListenerOptions,
        shutdown: CancellationToken,
    ) -> http::Response<HttpBody> {
        let text = |r: http::Response<String>| r.map(|s| full(Bytes::from(s)));
        let Some(thumbprint) = thumbprint else {
            if websocket::is_upgrade(&req) {
                let mut r = http::Response::new(format!(
                    "polling tentacles must present their certificate in TLS; this connection presented none (is this a tentacle? see `tentacle poll-server --server-web-socket`); the path for WebSocket polling is {}\n",
                    options.path
                ));
                *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                return text(r);
            }
            if let Some((prefix, service)) = &options.http {
                let path = req.uri().path();
                if path == prefix || path.starts_with(&format!("{prefix}/")) {
                    req.extensions_mut().insert(HttpOverTls { remote });
                    return service(req).await;
                }
            }
            return page::response(page::Listener::ServerWebSocket)
                .map(|b| b.map_err(|e| match e {}).boxed_unsync());
        };
        match websocket::check_upgrade(&req, &options.path) {
            websocket::Answer::Refuse(refusal) => {
                info!(
                    "refused a WebSocket request from {remote} (thumbprint {thumbprint}) for {}: {} {}",
                    req.uri().path(),
                    refusal.status(),
                    refusal.body().trim()
                );
                text(refusal)
            }
            websocket::Answer::Switch(switching) => {
                let on_upgrade = hyper::upgrade::on(&mut req);
                let this = self.clone();
                tokio::spawn(async move {
                    match on_upgrade.await {
                        Ok(upgraded) => {
                            let io = websocket::server_stream(TokioIo::new(upgraded)).await;
                            debug!("WebSocket from {remote} (thumbprint {thumbprint}) open");
                            this.register_polling(io, remote, thumbprint, shutdown)
                                .await;
                        }
                        Err(e) => warn!("WebSocket upgrade from {remote} failed: {e}"),
                    }
                });
                text(switching)
            }
        }
    }
}

/// Response body of the WebSocket port's HTTP answers.
pub type HttpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, crate::BoxError>;

/// An HTTP service for requests without a certificate on the WebSocket port.
type HttpService = Arc<
    dyn Fn(http::Request<Incoming>) -> BoxFuture<'static, http::Response<HttpBody>> + Send + Sync,
>;

fn full(b: Bytes) -> HttpBody {
    http_body_util::Full::new(b)
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Options of [`ServerComms::run_web_socket_listener`].
#[derive(Clone)]
pub struct WebSocketListenerOptions {
    /// The path WebSocket upgrades are accepted on ([`websocket::DEFAULT_PATH`]).
    pub path: String,
    http: Option<(String, HttpService)>,
}

impl fmt::Debug for WebSocketListenerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSocketListenerOptions")
            .field("path", &self.path)
            .field("http", &self.http.as_ref().map(|(p, _)| p))
            .finish()
    }
}

impl Default for WebSocketListenerOptions {
    fn default() -> Self {
        Self::new(websocket::DEFAULT_PATH)
    }
}

/// Marks an HTTP request that came over the TLS (WebSocket) port from a
/// client without a certificate, with the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOverTls {
    pub remote: SocketAddr,
}

impl WebSocketListenerOptions {
    /// Upgrades accepted on `path` ("/tentacle"; a missing leading '/' is added).
    pub fn new(path: &str) -> Self {
        let path = path.trim();
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        Self { path, http: None }
    }

    /// Requests from clients without a certificate whose path is `prefix` or
    /// below it (e.g. "/api") go to `service` (e.g. the REST API), so one TLS
    /// port serves both; everything else without a certificate gets the page.
    pub fn with_http<S, B>(mut self, prefix: &str, service: S) -> Self
    where
        S: tower::Service<
                http::Request<Incoming>,
                Response = http::Response<B>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<crate::BoxError>,
    {
        use tower::ServiceExt;
        // "/" serves every path.
        let prefix = prefix.trim_end_matches('/').to_string();
        let call: HttpService = Arc::new(move |req| {
            let svc = service.clone();
            Box::pin(async move {
                match svc.oneshot(req).await {
                    Ok(r) => r.map(|b| b.map_err(Into::into).boxed_unsync()),
                    Err(e) => match e {},
                }
            })
        });
        self.http = Some((prefix, call));
        self
    }
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// A live, multiplexed connection to one tentacle. Cheap to clone; all clones
/// share the connection. Calls fail with `Unavailable` once it closes.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    remote_addr: SocketAddr,
    peer_thumbprint: Thumbprint,
    label: Arc<str>,
    closed: CancellationToken,
    end: net::EndSlot,
    hello: OnceLock<HelloReply>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.inner.id)
            .field("label", &self.inner.label)
            .field("peer_thumbprint", &self.inner.peer_thumbprint)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// Starts an HTTP/2 client on an established TLS stream and spawns the task
    /// that drives it until it ends, is closed, or `trust` stops trusting the peer.
    async fn handshake<IO>(
        io: IO,
        remote_addr: SocketAddr,
        peer_thumbprint: Thumbprint,
        label: String,
        h2: &H2Settings,
        trust: Option<TrustStore>,
    ) -> Result<Connection, CommsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let closed = CancellationToken::new();
        let end = net::EndSlot::default();
        let activity = h2client::Activity::new();
        let io = net::Watched::new(io, closed.clone(), end.clone()).with_activity(activity.clone());
        let (sender, driver) =
            h2client::handshake(io, h2, activity)
                .await
                .map_err(|e| CommsError::Handshake {
                    address: label.clone(),
                    peer_role: Role::Tentacle,
                    reason: e.to_string(),
                })?;
        let conn = Connection {
            inner: Arc::new(ConnInner {
                id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
                sender,
                remote_addr,
                peer_thumbprint,
                label: label.into(),
                closed,
                end,
                hello: OnceLock::new(),
            }),
        };
        let inner = conn.inner.clone();
        tokio::spawn(async move {
            let revoked = async {
                match &trust {
                    Some(t) => t.revoked(inner.peer_thumbprint).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = driver => if let Err(e) = r {
                    debug!("connection to {} ended: {e}", inner.label);
                },
                _ = inner.closed.cancelled() => {}
                _ = revoked => warn!(
                    "dropping connection to {}: thumbprint {} is no longer trusted",
                    inner.label, inner.peer_thumbprint
                ),
            }
            inner.closed.cancel();
        });
        Ok(conn)
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    /// The thumbprint the tentacle presented (and which was trusted).
    pub fn peer_thumbprint(&self) -> Thumbprint {
        self.inner.peer_thumbprint
    }

    /// The other end of the TCP connection: the tentacle, or the proxy when it
    /// was dialled through one.
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_addr
    }

    /// What the tentacle said in the session handshake.
    pub fn hello(&self) -> Option<&HelloReply> {
        self.inner.hello.get()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Whether new calls may start on it: it has not ended, and the tentacle
    /// has not asked it to go away (HTTP/2 GOAWAY, e.g. after rotating its
    /// certificate; calls in flight still finish).
    pub fn is_usable(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut sender = self.inner.sender.clone();
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        // A fresh clone has no pending open: this only checks the connection's
        // error state (set by GOAWAY or a failure) and stream id space.
        !matches!(sender.poll_ready(&mut cx), std::task::Poll::Ready(Err(_)))
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    /// Ends the connection; calls in flight fail with `Unavailable`.
    pub fn close(&self) {
        self.inner.closed.cancel();
    }

    fn end_message(&self) -> Option<String> {
        self.inner
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| e.message.clone())
    }

    fn rejected_by_peer(&self) -> bool {
        self.inner
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|e| e.rejected_by_peer)
    }

    /// A gRPC channel over this connection.
    pub fn channel(&self) -> H2Channel {
        H2Channel::new(
            self.inner.sender.clone(),
            self.inner.label.clone(),
            self.inner.closed.clone(),
        )
    }

    fn origin() -> http::Uri {
        http::Uri::from_static("https://tentacle")
    }

    /// Session service client.
    pub fn session(&self) -> SessionClient<H2Channel> {
        SessionClient::with_origin(self.channel(), Self::origin())
    }

    /// Certificates service client (rotation).
    pub fn certificates(&self) -> CertificatesClient<H2Channel> {
        CertificatesClient::with_origin(self.channel(), Self::origin())
    }

    /// Capabilities service client.
    pub fn capabilities(&self) -> CapabilitiesClient<H2Channel> {
        CapabilitiesClient::with_origin(self.channel(), Self::origin())
    }

    /// Script service client.
    pub fn scripts(&self) -> ScriptServiceClient<H2Channel> {
        ScriptServiceClient::with_origin(self.channel(), Self::origin())
    }

    /// File service client (messages up to 16 MiB, for large chunks).
    pub fn files(&self) -> FileServiceClient<H2Channel> {
        FileServiceClient::with_origin(self.channel(), Self::origin())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
    }

    /// Upgrade service client (the tentacle replacing its own binary).
    pub fn upgrades(&self) -> UpgradeServiceClient<H2Channel> {
        UpgradeServiceClient::with_origin(self.channel(), Self::origin())
    }
}

impl FromStr for Endpoint {
    type Err = CommsError;

    /// Parses "https://host:port/#THUMBPRINT" or "poll://sub/#THUMBPRINT" (the
    /// form the demo and tools print).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (uri, tp) = s
            .rsplit_once('#')
            .ok_or_else(|| CommsError::InvalidEndpoint {
                endpoint: s.to_string(),
                reason: "expected URI#THUMBPRINT".into(),
            })?;
        let thumbprint: Thumbprint = tp.parse().map_err(|e: octo_tls::ThumbprintParseError| {
            CommsError::InvalidEndpoint {
                endpoint: s.to_string(),
                reason: e.to_string(),
            }
        })?;
        if uri.starts_with("poll://") {
            Endpoint::polling(uri, thumbprint)
        } else {
            Endpoint::listening(uri, thumbprint)
        }
    }
}
