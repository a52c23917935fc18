//! `octopus demo`: one server and two tentacles, one per mode, in this process.
//!
//! Everything binds 127.0.0.1 port 0. The server reaches the listening tentacle
//! by dialling it and the polling tentacle over the connection that tentacle
//! dialled; both are pinned mutual TLS carrying gRPC over HTTP/2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use octo_comms::{
    Backoff, CommsError, Connection, Endpoint, PollingTarget, ServerComms, ServerCommsOptions,
    TentacleComms,
};
use octo_proto::v1::{
    script_event, CompleteScriptRequest, GetCapabilitiesRequest, PingRequest, ScriptState,
    ScriptStatusRequest, StartScriptRequest,
};
use octo_tls::{Identity, Thumbprint, TrustHint, TrustStore};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::DemoArgs;

const SERVER_NAME: &str = "Octopus Server";
const LISTENING_NAME: &str = "Tentacle listening";
const POLLING_NAME: &str = "Tentacle polling";
const SUBSCRIPTION: &str = "demo-polling";
const PINGS: usize = 200;
/// The script each tentacle runs: five lines, 20 ms apart, so they visibly stream.
const SCRIPT: &str =
    "for i in 0 1 2 3 4; do echo \"line $i from $TentacleInstanceName in $PWD\"; sleep 0.02; done";
/// How long the server waits for the polling tentacle to connect.
const POLLING_WAIT: Duration = Duration::from_secs(15);
/// How long shutting down may take before the demo stops waiting.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A generated identity and where it was saved.
struct Saved {
    name: &'static str,
    identity: Identity,
    cert: PathBuf,
    key: PathBuf,
}

/// Generates an identity and saves it as `<stem>.crt` / `<stem>.key` in `dir`.
fn generate(dir: &Path, name: &'static str, stem: &str) -> anyhow::Result<Saved> {
    let identity =
        Identity::generate(name).with_context(|| format!("generating the identity of {name}"))?;
    let cert = dir.join(format!("{stem}.crt"));
    let key = dir.join(format!("{stem}.key"));
    identity
        .save(&cert, &key)
        .with_context(|| format!("saving the identity of {name}"))?;
    Ok(Saved {
        name,
        identity,
        cert,
        key,
    })
}

/// How a tentacle in this demo is told to trust a server.
fn tentacle_hint() -> TrustHint {
    Arc::new(|t: &Thumbprint| {
        format!("trust it on the tentacle with `tentacle configure --trust {t}`")
    })
}

/// How the server is told to trust a polling tentacle.
fn server_hint() -> TrustHint {
    Arc::new(|t: &Thumbprint| {
        format!("add thumbprint {t} to the polling machine's record on the server")
    })
}

async fn bind_loopback(what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("binding 127.0.0.1:0 for the {what}"))?;
    let addr = listener
        .local_addr()
        .with_context(|| format!("reading the address of the {what}"))?;
    Ok((listener, addr))
}

/// The real tentacle services (scripts, files, capabilities) for an agent whose
/// home is `dir/<slug>-home`.
fn agent_routes(dir: &std::path::Path, name: &str, slug: &str) -> tonic::service::Routes {
    use octo_proto::v1::capabilities_server::CapabilitiesServer;
    use octo_proto::v1::file_service_server::FileServiceServer;
    use octo_proto::v1::script_service_server::ScriptServiceServer;
    let home = dir.join(format!("{slug}-home"));
    if let Err(e) = std::fs::create_dir_all(&home) {
        tracing::warn!("cannot create {}: {e}", home.display());
    }
    let ctx = octo_agent::AgentContext {
        instance_name: name.to_string(),
        applications: home.join("Applications"),
        home,
    };
    tonic::service::Routes::new(CapabilitiesServer::new(
        octo_agent::capabilities::CapabilitiesImpl::new(ctx.clone()),
    ))
    .add_service(ScriptServiceServer::new(
        octo_agent::scripts::ScriptServiceImpl::new(ctx.clone()),
    ))
    .add_service(FileServiceServer::new(
        octo_agent::files::FileServiceImpl::new(ctx),
    ))
}

