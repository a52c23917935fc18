//! Polling over WebSocket: the same HTTP/2 + gRPC a polling TCP connection
//! carries, inside the binary messages of a WebSocket, inside TLS.
//!
//! ```text
//! tentacle ──TCP (direct, or HTTP CONNECT tunnel)──▶ server's WebSocket port
//!   TLS 1.2/1.3, tentacle presents its certificate, both sides pin thumbprints,
//!       SNI = the host of the wss:// URL
//!   HTTP/1.1 GET PATH, Upgrade: websocket, Sec-WebSocket-Protocol: octopus-tentacle.v1
//!   ◀── 101 Switching Protocols, Sec-WebSocket-Protocol: octopus-tentacle.v1
//!   binary messages carry the byte stream both ways:
//!       tentacle = HTTP/2 server (gRPC services), server = HTTP/2 client
//! ```
//!
//! [`WsIo`] turns a WebSocket back into a byte stream (AsyncRead + AsyncWrite),
//! so both sides run exactly the code they run on a TCP polling connection.
//! Message boundaries carry no meaning; text messages are a protocol error;
//! ping/pong are answered by the WebSocket layer and otherwise ignored (HTTP/2
//! PING is what detects dead connections).
//!
//! TLS is ours (rustls with the pinning verifiers from `octo_tls`), never the
//! WebSocket library's, so a reverse proxy can only pass the bytes through
//! (e.g. nginx `stream { proxy_pass ...; }`): a proxy that terminated TLS could
//! not present the tentacle's certificate.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocol both sides must name (`Sec-WebSocket-Protocol`):
/// HTTP/2 carrying the gRPC contract in `proto/`, in binary messages.
pub const SUBPROTOCOL: &str = "octopus-tentacle.v1";

/// The path the server accepts WebSocket polling connections on by default.
pub const DEFAULT_PATH: &str = "/tentacle";

/// The port of a `wss://` URL without one.
pub const DEFAULT_PORT: u16 = 443;

/// Largest WebSocket message we send: one write of the HTTP/2 layer at most.
const MAX_SEND: usize = 256 << 10;

/// Largest WebSocket message or frame we accept (HTTP/2 frames are at most
/// 256 KiB plus headers; hyper may coalesce several into one write).
const MAX_RECEIVE: usize = 4 << 20;

/// The WebSocket settings both sides use.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_RECEIVE))
        .max_frame_size(Some(MAX_RECEIVE))
        // Written when the HTTP/2 layer flushes, which it does after each batch.
        .write_buffer_size(128 << 10)
}

/// A `wss://HOST[:PORT][/PATH]` URL: where a polling tentacle opens its WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketUrl {
    /// Host name (sent as TLS SNI and in `Host`) or IP address.
    pub host: String,
    /// TCP port (443 when the URL has none).
    pub port: u16,
    /// Request path, starting with '/' ([`DEFAULT_PATH`] when the URL has none).
    pub path: String,
}

/// Whether `s` is a WebSocket URL (`wss://...`, or `ws://...`, which
/// [`WebSocketUrl::parse`] refuses with an explanation).
pub fn is_web_socket_url(s: &str) -> bool {
    let lower = s.trim().to_ascii_lowercase();
    lower.starts_with("wss://") || lower.starts_with("ws://")
}

