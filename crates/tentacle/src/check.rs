//! `tentacle check-connectivity`: walk each configured path of an instance step
//! by step, say which step fails and what fixes it.
//!
//! A polling server: `proxy` (which route the setting and HTTPS_PROXY/NO_PROXY
//! choose), `dns` (of the proxy, or of the server when dialled directly), `tcp`,
//! `proxy-connect` (the proxy's answer to CONNECT), `tls` (the server presents a
//! thumbprint this instance trusts), `accepted` (the server trusts ours: with
//! TLS 1.3 a refusal arrives only after the handshake, as an alert instead of
//! the server's first HTTP/2 bytes), and `session`: this command serves the
//! session contract on the connection, as the agent does, and waits for the
//! server to call `Session/Hello`, the server's first RPC on every polling
//! connection. It answers with a subscription id of its own
//! (`check-connectivity-...`), so the server never routes real work to it, and
//! closes once answered.
//!
//! A listening port: `trust` (which servers may call), `listen` (the address
//! and port can be bound, or are bound already), `agent` (when bound: a TLS
//! handshake *without* a client certificate, as a browser would, so the agent
//! logs nothing alarming, proves that this instance's certificate answers).
//!
//! A `wss://` server: `proxy`, `dns`, `tcp`, `proxy-connect`, `tls` as above
//! (ALPN http/1.1), then `websocket`: the upgrade request with the subprotocol;
//! an answer (101 naming the subprotocol) proves the server trusts our
//! certificate. The session inside the WebSocket is not exercised. An entry's
//! `connect_to` (SNI routing) is what is resolved and dialled; the address's
//! host stays the TLS name.
//!
//! Every network step is bounded by `--timeout`. Exit code 0 when every path
//! passes, 1 otherwise. `--format json` prints one object:
//! `{"instance", "thumbprint", "ok", "paths": [{"kind", "target", "ok",
//! "steps": [{"name", "ok", "detail", "fix", "elapsed_ms"}]}]}` (`fix` is null
//! for a step that passed; a failed step ends its path).

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use octo_agent::config::TentacleConfig;
use octo_comms::proxy::{self, ProxySetting, ProxySource, ResolvedProxy};
use octo_comms::websocket::{self, WebSocketUrl};
use octo_comms::{net, ProxyError};
use octo_proto::v1::session_server::{Session, SessionServer};
use octo_proto::v1::{HelloReply, HelloRequest};
use octo_tls::{Identity, Role, Thumbprint, TlsSettings, TrustStore, UntrustedPeer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::{load_identity, Format, Target};

/// Options of `check-connectivity`.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  tentacle check-connectivity --instance Web\n  tentacle check-connectivity --instance Web --format json\n\nExit code 0 when every path passes, 1 otherwise."
)]
pub(crate) struct CheckArgs {
    /// Text for people, or one JSON object for programs.
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Seconds allowed for each network step.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    timeout: u64,
}

/// One step of a path.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    /// "dns", "tcp", "tls", ...
    name: &'static str,
    /// Whether it passed.
    ok: bool,
    /// What happened.
    detail: String,
    /// What to do about a failure.
    fix: Option<String>,
    /// How long it took.
    elapsed_ms: u64,
}

/// One configured path.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PathReport {
    /// "polling", "listening" or "instance" (the instance itself cannot be used).
    kind: &'static str,
    /// What the path is: the server's address, the listening address.
    target: String,
    /// Whether every step passed.
    ok: bool,
    /// The steps run, in order; a failed step ends the path.
    steps: Vec<Step>,
}

/// Everything `check-connectivity` found.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The instance checked.
    instance: String,
    /// Its certificate's thumbprint (null without a certificate).
    thumbprint: Option<String>,
    /// Whether every path passed.
    ok: bool,
    /// Every configured path: polling servers, then the listening port.
    paths: Vec<PathReport>,
}

/// Collects the steps of one path; a failed step ends it.
struct Walk {
    report: PathReport,
}

/// A step's outcome: detail, or detail and fix.
type Outcome<T> = Result<(T, String), (String, Option<String>)>;

impl Walk {
    fn new(kind: &'static str, target: String) -> Self {
        Self {
            report: PathReport {
                kind,
                target,
                ok: true,
                steps: Vec::new(),
            },
        }
    }

