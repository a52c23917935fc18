//! `octopus server run`: the server process.
//!
//! Owns a data directory (mode 0700, locked so that a second server cannot
//! share it) holding the comms certificate, the SQLite database (0600), the
//! master key that encrypts secret values (0600) and the first admin API key
//! (0600). With `--database-url postgres://...` the database is PostgreSQL
//! instead, and everything else stays in the data directory. Serves the REST
//! API on `--listen` and accepts polling tentacles on the comms port.
//! `reset-admin` recovers access from the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use octo_comms::{ServerComms, ServerCommsOptions};
use octo_engine::secrets::MasterKey;
use octo_engine::{Engine, EngineDeps, PackageFiles, ToolBuild};
use octo_store::{Store, StoreError, ADMINISTRATORS_TEAM};
use octo_store_postgres::PgStore;
use octo_store_sqlite::SqliteStore;
use octo_tls::{Identity, Thumbprint, TrustStore};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::auth::issue_api_key;
use crate::config::RunArgs;
use crate::state::{polling_thumbprints, AppState};
use octo_comms::PassedSockets;

/// An exclusive advisory lock (`flock`) on a file, held for the life of the
/// server; the file holds the holder's pid, for the message of the next one.
#[derive(Debug)]
pub struct DataLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl DataLock {
    /// Locks `DATA/.lock`: one server per data directory.
    fn acquire(data: &Path) -> anyhow::Result<Self> {
        Self::lock_file(&data.join(".lock"), || {
            format!(
                "the data directory {}; stop it, or give this one another --data",
                data.display()
            )
        })
    }

    /// Locks `DB.lock` beside the database file: one server per database,
    /// whatever their data directories (a second server on the same database
    /// would resume the first one's running tasks).
    fn acquire_database(db: &Path) -> anyhow::Result<Self> {
        // Beside the real file: a symbolic link to it (or to its folder)
        // locks the same lock file.
        let real = std::fs::canonicalize(db).unwrap_or_else(|_| {
            match (
                db.parent().and_then(|d| std::fs::canonicalize(d).ok()),
                db.file_name(),
            ) {
                (Some(dir), Some(name)) => dir.join(name),
                _ => db.to_path_buf(),
            }
        });
        let mut name = real.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        Self::lock_file(&real.with_file_name(name), || {
            format!(
                "the SQLite database {}; stop it, or give this one another --database-url. SQLite serves one node only: to run several nodes, put every node on one PostgreSQL database with --database-url postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                db.display()
            )
        })
    }

    fn lock_file(path: &Path, what: impl Fn() -> String) -> anyhow::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the lock file {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                use std::io::{Seek, Write};
                let _ = lock.set_len(0);
                let _ = lock.seek(std::io::SeekFrom::Start(0));
                let _ = writeln!(lock, "{}", std::process::id());
                Ok(Self { _lock: lock })
            }
            Err((_, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let pid = std::fs::read_to_string(path).unwrap_or_default();
                bail!(
                    "another octopus server (pid {}) is using {}",
                    pid.trim(),
                    what()
                )
            }
            Err((_, errno)) => bail!("cannot lock {}: {errno}", path.display()),
        }
    }
}

pub fn cert_paths(data: &Path) -> (PathBuf, PathBuf) {
    (data.join("server.crt"), data.join("server.key"))
}

/// `octopus server show-thumbprint`.
#[allow(clippy::print_stderr)] // a rotation note beside the thumbprint
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
    // A server-led rotation under way (`octopus server rotate-certificate`):
    // said on stderr, so stdout stays the one thumbprint scripts read.
    let staged = crate::rotation::staged_path(data);
    if let Ok(next) = Identity::load(&staged, &staged) {
        eprintln!(
            "rotating to {}: tentacles are being asked to trust it; the server switches when they have answered",
            next.thumbprint()
        );
    }
    Ok(())
}

/// Where the data is kept: the engine picked by the URL's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Database {
    /// An SQLite file (the default: `DATA/octopus.db`).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