/// Starts a listening tentacle serving `routes`, trusting `server`.
async fn start_listening_tentacle(
    identity: Identity,
    routes: tonic::service::Routes,
    name: &str,
    server: Thumbprint,
    shutdown: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<SocketAddr> {
    let (listener, addr) = bind_loopback(name).await?;
    let trust = TrustStore::pinned(server, tentacle_hint());
    let comms = TentacleComms::new(identity, trust, routes, name);
    let token = shutdown.clone();
    let label = name.to_string();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = comms.run_listening(listener, token).await {
            tracing::error!("{label} stopped: {e}");
        }
    }));
    Ok(addr)
}

/// Round trip percentile `p` (0..=100) of sorted samples, in microseconds.
fn percentile_us(sorted: &[Duration], p: usize) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[i].as_micros()
}

/// Connects to one tentacle from the server side and exercises it, printing what happens.
async fn exercise(
    server: &ServerComms,
    name: &str,
    endpoint: &Endpoint,
    ticket: &str,
) -> anyhow::Result<()> {
    println!();
    println!("== {name}: {endpoint}");
    let conn: Connection = server
        .connect(endpoint)
        .await
        .with_context(|| format!("connecting to {name} at {endpoint}"))?;

    let hello = conn
        .hello()
        .with_context(|| format!("{name} completed no session handshake"))?;
    let subscription = if hello.subscription_id.is_empty() {
        "(none: the server dialled this tentacle)".to_string()
    } else {
        format!("poll://{}/", hello.subscription_id)
    };
    println!(
        "  hello: instance \"{}\", protocol {}, version {}",
        hello.instance_name, hello.protocol_version, hello.tentacle_version
    );
    println!("         subscription {subscription}");
    println!("         tentacle thumbprint {}", hello.thumbprint);
    println!(
        "         TLS peer {} presented {} (pinned)",
        conn.remote_addr(),
        conn.peer_thumbprint()
    );

    let mut caps = conn.capabilities();
    let mut samples = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        let payload = format!("ping {i}").into_bytes();
        let started = Instant::now();
        let reply = caps
            .ping(PingRequest {
                payload: payload.clone(),
            })
            .await
            .with_context(|| format!("ping {i} to {name}"))?
            .into_inner();
        samples.push(started.elapsed());
        if reply.payload != payload {
            bail!("{name} echoed a different ping payload");
        }
    }
    samples.sort();
    println!(
        "  ping x{PINGS}: p50 {} us, p99 {} us",
        percentile_us(&samples, 50),
        percentile_us(&samples, 99)
    );

    let capabilities = caps
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .with_context(|| format!("getting the capabilities of {name}"))?
        .into_inner();
    println!(
        "  capabilities: os {}, arch {}",
        capabilities.os, capabilities.arch
    );

    let mut scripts = conn.scripts();
    let started = scripts
        .start_script(StartScriptRequest {
            ticket: ticket.to_string(),
            script_body: SCRIPT.to_string(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("starting script {ticket} on {name}"))?
        .into_inner();
    println!(
        "  script {ticket} (bash: {SCRIPT}): started, state {}",
        state_name(started.state)
    );
    let mut events = scripts
        .stream_logs(ScriptStatusRequest {
            ticket: ticket.to_string(),
            since_sequence: 0,
        })
        .await
        .with_context(|| format!("streaming the log of script {ticket} on {name}"))?
        .into_inner();
    let mut last = None;
    while let Some(event) = events
        .message()
        .await
        .with_context(|| format!("reading the log of script {ticket} on {name}"))?
    {
        match event.event {
            Some(script_event::Event::Log(line)) => {
                println!("    [{name}] {}", line.text);
            }
            Some(script_event::Event::Completed(status)) => last = Some(status),
            None => {}
        }
    }
    let last = last.with_context(|| {
        format!("the log stream of script {ticket} on {name} ended without a final status")
    })?;
    println!(
        "  final state: {}, exit code {}",
        state_name(last.state),
        last.exit_code
    );
    scripts
        .complete_script(CompleteScriptRequest {
            ticket: ticket.to_string(),
            since_sequence: last.next_sequence,
        })
        .await
        .with_context(|| format!("completing script {ticket} on {name}"))?;
    Ok(())
}

fn state_name(state: i32) -> String {
    match ScriptState::try_from(state) {
        Ok(ScriptState::Pending) => "PENDING".into(),
        Ok(ScriptState::Running) => "RUNNING".into(),
        Ok(ScriptState::Complete) => "COMPLETE".into(),
        Ok(ScriptState::Unspecified) => "UNSPECIFIED".into(),
        Err(_) => format!("unknown ({state})"),
    }
}

/// Runs `octopus demo`.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Where the identities go: a temporary directory unless --dir is given.
    let (dir, temp) = match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the directory `{}`", dir.display()))?;
            (dir, None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("octopus-demo-")
                .tempdir()
                .context("creating a temporary directory for the demo's certificates")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };

    println!("Octopus comms demo: one server and two tentacles (one listening, one polling)");
    println!("in this process, calling each other with gRPC over pinned mutual TLS on 127.0.0.1.");
    println!();
    if temp.is_some() {
        println!(
            "Identities (in {}, removed on exit; use --dir DIR to keep them):",
            dir.display()
        );
    } else {
        println!("Identities (in {}):", dir.display());
    }
    let server_id = generate(&dir, SERVER_NAME, "octopus-server")?;
    let listening_id = generate(&dir, LISTENING_NAME, "tentacle-listening")?;
    let polling_id = generate(&dir, POLLING_NAME, "tentacle-polling")?;
    for s in [&server_id, &listening_id, &polling_id] {
        println!("  {:<20} thumbprint {}", s.name, s.identity.thumbprint());
        println!("  {:<20} cert       {}", "", s.cert.display());
        println!("  {:<20} key        {}", "", s.key.display());
    }
    let server_tp = server_id.identity.thumbprint();
    let listening_tp = listening_id.identity.thumbprint();
    let polling_tp = polling_id.identity.thumbprint();

    let shutdown = CancellationToken::new();
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();

    // The server: its polling listener trusts the polling tentacle only.
    let options = ServerCommsOptions {
        polling_wait: POLLING_WAIT,
        ..Default::default()
    };
    let server = ServerComms::new(
        server_id.identity,
        TrustStore::pinned(polling_tp, server_hint()),
        options,
    );
    let (polling_listener, polling_addr) = bind_loopback("server's polling listener").await?;
    {
        let (server, token) = (server.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = server.run_polling_listener(polling_listener, token).await {
                tracing::error!("the server's polling listener stopped: {e}");
            }
        }));
    }

    // The listening tentacle: the server dials it.
    let listening_addr = start_listening_tentacle(
        listening_id.identity,
        agent_routes(&dir, LISTENING_NAME, "tentacle-listening"),
        LISTENING_NAME,
        server_tp,
        &shutdown,
        &mut tasks,
    )
    .await?;

    // The polling tentacle: it dials the server and serves on that connection.
    {
        let trust = TrustStore::pinned(server_tp, tentacle_hint());
        let comms = TentacleComms::new(
            polling_id.identity,
            trust,
            agent_routes(&dir, POLLING_NAME, "tentacle-polling"),
            POLLING_NAME,
        );
        let target = PollingTarget {
            address: polling_addr.to_string(),
            subscription_id: SUBSCRIPTION.to_string(),
        };
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = comms
                .run_polling(target, 1, Backoff::default(), token)
                .await
            {
                tracing::error!("{POLLING_NAME} stopped: {e}");
            }
        }));
    }

    println!();
    println!("Started:");
    println!("  {SERVER_NAME:<20} polling port {polling_addr} (trusts {POLLING_NAME})");
    println!(
        "  {LISTENING_NAME:<20} listening on https://{listening_addr}/ (trusts {SERVER_NAME})"
    );
    println!(
        "  {POLLING_NAME:<20} dials {polling_addr} as poll://{SUBSCRIPTION}/ (trusts {SERVER_NAME})"
    );
    println!("  Both tentacles run the real agent services (octo-agent) in this process; scripts run in HOME/Work/<ticket>/ under {}.", dir.display());

    let listening_endpoint =
        Endpoint::listening(&format!("https://{listening_addr}/"), listening_tp)
            .context("building the listening tentacle's endpoint")?;
    let polling_endpoint = Endpoint::polling(&format!("poll://{SUBSCRIPTION}/"), polling_tp)
        .context("building the polling tentacle's endpoint")?;

    let result = async {
        exercise(
            &server,
            LISTENING_NAME,
            &listening_endpoint,
            "demo-listening-1",
        )
        .await?;
        exercise(&server, POLLING_NAME, &polling_endpoint, "demo-polling-1").await?;
        refusal(&server, server_tp, listening_tp, &shutdown, &mut tasks).await
    }
    .await;

    if result.is_ok() {
        println!();
        println!(
            "Friendly page (for a browser or curl; a client without a certificate gets only this):"
        );
        println!("  curl -k https://{listening_addr}/   ({LISTENING_NAME})");
        println!("  curl -k https://{polling_addr}/   ({SERVER_NAME}'s polling port)");
        if args.keep {
            println!();
            println!("Running until Ctrl-C (--keep).");
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
        }
    }

    // Shut down: close the server's connections, then stop every listener and loop.
    server.forget(&listening_endpoint);
    shutdown.cancel();
    let stopped = tokio::time::timeout(SHUTDOWN_WAIT, async {
        for task in tasks {
            let _ = task.await;
        }
    })
    .await;
    result?;
    println!();
    match stopped {
        Ok(()) => println!("Shut down."),
        Err(_) => println!(
            "Shut down (some tasks were still stopping after {} s).",
            SHUTDOWN_WAIT.as_secs()
        ),
    }
    Ok(())
}

