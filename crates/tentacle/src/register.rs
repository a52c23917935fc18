//! `tentacle register-with`: tell a server about this tentacle, and trust it back.
//!
//! With `--space NAME` the calls go to the server's routes of that space
//! (`/api/spaces/{NAME}/...`); without it, to the Default space. The same
//! tentacle may be registered in several spaces of one server; it trusts the
//! server once, and `deregister-from` stops trusting it only when no space the
//! key can see still has this tentacle.

use anyhow::{bail, Context};
use hyper::{Method, StatusCode};
use octo_agent::config::PollingServer;
use octo_tls::Thumbprint;
use serde::Deserialize;
use serde_json::json;

use crate::api::ApiClient;
use crate::{
    load_identity, new_subscription_id, parse_connect_to, parse_thumbprint, polling_address, Target,
};

/// The host of a polling address (HOST:PORT or wss://HOST:PORT/PATH).
fn address_host(address: &str) -> String {
    if let Ok(url) = octo_comms::websocket::WebSocketUrl::parse(address) {
        return url.host;
    }
    octo_comms::net::split_host_port(address)
        .map_or(address, |(h, _)| h)
        .to_string()
}

/// Options of `register-with`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  tentacle register-with --server http://octopus:8080 --api-key API-XXXX --environment Production --role web\n  tentacle register-with --server http://octopus:8080 --api-key API-XXXX --space \"Ops Team\" --environment Production   (in space Ops Team; without --space: the Default space)\n  tentacle register-with --server http://octopus:8080 --apiKey API-XXXX --env Test --role db --comms-style TentacleActive\n  tentacle register-with --server http://octopus:8080 --api-key API-XXXX --env Test --comms-style TentacleActive --server-web-socket wss://octopus.example:443/tentacle\n  tentacle register-with --server https://octopus.example:443 --server-thumbprint <THUMBPRINT> --api-key API-XXXX --env Test   (the API over the server's TLS port: the key stays private)"
)]
pub(crate) struct RegisterArgs {
    /// The server's API address: http://HOST:PORT, or https://HOST:PORT for the
    /// server's TLS port (`--web-socket-listen-port`), pinned by --server-thumbprint.
    #[arg(long)]
    server: String,
    /// An API key of a user allowed to add machines (used for this call only, never stored).
    #[arg(
        long,
        alias = "apiKey",
        env = "OCTOPUS_API_KEY",
        hide_env_values = true,
        required_unless_present = "username",
        conflicts_with = "username"
    )]
    api_key: Option<String>,
    /// Log in as this user instead of using an API key (with --password).
    #[arg(long, short = 'u', alias = "user", requires = "password")]
    username: Option<String>,
    /// The user's password (used for this call only, never stored).
    #[arg(long, short = 'p', requires = "username")]
    password: Option<String>,
    /// Environments this machine belongs to (repeatable; required for deployment targets).
    #[arg(long = "environment", alias = "env")]
    environments: Vec<String>,
    /// The worker pool (set by `register-worker`).
    #[arg(skip)]
    worker_pool: Option<String>,
    /// Roles of this machine (repeatable; spaces allowed, e.g. "web server").
    #[arg(long = "role", short = 'r')]
    roles: Vec<String>,
    /// Tenants (repeatable).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// Tenant tags (repeatable).
    #[arg(long = "tenant-tag", alias = "tenanttag")]
    tenant_tags: Vec<String>,
    /// Machine name on the server (default: this host's name).
    #[arg(long)]
    name: Option<String>,
    /// Machine policy.
    #[arg(long)]
    policy: Option<String>,
    /// TentaclePassive (listening; the server dials this machine) or TentacleActive (polling).
    #[arg(long, alias = "commsStyle", value_enum, default_value_t = CommsStyle::Passive)]
    comms_style: CommsStyle,
    /// Host name the server should dial (listening; default: this host's name).
    #[arg(long, alias = "publicHostName")]
    public_hostname: Option<String>,
    /// Port the server should dial (listening; default: the configured port).
    #[arg(long, alias = "tentacleCommsPort")]
    tentacle_comms_port: Option<u16>,
    /// The server's polling port (polling; default: what the server reports).
    #[arg(long, alias = "serverCommsPort")]
    server_comms_port: Option<u16>,
    /// Where to poll, when not the web host: HOST[:PORT] or https://HOST[:PORT] (polling). HOST is sent as TLS SNI.
    #[arg(long, alias = "serverCommsAddress")]
    server_comms_address: Option<String>,
    /// Poll over WebSocket: the server's wss://HOST[:PORT]/PATH (polling; `octopus server run --web-socket-listen-port`).
    #[arg(
        long,
        alias = "serverWebSocket",
        value_name = "URL",
        conflicts_with_all = ["server_comms_address", "server_comms_port"]
    )]
    server_web_socket: Option<String>,
    /// Dial HOST:PORT for polling instead of the polling address's host and port; that host is still sent as TLS SNI.
    #[arg(long, alias = "connectTo", value_name = "HOST:PORT")]
    connect_to: Option<String>,
    /// The server's comms thumbprint, if known: registration fails if the server reports another.
    #[arg(long, alias = "serverThumbprint")]
    server_thumbprint: Option<String>,
    /// Replace a machine of the same name.
    #[arg(long, short = 'f')]
    force: bool,
    /// The space to register in: its name (any case) or its id (Spaces-N). Default: the server's Default space.
    #[arg(long, alias = "Space", value_name = "NAME")]
    space: Option<String>,
}