/// The database of these options.
fn database(data: &Path, database_url: Option<&str>) -> anyhow::Result<Database> {
    let Some(url) = database_url.map(str::trim) else {
        return Ok(Database::Sqlite(data.join("octopus.db")));
    };
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            bail!("--database-url sqlite:// names no file; write sqlite:///PATH/octopus.db, or leave it out for DATA/octopus.db");
        }
        return Ok(Database::Sqlite(PathBuf::from(path)));
    }
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
        return Ok(Database::Postgres(url.to_string()));
    }
    bail!(
        "--database-url {} is not supported: use postgres://USER:PASSWORD@HOST:PORT/DATABASE for PostgreSQL, or sqlite://PATH (the default is SQLite in the data directory)",
        octo_store_postgres::redacted(url)
    )
}

/// Opens the store the options name: PostgreSQL, or SQLite (see [`open_sqlite`]).
async fn open_store(data: &Path, database_url: Option<&str>) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match database(data, database_url)? {
        Database::Sqlite(path) => Arc::new(open_sqlite(&path).await?),
        Database::Postgres(url) => {
            let store = PgStore::connect(&url).await?;
            info!(
                "store: PostgreSQL at {}",
                octo_store_postgres::redacted(&url)
            );
            Arc::new(store)
        }
    })
}

/// What to do about a database file the server cannot use.
const DATABASE_ADVICE: &str = "restore it from a backup (with its -wal file, if any), or point --database-url at the right file; a new server starts only where there is no database file at all";

/// Opens an SQLite database, creating it (0600) only when there is no file at
/// all: an empty, unreadable or foreign file is refused, naming it, and never
/// taken for a first start. An existing file, and its journal files, are made 0600.
async fn open_sqlite(path: &Path) -> anyhow::Result<SqliteStore> {
    let shown = path.display();
    let store = match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => bail!(
            "the database {shown} is not a file; {DATABASE_ADVICE}"
        ),
        Ok(meta) if meta.len() == 0 => bail!(
            "the database {shown} is empty (0 bytes): it is not a database this server made, and starting afresh would lose every machine, task and package; {DATABASE_ADVICE} (to start a new server here, remove the empty file)"
        ),
        Ok(_) => {
            if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(path) {
                bail!(
                    "cannot open the database {shown} for reading and writing: {e}; make it readable and writable by the user the server runs as (uid {}), or {DATABASE_ADVICE}",
                    nix::unistd::getuid()
                );
            }
            SqliteStore::open_existing(path)
                .await
                .map_err(|e| match e {
                    // Its message names the file and what is wrong with it.
                    octo_store::StoreError::Database(m) => anyhow::anyhow!("{m}; {DATABASE_ADVICE}"),
                    e => anyhow::anyhow!("{e}; {DATABASE_ADVICE}"),
                })?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            // Created 0600 here, so SQLite's -wal and -shm files get the same mode.
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating the database {shown}"))?;
            SqliteStore::open(path).await?
        }
        Err(e) => bail!(
            "cannot read the database {shown}: {e}; check the owner and mode of its folder"
        ),
    };
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        restrict(&file, 0o600)?;
    }
    Ok(store)
}

/// Sets `path`'s mode when it exists (it is the server's alone).
fn restrict(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("making {} mode {mode:o}", path.display())),
    }
}

/// The setting that holds the master key's fingerprint.
const MASTER_KEY_FINGERPRINT: &str = "master-key-fingerprint";

