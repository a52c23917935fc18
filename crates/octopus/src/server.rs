//! `octopus server run`: the server process.
//!
//! Owns a data directory (locked, so a second server cannot share it) holding the
//! comms certificate, the SQLite database and the first admin API key. Serves the
//! REST API on `--listen` and accepts polling tentacles on the comms port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use octo_comms::{ServerComms, ServerCommsOptions};
use octo_store::{EndpointKind, MachineFilter, Store};
use octo_store_sqlite::SqliteStore;
use octo_tls::{Identity, Thumbprint, TrustStore};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Options of `octopus server run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Data directory: certificate, database, admin API key.
    #[arg(long, default_value = "octopus-data")]
    pub data: PathBuf,
    /// Address of the web API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Port polling tentacles connect to (0 picks a free port).
    #[arg(long, alias = "commsListenPort", default_value_t = 10943)]
    pub comms_listen_port: u16,
    /// Address the comms port binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub comms_listen_address: String,
    /// Database URL; default: SQLite in the data directory (sqlite://DATA/octopus.db).
    #[arg(long)]
    pub database_url: Option<String>,
    /// The deployment tool binary to push to tentacles (default: `calamari`
    /// beside this binary).
    #[arg(long, env = "OCTOPUS_CALAMARI")]
    pub calamari: Option<PathBuf>,
    /// HTTP CONNECT proxy for dialling listening tentacles,
    /// `http://[USER:PASSWORD@]HOST:PORT` (default: `HTTPS_PROXY`/`NO_PROXY` from the
    /// environment; TLS to the tentacle stays end to end through the tunnel).
    #[arg(long, value_name = "URL", conflicts_with = "no_proxy")]
    pub proxy: Option<String>,
    /// Dial listening tentacles directly, ignoring proxy environment variables.
    #[arg(long)]
    pub no_proxy: bool,
    /// Also accept polling tentacles over WebSocket (`wss://`) on this TLS port
    /// (0 picks a free port; default: off). Binds --comms-listen-address. The
    /// same port serves the REST API (`/api`) over TLS to clients without a
    /// certificate, so one port (e.g. 443) can serve both.
    #[arg(long, value_name = "PORT")]
    pub web_socket_listen_port: Option<u16>,
    /// The path WebSocket polling tentacles connect to (`tentacle poll-server
    /// --server-web-socket wss://HOST:PORT/PATH`).
    #[arg(long, value_name = "PATH", default_value = octo_comms::websocket::DEFAULT_PATH)]
    pub web_socket_path: String,
}

impl RunArgs {
    /// How listening tentacles are dialled.
    pub fn proxy_setting(&self) -> anyhow::Result<octo_comms::ProxySetting> {
        use octo_comms::ProxySetting;
        Ok(match (&self.proxy, self.no_proxy) {
            (_, true) => ProxySetting::Direct,
            (Some(url), false) => ProxySetting::Explicit(
                octo_comms::proxy::parse_proxy_url(url)
                    .map_err(|e| anyhow::anyhow!("--proxy {}: {e}", redact_url(url)))?,
            ),
            (None, false) => ProxySetting::FromEnvironment,
        })
    }
}

/// A proxy URL with any password replaced, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Default for RunArgs {
    /// The defaults of `octopus server run`.
    fn default() -> Self {
        RunArgs {
            data: PathBuf::from("octopus-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            comms_listen_port: 10943,
            comms_listen_address: "0.0.0.0".into(),
            database_url: None,
            calamari: None,
            proxy: None,
            no_proxy: false,
            web_socket_listen_port: None,
            web_socket_path: octo_comms::websocket::DEFAULT_PATH.into(),
        }
    }
}

