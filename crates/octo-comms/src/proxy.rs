//! HTTP CONNECT proxies: which proxy (if any) to use for a destination, and
//! dialling through it.
//!
//! [`connect`] returns a TCP-level stream to the destination, made directly or
//! through an HTTP/1.1 proxy with `CONNECT host:port` (Basic authentication when
//! credentials are set). The proxy only ever sees that CONNECT: the TLS
//! handshake (and so the thumbprint pinning) runs end to end inside the tunnel,
//! on the real socket (TCP_NODELAY and keepalive set by [`net::tune`]), with
//! any bytes the proxy sent after its answer put back in front
//! ([`net::Prefixed`]).
//!
//! Which proxy: [`ProxySetting`]. `Explicit` always wins (the environment is
//! not read at all); `Direct` ignores the environment; `FromEnvironment` (the
//! default) reads `https_proxy`/`HTTPS_PROXY`, then `all_proxy`/`ALL_PROXY`,
//! and skips the proxy for destinations listed in `no_proxy`/`NO_PROXY` and
//! for loopback destinations (`localhost`, 127.0.0.0/8, ::1), as Go's and most
//! tools' resolvers do. The TLS server name (SNI) is always the configured host
//! name; the proxy resolves that name itself.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::net;

/// A proxy server: where it is and, optionally, who we are to it.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Host name or IP address of the proxy.
    pub host: String,
    /// Port of the proxy.
    pub port: u16,
    /// User name for Basic authentication.
    pub username: Option<String>,
    /// Password for Basic authentication (never printed or logged).
    pub password: Option<String>,
}

impl ProxyConfig {
    /// A proxy without credentials.
    pub fn new(host: &str, port: u16) -> Self {
        Self {
            host: host.to_string(),
            port,
            username: None,
            password: None,
        }
    }

    /// With Basic authentication credentials.
    pub fn with_credentials(mut self, username: &str, password: &str) -> Self {
        self.username = Some(username.to_string());
        self.password = Some(password.to_string());
        self
    }

    /// "host:port" ("[v6]:port" for IPv6 addresses).
    pub fn address(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The `Proxy-Authorization` value, when credentials are set.
    fn authorization(&self) -> Option<HeaderValue> {
        let user = self.username.as_deref()?;
        let pass = self.password.as_deref().unwrap_or_default();
        let mut v = HeaderValue::from_str(&format!(
            "Basic {}",
            base64(format!("{user}:{pass}").as_bytes())
        ))
        .ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// `http://[user@]host:port`; never the password.
impl fmt::Display for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.username {
            Some(u) => write!(f, "http://{u}@{}", self.address()),
            None => write!(f, "http://{}", self.address()),
        }?;
        if self.password.is_some() {
            write!(f, " (password set)")?;
        }
        Ok(())
    }
}

/// Whether and how to use a proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// Connect directly; proxy environment variables are ignored.
    Direct,
    /// Honour `https_proxy`/`HTTPS_PROXY` (then `all_proxy`/`ALL_PROXY`) and
    /// `no_proxy`/`NO_PROXY`; loopback destinations are never proxied.
    #[default]
    FromEnvironment,
    /// Always use this proxy; the environment is not read.
    Explicit(ProxyConfig),
}

/// Where a proxy setting came from (for error hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxySource {
    /// Configured explicitly (`tentacle polling-proxy`, server options).
    Explicit,
    /// From this environment variable.
    Environment(&'static str),
}

/// The proxy chosen for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedProxy {
    /// The proxy.
    pub config: ProxyConfig,
    /// Where the setting came from.
    pub source: ProxySource,
}

impl ResolvedProxy {
    fn address_hint(&self) -> String {
        match self.source {
            ProxySource::Explicit => "check --proxy-host/--proxy-port".into(),
            ProxySource::Environment(var) => format!(
                "check the {var} environment variable (or list this destination in NO_PROXY)"
            ),
        }
    }

