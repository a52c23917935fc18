//! The friendly page: what a browser or `curl -k` sees on a comms port.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

/// Which listener is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// A listening tentacle (default port 10933).
    Tentacle,
    /// The server's polling port (default 10943).
    ServerPolling,
    /// The server's WebSocket port (polling tentacles over `wss://`).
    ServerWebSocket,
}

/// The HTML shown to clients that connect without a certificate.
pub fn html(listener: Listener) -> String {
    let (title, body) = match listener {
        Listener::Tentacle => (
            "Octopus Tentacle",
            "This is a listening Tentacle's communications endpoint. Octopus servers connect here \
             over mutual TLS, each side presenting a certificate the other trusts by thumbprint. \
             There is nothing to see in a browser; reaching this page shows the port is open.",
        ),
        Listener::ServerPolling => (
            "Octopus Server",
            "This is an Octopus server's polling endpoint. Polling Tentacles connect here over \
             mutual TLS, each side presenting a certificate the other trusts by thumbprint. \
             There is nothing to see in a browser; reaching this page shows the port is open.",
        ),
        Listener::ServerWebSocket => (
            "Octopus Server",
            "This is an Octopus server's WebSocket polling endpoint. Polling Tentacles connect here \
             with wss:// over mutual TLS, each side presenting a certificate the other trusts by \
             thumbprint. There is nothing to see in a browser; reaching this page shows the port \
             is open.",
        ),
    };
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body><h1>{title}</h1><p>{body}</p><p>Version {}</p></body></html>\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The page as an HTTP response.
pub fn response(listener: Listener) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(html(listener))));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}