/// Holds the data directory's lock for the life of the server.
#[derive(Debug)]
pub struct DataLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DataLock {
    fn acquire(data: &Path) -> anyhow::Result<Self> {
        let path = data.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                use std::io::{Seek, Write};
                let _ = lock.set_len(0);
                let _ = lock.seek(std::io::SeekFrom::Start(0));
                let _ = writeln!(lock, "{}", std::process::id());
                Ok(Self { _lock: lock })
            }
            Err((_, _)) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "another octopus server (pid {}) is using the data directory {}; stop it, or give this one another --data",
                    pid.trim(),
                    data.display()
                )
            }
        }
    }
}

pub(crate) fn cert_paths(data: &Path) -> (PathBuf, PathBuf) {
    (data.join("server.crt"), data.join("server.key"))
}

/// `octopus server show-thumbprint`.
pub fn show_thumbprint(data: &Path) -> anyhow::Result<()> {
    let (cert, key) = cert_paths(data);
    if !cert.exists() {
        bail!(
            "there is no server in {} yet; start it once with `octopus server run --data {}`",
            data.display(),
            data.display()
        );
    }
    let id = Identity::load(&cert, &key)?;
    println!("{}", id.thumbprint());
    Ok(())
}

/// SHA-256 (lower-case hex) of an API key: what the store keeps.
pub(crate) fn hash_api_key(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A new API key: "API-" and 32 random upper-case letters and digits.
pub(crate) fn new_api_key() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    let body: String = (0..32)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("API-{body}")
}

pub(crate) use octo_store::now_ms;

async fn open_store(args: &RunArgs) -> anyhow::Result<SqliteStore> {
    let path = match args.database_url.as_deref() {
        None => args.data.join("octopus.db"),
        Some(url) => match url.strip_prefix("sqlite://") {
            Some(p) => PathBuf::from(p),
            None => bail!(
                "--database-url '{url}' is not supported: this build stores data in SQLite (sqlite://PATH); PostgreSQL support is planned"
            ),
        },
    };
    SqliteStore::open(&path)
        .await
        .with_context(|| format!("opening the database {}", path.display()))
}