    fn credentials_hint(&self) -> String {
        match self.source {
            ProxySource::Explicit => "set or fix --proxy-username/--proxy-password".into(),
            ProxySource::Environment(var) => format!(
                "set or fix the user name and password in {var} (http://USER:PASSWORD@HOST:PORT)"
            ),
        }
    }
}

/// Environment variables naming the proxy, first non-empty wins.
const PROXY_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// Environment variables listing destinations reached directly.
const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

impl ProxySetting {
    /// The proxy for `host:port`, reading the process environment.
    pub fn resolve(&self, host: &str, port: u16) -> Result<Option<ResolvedProxy>, ProxyError> {
        self.resolve_with(host, port, |k| std::env::var(k).ok())
    }

    /// The proxy for `host:port`, reading environment variables through `env`
    /// (tests pass their own). `Ok(None)`: connect directly.
    pub fn resolve_with(
        &self,
        host: &str,
        port: u16,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ResolvedProxy>, ProxyError> {
        match self {
            ProxySetting::Direct => Ok(None),
            ProxySetting::Explicit(config) => Ok(Some(ResolvedProxy {
                config: config.clone(),
                source: ProxySource::Explicit,
            })),
            ProxySetting::FromEnvironment => {
                let first = |vars: &[&'static str]| {
                    vars.iter().find_map(|v| {
                        env(v)
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .map(|s| (*v, s))
                    })
                };
                let Some((var, url)) = first(&PROXY_VARS) else {
                    return Ok(None);
                };
                if is_loopback(host) {
                    return Ok(None);
                }
                if let Some((_, list)) = first(&NO_PROXY_VARS) {
                    if no_proxy_matches(&list, host, port) {
                        return Ok(None);
                    }
                }
                let config = parse_proxy_url(&url).map_err(|reason| ProxyError::Invalid {
                    origin: format!("the {var} environment variable ({})", redact_url(&url)),
                    reason,
                })?;
                Ok(Some(ResolvedProxy {
                    config,
                    source: ProxySource::Environment(var),
                }))
            }
        }
    }
}

impl fmt::Display for ProxySetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxySetting::Direct => write!(f, "direct (proxy environment variables ignored)"),
            ProxySetting::FromEnvironment => write!(f, "from HTTPS_PROXY/NO_PROXY if set"),
            ProxySetting::Explicit(c) => write!(f, "{c}"),
        }
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback();
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// Whether a `NO_PROXY` list excludes `host:port` from proxying.
///
/// Comma-separated entries: `*` matches everything; a domain (`example.com` or
/// `.example.com`, also `*.example.com`) matches itself and its subdomains; an
/// IP address matches exactly; `ADDR/BITS` matches a network; any entry may
/// carry `:PORT` (IPv6 as `[::1]:PORT`) to match only that port.
pub fn no_proxy_matches(list: &str, host: &str, port: u16) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let host_ip = host.parse::<IpAddr>().ok();
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = split_entry(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some((net, bits)) = name.split_once('/') {
                return match (net.parse::<IpAddr>(), bits.parse::<u8>(), host_ip) {
                    (Ok(net), Ok(bits), Some(ip)) => in_network(ip, net, bits),
                    _ => false,
                };
            }
            if let Ok(ip) = name.parse::<IpAddr>() {
                return host_ip == Some(ip);
            }
            let domain = name.trim_start_matches("*.").trim_start_matches('.');
            !domain.is_empty()
                && (host == domain
                    || (host.len() > domain.len()
                        && host.ends_with(domain)
                        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'))
        })
}