    /// Runs a step, records it; None when it failed (the path ends).
    async fn step<T>(
        &mut self,
        name: &'static str,
        f: impl std::future::Future<Output = Outcome<T>>,
    ) -> Option<T> {
        let started = Instant::now();
        let outcome = f.await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match outcome {
            Ok((value, detail)) => {
                self.report.steps.push(Step {
                    name,
                    ok: true,
                    detail,
                    fix: None,
                    elapsed_ms,
                });
                Some(value)
            }
            Err((detail, fix)) => {
                self.report.ok = false;
                self.report.steps.push(Step {
                    name,
                    ok: false,
                    detail,
                    fix,
                    elapsed_ms,
                });
                None
            }
        }
    }

    fn done(self) -> PathReport {
        self.report
    }
}

/// `tentacle check-connectivity`.
pub(crate) fn run(target: &Target, args: &CheckArgs) -> anyhow::Result<()> {
    let report = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(check(target, Duration::from_secs(args.timeout.max(1))))?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print!("{}", render(&report)),
    }
    if !report.ok {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

/// Runs every check of the instance.
pub(crate) async fn check(target: &Target, timeout: Duration) -> anyhow::Result<Report> {
    let cfg = target.load()?;
    let name = target.name.clone();
    let mut paths = Vec::new();
    let identity = match load_identity(&cfg) {
        Ok(i) => Some(i),
        Err(e) => {
            paths.push(PathReport {
                kind: "instance",
                target: name.clone(),
                ok: false,
                steps: vec![Step {
                    name: "certificate",
                    ok: false,
                    detail: format!("{e:#}"),
                    fix: Some(format!(
                        "create one: `tentacle new-certificate --instance {name}`"
                    )),
                    elapsed_ms: 0,
                }],
            });
            None
        }
    };
    if !cfg.listen.enabled && cfg.polling_servers.is_empty() {
        paths.push(PathReport {
            kind: "instance",
            target: name.clone(),
            ok: false,
            steps: vec![Step {
                name: "paths",
                ok: false,
                detail: "this instance neither listens nor polls a server: there is no path to check".into(),
                fix: Some(format!("listen: `tentacle configure --instance {name} --listen`; or poll: `tentacle register-with --instance {name} --comms-style TentacleActive ...` (or `tentacle poll-server`)")),
                elapsed_ms: 0,
            }],
        });
    }
    if let Some(identity) = &identity {
        let ctx = Ctx {
            instance: name.clone(),
            identity: identity.clone(),
            cfg: cfg.clone(),
            timeout,
        };
        for server in &cfg.polling_servers {
            paths.push(ctx.polling(server).await);
        }
        if cfg.listen.enabled {
            paths.push(ctx.listening().await);
        }
    }
    Ok(Report {
        instance: name,
        thumbprint: identity.map(|i| i.thumbprint().to_string()),
        ok: paths.iter().all(|p| p.ok),
        paths,
    })
}

/// The text report.
pub(crate) fn render(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Instance '{}'{}",
        report.instance,
        report
            .thumbprint
            .as_deref()
            .map(|t| format!(" (thumbprint {t})"))
            .unwrap_or_default()
    );
    for p in &report.paths {
        let what = match p.kind {
            "polling" => "Polling server",
            "listening" => "Listening on",
            _ => "Instance",
        };
        let _ = writeln!(s, "\n{what} {}", p.target);
        for step in &p.steps {
            let _ = writeln!(
                s,
                "  {:<6}  {:<13} {:>7}  {}",
                if step.ok { "ok" } else { "FAILED" },
                step.name,
                format!("{} ms", step.elapsed_ms),
                step.detail
            );
            if let Some(fix) = &step.fix {
                let _ = writeln!(s, "          fix: {fix}");
            }
        }
    }
    let failed = report.paths.iter().filter(|p| !p.ok).count();
    let _ = writeln!(s);
    if failed == 0 {
        let _ = writeln!(s, "All {} path(s) ok.", report.paths.len());
    } else {
        let _ = writeln!(s, "{failed} of {} path(s) FAILED.", report.paths.len());
    }
    s
}

/// What every check of one instance shares.
struct Ctx {
    instance: String,
    identity: Identity,
    cfg: TentacleConfig,
    timeout: Duration,
}

/// A duration for messages ("10 s").
fn elapsed_fmt(d: Duration) -> String {
    format!("{} s", d.as_secs_f32())
}

impl Ctx {
    /// The trust store the agent uses: every configured server thumbprint.
    fn trust(&self) -> TrustStore {
        let name = self.instance.clone();
        TrustStore::new(
            self.cfg.trusted_thumbprints(),
            Arc::new(move |t: &Thumbprint| {
                format!("trust it with `tentacle configure --instance {name} --trust {t}`")
            }),
        )
    }