/// How the server and this tentacle connect (`--comms-style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CommsStyle {
    /// Listening: the server dials this machine.
    #[value(name = "TentaclePassive")]
    Passive,
    /// Polling: this machine dials the server.
    #[value(name = "TentacleActive")]
    Active,
}

impl CommsStyle {
    fn as_str(self) -> &'static str {
        match self {
            CommsStyle::Passive => "TentaclePassive",
            CommsStyle::Active => "TentacleActive",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Reply {
    machine: serde_json::Value,
    server_thumbprint: String,
    comms_port: u16,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

impl RegisterArgs {
    /// Makes this a worker registration in `pool`.
    pub(crate) fn set_worker_pool(&mut self, pool: String) {
        self.worker_pool = Some(pool);
    }
}

/// Whether `register` adds a deployment target or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Target,
    Worker,
}

pub(crate) fn register(target: &Target, a: &RegisterArgs, kind: Kind) -> anyhow::Result<()> {
    match (kind, &a.worker_pool, a.environments.is_empty()) {
        (Kind::Target, None, true) => bail!(
            "--environment is required: a deployment target belongs to at least one environment"
        ),
        (Kind::Worker, None, _) => {
            bail!("--worker-pool is required for `tentacle register-worker`")
        }
        _ => {}
    }
    let space = Space::new(a.space.as_deref())?;
    let mut cfg = target.load()?;
    let identity = load_identity(&cfg)?;
    let expected = a
        .server_thumbprint
        .as_deref()
        .map(parse_thumbprint)
        .transpose()?;
    let api = ApiClient::new(&a.server, expected.as_slice())?;
    let server = api.base().to_string();
    if expected.is_none() {
        let how = if api.is_https() {
            "over HTTPS without --server-thumbprint: the connection is encrypted, but the server's certificate is accepted on first use"
        } else {
            "over plain HTTP without --server-thumbprint: the server's identity is not verified and the API key crosses the network in clear"
        };
        eprintln!("warning: registering {how}; pass --server-thumbprint (`octopus server show-thumbprint`) to check it");
    } else if !api.is_https() && !api.is_loopback() {
        eprintln!("warning: registering over plain HTTP: the API key crosses the network in clear; the server's TLS port (`https://HOST:PORT` of `--web-socket-listen-port`) keeps it private");
    }
    let rest = server.split_once("://").map_or(server.as_str(), |(_, r)| r);
    let web_host = rest.split('/').next().unwrap_or(rest);
    let web_host = match octo_comms::net::split_host_port(web_host) {
        Some((h, _)) => h.to_string(),
        None => web_host.to_string(),
    };
    let name = a.name.clone().unwrap_or_else(hostname);
    let polling = a.comms_style == CommsStyle::Active;
    if !polling && (a.server_web_socket.is_some() || a.connect_to.is_some()) {
        bail!("--server-web-socket and --connect-to are for polling tentacles: add --comms-style TentacleActive");
    }
    let connect_to = parse_connect_to(a.connect_to.as_deref())?;
    // Polling: reuse this server's subscription if we have one, else a new one.
    let poll_address = |port: u16| -> anyhow::Result<String> {
        match (&a.server_comms_address, &a.server_web_socket) {
            (None, None) => Ok(format!("{web_host}:{port}")),
            (addr, ws) => polling_address(addr.as_deref(), ws.as_deref()),
        }
    };
    let uri = if polling {
        // Re-registering with the same server keeps the subscription already polled.
        let comms_host = match (&a.server_comms_address, &a.server_web_socket) {
            (None, None) => web_host.clone(),
            (addr, ws) => address_host(&polling_address(addr.as_deref(), ws.as_deref())?),
        };
        cfg.polling_servers
            .iter()
            .find(|p| address_host(&p.address) == comms_host)
            .map_or_else(new_subscription_id, |p| p.subscription_id.clone())
    } else {
        let host = a.public_hostname.clone().unwrap_or_else(hostname);
        let port = a.tentacle_comms_port.unwrap_or(cfg.listen.port);
        format!("https://{host}:{port}/")
    };
    let body = json!({
        "name": name,
        "comms_style": a.comms_style.as_str(),
        "uri": uri,
        "thumbprint": identity.thumbprint().to_string(),
        "environments": a.environments,
        "worker_pool": a.worker_pool,
        "roles": a.roles,
        "tenants": a.tenants,
        "tenant_tags": a.tenant_tags,
        "policy": a.policy,
        "force": a.force,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply: Reply = rt.block_on(async {
        let (key, session) = session_key(
            &api,
            a.api_key.as_deref(),
            a.username.as_deref(),
            a.password.as_deref(),
        )
        .await?;
        let result = post_registration(&api, &key, &space, &body).await;
        end_session(&api, &key, session).await;
        result
    })?;
    let server_tp: Thumbprint = parse_thumbprint(&reply.server_thumbprint)
        .with_context(|| format!("the server at {server} answered with a malformed thumbprint"))?;
    if let Some(presented) = api.presented_thumbprint() {
        if !api.is_pinned() {
            eprintln!("note: the server's TLS certificate {presented} was accepted without a check (no --server-thumbprint)");
        }
        if presented != server_tp {
            eprintln!("note: the TLS certificate at {server} ({presented}) is not the server's comms certificate ({server_tp}): a proxy in front of the server may be ending TLS there");
        }
    }
    if let Some(expected) = expected {
        if expected != server_tp {
            bail!(
                "the server at {server} presented thumbprint {server_tp} but {expected} was expected; nothing was changed on this tentacle (the server did record the machine: remove it there if this was the wrong server)"
            );
        }
    }
    let in_space = space.in_space();
    if polling {
        let address = poll_address(a.server_comms_port.unwrap_or(reply.comms_port))?;
        cfg.polling_servers.retain(|p| p.address != address);
        let via = connect_to
            .as_deref()
            .map(|c| format!(" (dialled at {c})"))
            .unwrap_or_default();
        cfg.polling_servers.push(PollingServer {
            address: address.clone(),
            thumbprint: server_tp.to_string(),
            subscription_id: uri.clone(),
            connections: 1,
            connect_to,
            rotating_to: None,
        });
        println!("Registered '{name}' with {server}{in_space} as polling tentacle poll://{uri}/; it will poll {address}{via}.");
    } else {
        cfg.trust(server_tp);
        println!("Registered '{name}' with {server}{in_space} as listening tentacle {uri}.");
    }
    target.save(&cfg)?;
    println!("This tentacle now trusts the server's thumbprint {server_tp}.");
    if let Some(id) = reply.machine.get("id") {
        println!("Machine id on the server: {id}. Restart the agent (or wait a few seconds if it runs) to apply.");
    }
    Ok(())
}

/// The key for this command's calls: `--api-key`, or a session key from logging
/// in with `--username`/`--password` (with its id, for [`end_session`]).
async fn session_key(
    api: &ApiClient,
    api_key: Option<&str>,
    username: Option<&str>,
    password: Option<&str>,
) -> anyhow::Result<(String, Option<i64>)> {
    match (api_key, username, password) {
        (Some(k), _, _) => Ok((k.trim().to_string(), None)),
        (None, Some(u), Some(p)) => {
            let (k, id) = login(api, u, p).await?;
            Ok((k, Some(id)))
        }
        _ => bail!("pass --api-key, or --username and --password"),
    }
}

/// Revokes a session key made by [`session_key`] for this command only.
async fn end_session(api: &ApiClient, key: &str, session: Option<i64>) {
    if let Some(id) = session {
        let path = format!("/api/api-keys/{id}");
        if let Err(e) = api.call(Method::DELETE, &path, Some(key), None).await {
            eprintln!("{}", crate::terminal::safe(&format!("warning: could not revoke this command's session key (id {id}): {e:#}; revoke it with `octopus api-key revoke {id}`")));
        }
    }
}

/// Logs in; returns a session key and its id (revoked after the registration).
async fn login(api: &ApiClient, username: &str, password: &str) -> anyhow::Result<(String, i64)> {
    let server = api.base();
    let (status, text) = api
        .call(
            Method::POST,
            "/api/users/login",
            None,
            Some(&json!({ "username": username, "password": password })),
        )
        .await?;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if !status.is_success() {
        bail!(
            "the server at {server} refused the login of '{username}': {}",
            v["error"].as_str().unwrap_or("no reason given")
        );
    }
    let key = v["api_key"]
        .as_str()
        .context("the login answer has no session key")?
        .to_string();
    let id = v["key"]["id"]
        .as_i64()
        .context("the login answer has no key id")?;
    Ok((key, id))
}

async fn post_registration(
    api: &ApiClient,
    key: &str,
    space: &Space,
    body: &serde_json::Value,
) -> anyhow::Result<Reply> {
    let server = api.base();
    let path = space.path("machines/register");
    let (status, text) = api.call(Method::POST, &path, Some(key), Some(body)).await?;
    if !status.is_success() {
        let msg = error_text(text);
        if status == StatusCode::UNAUTHORIZED {
            bail!("the server at {server} refused the API key ({msg}); create one with `octopus api-key create`");
        }
        if status == StatusCode::NOT_FOUND {
            return Err(space.not_found(server, &msg));
        }
        let in_space = space.in_space();
        bail!("the server at {server} refused the registration{in_space} ({status}): {msg}");
    }
    serde_json::from_str(&text).with_context(|| format!("unexpected answer from {server}{path}"))
}

/// The `error` of a JSON error answer, or the whole answer.
fn error_text(text: String) -> String {
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(text)
}

/// The space (`--space`) of the server's space routes: `/api/spaces/{space}/...`,
/// or, without `--space`, `/api/...` (the server's Default space).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Space(Option<String>);

impl Space {
    /// `--space` as given (trimmed); refused when no URL path could carry it.
    fn new(space: Option<&str>) -> anyhow::Result<Self> {
        let Some(s) = space.map(str::trim) else {
            return Ok(Self(None));
        };
        if s.is_empty() {
            bail!("--space is empty; give a space's name or id (Spaces-N), or leave it out for the Default space");
        }
        if s == "." || s == ".." {
            bail!("--space '{s}': a web address cannot carry this name; give the space's id instead (Spaces-N, from `octopus space list`)");
        }
        Ok(Self(Some(s.to_string())))
    }

    /// The API path of `rest` (e.g. `machines/register`) in this space; the
    /// space's name is percent-encoded as one path segment.
    fn path(&self, rest: &str) -> String {
        match &self.0 {
            None => format!("/api/{rest}"),
            Some(s) => format!("/api/spaces/{}/{rest}", encode(s)),
        }
    }

    /// ` in space 'NAME'` for messages (empty for the Default space).
    fn in_space(&self) -> String {
        self.0
            .as_deref()
            .map(|s| format!(" in space '{s}'"))
            .unwrap_or_default()
    }

    /// The error for a 404 from a space route: the space does not exist (or
    /// the caller has no role in it), or the server predates spaces.
    fn not_found(&self, server: &str, msg: &str) -> anyhow::Error {
        let Some(space) = &self.0 else {
            return anyhow::anyhow!("the server at {server} answered 404 Not Found: {msg}");
        };
        if msg.starts_with("no such API route") {
            return anyhow::anyhow!(
                "the server at {server} does not serve spaces (it answered: {msg}); leave out --space '{space}' to use its only space, or upgrade the server"
            );
        }
        // The server's usual words say no more than this message; others are kept.
        let said = if msg.starts_with("space '") {
            String::new()
        } else {
            format!(" (the server said: {msg})")
        };
        anyhow::anyhow!(
            "space '{space}' does not exist on the server at {server}, or the user of this key has no role in it{said}; `octopus space list` lists the spaces you can see, `octopus space create {}` creates it (with an administrator's key), and without --space the Default space is used",
            shell_word(space)
        )
    }
}

/// `s` as one shell word (quoted when it needs to be).
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.,:@%+=/".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Options of `deregister-from`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  tentacle deregister-from --server http://octopus:8080 --api-key API-XXXX\n  tentacle deregister-from --server https://octopus.example:443 --api-key API-XXXX\n  tentacle deregister-from --server http://octopus:8080 --api-key API-XXXX --space \"Ops Team\"   (leaves that space; the server stays trusted while this tentacle is registered in another)"
)]
pub(crate) struct DeregisterArgs {
    /// The server's API address: http://HOST:PORT or https://HOST:PORT (its TLS port).
    #[arg(long)]
    server: String,
    /// An API key (used for this call only, never stored).
    #[arg(
        long,
        alias = "apiKey",
        env = "OCTOPUS_API_KEY",
        hide_env_values = true,
        required_unless_present = "username",
        conflicts_with = "username"
    )]
    api_key: Option<String>,
    /// Log in as this user instead (with --password).
    #[arg(long, short = 'u', alias = "user", requires = "password")]
    username: Option<String>,
    /// The user's password (used for this call only, never stored).
    #[arg(long, short = 'p', requires = "username")]
    password: Option<String>,
    /// Accepted for the original's scripts: every machine with this tentacle's
    /// thumbprint in the space is removed, one or many.
    #[arg(long, short = 'm')]
    multiple: bool,
    /// The space to leave: its name (any case) or its id (Spaces-N). Default: the server's Default space.
    #[arg(long, alias = "Space", value_name = "NAME")]
    space: Option<String>,
}