/// First start: an admin user and an API key, printed once and written 0600.
async fn bootstrap(store: &dyn Store, data: &Path) -> anyhow::Result<Option<String>> {
    if store.count_users().await? > 0 {
        return Ok(None);
    }
    let admin = store
        .create_user("admin", "Administrator", None, true)
        .await?;
    let key = new_api_key();
    store
        .create_api_key(
            admin.id,
            "admin (created at first start)",
            &hash_api_key(&key),
            &key[..8],
        )
        .await?;
    let path = data.join("admin-api-key");
    octo_agent::config::write_atomic(&path, format!("{key}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(key))
}

/// Thumbprints of polling machines: who may connect to the comms port.
pub(crate) async fn polling_thumbprints(store: &dyn Store) -> anyhow::Result<Vec<Thumbprint>> {
    Ok(store
        .list_machines(&MachineFilter::default())
        .await?
        .into_iter()
        .filter(|m| m.kind == EndpointKind::Polling)
        .filter_map(|m| m.thumbprint.parse().ok())
        .collect())
}

/// Shared by API handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub comms: ServerComms,
    pub polling_trust: TrustStore,
    pub thumbprint: Thumbprint,
    pub comms_port: u16,
    /// The TLS port for WebSocket polling (and the API over TLS), when on, and its path.
    pub web_socket: Option<(u16, String)>,
    /// The data directory (package files live under it).
    pub data: PathBuf,
    /// The deployment tool this server pushes, or why there is none.
    pub tool: Arc<Result<crate::tool::ToolBuild, String>>,
    /// Runs tasks (health checks, scripts) and tells live log readers of changes.
    pub engine: Arc<crate::tasks::Engine>,
}

impl AppState {
    /// Re-reads which polling tentacles may connect (after machines change).
    pub(crate) async fn refresh_polling_trust(&self) -> anyhow::Result<()> {
        self.polling_trust
            .replace(polling_thumbprints(self.store.as_ref()).await?);
        Ok(())
    }
}

/// A started server.
#[derive(Debug)]
pub struct RunningServer {
    /// Where the API listens.
    pub api_addr: SocketAddr,
    /// The polling port.
    pub comms_port: u16,
    /// The WebSocket polling port (TLS), when enabled.
    pub web_socket_port: Option<u16>,
    /// The comms thumbprint tentacles must trust.
    pub thumbprint: Thumbprint,
    /// The first admin API key, when this start created it.
    pub admin_api_key: Option<String>,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    _lock: DataLock,
}

impl RunningServer {
    /// Stops accepting, closes connections, waits (bounded) for tasks to end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// Starts a server and returns once it listens.
pub async fn start(args: &RunArgs) -> anyhow::Result<RunningServer> {
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating the data directory {}", args.data.display()))?;
    let lock = DataLock::acquire(&args.data)?;
    let (cert, key) = cert_paths(&args.data);
    let identity = if cert.exists() {
        Identity::load(&cert, &key)?
    } else {
        let id = Identity::generate("Octopus Server")?;
        id.save(&cert, &key)?;
        id
    };
    let store = open_store(args).await?;
    let admin_api_key = bootstrap(&store, &args.data).await?;
    let store: Arc<dyn Store> = Arc::new(store);

    let polling_trust = TrustStore::new(
        polling_thumbprints(store.as_ref()).await?,
        Arc::new(|t: &Thumbprint| {
            format!("register the tentacle (`tentacle register-with --comms-style TentacleActive ...`) so the server knows thumbprint {t}")
        }),
    );
    let comms = ServerComms::new(
        identity.clone(),
        polling_trust.clone(),
        ServerCommsOptions {
            proxy: args.proxy_setting()?,
            ..ServerCommsOptions::default()
        },
    );

    let api_listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| bind_error(&e, &args.listen.to_string(), "--listen"))?;
    let comms_addr = format!("{}:{}", args.comms_listen_address, args.comms_listen_port);
    let comms_listener = tokio::net::TcpListener::bind(&comms_addr)
        .await
        .map_err(|e| bind_error(&e, &comms_addr, "--comms-listen-port"))?;
    let api_addr = api_listener.local_addr()?;
    let comms_port = comms_listener.local_addr()?.port();
    let web_socket_options = match args.web_socket_listen_port {
        None => None,
        Some(port) => {
            let path = args.web_socket_path.trim();
            if !path.starts_with('/')
                || path.contains(char::is_whitespace)
                || path.contains(['?', '#'])
            {
                bail!("--web-socket-path '{path}' must be a path such as {} (starting with '/', no spaces, query or fragment)", octo_comms::websocket::DEFAULT_PATH);
            }
            let addr = format!("{}:{port}", args.comms_listen_address);
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| bind_error(&e, &addr, "--web-socket-listen-port"))?;
            Some((listener, octo_comms::WebSocketListenerOptions::new(path)))
        }
    };
    let web_socket_port = match &web_socket_options {
        Some((l, _)) => Some(l.local_addr()?.port()),
        None => None,
    };

    let tool = crate::tool::ToolBuild::locate(args.calamari.as_deref()).await;
    match &tool {
        Ok(t) => info!(
            "deployment tool {} ({}, SHA-256 {})",
            t.version,
            t.path.display(),
            t.sha256
        ),
        Err(why) => tracing::warn!("deployments are not possible: {why}"),
    }
    let tool = Arc::new(tool);
    let engine = Arc::new(crate::tasks::Engine::new(
        store.clone(),
        comms.clone(),
        args.data.clone(),
        tool.clone(),
    ));
    let state = AppState {
        store,
        comms: comms.clone(),
        polling_trust,
        thumbprint: identity.thumbprint(),
        comms_port,
        web_socket: web_socket_port.map(|p| (p, args.web_socket_path.trim().to_string())),
        data: args.data.clone(),
        tool,
        engine,
    };
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn({
        let (c, t) = (comms.clone(), shutdown.clone());
        async move {
            if let Err(e) = c.run_polling_listener(comms_listener, t).await {
                tracing::error!("comms listener stopped: {e}");
            }
        }
    });
    if let Some((listener, options)) = web_socket_options {
        // Clients without a certificate may use the REST API over this TLS port.
        let options = options.with_http("/api", crate::api::router(state.clone()));
        let (c, t) = (comms.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = c.run_web_socket_listener(listener, options, t).await {
                tracing::error!("WebSocket listener stopped: {e}");
            }
        });
    }
    // Task engine: resume unfinished tasks, scheduled health checks (crate::tasks).
    crate::tasks::spawn_background(&state, shutdown.clone(), &mut tasks);
    tasks.spawn({
        let t = shutdown.clone();
        let app = crate::api::router(state);
        async move {
            // TCP_NODELAY on every accepted API socket: without it, each server-sent
            // event after the first waits for a delayed ACK (up to 40 ms).
            let api_listener =
                axum::serve::ListenerExt::tap_io(api_listener, |t: &mut tokio::net::TcpStream| {
                    if let Err(e) = t.set_nodelay(true) {
                        tracing::debug!("TCP_NODELAY on an API connection: {e}");
                    }
                });
            let serve = axum::serve(api_listener, app)
                .with_graceful_shutdown(async move { t.cancelled().await });
            if let Err(e) = serve.await {
                tracing::error!("API server stopped: {e}");
            }
        }
    });
    let web_socket = web_socket_port
        .map(|p| {
            format!(
                ", WebSocket polling wss://HOST:{p}{}",
                args.web_socket_path.trim()
            )
        })
        .unwrap_or_default();
    info!(
        "octopus server ready: API http://{api_addr}/api, comms port {comms_port}{web_socket}, thumbprint {}",
        identity.thumbprint()
    );
    Ok(RunningServer {
        api_addr,
        comms_port,
        web_socket_port,
        thumbprint: identity.thumbprint(),
        admin_api_key,
        shutdown,
        tasks,
        _lock: lock,
    })
}