    async fn polling(&self, server: &octo_agent::config::PollingServer) -> PathReport {
        let address = server.address.clone();
        let mut walk = Walk::new("polling", address.clone());
        let (host, port, ws_path) = match polling_destination(&address) {
            Ok(d) => d,
            Err(why) => {
                walk.step("address", async {
                Err::<((), String), _>((
                    why,
                    Some(format!(
                        "fix it: `tentacle poll-server --instance {} --server-comms-address HOST:PORT --server-thumbprint ...`",
                        self.instance
                    )),
                ))
            })
            .await;
                return walk.done();
            }
        };
        let setting = self.cfg.polling_proxy_setting();
        // Where the connection goes: the address's host and port, or the
        // entry's `connect_to` (SNI routing: the host stays the TLS name).
        let (to_host, to_port) = connect_to(server).unwrap_or_else(|| (host.clone(), port));

        // proxy: which route.
        let Some(route) = walk
            .step("proxy", self.route(&setting, &to_host, to_port))
            .await
        else {
            return walk.done();
        };
        let (dial_host, dial_port) = match &route {
            Some(p) => (p.config.host.clone(), p.config.port),
            None => (to_host.clone(), to_port),
        };
        let what = if route.is_some() { "proxy" } else { "server" };
        let Some(addrs) = walk
            .step("dns", self.dns(&dial_host, dial_port, what, route.as_ref()))
            .await
        else {
            return walk.done();
        };
        let Some(tcp) = walk
            .step(
                "tcp",
                self.tcp(&addrs, &dial_host, dial_port, route.as_ref()),
            )
            .await
        else {
            return walk.done();
        };
        match &route {
            None => {
                self.tls_and_session(&mut walk, tcp, &host, server, ws_path.as_deref())
                    .await;
            }
            Some(proxy) => {
                // The tcp step reached the proxy; CONNECT on a connection of its own.
                drop(tcp);
                let Some(tunnel) = walk
                    .step("proxy-connect", self.connect(proxy, &to_host, to_port))
                    .await
                else {
                    return walk.done();
                };
                self.tls_and_session(&mut walk, tunnel, &host, server, ws_path.as_deref())
                    .await;
            }
        }
        walk.done()
    }