impl WebSocketUrl {
    /// Parses `wss://HOST[:PORT][/PATH]`. The port defaults to 443 and the path
    /// to [`DEFAULT_PATH`]; IPv6 addresses go in brackets.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!(
                "'{url}' is not a WebSocket URL; expected wss://HOST[:PORT]/PATH, e.g. wss://octopus.example:443{DEFAULT_PATH}"
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "wss" => {}
            "ws" => {
                return Err(format!(
                    "'{url}': plain ws:// is not supported: the tentacle's certificate is presented in TLS; use wss://"
                ))
            }
            other => {
                return Err(format!(
                    "'{url}': scheme '{other}://' is not a WebSocket scheme; expected wss://HOST[:PORT]/PATH"
                ))
            }
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(format!(
                "'{url}': a query or fragment is not supported; expected wss://HOST[:PORT]/PATH"
            ));
        }
        if path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || !c.is_ascii())
        {
            return Err(format!(
                "'{url}': the path may contain only printable ASCII without spaces"
            ));
        }
        if authority.contains('@') {
            return Err(format!(
                "'{url}': user names and passwords in the URL are not supported (the tentacle authenticates with its certificate)"
            ));
        }
        if !authority.starts_with('[') && authority.matches(':').count() > 1 {
            return Err(format!(
                "'{url}': expected wss://HOST[:PORT]/PATH (IPv6 addresses in brackets)"
            ));
        }
        let (host, port) = match crate::net::split_host_port(authority) {
            Some((h, p)) => (h.to_string(), p),
            None => {
                let bare = authority.trim_start_matches('[').trim_end_matches(']');
                let bracketed = authority.starts_with('[') && authority.ends_with(']');
                if bare.is_empty() || (bare.contains(':') && !bracketed) || authority.ends_with(':')
                {
                    return Err(format!(
                        "'{url}': expected wss://HOST[:PORT]/PATH (IPv6 addresses in brackets)"
                    ));
                }
                (bare.to_string(), DEFAULT_PORT)
            }
        };
        if port == 0 {
            return Err(format!("'{url}': the port must not be 0"));
        }
        crate::net::server_name(&host).map_err(|e| format!("'{url}': {e}"))?;
        let path = if path.is_empty() {
            DEFAULT_PATH.to_string()
        } else {
            path.to_string()
        };
        Ok(Self { host, port, path })
    }

    /// "host:port" ("[v6]:port" for IPv6 addresses): what is dialled by default.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for WebSocketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "wss://{}{}", self.authority(), self.path)
    }
}

impl std::str::FromStr for WebSocketUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A WebSocket as a byte stream: writes become binary messages, the payloads
/// of received binary messages are read back in order. A close message or the
/// end of the connection reads as EOF.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    eof: bool,
}

impl<S> fmt::Debug for WsIo<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsIo")
            .field("pending", &self.pending.len())
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsIo<S> {
    /// Wraps a WebSocket whose handshake is done.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }

    /// The stream under the WebSocket (e.g. the TLS stream).
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }
}

/// A WebSocket error as an I/O error; an I/O error inside stays itself, so that
/// callers can still find the TLS alert in it.
fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket: {other}")),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => self.eof = true,
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the peer sent a WebSocket text message; subprotocol {SUBPROTOCOL} carries binary messages only"
                        ),
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        let n = data.len().min(MAX_SEND);
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(&data[..n])))
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// Why the WebSocket upgrade did not happen (client side).
#[derive(Debug)]
pub(crate) enum UpgradeError {
    /// The stream failed (e.g. the TLS alert of a peer refusing our certificate).
    Io(io::Error),
    /// The server answered, but not with 101 and our subprotocol.
    Refused(String),
}

/// The client half: sends the upgrade request for `url` on `stream` (TLS
/// already established) and checks the answer.
pub(crate) async fn client_upgrade<S>(
    stream: S,
    url: &WebSocketUrl,
) -> Result<WsIo<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let uri = format!("wss://{}{}", url.authority(), url.path);
    let mut request = uri
        .as_str()
        .into_client_request()
        .map_err(|e| UpgradeError::Refused(format!("cannot build the request for {url}: {e}")))?;
    let headers = request.headers_mut();
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("octopus-tentacle/", env!("CARGO_PKG_VERSION"))),
    );
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config())).await {
        Ok((ws, _)) => Ok(WsIo::new(ws)),
        Err(tungstenite::Error::Io(e)) => Err(UpgradeError::Io(e)),
        Err(tungstenite::Error::Http(resp)) => Err(UpgradeError::Refused(describe_refusal(
            url,
            resp.status(),
            resp.body().as_deref(),
        ))),
        Err(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_),
        )) => Err(UpgradeError::Refused(format!(
            "it accepted the WebSocket but not the subprotocol {SUBPROTOCOL}: this is not an Octopus server's WebSocket endpoint (or one that speaks another version); check the URL"
        ))),
        Err(e) => Err(UpgradeError::Refused(format!(
            "the WebSocket upgrade failed: {e}; is {url} an Octopus server's WebSocket endpoint (`octopus server run --web-socket-listen-port`)?"
        ))),
    }
}

