//! The server's HTTP/2 client: tonic calls sent straight over an `h2` connection.
//!
//! hyper's client sends a request's HEADERS as soon as the stream opens and its
//! body later, from a task of its own that waits for flow-control capacity, and
//! hands the response to the caller through another task. For a unary call that
//! is two extra task hops and an extra TLS record (and an extra wake-up of the
//! tentacle) per call. Here a call whose body is ready at once (every unary and
//! server-streaming call) is queued as HEADERS + DATA(END_STREAM) before the
//! connection task runs, which writes both in one TLS record, and the response is
//! read on the caller's own task. Bodies that are not ready at once (client
//! streams such as uploads) are pumped by a task that respects flow control.
//!
//! Keepalive: after `keepalive_interval` without reading anything the driver
//! sends a PING; when neither its PONG nor any other byte arrives within
//! `keepalive_timeout`, the connection is declared dead.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::H2Settings;

/// When the connection last delivered bytes, shared between the socket wrapper
/// (which records every read) and the keepalive loop.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    last_read_ns: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            last_read_ns: AtomicU64::new(0),
        })
    }

    /// Records that bytes were read just now.
    pub(crate) fn touch(&self) {
        let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_read_ns.store(ns, Ordering::Relaxed);
    }

    fn last_read(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_read_ns.load(Ordering::Relaxed))
    }
}

/// Starts an HTTP/2 client on `io`. The returned future drives the connection
/// (and its keepalive) and resolves with the reason it ended.
pub(crate) async fn handshake<IO>(
    io: IO,
    settings: &H2Settings,
    activity: Arc<Activity>,
) -> Result<(SendRequest<Bytes>, impl Future<Output = Result<(), String>>), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_send_buffer_size(settings.max_frame_size as usize * 4)
        .handshake::<_, Bytes>(io)
        .await?;
    let pings = connection.ping_pong();
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    let driver = async move {
        let keepalive = async {
            match pings {
                Some(pings) => keepalive(pings, activity, interval, timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut connection => r.map_err(|e| e.to_string()),
            dead = keepalive => Err(dead),
        }
    };
    Ok((sender, driver))
}

/// Resolves when the peer stopped answering.
async fn keepalive(
    mut pings: h2::PingPong,
    activity: Arc<Activity>,
    interval: Duration,
    timeout: Duration,
) -> String {
    loop {
        let due = activity.last_read() + interval;
        if Instant::now() < due {
            tokio::time::sleep_until(due.into()).await;
            continue;
        }
        let sent = Instant::now();
        let pong = pings.ping(h2::Ping::opaque());
        tokio::pin!(pong);
        loop {
            let deadline = activity.last_read().max(sent) + timeout;
            match tokio::time::timeout_at(deadline.into(), &mut pong).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
                // Bytes arrived after the PING (its PONG queued behind data): alive.
                Err(_) if activity.last_read() > sent => {}
                Err(_) => {
                    return format!(
                        "keepalive timed out: no answer to a PING within {timeout:?} after {interval:?} of silence"
                    )
                }
            }
        }
    }
}

/// A tower service sending gRPC requests over one HTTP/2 connection. Failures of
/// the connection itself (closed, reset, keepalive timeout) become
/// `tonic::Status::unavailable`, which [`crate::is_retryable`] recognises.
#[derive(Clone)]
pub struct H2Channel {
    sender: SendRequest<Bytes>,
    label: Arc<str>,
    closed: CancellationToken,
}

impl std::fmt::Debug for H2Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Channel")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl H2Channel {
    pub(crate) fn new(
        sender: SendRequest<Bytes>,
        label: Arc<str>,
        closed: CancellationToken,
    ) -> Self {
        Self {
            sender,
            label,
            closed,
        }
    }
}

fn not_sent(label: &str) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "connection to the tentacle at {label} is closed; the call was not sent and is safe to retry"
    ))
}

fn connection_lost(label: &str, e: &h2::Error) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "connection to the tentacle at {label} was lost ({e}); the call did not complete and is safe to retry"
    ))
}

fn body_error(e: &h2::Error) -> tonic::Status {
    tonic::Status::unavailable(format!(
        "connection to the tentacle was lost mid-call ({e}); the call is safe to retry"
    ))
}

/// Most request bytes gathered before sending when a body is ready at once; a
/// longer ready body (a client stream from memory) is pumped under flow control.
const GATHER_LIMIT: usize = 256 << 10;

/// What a request body had ready when the call was made.
struct Gathered {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    complete: bool,
}