    /// Which proxy (if any) the agent would use for `host:port`.
    async fn route(
        &self,
        setting: &ProxySetting,
        host: &str,
        port: u16,
    ) -> Outcome<Option<ResolvedProxy>> {
        let env_set = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .find(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
        match setting.resolve(host, port) {
            Ok(Some(p)) => {
                let from = match p.source {
                    ProxySource::Explicit => "set with `tentacle polling-proxy`".to_string(),
                    ProxySource::Environment(var) => format!("from the {var} environment variable"),
                };
                let detail = format!("through the HTTP proxy {} ({from})", p.config);
                Ok((Some(p), detail))
            }
            Ok(None) => {
                let detail = match (setting, env_set) {
                    (ProxySetting::Direct, _) => {
                        "direct (`tentacle polling-proxy --proxy-enable false`: proxy environment variables ignored)".to_string()
                    }
                    (_, Some(var)) => format!(
                        "direct ({var} is set, but NO_PROXY or a loopback destination excludes {host})"
                    ),
                    _ => "direct (no proxy configured, HTTPS_PROXY not set)".to_string(),
                };
                Ok((None, detail))
            }
            Err(e) => Err((
                e.to_string(),
                Some(format!(
                    "fix the variable, or set the proxy explicitly: `tentacle polling-proxy --instance {} --proxy-enable true --proxy-host HOST --proxy-port PORT`",
                    self.instance
                )),
            )),
        }
    }

    async fn dns(
        &self,
        host: &str,
        port: u16,
        what: &str,
        proxy: Option<&ResolvedProxy>,
    ) -> Outcome<Vec<SocketAddr>> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
            let mut detail = format!("{bare} is an IP address: nothing to resolve");
            if proxy.is_some() {
                detail.push_str(" (the proxy resolves the server's name)");
            }
            return Ok((vec![SocketAddr::new(ip, port)], detail));
        }
        let lookup = tokio::time::timeout(self.timeout, tokio::net::lookup_host((bare, port)));
        let fix = match proxy {
            Some(p) => format!(
                "check the proxy's host name '{bare}' ({}) and this machine's DNS settings (/etc/resolv.conf)",
                source_hint(p)
            ),
            None => format!(
                "check the spelling of '{bare}' and this machine's DNS settings (/etc/resolv.conf); or poll the server by IP address: `tentacle poll-server --instance {} --server-comms-address IP:PORT --server-thumbprint ...`",
                self.instance
            ),
        };
        match lookup.await {
            Err(_) => Err((
                format!(
                    "resolving the {what}'s name '{bare}' took longer than {}",
                    elapsed_fmt(self.timeout)
                ),
                Some(fix),
            )),
            Ok(Err(e)) => Err((
                format!("cannot resolve the {what}'s name '{bare}': {e}"),
                Some(fix),
            )),
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    return Err((format!("'{bare}' resolves to no address"), Some(fix)));
                }
                let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                let mut detail = format!("{bare} -> {}", list.join(", "));
                if proxy.is_some() {
                    detail.push_str(" (the proxy resolves the server's name)");
                }
                Ok((addrs, detail))
            }
        }
    }

    async fn tcp(
        &self,
        addrs: &[SocketAddr],
        host: &str,
        port: u16,
        proxy: Option<&ResolvedProxy>,
    ) -> Outcome<TcpStream> {
        let mut last: Option<(SocketAddr, Result<io::Error, ()>)> = None;
        for addr in addrs {
            match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = net::tune(&s);
                    let what = if proxy.is_some() { "the proxy " } else { "" };
                    return Ok((
                        s,
                        format!("connected to {what}{}", with_addr(host, port, *addr)),
                    ));
                }
                Ok(Err(e)) => last = Some((*addr, Ok(e))),
                Err(_) => last = Some((*addr, Err(()))),
            }
        }
        let Some((addr, err)) = last else {
            return Err(("no address to connect to".into(), None));
        };
        let target = format!("{host}:{port}");
        let fix_for = |kind: &str| -> String {
            match (proxy, kind) {
                (Some(p), "refused") => format!(
                    "nothing listens on the proxy's address {target}: is the proxy running, and are its host and port right ({})?",
                    source_hint(p)
                ),
                (Some(p), _) => format!(
                    "no answer from the proxy {target}: a firewall drops the packets, or the proxy's address is wrong ({})",
                    source_hint(p)
                ),
                (None, "refused") => format!(
                    "nothing listens on {target}: is the server running, is its comms (polling) port {port}, is a firewall in the way (open port {port} on the server's firewall)?"
                ),
                (None, "unreachable") => format!(
                    "this machine has no route to {host}: check its network, default gateway or VPN"
                ),
                (None, _) => format!(
                    "no answer: a firewall drops the packets (open port {port} on the server's firewall and on any firewall between), or {host} is not the server's address"
                ),
            }
        };
        match err {
            Err(()) => Err((
                format!(
                    "no answer from {} within {}: connection timed out",
                    with_addr(host, port, addr),
                    elapsed_fmt(self.timeout)
                ),
                Some(fix_for("timeout")),
            )),
            Ok(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::ConnectionRefused => "refused",
                    io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                        "unreachable"
                    }
                    io::ErrorKind::TimedOut => "timeout",
                    _ => "other",
                };
                let at = with_addr(host, port, addr);
                let detail = match kind {
                    "refused" => format!("connection refused by {at}"),
                    _ => format!("cannot connect to {at}: {e}"),
                };
                Err((detail, Some(fix_for(kind))))
            }
        }
    }

    /// CONNECT through the proxy; the tunnel is the stream TLS runs on.
    async fn connect(
        &self,
        proxy: &ResolvedProxy,
        host: &str,
        port: u16,
    ) -> Outcome<net::Prefixed<TcpStream>> {
        let setting = ProxySetting::Explicit(proxy.config.clone());
        match proxy::connect(&setting, host, port, self.timeout).await {
            Ok(d) => Ok((
                d.stream,
                format!(
                    "the proxy {} opened a tunnel to {host}:{port} (200)",
                    proxy.config.address()
                ),
            )),
            Err(e) => {
                let fix = match &e {
                    ProxyError::Authentication { .. } => Some(match proxy.source {
                        ProxySource::Explicit => format!(
                            "the proxy refused the user name or password: set the right ones with `tentacle polling-proxy --instance {} --proxy-enable true --proxy-host {} --proxy-port {} --proxy-username USER --proxy-password PASSWORD`",
                            self.instance, proxy.config.host, proxy.config.port
                        ),
                        ProxySource::Environment(var) => format!(
                            "the proxy refused the user name or password: fix them in {var} (http://USER:PASSWORD@HOST:PORT)"
                        ),
                    }),
                    ProxyError::Forbidden { .. } => Some(format!(
                        "ask the proxy's administrator to allow CONNECT to port {port}"
                    )),
                    ProxyError::TargetUnreachable { .. } => Some(format!(
                        "the proxy cannot reach {host}:{port}: is the server running and its comms port {port} open to the proxy?"
                    )),
                    _ => Some(format!(
                        "check the proxy ({})",
                        source_hint(proxy)
                    )),
                };
                Err((e.to_string(), fix))
            }
        }
    }

    /// tls, accepted and session, on a stream to the server.
    async fn tls_and_session<IO>(
        &self,
        walk: &mut Walk,
        io: IO,
        host: &str,
        server: &octo_agent::config::PollingServer,
        ws_path: Option<&str>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (address, expected) = (server.address.as_str(), server.thumbprint.as_str());
        let name = &self.instance;
        let ours = self.identity.thumbprint();
        let flag = match ws_path {
            Some(_) => "--server-web-socket",
            None => "--server-comms-address",
        };
        let register_fix = format!(
            "the server does not trust this tentacle: register it (`tentacle register-with --instance {name} --server http://SERVER:8080 --api-key API-... --comms-style TentacleActive {flag} {address} ...`), or add thumbprint {ours} to its machine on the server (subscription poll://{}/)",
            server.subscription_id
        );
        let refused = || {
            (
                format!("the server refused this tentacle's certificate (thumbprint {ours})"),
                Some(register_fix.clone()),
            )
        };
        let tls = walk
            .step("tls", async {
                // A WebSocket starts with HTTP/1.1; TCP polling with HTTP/2.
                let settings = match ws_path {
                    Some(_) => TlsSettings {
                        alpn: vec![b"http/1.1".to_vec()],
                    },
                    None => TlsSettings::default(),
                };
                let cfg = octo_tls::client_config(&self.identity, self.trust(), Role::Server, &settings)
                .map_err(|e| (format!("TLS configuration: {e}"), None))?;
                let server_name = net::server_name(host).map_err(|e| (e, None))?;
                let connect = TlsConnector::from(cfg).connect(server_name, io);
                match tokio::time::timeout(self.timeout, connect).await {
                    Err(_) => Err((
                        format!("no TLS answer from {address} within {}", elapsed_fmt(self.timeout)),
                        Some(format!("something accepted the connection but does not speak TLS: is {address} the server's comms (polling) port, not its web port? A proxy or load balancer in between must pass TLS through untouched")),
                    )),
                    Ok(Err(e)) => {
                        if let Some(u) = UntrustedPeer::find(&e) {
                            let presented = u.presented;
                            let expected_list: Vec<String> =
                                u.expected.iter().map(ToString::to_string).collect();
                            Err((
                                format!(
                                    "the server presented thumbprint {presented} but {} is expected",
                                    match expected_list.as_slice() {
                                        [one] => one.clone(),
                                        [] => "nothing".into(),
                                        many => format!("one of {}", many.join(", ")),
                                    }
                                ),
                                Some(format!(
                                    "if {presented} is your server's thumbprint (`octopus server show-thumbprint` on the server), trust it: `tentacle poll-server --instance {name} {flag} {address} --server-thumbprint {presented}` (or `tentacle configure --instance {name} --trust {presented}`); if not, something else answers at {address} (another server, or a proxy that intercepts TLS)"
                                )),
                            ))
                        } else if octo_tls::rejected_by_peer(&e) {
                            Err(refused())
                        } else {
                            Err((
                                format!("TLS handshake with {address} failed: {e}"),
                                Some(format!("is {address} the server's comms (polling) port (default 10943), not its web port? A proxy or load balancer in between must pass TLS through untouched")),
                            ))
                        }
                    }
                    Ok(Ok(tls)) => {
                        let presented = octo_tls::peer_thumbprint(tls.get_ref().1)
                            .map(|t| t.to_string())
                            .unwrap_or_default();
                        let pinned = if presented == expected {
                            "the thumbprint configured for this server".to_string()
                        } else {
                            "trusted by this instance".to_string()
                        };
                        Ok((tls, format!("the server presented thumbprint {presented} ({pinned})")))
                    }
                }
            })
            .await;
        let Some(tls) = tls else { return };
        if let Some(path) = ws_path {
            walk.step("websocket", async {
                match self.upgrade(tls, host, path).await {
                    Err(e) if octo_tls::rejected_by_peer(&e) => Err(refused()),
                    Err(e) => Err((
                        format!("the WebSocket upgrade at {address} failed: {e}"),
                        None,
                    )),
                    Ok(head) => websocket_answer(&head, address),
                }
            })
            .await;
            return;
        }

        // The server speaks first (HTTP/2 preface) once it accepted our
        // certificate; a refusal arrives instead as a TLS alert.
        let first = walk
            .step("accepted", async {
                let mut tls = tls;
                let mut buf = vec![0u8; 4096];
                match tokio::time::timeout(self.timeout, tls.read(&mut buf)).await {
                    Err(_) => Err((
                        format!(
                            "the server sent nothing within {} after TLS",
                            elapsed_fmt(self.timeout)
                        ),
                        Some(format!("is {address} an Octopus server's polling port?")),
                    )),
                    Ok(Err(e)) if octo_tls::rejected_by_peer(&e) => Err(refused()),
                    Ok(Err(e)) => {
                        Err((format!("the connection failed right after TLS: {e}"), None))
                    }
                    Ok(Ok(0)) => Err((
                        "the server closed the connection right after TLS".into(),
                        Some(register_fix.clone()),
                    )),
                    Ok(Ok(n)) => {
                        buf.truncate(n);
                        Ok((
                            net::Prefixed::new(buf, tls),
                            format!(
                                "the server trusts this tentacle's certificate (thumbprint {ours})"
                            ),
                        ))
                    }
                }
            })
            .await;
        let Some(io) = first else { return };
        walk.step(
            "session",
            self.session(io, address, &server.subscription_id),
        )
        .await;
    }

    /// Asks for the WebSocket upgrade; returns the answer's head (status line
    /// and headers). The server answering at all means it accepted our
    /// certificate (a refusal is a TLS alert instead).
    async fn upgrade<IO>(&self, mut tls: IO, host: &str, path: &str) -> io::Result<String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {}\r\nUser-Agent: tentacle-check-connectivity/{}\r\n\r\n",
            websocket::SUBPROTOCOL,
            octo_agent::version()
        );
        let exchange = async {
            tls.write_all(request.as_bytes()).await?;
            tls.flush().await?;
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                let n = tls.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok(String::from_utf8_lossy(&head).into_owned())
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", elapsed_fmt(self.timeout)),
            )),
        }
    }

    /// Serves `Session/Hello` on the connection until the server calls it.
    async fn session<IO>(&self, io: IO, address: &str, subscription: &str) -> Outcome<()>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let probe = Probe {
            called: Mutex::new(Some(tx)),
            reply: HelloReply {
                protocol_version: octo_proto::PROTOCOL_VERSION,
                subscription_id: format!("check-connectivity-{}", crate::new_subscription_id()),
                thumbprint: self.identity.thumbprint().to_string(),
                instance_name: format!("{} (check-connectivity)", self.instance),
                tentacle_version: octo_agent::version().to_string(),
            },
        };
        let server = SessionServer::new(probe);
        let svc = hyper::service::service_fn(move |req| {
            let mut s = server.clone();
            async move { tonic::codegen::Service::call(&mut s, req).await }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let called = tokio::select! {
            v = rx => v.ok(),
            r = conn.as_mut() => {
                let why = match r {
                    Ok(()) => "the server closed the connection".to_string(),
                    Err(e) if is_rejection(&e) => "the server refused this tentacle's certificate".to_string(),
                    Err(e) => format!("the connection failed: {e}"),
                };
                return Err((
                    format!("{why} before calling Session/Hello"),
                    Some("see the server's log for why it dropped the connection".into()),
                ));
            }
            _ = deadline.as_mut() => None,
        };
        let Some(version) = called else {
            return Err((
                format!(
                    "the server did not call Session/Hello within {}",
                    elapsed_fmt(self.timeout)
                ),
                Some(format!(
                    "{address} accepted TLS but does not act like an Octopus server's polling port; check the address"
                )),
            ));
        };
        // Let the answer go out, then close.
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.as_mut()).await;
        Ok((
            (),
            format!(
                "the server called Session/Hello (protocol {version}) and got this tentacle's answer: it accepts polling connections from this tentacle (the agent serves poll://{subscription}/; `octopus machine list` on the server shows whether a machine uses it)"
            ),
        ))
    }

    async fn listening(&self) -> PathReport {
        let l = &self.cfg.listen;
        let name = &self.instance;
        let address = net_authority(&l.address, l.port);
        let mut walk = Walk::new("listening", address.clone());
        let trusted = self.cfg.trusted_thumbprints();
        let ok = walk
            .step("trust", async {
                if trusted.is_empty() {
                    return Err((
                        "no server is trusted: every server that dials this tentacle is refused".to_string(),
                        Some(format!(
                            "trust your server: `tentacle configure --instance {name} --trust THUMBPRINT` (the server prints it with `octopus server show-thumbprint`), or register: `tentacle register-with --instance {name} ...`"
                        )),
                    ));
                }
                let list: Vec<String> = trusted.iter().map(ToString::to_string).collect();
                Ok(((), format!("trusted server thumbprint(s): {}", list.join(", "))))
            })
            .await;
        if ok.is_none() {
            return walk.done();
        }
        let in_use = walk
            .step("listen", async {
                match std::net::TcpListener::bind((l.address.as_str(), l.port)) {
                    Ok(listener) => {
                        let port = listener.local_addr().map_or(l.port, |a| a.port());
                        let mut detail = if l.port == 0 {
                            format!("port 0: the agent picks a free port on {} at each start", l.address)
                        } else {
                            format!("{address} is free: the agent can listen there (it is not running now; start it with `tentacle run --instance {name}` or `tentacle service --instance {name} --start`)")
                        };
                        if port != l.port && l.port != 0 {
                            detail.push_str(&format!(" (bound port {port})"));
                        }
                        Ok((false, detail))
                    }
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        Ok((true, format!("{address} is in use (by the agent, if the next step passes)")))
                    }
                    Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Err((
                        format!("cannot listen on {address}: {} is not an address of this machine", l.address),
                        Some(format!("listen on one of this machine's addresses (or 0.0.0.0 for all): `tentacle configure --instance {name} --listen-ip 0.0.0.0`")),
                    )),
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err((
                        format!("cannot listen on {address}: {e}"),
                        Some(format!("ports below 1024 need root: `tentacle configure --instance {name} --port 10933`")),
                    )),
                    Err(e) => Err((format!("cannot listen on {address}: {e}"), None)),
                }
            })
            .await;
        if in_use == Some(true) {
            walk.step("agent", self.probe_listener()).await;
        }
        walk.done()
    }

    /// Connects to our own listening port without a client certificate (as a
    /// browser would) and checks that this instance's certificate answers.
    async fn probe_listener(&self) -> Outcome<()> {
        let l = &self.cfg.listen;
        let name = &self.instance;
        let host = match l.address.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" | "[::]" => "::1".to_string(),
            other => other.to_string(),
        };
        let address = net_authority(&host, l.port);
        let ours = self.identity.thumbprint();
        let other_fix = format!(
            "another program listens on {address}: stop it, or move this instance to another port: `tentacle configure --instance {name} --port N`"
        );
        let tcp = match tokio::time::timeout(self.timeout, TcpStream::connect(&address)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err((format!("cannot connect to {address}: {e}"), None)),
            Err(_) => {
                return Err((
                    format!(
                        "{address} did not accept a connection within {}",
                        elapsed_fmt(self.timeout)
                    ),
                    None,
                ))
            }
        };
        let cfg = octo_tls::client_config(
            &self.identity,
            TrustStore::pinned(ours, Arc::new(|_: &Thumbprint| String::new())),
            Role::Tentacle,
            &TlsSettings::default(),
        )
        .map_err(|e| (format!("TLS configuration: {e}"), None))?;
        let mut cfg = (*cfg).clone();
        cfg.client_auth_cert_resolver = Arc::new(NoClientCertificate);
        let server_name = net::server_name(&host).map_err(|e| (e, None))?;
        let connect = TlsConnector::from(Arc::new(cfg)).connect(server_name, tcp);
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(_)) => Ok((
                (),
                format!(
                    "this instance's agent listens on {address} (it presented this instance's thumbprint {ours}); whether a server can reach it depends on the network between them: run a health check on the server (`octopus health-check --machine NAME`)"
                ),
            )),
            Ok(Err(e)) => match UntrustedPeer::find(&e) {
                Some(u) => Err((
                    format!(
                        "{address} is held by another tentacle: it presented thumbprint {}, not this instance's {ours}",
                        u.presented
                    ),
                    Some(other_fix),
                )),
                None => Err((
                    format!("{address} is held by another program (not a tentacle: {e})"),
                    Some(other_fix),
                )),
            },
            Err(_) => Err((
                format!("{address} accepted a connection but did not complete TLS within {}", elapsed_fmt(self.timeout)),
                Some(other_fix),
            )),
        }
    }
}