/// Splits a NO_PROXY entry into name and optional port.
fn split_entry(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((inside, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (inside, port);
        }
    }
    if entry.parse::<IpAddr>().is_ok() || entry.contains('/') {
        return (entry, None);
    }
    match entry.rsplit_once(':') {
        Some((name, p)) if !name.contains(':') => match p.parse() {
            Ok(port) => (name, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Parses a proxy URL as found in `HTTPS_PROXY`: `http://[USER[:PASSWORD]@]HOST[:PORT][/]`
/// (a missing scheme means http; the default port is 80). User name and password
/// may be percent-encoded. Only http:// proxies are supported.
pub fn parse_proxy_url(url: &str) -> Result<ProxyConfig, String> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "http" => rest,
            "https" => {
                return Err("proxies reached over TLS (https://) are not supported; use the proxy's plain http:// address (the tunnel through it carries TLS end to end anyway)".into())
            }
            other => {
                return Err(format!(
                    "'{other}://' proxies are not supported; only HTTP CONNECT proxies (http://HOST:PORT)"
                ))
            }
        },
        None => url,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = if let Some((h, p)) = net::split_host_port(hostport) {
        (h.to_string(), p)
    } else {
        let h = hostport.trim_start_matches('[').trim_end_matches(']');
        if h.is_empty()
            || h.contains(':') && !hostport.starts_with('[') && h.parse::<IpAddr>().is_err()
        {
            return Err("expected http://HOST:PORT".into());
        }
        (h.to_string(), 80)
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("expected http://HOST:PORT".into());
    }
    if port == 0 {
        return Err("the proxy port must not be 0".into());
    }
    let mut config = ProxyConfig::new(&host, port);
    if let Some(userinfo) = userinfo {
        let (user, pass) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        config.username = Some(percent_decode(user)?);
        config.password = pass.map(percent_decode).transpose()?;
    }
    Ok(config)
}

/// A proxy URL fit for messages: any password replaced by `***`.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    if scheme.is_empty() {
        format!("{authority}{tail}")
    } else {
        format!("{scheme}://{authority}{tail}")
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("bad percent-encoding in the user name or password")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the user name or password is not UTF-8".to_string())
}

/// Standard base64 (RFC 4648, with padding), for the Basic credentials.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// "host:port", with brackets around IPv6 addresses.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Why a connection could not be made, directly or through a proxy. Every
/// message names the proxy and says what to do; none contains the password.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy setting cannot be used (e.g. an `https://` proxy URL).
    #[error("invalid proxy setting in {origin}: {reason}")]
    Invalid {
        /// Where the setting came from (the variable and its value, password hidden).
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// No TCP connection to the proxy.
    #[error("could not connect to the proxy {proxy}: {reason}; {hint}")]
    Unreachable {
        /// "host:port" of the proxy.
        proxy: String,
        /// "connection refused", ...
        reason: String,
        /// Which setting to check.
        hint: String,
    },
    /// A step took too long.
    #[error("the proxy {proxy} did not {step} within {} s; {hint}", after.as_secs_f32())]
    Timeout {
        /// "host:port" of the proxy.
        proxy: String,
        /// "accept a TCP connection", "answer CONNECT to HOST:PORT".
        step: String,
        /// The time allowed.
        after: Duration,
        /// What to check.
        hint: String,
    },
    /// 407 (or 401, which some proxies send for wrong credentials).
    #[error("the proxy {proxy} requires authentication or refused the credentials ({status} {reason}); {hint}")]
    Authentication {
        /// "host:port" of the proxy.
        proxy: String,
        /// The status code.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
        /// Which setting to fix.
        hint: String,
    },
    /// 403: the proxy's rules forbid this destination.
    #[error("the proxy {proxy} refused CONNECT to {target} ({status} {reason}): the proxy's rules do not allow this destination port (many proxies allow only 443); allow port {port} for CONNECT in the proxy (tinyproxy: `ConnectPort {port}`; squid: `SSL_ports`)")]
    Forbidden {
        /// "host:port" of the proxy.
        proxy: String,
        /// "host:port" asked for.
        target: String,
        /// The port asked for.
        port: u16,
        /// The status code.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
    },
    /// 500/502/503/504: the proxy could not reach the destination.
    #[error("the proxy {proxy} could not reach {target} ({status} {reason}); check that it is running and that the proxy can resolve and reach it")]
    TargetUnreachable {
        /// "host:port" of the proxy.
        proxy: String,
        /// "host:port" asked for.
        target: String,
        /// The status code.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
    },
    /// Any other refusal.
    #[error("the proxy {proxy} refused CONNECT to {target} ({status} {reason})")]
    Refused {
        /// "host:port" of the proxy.
        proxy: String,
        /// "host:port" asked for.
        target: String,
        /// The status code.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
    },
    /// The proxy did not answer like an HTTP proxy.
    #[error(
        "the proxy {proxy} did not answer CONNECT to {target}: {reason}; is {proxy} an HTTP proxy?"
    )]
    Protocol {
        /// "host:port" of the proxy.
        proxy: String,
        /// "host:port" asked for.
        target: String,
        /// What happened.
        reason: String,
    },
    /// No proxy applied, and the direct connection failed.
    #[error("could not connect to {address}: {reason}")]
    Direct {
        /// "host:port" dialled.
        address: String,
        /// "connection refused", ...
        reason: String,
    },
}

