//! Certificate rotation's transport half (`proto/.../certificates.proto`).
//!
//! The tentacle side serves the `Certificates` service from a [`TentacleRotation`]
//! the agent provides (what is staged, what to do with an acceptance or a new
//! server thumbprint). The server side opens `WatchRotation` on every new
//! connection and hands what arrives, and every connection made, to the server's
//! own logic as [`CommsEvent`]s. What to decide lives above this crate (the
//! agent's `rotation` module, the server's).

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use octo_proto::v1::certificates_server::{Certificates, CertificatesServer};
use octo_proto::v1::{
    AcceptRotationReply, AcceptRotationRequest, RotationOffer, TrustServerReply,
    TrustServerRequest, WatchRotationRequest,
};
use octo_tls::Thumbprint;
use tokio::sync::watch;

use crate::server::Connection;
use crate::tentacle::ConnectionInfo;

/// What the agent decides; the `Certificates` service only carries it.
#[tonic::async_trait]
pub trait TentacleRotation: Send + Sync + 'static {
    /// The staged next certificate's thumbprint, watched: offers go out
    /// whenever it is `Some`.
    fn staged(&self) -> watch::Receiver<Option<Thumbprint>>;

    /// A server accepted `next`; `server` lists the thumbprints it answers to.
    /// Returns the trusted server thumbprints still to accept (empty: switching).
    async fn accepted(
        &self,
        next: Thumbprint,
        server: Vec<Thumbprint>,
    ) -> Result<Vec<Thumbprint>, String>;

    /// The server presenting `current` asks to be trusted as `next` too.
    /// Returns false when `next` was trusted already.
    async fn trust_server(&self, current: Thumbprint, next: Thumbprint) -> Result<bool, String>;
}

/// The tonic service over a [`TentacleRotation`].
pub(crate) fn service(
    rotation: Arc<dyn TentacleRotation>,
    presented: octo_tls::LiveIdentity,
) -> CertificatesServer<CertificatesService> {
    CertificatesServer::new(CertificatesService {
        rotation,
        presented,
    })
}

pub(crate) struct CertificatesService {
    rotation: Arc<dyn TentacleRotation>,
    presented: octo_tls::LiveIdentity,
}

fn parse(field: &str, text: &str) -> Result<Thumbprint, tonic::Status> {
    text.parse()
        .map_err(|e| tonic::Status::invalid_argument(format!("field `{field}`: {e}")))
}

fn peer<T>(request: &tonic::Request<T>) -> Result<Thumbprint, tonic::Status> {
    request
        .extensions()
        .get::<ConnectionInfo>()
        .map(|i| i.peer_thumbprint)
        .ok_or_else(|| tonic::Status::unauthenticated("no trusted peer on this connection"))
}

type OfferStream = Pin<Box<dyn Stream<Item = Result<RotationOffer, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Certificates for CertificatesService {
    type WatchRotationStream = OfferStream;

    async fn watch_rotation(
        &self,
        request: tonic::Request<WatchRotationRequest>,
    ) -> Result<tonic::Response<Self::WatchRotationStream>, tonic::Status> {
        peer(&request)?;
        // Ends when this tentacle closes the connection gracefully (it stops,
        // or presents another certificate), so the close need not wait for it.
        let closing = request
            .extensions()
            .get::<crate::tentacle::ConnectionInfo>()
            .map(|i| i.closing.clone())
            .unwrap_or_default();
        let mut staged = self.rotation.staged();
        // The certificate this connection was made with: what is current now.
        let current = self.presented.thumbprint();
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                if closing.is_cancelled() {
                    return;
                }
                let next = *staged.borrow_and_update();
                if let Some(next) = next.filter(|n| Some(*n) != last && *n != current) {
                    last = Some(next);
                    let offer = RotationOffer {
                        current_thumbprint: current.to_string(),
                        next_thumbprint: next.to_string(),
                    };
                    if tx.send(Ok(offer)).await.is_err() {
                        return;
                    }
                }
                let changed = tokio::select! {
                    r = staged.changed() => r,
                    () = closing.cancelled() => return,
                };
                if changed.is_err() {
                    // The agent is stopping: keep the stream open until the
                    // connection ends or closes, as the contract says.
                    tokio::select! {
                        () = tx.closed() => {}
                        () = closing.cancelled() => {}
                    }
                    return;
                }
            }
        });
        Ok(tonic::Response::new(stream))
    }

    async fn accept_rotation(
        &self,
        request: tonic::Request<AcceptRotationRequest>,
    ) -> Result<tonic::Response<AcceptRotationReply>, tonic::Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let next = parse("next_thumbprint", &r.next_thumbprint)?;
        let mut server = vec![peer];
        for (i, t) in r.server_thumbprints.iter().enumerate() {
            let t = parse(&format!("server_thumbprints[{i}]"), t)?;
            if !server.contains(&t) {
                server.push(t);
            }
        }
        let waiting = self
            .rotation
            .accepted(next, server)
            .await
            .map_err(tonic::Status::failed_precondition)?;
        Ok(tonic::Response::new(AcceptRotationReply {
            waiting_for: waiting.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn trust_server(
        &self,
        request: tonic::Request<TrustServerRequest>,
    ) -> Result<tonic::Response<TrustServerReply>, tonic::Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let current = parse("current_thumbprint", &r.current_thumbprint)?;
        let next = parse("next_thumbprint", &r.next_thumbprint)?;
        if current != peer {
            return Err(tonic::Status::permission_denied(format!(
                "field `current_thumbprint`: {current} is not the certificate this server presented ({peer})"
            )));
        }
        let added = self
            .rotation
            .trust_server(current, next)
            .await
            .map_err(tonic::Status::failed_precondition)?;
        Ok(tonic::Response::new(TrustServerReply { added }))
    }
}

/// A stream fed by `f` through a small channel.
fn async_stream<F, Fut>(f: F) -> OfferStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<RotationOffer, tonic::Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// What the server's comms tell the server's rotation logic.
#[derive(Debug, Clone)]
pub enum CommsEvent {
    /// A new connection passed `Session/Hello`; `conn.peer_thumbprint()` is the
    /// certificate the tentacle presented.
    Connected {
        /// The connection.
        conn: Connection,
        /// Its polling subscription (None: a listening tentacle, dialled).
        subscription_id: Option<String>,
    },
    /// A tentacle offered its next certificate on `conn`.
    Offer {
        /// The connection it came on (the offer's authority).
        conn: Connection,
        /// The polling subscription (None: a listening tentacle).
        subscription_id: Option<String>,
        /// The offered thumbprint.
        next: Thumbprint,
    },
}