/// The `connect_to` "host:port" of a polling entry, if it has one.
fn connect_to(server: &octo_agent::config::PollingServer) -> Option<(String, u16)> {
    let (host, port) = net::split_host_port(server.connect_to.as_deref()?)?;
    Some((host.to_string(), port))
}

/// Where a polling server is reached: host, port, and the WebSocket path for
/// `wss://HOST[:PORT][/PATH]` addresses.
fn polling_destination(address: &str) -> Result<(String, u16, Option<String>), String> {
    if websocket::is_web_socket_url(address) {
        let url = WebSocketUrl::parse(address)?;
        return Ok((url.host, url.port, Some(url.path)));
    }
    let (host, port) = net::split_host_port(address)
        .ok_or_else(|| format!("'{address}' is not HOST:PORT (or wss://HOST[:PORT]/PATH)"))?;
    Ok((host.to_string(), port, None))
}

/// Judges the answer to the WebSocket upgrade.
fn websocket_answer(head: &str, address: &str) -> Outcome<()> {
    let protocol = websocket::SUBPROTOCOL;
    let status_line = head.lines().next().unwrap_or_default().trim().to_string();
    if status_line.is_empty() {
        return Err((
            format!("{address} closed the connection without answering the WebSocket upgrade"),
            Some("the server may have refused this tentacle's certificate: register it (`tentacle register-with ...`)".into()),
        ));
    }
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    let protocol_ok = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-protocol") && v.trim() == protocol
        })
    });
    match code {
        "101" if protocol_ok => Ok((
            (),
            format!("the server trusts this tentacle's certificate and accepted the WebSocket ({protocol}); the session over it is not exercised by this check"),
        )),
        "101" => Err((
            format!("{address} accepted the WebSocket but not the subprotocol {protocol} ({status_line})"),
            Some("something other than an Octopus server answers there: check the URL, and that a reverse proxy passes the connection through".into()),
        )),
        _ => Err((
            format!("{address} answered the WebSocket upgrade with '{status_line}'"),
            Some(format!("check the URL's path (the server accepts polling WebSockets at {} by default) and that a reverse proxy in between passes WebSocket upgrades through", websocket::DEFAULT_PATH)),
        )),
    }
}