impl ProxyError {
    /// Whether trying again later may succeed without anyone changing configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProxyError::Unreachable { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::TargetUnreachable { .. }
            | ProxyError::Protocol { .. }
            | ProxyError::Direct { .. } => true,
            ProxyError::Refused { status, .. } => *status >= 500,
            ProxyError::Invalid { .. }
            | ProxyError::Authentication { .. }
            | ProxyError::Forbidden { .. } => false,
        }
    }

    /// As the crate's error, for a dial of the `peer_role` at `address`.
    pub fn into_comms(self, address: &str, peer_role: octo_tls::Role) -> crate::CommsError {
        match self {
            ProxyError::Direct { reason, .. } => crate::CommsError::Connect {
                address: address.to_string(),
                peer_role,
                reason,
            },
            source => crate::CommsError::Proxy {
                address: address.to_string(),
                peer_role,
                source,
            },
        }
    }
}

/// A TCP-level connection to the destination, ready for TLS.
#[derive(Debug)]
pub struct Dialled {
    /// The socket, with any bytes the proxy sent after its answer in front.
    pub stream: net::Prefixed<TcpStream>,
    /// The other end of the TCP connection: the proxy when one was used.
    pub peer_addr: SocketAddr,
    /// The proxy used, if any ("http://user@host:port", no password).
    pub proxy: Option<String>,
}