async fn gather(body: &mut tonic::body::Body) -> Result<Gathered, tonic::Status> {
    let mut g = Gathered {
        data: Vec::new(),
        trailers: None,
        complete: false,
    };
    let mut bytes = 0;
    while bytes < GATHER_LIMIT {
        let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        match polled {
            Poll::Pending => return Ok(g),
            Poll::Ready(None) => break,
            Poll::Ready(Some(Err(status))) => return Err(status),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    bytes += data.len();
                    if !data.is_empty() {
                        g.data.push(data);
                    }
                    if body.is_end_stream() {
                        break;
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        g.trailers = Some(trailers);
                        break;
                    }
                }
            },
        }
    }
    // Stopped at the limit with more to come: the rest is pumped.
    g.complete = bytes < GATHER_LIMIT || body.is_end_stream() || g.trailers.is_some();
    Ok(g)
}

fn send_gathered(send: &mut SendStream<Bytes>, g: Gathered) -> Result<(), h2::Error> {
    let n = g.data.len();
    let last_is_eos = g.complete && g.trailers.is_none();
    for (i, data) in g.data.into_iter().enumerate() {
        send.send_data(data, last_is_eos && i + 1 == n)?;
    }
    if let Some(trailers) = g.trailers {
        send.send_trailers(trailers)?;
    }
    Ok(())
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Channel {
    type Response = http::Response<ResponseBody>;
    type Error = tonic::Status;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // HTTP/2 multiplexes: always ready. A closed connection is reported by
        // `call` (tonic would turn a readiness error into `Unknown`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let sender = self.sender.clone();
        let label = self.label.clone();
        let closed = self.closed.clone();
        Box::pin(async move {
            if closed.is_cancelled() {
                return Err(not_sent(&label));
            }
            let (parts, mut body) = req.into_parts();
            let gathered = gather(&mut body).await?;
            let mut sender = sender
                .ready()
                .await
                .map_err(|e| connection_lost(&label, &e))?;
            let empty =
                gathered.complete && gathered.data.is_empty() && gathered.trailers.is_none();
            let complete = gathered.complete;
            let (response, mut send) = sender
                .send_request(http::Request::from_parts(parts, ()), empty)
                .map_err(|e| connection_lost(&label, &e))?;
            let mut pipe = None;
            if !empty {
                send_gathered(&mut send, gathered).map_err(|e| connection_lost(&label, &e))?;
                if !complete {
                    let cancel = CancellationToken::new();
                    let failure = Arc::new(Mutex::new(None));
                    tokio::spawn(pump(send, body, cancel.clone(), failure.clone()));
                    pipe = Some((cancel.drop_guard(), failure));
                }
            }
            let response = match response.await {
                Ok(r) => r,
                Err(e) => {
                    // A request body that failed (a message too large to encode)
                    // is the cause, not the reset that followed it.
                    let failed = pipe
                        .as_ref()
                        .and_then(|(_, f)| f.lock().unwrap_or_else(|p| p.into_inner()).take());
                    return Err(failed.unwrap_or_else(|| connection_lost(&label, &e)));
                }
            };
            let guard = pipe.map(|(guard, _)| guard);
            Ok(response.map(|recv| ResponseBody {
                recv,
                data_done: false,
                _pipe: guard,
            }))
        })
    }
}

/// Sends the rest of a request body that was not ready when the call was made,
/// as flow control allows. Stops (resetting the stream) when the call is dropped.
async fn pump(
    mut send: SendStream<Bytes>,
    mut body: tonic::body::Body,
    cancel: CancellationToken,
    failure: Arc<Mutex<Option<tonic::Status>>>,
) {
    let result = tokio::select! {
        r = pump_frames(&mut send, &mut body) => r,
        () = cancel.cancelled() => {
            send.send_reset(Reason::CANCEL);
            return;
        }
    };
    if let Err(Some(status)) = result {
        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        send.send_reset(Reason::CANCEL);
    }
    // Err(None): the stream or connection failed; the response reports it.
}

/// `Err(Some(status))`: the body failed; `Err(None)`: the stream did.
async fn pump_frames(
    send: &mut SendStream<Bytes>,
    body: &mut tonic::body::Body,
) -> Result<(), Option<tonic::Status>> {
    loop {
        let frame = poll_fn(|cx| {
            if send.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(None));
            }
            Pin::new(&mut *body).poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => return send.send_data(Bytes::new(), true).map_err(|_| None),
            Some(Err(status)) => return Err(Some(status)),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if !data.is_empty() {
                    // Claim a little and wait for it: h2 raises the claim to what
                    // is buffered, so at most one chunk waits beyond the window.
                    send.reserve_capacity(1);
                    poll_fn(|cx| poll_capacity(send, cx)).await?;
                }
                send.send_data(data, eos).map_err(|_| None)?;
                if eos {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return send.send_trailers(trailers).map_err(|_| None);
                }
            }
        }
    }
}

