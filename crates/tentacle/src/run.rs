//! `tentacle run`: the agent in the foreground.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use octo_agent::capabilities::CapabilitiesImpl;
use octo_agent::config::{PollingServer, TentacleConfig};
use octo_agent::files::FileServiceImpl;
use octo_agent::scripts::ScriptServiceImpl;
use octo_agent::upgrade::{self, Host, RestartMode, UpgradeServiceImpl};
use octo_agent::AgentContext;
use octo_comms::{
    Backoff, HeldListener, PassedSockets, PollingOptions, PollingTarget, TentacleComms,
};
use octo_proto::v1::capabilities_server::CapabilitiesServer;
use octo_proto::v1::file_service_server::FileServiceServer;
use octo_proto::v1::script_service_server::ScriptServiceServer;
use octo_proto::v1::upgrade_service_server::UpgradeServiceServer;
use octo_tls::{Thumbprint, TrustStore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{load_identity, Target};

/// How often the configuration file is checked for trust changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

pub(crate) fn run(target: &Target) -> anyhow::Result<()> {
    // A listening socket passed by a socket unit, or kept by this process
    // when it executed itself again (an upgrade): read while this is the only
    // thread, since reading removes the variables from the environment.
    let sockets = PassedSockets::from_env()
        .context("reading the sockets passed to the tentacle (LISTEN_FDS)")?;
    let cfg = target.load()?;
    let identity = load_identity(&cfg)?;
    for dir in [&cfg.tentacle.home, &cfg.tentacle.applications] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let host = Arc::new(
        Host::current(&cfg.tentacle.home).context("finding this process's binary and folder")?,
    );
    let log_guard = init_logging(&cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let ended = runtime.block_on(agent(target, cfg, identity, host.clone(), sockets))?;
    // Nothing of the agent may outlive it into the restarted process.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let Ended::Restart(held) = ended else {
        return Ok(());
    };
    // The socket goes to the new process only when the configuration still
    // listens there (a port changed since the start is bound anew).
    let held = held.filter(|h| {
        target.load().is_ok_and(|c| {
            c.listen.enabled
                && c.listen.port == h.local_addr().port()
                && c.listen
                    .address
                    .parse()
                    .is_ok_and(|ip| octo_comms::passed::address_agrees(&[ip], h.local_addr().ip()))
        })
    });
    info!(
        "restarting ({})",
        match &host.mode {
            RestartMode::Systemd { unit } => format!("systemd unit {unit}"),
            RestartMode::ReExec => format!("executing {} again", host.binary.display()),
        }
    );
    drop(log_guard);
    let why = upgrade::restart(&host, held);
    if why.is_empty() {
        // systemd restarts the unit.
        return Ok(());
    }
    eprintln!("error: restarting the tentacle: {why}");
    std::process::exit(upgrade::RESTART_EXIT_CODE);
}

/// How the agent ended.
#[derive(Debug)]
enum Ended {
    /// Asked to stop (SIGTERM, Ctrl-C).
    Stopped,
    /// Asked to restart (an upgrade swapped or restored its binary), with
    /// its listening socket still open when it re-executes itself.
    Restart(Option<HeldListener>),
}

/// Logs to stderr (journald keeps it under systemd) and to a daily-rolling file
/// under HOME/Logs (7 kept). `RUST_LOG` filters (default info).
fn init_logging(
    cfg: &TentacleConfig,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::prelude::*;
    let logs = cfg.tentacle.home.join("Logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(tracing_appender::rolling::Rotation::DAILY)
        .filename_prefix("tentacle")
        .filename_suffix("log")
        .max_log_files(7)
        .build(&logs)
        .with_context(|| format!("opening log files in {}", logs.display()))?;
    let (file, guard) = tracing_appender::non_blocking(appender);
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(file)
                .with_filter(filter()),
        )
        .init();
    Ok(guard)
}

async fn agent(
    target: &Target,
    cfg: TentacleConfig,
    identity: octo_tls::Identity,
    host: Arc<Host>,
    mut sockets: PassedSockets,
) -> anyhow::Result<Ended> {
    // Watched before the tentacle says it started: a service manager may stop
    // it at once, and an unwatched SIGTERM would kill it mid-way.
    let mut stop = octo_comms::StopSignals::watch();
    let name = target.name.clone();
    if !cfg.listen.enabled && cfg.polling_servers.is_empty() {
        bail!(
            "instance '{name}' neither listens nor polls a server: enable listening with `tentacle configure --instance {name} --listen`, or add a server with `tentacle poll-server --instance {name} ...`"
        );
    }
    if cfg.trusted_thumbprints().is_empty() {
        warn!("instance '{name}' trusts no server yet: every server will be refused until you run `tentacle configure --instance {name} --trust THUMBPRINT`");
    }
    let ctx = AgentContext {
        instance_name: name.clone(),
        home: cfg.tentacle.home.clone(),
        applications: cfg.tentacle.applications.clone(),
    };
    upgrade::on_start(&ctx.home, &host);
    let scripts = ScriptServiceImpl::new(ctx.clone());
    let routes =
        tonic::service::Routes::new(CapabilitiesServer::new(CapabilitiesImpl::new(ctx.clone())))
            .add_service(
                // Scripts may carry extra files: allow requests up to 64 MiB.
                ScriptServiceServer::new(scripts.clone()).max_decoding_message_size(64 << 20),
            )
            .add_service(
                FileServiceServer::new(FileServiceImpl::new(ctx.clone()))
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
            )
            .add_service(UpgradeServiceServer::new(UpgradeServiceImpl::new(
                ctx,
                scripts,
                host.clone(),
            )));
    let hint_name = name.clone();
    let trust = TrustStore::new(
        cfg.trusted_thumbprints(),
        Arc::new(move |t: &Thumbprint| {
            format!("trust it with `tentacle configure --instance {hint_name} --trust {t}`")
        }),
    );
    let rotation =
        crate::rotate::AgentRotation::new(&cfg.tentacle.home, &target.config_path, trust.clone());
    let comms = TentacleComms::new(identity.clone(), trust.clone(), routes, &name)
        .with_proxy(cfg.polling_proxy_setting())
        .with_rotation(rotation.clone());
    rotation.attach(comms.clone());
    rotation.sync().await;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    let mut summary = Vec::new();
    let mut held = None;
    if cfg.listen.enabled {
        let addr = format!("{}:{}", cfg.listen.address, cfg.listen.port);
        let wanted: Vec<std::net::IpAddr> = cfg.listen.address.parse().into_iter().collect();
        let passed = sockets.take(
            cfg.listen.port,
            &wanted,
            &format!("`tentacle configure --instance {name} --listen-ip`"),
        )?;
        let from_passed = passed.is_some();
        let listener = match passed {
            Some(l) => l,
            None => bind(&addr, &cfg, &name).await?,
        };
        let local = listener.local_addr()?;
        summary.push(if from_passed {
            format!("listening on {local} (a socket passed to it, open across restarts)")
        } else {
            format!("listening on {local}")
        });
        // Kept across a re-execution (an upgrade without systemd): a server
        // dialling meanwhile waits in the queue instead of being refused.
        if host.mode == RestartMode::ReExec {
            match HeldListener::of(&listener) {
                Ok(h) => held = Some(h),
                Err(e) => warn!("cannot keep the listening socket on {local} for restarts: {e}"),
            }
        }
        let (c, t) = (comms.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = c.run_listening(listener, t).await {
                error!("listener stopped: {e}");
            }
        });
    }
    if !cfg.polling_servers.is_empty() {
        summary.push(format!("polling proxy: {}", cfg.polling_proxy_setting()));
    }
    for p in &cfg.polling_servers {
        summary.push(format!("polling {}", describe(p)));
    }
    sockets.finish(&if cfg.listen.enabled {
        format!("listening on {}:{}", cfg.listen.address, cfg.listen.port)
    } else {
        "not listening".to_string()
    })?;
    let mut pollers = Pollers::new(comms.clone(), shutdown.clone());
    pollers.sync(&cfg.polling_servers, false);
    tasks.spawn(watch_config(
        target.config_path.clone(),
        trust,
        comms.clone(),
        pollers,
        shutdown.clone(),
    ));
    tasks.spawn(watch_rotation(
        cfg.tentacle.home.clone(),
        rotation,
        shutdown.clone(),
    ));
    info!(
        "tentacle '{name}' {} started: {}; thumbprint {}",
        octo_agent::version(),
        summary.join("; "),
        identity.thumbprint()
    );

    let ended = tokio::select! {
        () = stop.recv() => Ended::Stopped,
        () = host.restart.cancelled() => Ended::Restart(held),
    };
    info!("stopping tentacle '{name}'");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(ended)
}