/// Connects to `host:port`, directly or through the proxy `setting` selects,
/// within `timeout` overall. The socket is tuned ([`net::tune`]).
pub async fn connect(
    setting: &ProxySetting,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Dialled, ProxyError> {
    let target = authority(host, port);
    let Some(proxy) = setting.resolve(host, port)? else {
        let tcp = net::dial(&target, timeout)
            .await
            .map_err(|reason| ProxyError::Direct {
                address: target.clone(),
                reason,
            })?;
        let peer_addr = peer(&tcp);
        return Ok(Dialled {
            stream: net::Prefixed::new(Vec::new(), tcp),
            peer_addr,
            proxy: None,
        });
    };
    let deadline = Instant::now() + timeout;
    let stream = tunnel(&proxy, &target, deadline, timeout).await?;
    Ok(Dialled {
        peer_addr: peer(stream.get_ref()),
        stream,
        proxy: Some(proxy.config.to_string()),
    })
}

fn peer(tcp: &TcpStream) -> SocketAddr {
    tcp.peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Dials the proxy and asks it for a tunnel to `target` with HTTP/1.1 CONNECT.
async fn tunnel(
    proxy: &ResolvedProxy,
    target: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<net::Prefixed<TcpStream>, ProxyError> {
    let address = proxy.config.address();
    let tcp = match tokio::time::timeout_at(
        deadline,
        TcpStream::connect((proxy.config.host.as_str(), proxy.config.port)),
    )
    .await
    {
        Err(_) => {
            return Err(ProxyError::Timeout {
                proxy: address,
                step: "accept a TCP connection".into(),
                after: timeout,
                hint: proxy.address_hint(),
            })
        }
        Ok(Err(e)) => {
            return Err(ProxyError::Unreachable {
                proxy: address,
                reason: describe(&e),
                hint: proxy.address_hint(),
            })
        }
        Ok(Ok(tcp)) => tcp,
    };
    if let Err(e) = net::tune(&tcp) {
        tracing::debug!("socket options on the connection to the proxy {address}: {e}");
    }
    let protocol = |reason: String| ProxyError::Protocol {
        proxy: address.clone(),
        target: target.to_string(),
        reason,
    };
    let answer = async {
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(|e| protocol(e.to_string()))?;
        let mut conn = std::pin::pin!(conn.with_upgrades());
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .header(header::HOST, target)
            .header(
                header::USER_AGENT,
                concat!("octo-comms/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| protocol(format!("cannot build the request: {e}")))?;
        if let Some(auth) = proxy.config.authorization() {
            request
                .headers_mut()
                .insert(header::PROXY_AUTHORIZATION, auth);
        }
        // Drive the connection while waiting for the answer. After a 2xx it
        // finishes by itself (it hands the socket over to the upgrade), possibly
        // before the answer is picked up here.
        let mut send = std::pin::pin!(sender.send_request(request));
        let mut driven = None;
        let response = tokio::select! {
            r = send.as_mut() => r,
            r = conn.as_mut() => {
                driven = Some(r);
                send.await
            }
        };
        let response = response.map_err(|e| protocol(describe_hyper(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(refusal(proxy, &address, target, status, &response));
        }
        let (upgraded, driven) = match driven {
            Some(d) => (hyper::upgrade::on(response).await, d),
            None => tokio::join!(hyper::upgrade::on(response), conn),
        };
        if let Err(e) = driven {
            return Err(protocol(describe_hyper(&e)));
        }
        let upgraded = upgraded.map_err(|e| protocol(describe_hyper(&e)))?;
        let parts = upgraded
            .downcast::<TokioIo<TcpStream>>()
            .map_err(|_| protocol("the tunnel is not the socket we opened".into()))?;
        Ok(net::Prefixed::new(
            parts.read_buf.to_vec(),
            parts.io.into_inner(),
        ))
    };
    match tokio::time::timeout_at(deadline, answer).await {
        Err(_) => Err(ProxyError::Timeout {
            proxy: address.clone(),
            step: format!("answer CONNECT to {target}"),
            after: timeout,
            hint: "the proxy may be unable to reach the destination, or it is not an HTTP proxy"
                .into(),
        }),
        Ok(r) => r,
    }
}

/// Maps a non-2xx answer to CONNECT.
fn refusal<B>(
    proxy: &ResolvedProxy,
    address: &str,
    target: &str,
    status: StatusCode,
    response: &http::Response<B>,
) -> ProxyError {
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_string))
        .unwrap_or_default();
    let (proxy_addr, target_s, code) = (address.to_string(), target.to_string(), status.as_u16());
    match code {
        401 | 407 => ProxyError::Authentication {
            proxy: proxy_addr,
            status: code,
            reason,
            hint: proxy.credentials_hint(),
        },
        403 => ProxyError::Forbidden {
            proxy: proxy_addr,
            port: net::split_host_port(target).map_or(0, |(_, p)| p),
            target: target_s,
            status: code,
            reason,
        },
        500 | 502 | 503 | 504 => ProxyError::TargetUnreachable {
            proxy: proxy_addr,
            target: target_s,
            status: code,
            reason,
        },
        _ => ProxyError::Refused {
            proxy: proxy_addr,
            target: target_s,
            status: code,
            reason,
        },
    }
}

fn describe(e: &std::io::Error) -> String {
    net::describe_connect_error(e)
}

fn describe_hyper(e: &hyper::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn resolved(
        setting: &ProxySetting,
        host: &str,
        port: u16,
        vars: &[(&str, &str)],
    ) -> Option<ResolvedProxy> {
        setting
            .resolve_with(host, port, env(vars))
            .expect("resolves")
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("user:pass", "dXNlcjpwYXNz"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn https_proxy_is_used_when_nothing_explicit() {
        let s = ProxySetting::FromEnvironment;
        let r = resolved(
            &s,
            "octopus.example",
            10943,
            &[("HTTPS_PROXY", "http://user:p%40ss@proxy.example:3128/")],
        )
        .expect("a proxy");
        assert_eq!(r.source, ProxySource::Environment("HTTPS_PROXY"));
        assert_eq!(
            r.config,
            ProxyConfig::new("proxy.example", 3128).with_credentials("user", "p@ss")
        );
        // Lower case first, then ALL_PROXY as a fallback.
        let r = resolved(
            &s,
            "octopus.example",
            443,
            &[("https_proxy", "lower:1"), ("HTTPS_PROXY", "upper:2")],
        )
        .expect("a proxy");
        assert_eq!(r.config.host, "lower");
        let r = resolved(&s, "octopus.example", 443, &[("ALL_PROXY", "all:3")]).expect("a proxy");
        assert_eq!((r.config.host.as_str(), r.config.port), ("all", 3));
        assert_eq!(r.source, ProxySource::Environment("ALL_PROXY"));
        // Empty values do not count; no variable: direct.
        assert!(resolved(&s, "octopus.example", 443, &[("HTTPS_PROXY", " ")]).is_none());
        assert!(resolved(&s, "octopus.example", 443, &[]).is_none());
        // HTTP_PROXY is for plain http, not for us.
        assert!(resolved(&s, "octopus.example", 443, &[("HTTP_PROXY", "p:1")]).is_none());
    }

    #[test]
    fn explicit_wins_and_direct_ignores_the_environment() {
        let vars = [("HTTPS_PROXY", "http://env-proxy:3128"), ("NO_PROXY", "*")];
        let explicit = ProxySetting::Explicit(ProxyConfig::new("mine", 8080));
        let r = resolved(&explicit, "octopus.example", 10943, &vars).expect("explicit");
        assert_eq!(r.config.host, "mine");
        assert_eq!(r.source, ProxySource::Explicit);
        // Even for loopback destinations and with NO_PROXY=*.
        assert!(resolved(&explicit, "127.0.0.1", 1, &vars).is_some());
        assert!(resolved(&ProxySetting::Direct, "octopus.example", 10943, &vars).is_none());
    }

    #[test]
    fn no_proxy_and_loopback_skip_the_environment_proxy() {
        let s = ProxySetting::FromEnvironment;
        let with = |no: &str| {
            vec![
                ("HTTPS_PROXY", "http://proxy:3128".to_string()),
                ("NO_PROXY", no.to_string()),
            ]
        };
        let check = |no: &str, host: &str, port: u16| {
            let v = with(no);
            let v: Vec<(&str, &str)> = v.iter().map(|(k, v)| (*k, v.as_str())).collect();
            resolved(&s, host, port, &v).is_none()
        };
        assert!(check("*", "anything.example", 1));
        assert!(check("example.com", "example.com", 1));
        assert!(check("example.com", "a.b.example.com", 1));
        assert!(check(".example.com", "example.com", 1));
        assert!(check(".example.com", "x.example.com", 1));
        assert!(check("*.example.com", "x.example.com", 1));
        assert!(!check("example.com", "notexample.com", 1));
        assert!(!check("example.com", "example.com.evil", 1));
        assert!(check("other, EXAMPLE.com ,x", "Example.COM", 1));
        assert!(check("10.1.2.3", "10.1.2.3", 1));
        assert!(!check("10.1.2.3", "10.1.2.30", 1));
        assert!(check("10.0.0.0/8", "10.200.0.1", 1));
        assert!(!check("10.0.0.0/8", "11.0.0.1", 1));
        assert!(check("example.com:10943", "example.com", 10943));
        assert!(!check("example.com:10943", "example.com", 443));
        assert!(check("[2001:db8::1]:443", "2001:db8::1", 443));
        assert!(check("2001:db8::1", "2001:db8::1", 443));
        assert!(check("10.1.2.3:443", "10.1.2.3", 443));
        assert!(!check("10.1.2.3:443", "10.1.2.3", 444));
        assert!(!check("", "example.com", 1));
        // no_proxy (lower case) counts too.
        assert!(resolved(
            &s,
            "a.internal",
            1,
            &[("HTTPS_PROXY", "p:1"), ("no_proxy", "internal")]
        )
        .is_none());
        // Loopback destinations never go through an environment proxy.
        for host in [
            "127.0.0.1",
            "127.3.4.5",
            "::1",
            "[::1]",
            "localhost",
            "a.localhost",
        ] {
            assert!(
                resolved(&s, host, 1, &[("HTTPS_PROXY", "p:1")]).is_none(),
                "{host}"
            );
        }
        assert!(resolved(&s, "10.0.0.1", 1, &[("HTTPS_PROXY", "p:1")]).is_some());
    }

    #[test]
    fn proxy_urls() {
        let p = parse_proxy_url("http://proxy.example:3128").expect("parse");
        assert_eq!(p, ProxyConfig::new("proxy.example", 3128));
        assert_eq!(parse_proxy_url("proxy.example").expect("parse").port, 80);
        assert_eq!(
            parse_proxy_url("HTTP://[::1]:8080/").expect("parse").host,
            "::1"
        );
        let p = parse_proxy_url("http://only-user@p:1").expect("parse");
        assert_eq!(p.username.as_deref(), Some("only-user"));
        assert_eq!(p.password, None);
        let e = parse_proxy_url("https://proxy:443").expect_err("https");
        assert!(e.contains("https://") && e.contains("http://"), "{e}");
        let e = parse_proxy_url("socks5://proxy:1080").expect_err("socks");
        assert!(e.contains("socks5"), "{e}");
        assert!(parse_proxy_url("http://").is_err());
        assert!(parse_proxy_url("http://p:0").is_err());
        assert!(parse_proxy_url("http://u:%zz@p:1").is_err());

        // An unusable variable is an error naming it, without the password.
        let e = ProxySetting::FromEnvironment
            .resolve_with(
                "octopus.example",
                443,
                env(&[("HTTPS_PROXY", "https://user:hunter2@proxy:443")]),
            )
            .expect_err("https proxy refused")
            .to_string();
        assert!(
            e.contains("HTTPS_PROXY") && e.contains("user:***@proxy"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_password_is_never_printed() {
        let p = ProxyConfig::new("proxy", 3128).with_credentials("user", "hunter2");
        let debug = format!("{p:?} {:?}", ProxySetting::Explicit(p.clone()));
        let display = format!("{p} {}", ProxySetting::Explicit(p.clone()));
        for s in [&debug, &display] {
            assert!(!s.contains("hunter2"), "{s}");
            assert!(s.contains("user"), "{s}");
        }
        assert!(display.contains("http://user@proxy:3128"), "{display}");
        let auth = p.authorization().expect("header");
        assert!(auth.is_sensitive());
        assert_eq!(auth, "Basic dXNlcjpodW50ZXIy");
        assert_eq!(redact_url("http://u:pw@h:1/x"), "http://u:***@h:1/x");
        assert_eq!(redact_url("u:pw@h:1"), "u:***@h:1");
    }

    #[test]
    fn authorities() {
        assert_eq!(authority("::1", 5), "[::1]:5");
        assert_eq!(authority("h", 5), "h:5");
        assert_eq!(ProxyConfig::new("::1", 3128).address(), "[::1]:3128");
    }
}