/// The master key in `DATA/master-key`: created (0600) at first start, and
/// otherwise required to match the database's values.
async fn master_key(store: &dyn Store, data: &Path) -> anyhow::Result<(MasterKey, bool)> {
    let path = data.join("master-key");
    let recorded = store.setting(MASTER_KEY_FINGERPRINT).await?;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = MasterKey::from_text(&text)
                .with_context(|| format!("reading the master key {}", path.display()))?;
            match recorded {
                Some(fp) if fp != key.fingerprint() => bail!(
                    "the master key {} (fingerprint {}) is not the one this database's secret values were encrypted with (fingerprint {fp}); restore the right master-key file from your backup",
                    path.display(),
                    key.fingerprint()
                ),
                Some(_) => {}
                None => store.set_setting(MASTER_KEY_FINGERPRINT, key.fingerprint()).await?,
            }
            restrict(&path, 0o600)?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secrets = store.count_task_secrets().await?;
            if recorded.is_some() || secrets > 0 {
                bail!(
                    "the master key {} is missing, but this database holds {secrets} value(s) encrypted with it{}; restore the master-key file from your backup (without it those values cannot be read); a new node of a cluster needs the first node's master-key, server.crt and server.key in its data directory",
                    path.display(),
                    recorded.map(|fp| format!(" (fingerprint {fp})")).unwrap_or_default()
                );
            }
            let (key, text) = MasterKey::generate()?;
            octo_agent::config::write_atomic(&path, format!("{text}\n").as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            store
                .set_setting(MASTER_KEY_FINGERPRINT, key.fingerprint())
                .await?;
            Ok((key, true))
        }
        Err(e) => Err(e).with_context(|| format!("reading the master key {}", path.display())),
    }
}