/// "host:port", with the address it resolved to when that says more.
fn with_addr(host: &str, port: u16, addr: SocketAddr) -> String {
    let target = net_authority(host.trim_start_matches('[').trim_end_matches(']'), port);
    if target == addr.to_string() {
        target
    } else {
        format!("{target} ({addr})")
    }
}

/// "host:port" with brackets around IPv6 addresses.
fn net_authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn source_hint(p: &ResolvedProxy) -> String {
    match p.source {
        ProxySource::Explicit => "see `tentacle polling-proxy --help`".into(),
        ProxySource::Environment(var) => format!("the {var} environment variable"),
    }
}

fn is_rejection(e: &hyper::Error) -> bool {
    octo_tls::rejected_by_peer(e)
}

/// Answers `Session/Hello` once and reports that it was called.
struct Probe {
    called: Mutex<Option<tokio::sync::oneshot::Sender<u32>>>,
    reply: HelloReply,
}

#[tonic::async_trait]
impl Session for Probe {
    async fn hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<HelloReply>, tonic::Status> {
        let version = request.get_ref().protocol_version;
        if let Some(tx) = self.called.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(version);
        }
        Ok(tonic::Response::new(self.reply.clone()))
    }
}

/// Presents no client certificate: the listening agent then treats the probe
/// like a browser (the friendly page), and logs no refusal.
#[derive(Debug)]
struct NoClientCertificate;