/// Removes every machine with this tentacle's thumbprint from the space
/// (`--space`, else the Default space) of the server, and stops trusting (and
/// polling) that server unless this tentacle is still registered in another
/// of its spaces (of those the key can see).
pub(crate) fn deregister(target: &Target, a: &DeregisterArgs) -> anyhow::Result<()> {
    let space = Space::new(a.space.as_deref())?;
    let mut cfg = target.load()?;
    let identity = load_identity(&cfg)?;
    let ours = identity.thumbprint().to_string();
    // Over https, only a server this tentacle trusts gets the API key.
    let api = ApiClient::new(&a.server, &cfg.trusted_thumbprints())?;
    let server = api.base().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (removed, server_tp, elsewhere) = rt.block_on(async {
        let (key, session) = session_key(
            &api,
            a.api_key.as_deref(),
            a.username.as_deref(),
            a.password.as_deref(),
        )
        .await?;
        let result = async {
            let info = checked(&api, Method::GET, "/api/server", &key).await?;
            let machines = checked(&api, Method::GET, &space.path("machines"), &key)
                .await
                .map_err(|e| match e.downcast_ref::<NotFound>() {
                    Some(NotFound(msg)) => space.not_found(api.base(), msg),
                    None => e,
                })?;
            let mut removed = Vec::new();
            for m in machines.as_array().into_iter().flatten() {
                if is_ours(m, &ours) {
                    let name = m["name"].as_str().unwrap_or_default().to_string();
                    let path = space.path(&format!("machines/{}", encode(&name)));
                    checked(&api, Method::DELETE, &path, &key).await?;
                    removed.push(name);
                }
            }
            let elsewhere = registrations_in_spaces(&api, &key, &ours).await;
            Ok::<_, anyhow::Error>((
                removed,
                info["thumbprint"].as_str().unwrap_or_default().to_string(),
                elsewhere,
            ))
        }
        .await;
        end_session(&api, &key, session).await;
        result
    })?;
    let in_space = space.in_space();
    if removed.is_empty() {
        println!("The server at {server} has no machine{in_space} with this tentacle's thumbprint {ours}.");
    } else {
        println!(
            "Removed {} from {server}{in_space}.",
            crate::terminal::safe(&removed.join(", "))
        );
    }
    if !elsewhere.is_empty() {
        println!(
            "This tentacle is still registered with {server} as {}, so it keeps trusting (and polling) that server; `tentacle deregister-from --space NAME` leaves those spaces too.",
            crate::terminal::safe(&elsewhere.join(", "))
        );
        return Ok(());
    }
    if let Ok(tp) = parse_thumbprint(&server_tp) {
        let trusted = cfg.remove_trust(tp);
        let before = cfg.polling_servers.len();
        cfg.polling_servers
            .retain(|p| !p.thumbprint.eq_ignore_ascii_case(&server_tp));
        if trusted || before != cfg.polling_servers.len() {
            target.save(&cfg)?;
            println!("This tentacle no longer trusts or polls the server {tp}.");
        }
    }
    Ok(())
}

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether a machine (JSON) has this thumbprint.
fn is_ours(machine: &serde_json::Value, ours: &str) -> bool {
    machine["thumbprint"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case(ours))
}