/// An impostor listens where the server expects the listening tentacle: the
/// server refuses it in the TLS handshake because its thumbprint is not the
/// pinned one.
async fn refusal(
    server: &ServerComms,
    server_tp: Thumbprint,
    expected: Thumbprint,
    shutdown: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<()> {
    const IMPOSTOR: &str = "Tentacle untrusted";
    println!();
    println!("== Refusal: an untrusted tentacle");
    let impostor = Identity::generate(IMPOSTOR).context("generating the impostor's identity")?;
    let impostor_tp = impostor.thumbprint();
    // It even trusts the server, so only the server's pin can stop it.
    // It serves nothing: the server's pin refuses it before any call.
    let routes = tonic::service::Routes::default();
    let addr =
        start_listening_tentacle(impostor, routes, IMPOSTOR, server_tp, shutdown, tasks).await?;
    println!("  {IMPOSTOR:<20} thumbprint {impostor_tp} (in memory only)");
    println!(
        "  it listens on https://{addr}/; the server is told to expect {LISTENING_NAME} there"
    );
    let endpoint = Endpoint::listening(&format!("https://{addr}/"), expected)
        .context("building the impostor's endpoint")?;
    match server.connect(&endpoint).await {
        Ok(_) => bail!("the server accepted a tentacle whose thumbprint it does not trust"),
        Err(e @ CommsError::Untrusted { .. }) => {
            println!("  refused, as it should be:");
            println!("    {e}");
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context(
            "the server refused the untrusted tentacle, but not for its thumbprint as expected",
        )),
    }
}