impl rustls::client::ResolvesClientCert for NoClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let d = |a: &str| polling_destination(a).ok();
        assert_eq!(
            d("octopus.example:10943"),
            Some(("octopus.example".into(), 10943, None))
        );
        assert_eq!(
            d("wss://octopus.example/tentacle"),
            Some(("octopus.example".into(), 443, Some("/tentacle".into())))
        );
        assert_eq!(
            d("wss://octopus.example:8443"),
            Some((
                "octopus.example".into(),
                8443,
                Some(websocket::DEFAULT_PATH.into())
            ))
        );
        assert_eq!(d("octopus.example"), None);
        assert!(polling_destination("wss:///x").is_err());
    }

    #[test]
    fn websocket_answers() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: octopus-tentacle.v1\r\n\r\n";
        assert!(websocket_answer(ok, "wss://h/").is_ok());
        let other = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let (detail, _) = websocket_answer(other, "wss://h/").expect_err("no subprotocol");
        assert!(detail.contains("subprotocol"), "{detail}");
        let (detail, fix) =
            websocket_answer("HTTP/1.1 404 Not Found\r\n\r\n", "wss://h/").expect_err("404");
        assert!(detail.contains("404 Not Found"), "{detail}");
        assert!(fix.unwrap_or_default().contains("/tentacle"));
        assert!(websocket_answer("", "wss://h/").is_err());
    }
}