fn poll_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), Option<tonic::Status>>> {
    if send.poll_reset(cx).is_ready() {
        return Poll::Ready(Err(None));
    }
    while send.capacity() == 0 {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(0)) => {}
            Some(Ok(_)) => break,
            Some(Err(_)) | None => return Poll::Ready(Err(None)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Response body of an [`H2Channel`] call: DATA then trailers, flow-control
/// capacity given back as it is read; errors become `Unavailable` statuses.
/// Dropping it cancels the call (RST_STREAM) and any request body still being sent.
pub struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    _pipe: Option<DropGuard>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("stream", &self.recv.stream_id().as_u32())
            .finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Can only fail when the stream is gone; the next poll says so.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(body_error(&e)))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(body_error(&e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use octo_proto::v1::capabilities_client::CapabilitiesClient;
    use octo_proto::v1::file_service_client::FileServiceClient;
    use octo_proto::v1::{
        upload_request, FileChunk, PingRequest, UploadFinish, UploadRequest, UploadStart,
    };
    use sha2::{Digest, Sha256};
    use tokio::io::{DuplexStream, ReadBuf};
    use tower::Service;

    use super::*;

    /// An in-memory socket that counts the writes reaching it.
    struct CountingIo {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountingIo {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            r
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A channel to the test fixtures served by hyper's HTTP/2 server (as a
    /// tentacle does) over an in-memory socket, and the client's write count.
    async fn channel() -> (H2Channel, Arc<AtomicUsize>) {
        let (client_io, server_io) = tokio::io::duplex(4 << 20);
        tokio::spawn(async move {
            let routes = octo_testkit::services::routes();
            let svc = hyper::service::service_fn(move |req| {
                let mut routes = routes.clone();
                async move { routes.call(req).await }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc)
                .await;
        });
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingIo {
            io: client_io,
            writes: writes.clone(),
        };
        let (sender, driver) = handshake(io, &H2Settings::default(), Activity::new())
            .await
            .expect("HTTP/2 handshake in memory");
        tokio::spawn(driver);
        let channel = H2Channel::new(sender, "memory".into(), CancellationToken::new());
        (channel, writes)
    }

    fn origin() -> http::Uri {
        http::Uri::from_static("https://tentacle")
    }

    #[tokio::test]
    async fn a_unary_call_leaves_in_one_write() {
        let (channel, writes) = channel().await;
        let mut client = CapabilitiesClient::with_origin(channel, origin());
        // The first call also carries the SETTINGS acknowledgement.
        client.ping(PingRequest::default()).await.expect("ping");
        let before = writes.load(Ordering::Relaxed);
        for _ in 0..20 {
            client.ping(PingRequest::default()).await.expect("ping");
        }
        assert_eq!(
            writes.load(Ordering::Relaxed) - before,
            20,
            "each call's HEADERS and DATA must go out together"
        );
    }

    #[tokio::test]
    async fn a_client_stream_larger_than_the_windows_is_pumped_whole() {
        let (channel, _) = channel().await;
        let mut client = FileServiceClient::with_origin(channel, origin())
            .max_encoding_message_size(16 << 20)
            .max_decoding_message_size(16 << 20);
        // 24 MiB: more than the stream and connection windows, so the pump
        // must wait for capacity several times.
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        let chunks = 24u64;
        let mut h = Sha256::new();
        for _ in 0..chunks {
            h.update(&chunk);
        }
        let sha: String = h.finalize().iter().map(|b| format!("{b:02X}")).collect();
        let total = chunks << 20;
        let mut messages = vec![UploadRequest {
            part: Some(upload_request::Part::Start(UploadStart {
                path: "x.bin".into(),
                total_length: total,
                ..Default::default()
            })),
        }];
        messages.extend((0..chunks).map(|i| UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: i << 20,
                data: chunk.clone(),
            })),
        }));
        messages.push(UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: sha.clone(),
                total_length: total,
            })),
        });
        let reply = client
            .upload_file(tokio_stream::iter(messages))
            .await
            .expect("upload")
            .into_inner();
        assert_eq!((reply.length, reply.sha256), (total, sha));
    }

    #[tokio::test]
    async fn a_message_too_large_to_encode_is_reported_as_such() {
        let (channel, _) = channel().await;
        let mut client =
            FileServiceClient::with_origin(channel, origin()).max_encoding_message_size(1 << 10);
        let messages = vec![
            UploadRequest {
                part: Some(upload_request::Part::Start(UploadStart {
                    path: "x.bin".into(),
                    ..Default::default()
                })),
            },
            UploadRequest {
                part: Some(upload_request::Part::Chunk(FileChunk {
                    offset: 0,
                    data: Bytes::from(vec![1u8; 4 << 10]),
                })),
            },
        ];
        let err = client
            .upload_file(tokio_stream::iter(messages))
            .await
            .expect_err("a 4 KiB message over a 1 KiB limit");
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    }
}