/// `octopus server run`: start, then serve until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let server = start(&args).await?;
    if let Some(key) = &server.admin_api_key {
        println!(
            "First start: created user 'admin' and an API key for it (shown once, also in {}):",
            args.data.join("admin-api-key").display()
        );
        println!("  {key}");
    }
    let web_socket = server
        .web_socket_port
        .map(|p| {
            format!(
                ", WebSocket polling wss://HOST:{p}{}",
                args.web_socket_path.trim()
            )
        })
        .unwrap_or_default();
    println!(
        "Octopus server ready: API http://{}/api, comms port {}{web_socket}, thumbprint {}",
        server.api_addr, server.comms_port, server.thumbprint
    );
    wait_for_signal().await;
    println!("Stopping.");
    server.stop().await;
    Ok(())
}

fn bind_error(e: &std::io::Error, addr: &str, flag: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!("{addr} is already in use (another server or program listens there); choose another with {flag}")
    } else {
        anyhow::anyhow!("cannot listen on {addr}: {e}")
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn proxy_flags_map_to_settings_and_hide_passwords() {
        use octo_comms::ProxySetting;
        let args = |proxy: Option<&str>, no_proxy| RunArgs {
            proxy: proxy.map(str::to_string),
            no_proxy,
            ..RunArgs::default()
        };
        assert_eq!(
            args(None, false).proxy_setting().unwrap(),
            ProxySetting::FromEnvironment
        );
        assert_eq!(
            args(None, true).proxy_setting().unwrap(),
            ProxySetting::Direct
        );
        match args(Some("http://u:secret@proxy:3128"), false)
            .proxy_setting()
            .unwrap()
        {
            ProxySetting::Explicit(c) => {
                assert_eq!((c.host.as_str(), c.port), ("proxy", 3128));
            }
            other => panic!("{other:?}"),
        }
        let e = args(Some("socks5://u:secret@proxy:1080"), false)
            .proxy_setting()
            .unwrap_err()
            .to_string();
        assert!(e.contains("socks5") && !e.contains("secret"), "{e}");
    }
}