/// What a non-101 answer to our upgrade means, with the server's own words.
fn describe_refusal(url: &WebSocketUrl, status: StatusCode, body: Option<&[u8]>) -> String {
    let said = body
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .filter(|s| !s.is_empty() && !s.starts_with('<'))
        .map(|s| format!(" (it said: {})", s.chars().take(300).collect::<String>()))
        .unwrap_or_default();
    let hint = match status.as_u16() {
        404 => format!(
            "there is no WebSocket endpoint at the path {}; use the path the server's --web-socket-path names (default {DEFAULT_PATH})",
            url.path
        ),
        400 | 426 => format!(
            "the server refused the WebSocket request; this tentacle speaks subprotocol {SUBPROTOCOL}"
        ),
        401 | 403 => "the server requires a trusted client certificate; register this tentacle with the server (`tentacle register-with`)".to_string(),
        502..=504 => "a proxy in the path could not reach the server".to_string(),
        _ => format!("is {url} an Octopus server's WebSocket endpoint?"),
    };
    format!("it answered {status} to the WebSocket upgrade{said}; {hint}")
}

/// The server's answer to a request on its WebSocket port.
#[derive(Debug)]
pub(crate) enum Answer {
    /// 101: the upgrade then happens on the connection.
    Switch(Response<String>),
    /// An error status whose body says what is wrong and what is expected.
    Refuse(Response<String>),
}

/// The server half, step one: is `req` a WebSocket upgrade we accept on `path`?
pub(crate) fn check_upgrade<B>(req: &Request<B>, path: &str) -> Answer {
    match check(req, path) {
        Ok(r) => Answer::Switch(r),
        Err(r) => Answer::Refuse(*r),
    }
}

fn check<B>(req: &Request<B>, path: &str) -> Result<Response<String>, Box<Response<String>>> {
    let refuse = |status: StatusCode, text: String| {
        let mut r = Response::new(format!("{text}\n"));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let wanted = normalise_path(path);
    let asked = normalise_path(req.uri().path());
    if asked != wanted {
        return Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no WebSocket endpoint at {}: this server accepts polling tentacles at {wanted} (tentacle poll-server --server-web-socket wss://HOST:PORT{wanted})",
                req.uri().path()
            ),
        )));
    }
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if req.method() != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            format!(
                "{wanted} accepts only WebSocket upgrades (GET with Upgrade: websocket and Sec-WebSocket-Protocol: {SUBPROTOCOL}) from polling tentacles"
            ),
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(Box::new(r));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket version 13 (RFC 6455) is required".into(),
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(r));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket upgrade has no Sec-WebSocket-Key".into(),
        )));
    };
    if !has_token(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL) {
        let offered: Vec<&str> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let offered = if offered.is_empty() {
            "none".to_string()
        } else {
            offered.join(", ")
        };
        return Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "this endpoint speaks the WebSocket subprotocol {SUBPROTOCOL} only; the client offered: {offered}"
            ),
        )));
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = Response::new(String::new());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|_| {
            Box::new(refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the accept key".into(),
            ))
        })?,
    );
    Ok(r)
}

/// Whether a request asks for a WebSocket upgrade at all.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().get_all(header::UPGRADE).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains("websocket"))
    })
}

/// The server half, step two: the upgraded connection as a byte stream.
pub(crate) async fn server_stream<S>(io: S) -> WsIo<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WsIo::new(WebSocketStream::from_raw_socket(io, WsRole::Server, Some(config())).await)
}