/// First start: an admin user (a member of the built-in administrators'
/// team) and an API key, printed once and written 0600. On a database that
/// another server (node) set up first, nothing.
async fn bootstrap(store: &dyn Store, data: &Path) -> anyhow::Result<Option<String>> {
    if store.count_users().await? > 0 {
        return Ok(None);
    }
    let admin = match store.create_user("admin", "Administrator", None).await {
        Ok(admin) => admin,
        // Another node starting on the same database at the same time made it.
        Err(StoreError::Conflict { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    make_administrator(store, admin.id).await?;
    let (key, _) = issue_api_key(store, admin.id, "admin (created at first start)").await?;
    let path = data.join("admin-api-key");
    octo_agent::config::write_atomic(&path, format!("{key}\n").as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(key))
}

/// Puts a user in the built-in administrators' team.
async fn make_administrator(store: &dyn Store, user_id: i64) -> anyhow::Result<()> {
    let team = store
        .list_teams(None)
        .await?
        .into_iter()
        .find(|t| t.built_in && t.space_id.is_none() && t.name == ADMINISTRATORS_TEAM)
        .context("the built-in team of administrators is missing from the database")?;
    store.add_team_member(team.id, user_id).await?;
    Ok(())
}

/// `octopus server reset-admin`: with local access to the data directory
/// (the server may be running), makes `admin` (created if missing) an enabled
/// System administrator and gives it a new API key, returned to print once.
pub async fn reset_admin(data: &Path, database_url: Option<&str>) -> anyhow::Result<String> {
    if let Database::Sqlite(path) = database(data, database_url)? {
        if !path.exists() {
            bail!(
                "there is no database at {}; start the server once with `octopus server run --data {}`",
                path.display(),
                data.display()
            );
        }
    }
    let store = open_store(data, database_url).await?;
    let admin = match store.user_by_name("admin").await? {
        Some((u, _)) => u,
        None => store.create_user("admin", "Administrator", None).await?,
    };
    if admin.disabled {
        store.set_user_disabled(admin.id, false).await?;
    }
    make_administrator(store.as_ref(), admin.id).await?;
    let (key, stored) = issue_api_key(store.as_ref(), admin.id, "admin (reset-admin)").await?;
    let event = octo_store::NewAuditEvent {
        at: octo_store::now_ms(),
        user_id: Some(admin.id),
        username: "admin".into(),
        source: "local (octopus server reset-admin)".into(),
        action: "created".into(),
        kind: "api key".into(),
        object: format!("#{} {}", stored.id, stored.prefix),
        space_id: None,
        details: "System administrator access recovered".into(),
    };
    store.append_audit(&event).await?;
    store.close().await;
    Ok(key)
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
    /// This start created the master key (the operator must back it up).
    pub master_key_created: bool,
    /// The ports served on sockets the service manager passed ("API
    /// 127.0.0.1:8080"), none when the server bound them all.
    pub passed_sockets: Vec<String>,
    comms: CommsHandle,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    _lock: DataLock,
    _db_lock: Option<DataLock>,
}

/// The server's comms, held by [`RunningServer`] for what it reports.
struct CommsHandle(ServerComms);

impl std::fmt::Debug for CommsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerComms")
    }
}

impl RunningServer {
    /// How many polling tentacles are connected now (benchmarks, tests).
    pub fn polling_connections(&self) -> usize {
        self.comms.0.polling().len()
    }

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
    start_with(args, |_| None).await
}

/// As [`start`], also serving `extra`'s routes (the web portal) beside `/api`,
/// on the API port and, for clients without a certificate, on the TLS port.
pub async fn start_with(
    args: &RunArgs,
    extra: impl FnOnce(AppState) -> Option<axum::Router> + Send,
) -> anyhow::Result<RunningServer> {
    start_on(args, PassedSockets::none(), extra).await
}

/// As [`start_with`], listening on `sockets` (the service manager's, see
/// [`PassedSockets`]) for the ports they listen on, binding the others.
pub async fn start_on(
    args: &RunArgs,
    mut sockets: PassedSockets,
    extra: impl FnOnce(AppState) -> Option<axum::Router> + Send,
) -> anyhow::Result<RunningServer> {
    if !(args.session_idle_hours > 0.0 && args.session_idle_hours.is_finite()) {
        bail!(
            "--session-idle-hours must be a positive number of hours, not {}",
            args.session_idle_hours
        );
    }
    let node_name = args.node_name()?;
    if args.task_cap == 0 {
        bail!("--task-cap must be at least 1 (tasks this node runs at once)");
    }
    if !(1..=1024 * 1024).contains(&args.max_log_mib_per_step) {
        bail!(
            "--max-log-mib-per-step must be between 1 and 1048576 (MiB), not {}",
            args.max_log_mib_per_step
        );
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating the data directory {}", args.data.display()))?;
    restrict(&args.data, 0o700)?;
    let lock = DataLock::acquire(&args.data)?;
    let (cert, key) = cert_paths(&args.data);
    crate::rotation::recover(&args.data)?;
    let identity = if cert.exists() {
        Identity::load(&cert, &key)?
    } else {
        let id = Identity::generate("Octopus Server")?;
        id.save(&cert, &key)?;
        id
    };
    // Secrets written at an earlier start are made 0600 again, as the database
    // and the master key are (a restore or a `chmod -R` may have loosened
    // them; found by tests/file_modes.rs).
    restrict(&key, 0o600)?;
    restrict(&args.data.join("admin-api-key"), 0o600)?;
    // The database is locked too, whatever the data directory: another
    // server's --database-url may name this one's (PostgreSQL is shared by
    // design, and needs no lock).
    let db_lock = match database(&args.data, args.database_url.as_deref())? {
        Database::Sqlite(db) => {
            if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            Some(DataLock::acquire_database(&db)?)
        }
        Database::Postgres(_) => None,
    };
    let store = open_store(&args.data, args.database_url.as_deref()).await?;
    let admin_api_key = bootstrap(store.as_ref(), &args.data).await?;
    let (master_key, master_key_created) = master_key(store.as_ref(), &args.data).await?;
    let master_key = Arc::new(master_key);

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
            max_concurrent_handshakes: args.max_concurrent_handshakes,
            ..ServerCommsOptions::default()
        },
    );

    let mut passed_sockets = Vec::new();
    let api_listener = match sockets.take(args.listen.port(), &[args.listen.ip()], "--listen")? {
        Some(l) => passed("API", l, &mut passed_sockets),
        None => octo_comms::net::listen_on(args.listen)
            .map_err(|e| bind_error(&e, &args.listen.to_string(), "--listen"))?,
    };
    let comms_addr = format!("{}:{}", args.comms_listen_address, args.comms_listen_port);
    let comms_listener = match take_passed(
        &mut sockets,
        &args.comms_listen_address,
        args.comms_listen_port,
    )
    .await?
    {
        Some(l) => passed("comms", l, &mut passed_sockets),
        None => octo_comms::net::listen(&comms_addr)
            .await
            .map_err(|e| bind_error(&e, &comms_addr, "--comms-listen-port"))?,
    };
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
            let listener = match take_passed(&mut sockets, &args.comms_listen_address, port).await?
            {
                Some(l) => passed("WebSocket", l, &mut passed_sockets),
                None => octo_comms::net::listen(&addr)
                    .await
                    .map_err(|e| bind_error(&e, &addr, "--web-socket-listen-port"))?,
            };
            Some((listener, octo_comms::WebSocketListenerOptions::new(path)))
        }
    };
    sockets.finish(&format!(
        "--listen {}, --comms-listen-port {}, --web-socket-listen-port {}",
        args.listen,
        args.comms_listen_port,
        args.web_socket_listen_port
            .map_or_else(|| "off".to_string(), |p| p.to_string())
    ))?;
    let web_socket_port = match &web_socket_options {
        Some((l, _)) => Some(l.local_addr()?.port()),
        None => None,
    };

    // A snapshot in the data directory: replacing the original later (an
    // upgrade of the server's package) cannot change what pushes send.
    let tool = ToolBuild::locate(args.calamari.as_deref(), &args.data.join("tools")).await;
    match &tool {
        Ok(t) => info!(
            "deployment tool {} (from {}, copied to {}, SHA-256 {})",
            t.version,
            t.source.display(),
            t.path.display(),
            t.sha256
        ),
        Err(why) => tracing::warn!("deployments are not possible: {why}"),
    }
    let tool = Arc::new(tool);
    let tentacle = octo_engine::TentacleBuild::locate(args.tentacle.as_deref()).await;
    match &tentacle {
        Ok(t) => info!(
            "tentacle {} ({}, SHA-256 {}) for upgrades",
            t.version,
            t.path.display(),
            t.sha256
        ),
        Err(why) => tracing::warn!("tentacle upgrades are not possible: {why}"),
    }
    let tentacle = Arc::new(tentacle);
    let packages = PackageFiles::new(&args.data, store.clone(), &node_name);
    match packages.remove_incoming().await {
        Ok((0, 0)) => {}
        Ok((files, uploads)) => info!(
            "removed {files} incomplete package upload file(s) from {} and {uploads} abandoned upload(s) from the database",
            packages.dir().display()
        ),
        Err(e) => bail!(
            "cannot clean incomplete package uploads in {} or the database: {e}; check the folder's owner and mode",
            packages.dir().display()
        ),
    }
    // A data directory from before package content lived in the database.
    match packages.import_files().await {
        Ok(done) => {
            if done.imported + done.removed + done.failed > 0 {
                info!(
                    "package files in {}: {} imported into the database, {} unused deleted, {} kept as cache, {} failed (see above)",
                    packages.dir().display(),
                    done.imported,
                    done.removed,
                    done.cached,
                    done.failed
                );
            }
        }
        Err(e) => bail!(
            "cannot import the package files of {} into the database: {e}",
            packages.dir().display()
        ),
    }
    let engine = Arc::new(Engine::new(EngineDeps {
        store: store.clone(),
        comms: comms.clone(),
        tool: tool.clone(),
        tentacle: tentacle.clone(),
        packages: packages.clone(),
        master_key: master_key.clone(),
        task_cap: args.task_cap,
        node_name: node_name.clone(),
        limits: octo_engine::StepLimits {
            per_task: args.max_parallel_steps,
            per_node: args.max_running_steps,
        },
        max_log_bytes_per_step: args.max_log_mib_per_step.saturating_mul(1024 * 1024),
        health_scan_interval: Duration::from_millis(args.health_scan_interval_ms),
    }));
    let state = AppState {
        store,
        comms: comms.clone(),
        polling_trust,
        comms_port,
        web_socket: web_socket_port.map(|p| (p, args.web_socket_path.trim().to_string())),
        data: args.data.clone(),
        tool,
        tentacle,
        packages,
        engine,
        master_key,
        session_idle: Duration::from_secs_f64(args.session_idle_hours * 3600.0),
        grant_cache: Arc::default(),
        space_cache: Arc::default(),
        logins: Arc::default(),
        node_name: node_name.clone(),
    };
    // This node's first heartbeat before anything is served: `octopus node
    // list` and `/api/nodes/ping` know it from the start.
    let started_at = octo_store::now_ms();
    heartbeat(&state, started_at)
        .await
        .with_context(|| format!("recording node '{node_name}' in the database"))?;
    // The API, and beside it whatever else this server serves (the portal).
    let api = crate::api::router(state.clone());
    let app = match extra(state.clone()) {
        Some(extra) => api.merge(extra),
        None => api,
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
        let options = options.with_http("/", app.clone());
        let (c, t) = (comms.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = c.run_web_socket_listener(listener, options, t).await {
                tracing::error!("WebSocket listener stopped: {e}");
            }
        });
    }
    // Certificate rotation: offers from tentacles, connections with new certificates.
    tasks.spawn(crate::rotation::run(
        state.clone(),
        comms.events(),
        shutdown.clone(),
    ));
    // Task engine: resume unfinished tasks, scheduled health checks.
    state.engine.spawn_background(shutdown.clone(), &mut tasks);
    if state.store.shared() {
        tasks.spawn(follow_trust(state.clone(), shutdown.clone()));
    }
    tasks.spawn(heartbeats(state.clone(), started_at, shutdown.clone()));
    tasks.spawn({
        let t = shutdown.clone();
        async move {
            // TCP_NODELAY on every accepted API socket: without it, each server-sent
            // event after the first waits for a delayed ACK (up to 40 ms).
            let api_listener =
                axum::serve::ListenerExt::tap_io(api_listener, |t: &mut tokio::net::TcpStream| {
                    if let Err(e) = t.set_nodelay(true) {
                        tracing::debug!("TCP_NODELAY on an API connection: {e}");
                    }
                });
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
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
        "octopus server ready: node {node_name}, API http://{api_addr}/api, comms port {comms_port}{web_socket}, thumbprint {}",
        identity.thumbprint()
    );
    Ok(RunningServer {
        api_addr,
        comms_port,
        web_socket_port,
        thumbprint: identity.thumbprint(),
        admin_api_key,
        master_key_created,
        passed_sockets,
        comms: CommsHandle(comms),
        shutdown,
        tasks,
        _lock: lock,
        _db_lock: db_lock,
    })
}

/// On a cluster: reads the polling trust again when another node changed
/// machines (or events may have been missed).
async fn follow_trust(state: AppState, shutdown: CancellationToken) {
    use octo_store::ClusterEvent;
    use tokio::sync::broadcast::error::RecvError;
    let mut events = state.engine.cluster_events();
    loop {
        let reload = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = events.recv() => match ev {
                Ok(ClusterEvent::TrustChanged | ClusterEvent::Resync) | Err(RecvError::Lagged(_)) => true,
                Ok(_) => false,
                Err(RecvError::Closed) => return,
            },
        };
        if reload {
            // Changes queued meanwhile (machines registered in a burst) are
            // covered by this one read.
            while events.try_recv().is_ok() {}
            if let Err(e) = state.reload_polling_trust().await {
                tracing::warn!("reading the polling tentacles' trust again: {e:#}");
            }
        }
    }
}