/// This tentacle's machines in the server's spaces the key can see, as
/// `'NAME' in space 'SPACE'`. A server without spaces, or a space whose
/// machines the key may not list, adds nothing (the latter with a note).
async fn registrations_in_spaces(api: &ApiClient, key: &str, ours: &str) -> Vec<String> {
    let Ok(spaces) = checked(api, Method::GET, "/api/spaces", key).await else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for s in spaces.as_array().into_iter().flatten() {
        let (Some(id), Some(name)) = (s["id"].as_i64(), s["name"].as_str()) else {
            continue;
        };
        let path = Space(Some(format!("Spaces-{id}"))).path("machines");
        match checked(api, Method::GET, &path, key).await {
            Ok(machines) => found.extend(
                machines
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|m| is_ours(m, ours))
                    .map(|m| {
                        format!(
                            "'{}' in space '{name}'",
                            m["name"].as_str().unwrap_or_default()
                        )
                    }),
            ),
            Err(e) => eprintln!(
                "{}",
                crate::terminal::safe(&format!(
                    "note: could not check space '{name}' for other registrations of this tentacle: {e:#}"
                ))
            ),
        }
    }
    found
}

/// A 404 answer (the server's message), so callers can say what was not found.
#[derive(Debug)]
struct NotFound(String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for NotFound {}

/// The JSON body of a successful answer, or an error naming the server's reason
/// (a 404's is a [`NotFound`] in the chain).
async fn checked(
    api: &ApiClient,
    method: Method,
    path: &str,
    key: &str,
) -> anyhow::Result<serde_json::Value> {
    let server = api.base();
    let (status, text) = api.call(method, path, Some(key), None).await?;
    if !status.is_success() {
        let msg = error_text(text);
        if status == StatusCode::UNAUTHORIZED {
            bail!("the server at {server} refused the API key ({msg})");
        }
        if status == StatusCode::NOT_FOUND {
            return Err(anyhow::Error::new(NotFound(msg.clone()))
                .context(format!("the server at {server} answered {status}: {msg}")));
        }
        bail!("the server at {server} answered {status}: {msg}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn space_paths() {
        let default = Space::new(None).unwrap();
        assert_eq!(default.path("machines/register"), "/api/machines/register");
        assert_eq!(default.in_space(), "");
        for (given, path) in [
            ("Ops", "/api/spaces/Ops/machines/register"),
            (" Ops Team ", "/api/spaces/Ops%20Team/machines/register"),
            ("Spaces-2", "/api/spaces/Spaces-2/machines/register"),
            ("a/b?c#d%", "/api/spaces/a%2Fb%3Fc%23d%25/machines/register"),
            ("é", "/api/spaces/%C3%A9/machines/register"),
        ] {
            let space = Space::new(Some(given)).unwrap();
            assert_eq!(space.path("machines/register"), path, "{given:?}");
        }
        assert_eq!(
            Space::new(Some("Ops Team")).unwrap().in_space(),
            " in space 'Ops Team'"
        );
        for bad in ["", "  ", ".", ".."] {
            assert!(Space::new(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn not_found_names_the_space_and_what_to_do() {
        let e = Space::new(Some("Ops Team"))
            .unwrap()
            .not_found("http://o:8080", "space 'Ops Team' does not exist")
            .to_string();
        assert!(e.contains("space 'Ops Team' does not exist on the server at http://o:8080"));
        assert!(e.contains("`octopus space list`"));
        assert!(e.contains("`octopus space create 'Ops Team'`"));
        let old = Space::new(Some("Ops"))
            .unwrap()
            .not_found("http://o:8080", "no such API route; see /api/server")
            .to_string();
        assert!(old.contains("does not serve spaces"), "{old}");
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("Ops"), "Ops");
        assert_eq!(shell_word("Ops Team"), "'Ops Team'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }
}
