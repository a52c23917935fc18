//! Calls to the server's REST API for `register-with` and `deregister-from`, over
//! `http://` or `https://`.
//!
//! Over `https://` (the server's TLS port, `--web-socket-listen-port`, which serves
//! the API to clients without a certificate) the API key never crosses the network
//! in clear: the server is pinned by `--server-thumbprint` during the handshake, or,
//! without it, its certificate is accepted on first use and reported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use octo_tls::{Thumbprint, TrustStore, UntrustedPeer};
use tokio_rustls::TlsConnector;

/// How long one API call (connect, TLS, request, answer) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one server's API.
#[derive(Debug)]
pub(crate) struct ApiClient {
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    transport: Transport,
}

#[derive(Debug)]
enum Transport {
    Http(reqwest::Client),
    Https {
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        pinned: bool,
        /// The thumbprint the server presented on the last connection.
        presented: Arc<Mutex<Option<Thumbprint>>>,
    },
}

impl ApiClient {
    /// A client for `server` (`http://HOST[:PORT]` or `https://HOST[:PORT]`).
    /// Over https, the server must present one of `expected` (any certificate
    /// when it is empty).
    pub(crate) fn new(server: &str, expected: &[Thumbprint]) -> anyhow::Result<Self> {
        let base = server.trim_end_matches('/').to_string();
        let (scheme, rest) = base
            .split_once("://")
            .with_context(|| format!("--server '{base}' needs a scheme, e.g. https://{base}"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        if rest.len() != authority.len() {
            bail!("--server '{base}': give the server's address only (scheme, host and port), without a path");
        }
        let transport = match scheme {
            "http" => Transport::Http(reqwest::Client::new()),
            "https" => {
                let (host, port) = match octo_comms::net::split_host_port(authority) {
                    Some((h, p)) => (h.to_string(), p),
                    None if !authority.is_empty() && !authority.contains(':') => {
                        (authority.to_string(), 443)
                    }
                    None => bail!("--server '{base}': expected https://HOST[:PORT]"),
                };
                let trust = (!expected.is_empty()).then(|| {
                    TrustStore::new(
                        expected.iter().copied(),
                        Arc::new(|p: &Thumbprint| {
                            format!("pass --server-thumbprint {p} (compare it with `octopus server show-thumbprint` on the server first)")
                        }),
                    )
                });
                let tls = octo_tls::api_client_config(trust).context("TLS configuration")?;
                Transport::Https {
                    host: host.trim_matches(|c| c == '[' || c == ']').to_string(),
                    port,
                    tls,
                    pinned: !expected.is_empty(),
                    presented: Arc::default(),
                }
            }
            other => bail!("--server '{base}': the scheme must be http or https, not {other}"),
        };
        Ok(Self { base, transport })
    }

    /// The server's address as given.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// Whether the server's identity is checked during the TLS handshake.
    pub(crate) fn is_pinned(&self) -> bool {
        matches!(self.transport, Transport::Https { pinned: true, .. })
    }

    /// Whether the server is on this machine (nothing crosses a network).
    pub(crate) fn is_loopback(&self) -> bool {
        let rest = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, r)| r);
        let host = octo_comms::net::split_host_port(rest).map_or(rest, |(h, _)| h);
        let host = host.trim_matches(|c| c == '[' || c == ']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_https(&self) -> bool {
        matches!(self.transport, Transport::Https { .. })
    }

    /// The certificate thumbprint the server presented over https (after a call).
    pub(crate) fn presented_thumbprint(&self) -> Option<Thumbprint> {
        match &self.transport {
            Transport::Http(_) => None,
            Transport::Https { presented, .. } => {
                *presented.lock().unwrap_or_else(|p| p.into_inner())
            }
        }
    }

    /// Sends one request; returns the status and the body as text.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        api_key: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let unreachable = || {
            format!(
                "cannot reach the server at {}; check the address and that `octopus server run` is running there",
                self.base
            )
        };
        let call = async {
            match &self.transport {
                Transport::Http(http) => {
                    let mut req = http.request(method, format!("{}{path}", self.base));
                    if let Some(key) = api_key {
                        req = req.header("X-Octopus-ApiKey", key);
                    }
                    if let Some(body) = body {
                        req = req.json(body);
                    }
                    let resp = req.send().await.with_context(unreachable)?;
                    let status = resp.status();
                    let text = resp.text().await.with_context(unreachable)?;
                    Ok((status, text))
                }
                Transport::Https { .. } => self.call_https(method, path, api_key, body).await,
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .with_context(|| {
                format!(
                    "the server at {} did not answer within {CALL_TIMEOUT:?}",
                    self.base
                )
            })?
    }

    async fn call_https(
        &self,
        method: Method,
        path: &str,
        api_key: Option<&str>,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<(StatusCode, String)> {
        let Transport::Https {
            host,
            port,
            tls,
            presented,
            ..
        } = &self.transport
        else {
            bail!("not an https client");
        };
        let base = &self.base;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), *port))
            .await
            .with_context(|| format!("cannot reach the server at {base}; check the address, that `octopus server run` has --web-socket-listen-port {port} there, and that a firewall lets the port through"))?;
        let _ = octo_comms::net::tune(&tcp);
        let name = octo_comms::net::server_name(host)
            .map_err(|e| anyhow::anyhow!("--server '{base}': {e}"))?;
        let stream = match TlsConnector::from(tls.clone()).connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => {
                if let Some(u) = UntrustedPeer::find(&e) {
                    bail!("{u}; nothing was sent to {base} (its identity did not match)");
                }
                bail!("TLS with the server at {base} failed: {e}; is {port} the server's TLS port (`--web-socket-listen-port`)?");
            }
        };
        *presented.lock().unwrap_or_else(|p| p.into_inner()) =
            octo_tls::peer_thumbprint(stream.get_ref().1);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP with the server at {base} failed"))?;
        let driver = tokio::spawn(conn);
        let authority = if *port == 443 {
            host.clone()
        } else {
            format!("{host}:{port}")
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority);
        if let Some(key) = api_key {
            req = req.header("X-Octopus-ApiKey", key);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .with_context(|| format!("building the request for {path}"))?;
        let resp = sender.send_request(req).await.with_context(|| {
            format!("the server at {base} closed the connection before answering {path}")
        })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the server's answer to {path}"))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}