/// Records this node's heartbeat with what its engine runs, and hands the
/// engine the drain flag an operator may have set (through any node).
async fn heartbeat(state: &AppState, started_at: i64) -> anyhow::Result<()> {
    // The drain flag first, so that the load written below is the load after
    // it applied (`octopus node drain --wait` relies on that).
    if let Some(node) = state.store.node(&state.node_name).await? {
        apply_drain(state, node.draining);
    }
    let load = state.engine.load();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let node = state
        .store
        .node_heartbeat(&octo_store::NodeBeat {
            name: state.node_name.clone(),
            started_at,
            at: octo_store::now_ms(),
            task_cap: count(load.cap),
            running_tasks: count(load.tasks),
            running_steps: count(load.steps),
        })
        .await?;
    apply_drain(state, node.draining);
    Ok(())
}

/// Hands the engine the drain flag, saying so when it changes.
fn apply_drain(state: &AppState, draining: bool) {
    if state.engine.load().draining != draining {
        info!(
            "node {}: {}",
            state.node_name,
            if draining {
                "draining (running tasks go on; new ones wait)"
            } else {
                "undrained (takes tasks again)"
            }
        );
    }
    state.engine.set_draining(draining);
}

/// Heartbeats every [`octo_api_types::NODE_HEARTBEAT_MS`] until `shutdown`; a
/// failed one is logged and the next tried on time.
async fn heartbeats(state: AppState, started_at: i64, shutdown: CancellationToken) {
    let period = Duration::from_millis(octo_api_types::NODE_HEARTBEAT_MS.unsigned_abs());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = heartbeat(&state, started_at).await {
            tracing::warn!("node {}: heartbeat: {e:#}", state.node_name);
        }
    }
}