/// The instance's listening socket on `addr`, bound by the tentacle itself.
async fn bind(
    addr: &str,
    cfg: &TentacleConfig,
    name: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    octo_comms::net::listen(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "port {} on {} is already in use (another tentacle instance or program listens there); choose another with `tentacle configure --instance {name} --port N`",
                cfg.listen.port,
                cfg.listen.address
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })
}

/// "wss://... as poll://SUB/ (N connection(s), dialled at X)".
fn describe(p: &PollingServer) -> String {
    let via = p
        .connect_to
        .as_deref()
        .map(|c| format!(", dialled at {c}"))
        .unwrap_or_default();
    format!(
        "{} as poll://{}/ ({} connection(s){via})",
        p.address, p.subscription_id, p.connections
    )
}

/// The servers being polled: one polling loop per configured server, each with
/// a token of its own, so servers can be added and removed while running.
struct Pollers {
    comms: TentacleComms,
    shutdown: CancellationToken,
    running: HashMap<PollingServer, (CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Pollers {
    fn new(comms: TentacleComms, shutdown: CancellationToken) -> Self {
        Self {
            comms,
            shutdown,
            running: HashMap::new(),
        }
    }

    /// Polls exactly `servers`: stops loops for entries gone or changed, starts
    /// loops for new ones. `log`: say so (not at start, which logs a summary).
    fn sync(&mut self, servers: &[PollingServer], log: bool) {
        let gone: Vec<PollingServer> = self
            .running
            .keys()
            .filter(|p| !servers.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some((token, _)) = self.running.remove(&p) {
                token.cancel();
            }
            if log {
                info!("no longer polling {}", describe(&p));
            }
        }
        for p in servers {
            if self.running.contains_key(p) {
                continue;
            }
            if log {
                info!("now polling {}", describe(p));
            }
            let token = self.shutdown.child_token();
            let target = PollingTarget {
                address: p.address.clone(),
                subscription_id: p.subscription_id.clone(),
            };
            let options = PollingOptions {
                connect_to: p.connect_to.clone(),
                // Each server's connections accept that server's certificate only.
                server_thumbprint: p.thumbprint.parse().ok(),
                rotating_to: p.rotating_to.as_deref().and_then(|t| t.parse().ok()),
            };
            let (c, t, n) = (self.comms.clone(), token.clone(), p.connections);
            let handle = tokio::spawn(async move {
                if let Err(e) = c
                    .run_polling_with(target, options, n, Backoff::default(), t)
                    .await
                {
                    error!("polling stopped: {e}");
                }
            });
            self.running.insert(p.clone(), (token, handle));
        }
    }

    /// Waits for every loop to end (after the shutdown token was cancelled).
    async fn join(self) {
        for (_, (_, handle)) in self.running {
            let _ = handle.await;
        }
    }
}

/// Acts on `tentacle rotate-certificate`: reads the rotation state when its
/// file changes (and at least every 30 s, for a switch that became due).
async fn watch_rotation(
    home: std::path::PathBuf,
    rotation: Arc<crate::rotate::AgentRotation>,
    shutdown: CancellationToken,
) {
    let path = octo_agent::rotation::RotationState::path(&home);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = modified(&path);
    let mut since_sync = Duration::ZERO;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        since_sync += Duration::from_millis(500);
        let now = modified(&path);
        if now != last || since_sync >= Duration::from_secs(30) {
            last = now;
            since_sync = Duration::ZERO;
            rotation.sync().await;
        }
    }
}

/// Applies changes to the configuration file while the agent runs: trust
/// changes (`tentacle configure`; removed thumbprints drop their live
/// connections at once), polled servers (`tentacle poll-server`, added or
/// removed), and the polling proxy (`tentacle polling-proxy`, for the next
/// polling connections).
async fn watch_config(
    path: std::path::PathBuf,
    trust: TrustStore,
    comms: TentacleComms,
    mut pollers: Pollers,
    shutdown: CancellationToken,
) {
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = modified(&path);
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return pollers.join().await,
            _ = tick.tick() => {}
        }
        let now = modified(&path);
        if now == last {
            continue;
        }
        last = now;
        match TentacleConfig::load(&path) {
            Ok(cfg) => {
                let new = cfg.trusted_thumbprints();
                if new != trust.snapshot() {
                    info!(
                        "trusted servers changed in {}: now {} trusted",
                        path.display(),
                        new.len()
                    );
                    trust.replace(new);
                }
                let proxy = cfg.polling_proxy_setting();
                if proxy != comms.proxy() {
                    info!("polling proxy changed in {}: now {proxy}", path.display());
                    comms.set_proxy(proxy);
                }
                pollers.sync(&cfg.polling_servers, true);
            }
            Err(e) => warn!("configuration changed but cannot be applied: {e}"),
        }
    }
}