fn normalise_path(p: &str) -> &str {
    match p.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = WebSocketUrl::parse("wss://octopus.example").expect("parse");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("octopus.example", 443, "/tentacle")
        );
        assert_eq!(u.to_string(), "wss://octopus.example:443/tentacle");
        let u = WebSocketUrl::parse("WSS://h:8443/a/b").expect("parse");
        assert_eq!((u.port, u.path.as_str()), (8443, "/a/b"));
        let u = WebSocketUrl::parse("wss://[::1]:9/").expect("parse");
        assert_eq!((u.host.as_str(), u.path.as_str()), ("::1", "/"));
        assert_eq!(u.authority(), "[::1]:9");
        let u = WebSocketUrl::parse("wss://[::1]").expect("parse");
        assert_eq!(u.port, 443);
        for (bad, says) in [
            ("ws://h/x", "wss://"),
            ("https://h/x", "not a WebSocket scheme"),
            ("h:443", "not a WebSocket URL"),
            ("wss://h:0/x", "must not be 0"),
            ("wss:///x", "expected wss://"),
            ("wss://h:/x", "expected wss://"),
            ("wss://::1/x", "brackets"),
            ("wss://h/x?y", "query"),
            ("wss://u:p@h/x", "passwords"),
            ("wss://bad name/x", "valid host name"),
        ] {
            let e = WebSocketUrl::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(is_web_socket_url("WSS://x") && is_web_socket_url("ws://x"));
        assert!(!is_web_socket_url("https://x") && !is_web_socket_url("x:1"));
    }

    fn upgrade(path: &str, protocol: Option<&str>) -> Request<()> {
        let mut b = Request::get(path)
            .header("Host", "h")
            .header("Upgrade", "websocket")
            .header("Connection", "keep-alive, Upgrade")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(p) = protocol {
            b = b.header("Sec-WebSocket-Protocol", p);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn upgrade_checks_name_what_is_expected() {
        let ok = check(
            &upgrade("/tentacle/", Some("x, octopus-tentacle.v1")),
            "/tentacle",
        )
        .expect("accepted");
        assert_eq!(ok.status(), StatusCode::SWITCHING_PROTOCOLS);
        // RFC 6455's example key and answer.
        assert_eq!(
            ok.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(ok.headers()[header::SEC_WEBSOCKET_PROTOCOL], SUBPROTOCOL);

        let e = check(&upgrade("/other", Some(SUBPROTOCOL)), "/tentacle").expect_err("wrong path");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(
            e.body().contains("/other") && e.body().contains("/tentacle"),
            "{}",
            e.body()
        );

        let e =
            check(&upgrade("/tentacle", Some("chat")), "/tentacle").expect_err("wrong subprotocol");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(
            e.body().contains(SUBPROTOCOL) && e.body().contains("chat"),
            "{}",
            e.body()
        );
        let e = check(&upgrade("/tentacle", None), "/tentacle").expect_err("none");
        assert!(e.body().contains("offered: none"), "{}", e.body());

        let plain = Request::get("/tentacle").body(()).expect("request");
        let e = check(&plain, "/tentacle").expect_err("no upgrade");
        assert_eq!(e.status(), StatusCode::UPGRADE_REQUIRED);
        assert!(!is_upgrade(&plain));
        assert!(is_upgrade(&upgrade("/", None)));
    }

    #[test]
    fn refusals_say_what_to_do() {
        let u = WebSocketUrl::parse("wss://h/wrong").expect("parse");
        let s = describe_refusal(
            &u,
            StatusCode::NOT_FOUND,
            Some(b"no WebSocket endpoint at /wrong"),
        );
        assert!(
            s.contains("404") && s.contains("/wrong") && s.contains("--web-socket-path"),
            "{s}"
        );
        let s = describe_refusal(&u, StatusCode::BAD_GATEWAY, Some(b"<html>"));
        assert!(s.contains("502") && !s.contains("<html>"), "{s}");
    }
}