/// `octopus server run`: start, then serve until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    run_with(args, |_| None).await
}

/// As [`run`], serving `extra` (the web portal) beside the API.
pub async fn run_with(
    args: RunArgs,
    extra: impl FnOnce(AppState) -> Option<axum::Router> + Send,
) -> anyhow::Result<()> {
    run_on(args, PassedSockets::none(), extra).await
}

/// As [`run_with`], on the sockets the service manager passed (read them with
/// [`PassedSockets::from_env`] before the runtime starts its threads), and
/// telling it (`sd_notify`, when it asks: `Type=notify`) when the server is
/// ready and when it stops.
pub async fn run_on(
    args: RunArgs,
    sockets: PassedSockets,
    extra: impl FnOnce(AppState) -> Option<axum::Router> + Send,
) -> anyhow::Result<()> {
    // Watched before the server says it is ready: a service manager may stop
    // it at once, and an unwatched SIGTERM would kill it mid-way. A stop
    // during the start (a database that does not answer) ends the start.
    let mut stop = octo_comms::StopSignals::watch();
    let server = tokio::select! {
        server = start_on(&args, sockets, extra) => server?,
        () = stop.recv() => {
            println!("Stopped before the server was ready.");
            return Ok(());
        }
    };
    if let Some(key) = &server.admin_api_key {
        println!(
            "First start: created user 'admin' and an API key for it (shown once, also in {}):",
            args.data.join("admin-api-key").display()
        );
        println!("  {key}");
    }
    if server.master_key_created {
        println!(
            "Created the master key {}, which encrypts secret values in the database: back it up (with the database); without it they cannot be read.",
            args.data.join("master-key").display()
        );
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
    if !server.passed_sockets.is_empty() {
        println!(
            "Listening on the sockets the service manager passed (they stay open across restarts): {}",
            server.passed_sockets.join(", ")
        );
    }
    println!(
        "Octopus server ready: API http://{}/api, comms port {}{web_socket}, thumbprint {}",
        server.api_addr, server.comms_port, server.thumbprint
    );
    notify_service_manager(&[sd_notify::NotifyState::Ready]);
    stop.recv().await;
    println!("Stopping.");
    notify_service_manager(&[sd_notify::NotifyState::Stopping]);
    server.stop().await;
    Ok(())
}

/// Tells the service manager `state` when it asked to be told
/// (`NOTIFY_SOCKET`); a failure is logged, as the server serves either way.
fn notify_service_manager(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(
            "telling the service manager (NOTIFY_SOCKET) that the server is {}: {e}",
            state
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// `listener`, passed by the service manager for `what`, noted in `list`.
fn passed(
    what: &str,
    listener: tokio::net::TcpListener,
    list: &mut Vec<String>,
) -> tokio::net::TcpListener {
    list.push(match listener.local_addr() {
        Ok(a) => format!("{what} {a}"),
        Err(_) => what.to_string(),
    });
    listener
}

/// The passed socket for `port` (the comms or WebSocket port), checked
/// against `--comms-listen-address` (`host`, a name or an address).
async fn take_passed(
    sockets: &mut PassedSockets,
    host: &str,
    port: u16,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if sockets.is_empty() || port == 0 {
        return Ok(None);
    }
    let wanted: Vec<std::net::IpAddr> = match host.parse() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving --comms-listen-address {host}"))?
            .map(|a| a.ip())
            .collect(),
    };
    Ok(sockets.take(port, &wanted, "--comms-listen-address")?)
}

fn bind_error(e: &std::io::Error, addr: &str, flag: &str) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!("{addr} is already in use (another server or program listens there); choose another with {flag}")
    } else {
        anyhow::anyhow!("cannot listen on {addr}: {e}")
    }
}
