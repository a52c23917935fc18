//! `tentacle`: install, configure and run a tentacle instance from the command line.
//!
//! Command and option names follow the original Tentacle so automation carries
//! over; options are kebab-case and also accept the original's spellings.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod api;
mod check;
mod compat;
mod container;
mod register;
mod rotate;
mod run;
mod setup;
mod terminal;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use octo_agent::config::{PollingServer, ProxySection, TentacleConfig, DEFAULT_SERVER_COMMS_PORT};
use octo_agent::instances::{Instance, Registry, DEFAULT_INSTANCE};
use octo_agent::service_unit;
use octo_comms::ProxySetting;
use octo_tls::{Identity, Thumbprint};

#[derive(Parser, Debug)]
#[command(
    name = "tentacle",
    version,
    about = "The deployment agent: receives scripts and files from an Octopus server.",
    after_help = "Typical first steps:\n  tentacle create-instance --instance Tentacle\n  tentacle new-certificate --instance Tentacle\n  tentacle configure --instance Tentacle --port 10933 --trust SERVER_THUMBPRINT\n  tentacle service --instance Tentacle --install\nor run `tentacle setup` and answer its questions."
)]
struct Cli {
    /// Instance to act on.
    #[arg(long, global = true, default_value = DEFAULT_INSTANCE)]
    instance: String,
    /// Use this configuration file instead of looking the instance up in the registry.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register a new instance and write its configuration.
    #[command(
        after_help = "Example:\n  tentacle create-instance --instance Web --config /etc/octopus/web.toml --home /var/lib/octopus/web"
    )]
    CreateInstance {
        /// Home directory (work folders, logs, received files).
        #[arg(long)]
        home: Option<PathBuf>,
        /// Applications directory (deployed packages). Default: HOME/Applications.
        #[arg(long)]
        app: Option<PathBuf>,
    },
    /// Remove an instance's registration and configuration (its home directory is kept).
    #[command(after_help = "Example:\n  tentacle delete-instance --instance Web")]
    DeleteInstance,
    /// List registered instances.
    #[command(after_help = "Example:\n  tentacle list-instances --format json")]
    ListInstances {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Create the instance's certificate (replacing any existing one unless --if-blank).
    #[command(after_help = "Example:\n  tentacle new-certificate --instance Web --if-blank")]
    NewCertificate {
        /// Keep an existing certificate.
        #[arg(long, short = 'b', alias = "ifBlank")]
        if_blank: bool,
    },
    /// Use an existing certificate: a PEM file with certificate and key, or PKCS#12/PFX.
    #[command(
        after_help = "Example:\n  tentacle import-certificate --instance Web --from-file /root/tentacle.pfx --password secret"
    )]
    ImportCertificate {
        /// The file to import.
        #[arg(long, short = 'f', alias = "fromFile")]
        from_file: PathBuf,
        /// PKCS#12 password.
        #[arg(long, alias = "pw", alias = "pfx-password", alias = "pfxPassword")]
        password: Option<String>,
    },
    /// Print this instance's certificate thumbprint (servers must trust it).
    #[command(
        after_help = "Examples:\n  tentacle show-thumbprint --instance Web --format json\n  tentacle show-thumbprint --export-file /tmp/thumbprint.txt"
    )]
    ShowThumbprint {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Also write the thumbprint to this file.
        #[arg(long, short = 'e', alias = "exportFile", value_name = "FILE")]
        export_file: Option<PathBuf>,
        /// Accepted for the original's scripts (the output is the thumbprint alone anyway).
        #[arg(long, alias = "thumbprintOnly", hide = true)]
        thumbprint_only: bool,
    },
    /// Replace a trusted server's thumbprint everywhere it is used (listening trust and polled servers).
    #[command(
        after_help = "Example:\n  tentacle update-trust --oldThumbprint 3FAF...8C8D --newThumbprint 5FAE...C8F0"
    )]
    UpdateTrust {
        /// The thumbprint to replace.
        #[arg(long, alias = "oldThumbprint")]
        old_thumbprint: String,
        /// The thumbprint to trust instead.
        #[arg(long, alias = "newThumbprint")]
        new_thumbprint: String,
    },
    /// Stop trusting and polling every server except those listed (their polling addresses).
    #[command(
        after_help = "Example:\n  tentacle clear-trusted-servers --keep \"https://polling-lb.example:10943\""
    )]
    ClearTrustedServers {
        /// Comma-separated polling addresses to keep (HOST:PORT or https://HOST:PORT).
        #[arg(long, value_delimiter = ',')]
        keep: Vec<String>,
    },
    /// Start the services of instances that are installed but not running (a watchdog calls this).
    #[command(
        name = "checkservices",
        after_help = "Examples:\n  tentacle checkservices --instances \"*\"\n  tentacle checkservices --instances Web,Db"
    )]
    CheckServices {
        /// Comma-separated instance names, or * for every instance.
        #[arg(long, default_value = "*")]
        instances: String,
    },
    /// Replace this instance's certificate without registering again: the running agent offers the new one to every server it trusts and switches once they accept.
    #[command(after_help = "Example:\n  tentacle rotate-certificate --instance Web --wait 120")]
    RotateCertificate {
        /// Seconds to wait for the agent to switch (it carries on after).
        #[arg(long, default_value_t = 60)]
        wait: u64,
        /// Switch without waiting for every server to accept.
        #[arg(long)]
        force: bool,
    },
    /// Change directories, listening and trusted servers.
    Configure(ConfigureArgs),
    /// Poll a server (add it), or stop polling one (--remove).
    PollServer(PollServerArgs),
    /// Set the HTTP proxy polling connections go through (or none).
    PollingProxy(PollingProxyArgs),
    /// Install, remove, start or stop the systemd service for this instance.
    Service(ServiceArgs),
    /// Register this tentacle with a server (as a deployment target) and trust the server.
    RegisterWith(Box<register::RegisterArgs>),
    /// Register this tentacle with a server as a worker in a worker pool.
    #[command(
        after_help = "Examples:\n  tentacle register-worker --server http://octopus:8080 --api-key API-XXXX --worker-pool Default\n  tentacle register-worker --server http://octopus:8080 --api-key API-XXXX --worker-pool Builders --space \"Ops Team\""
    )]
    RegisterWorker {
        /// The worker pool.
        #[arg(long, alias = "workerpool")]
        worker_pool: String,
        #[command(flatten)]
        args: Box<register::RegisterArgs>,
    },
    /// Remove this tentacle from a server, and stop trusting and polling it (`deregister-worker` too).
    #[command(alias = "deregister-worker")]
    DeregisterFrom(register::DeregisterArgs),
    /// Run the agent in the foreground (what the service runs).
    #[command(
        alias = "agent",
        after_help = "Examples:\n  tentacle run --instance Web\n  tentacle agent --from-env     (a container's entrypoint: configure and register from ServerUrl, ServerApiKey, ... once, then run)"
    )]
    Run(RunArgs),
    /// Check each configured path to the servers step by step (DNS, proxy, TCP, TLS, trust, RPC) and say what fixes a failure.
    CheckConnectivity(check::CheckArgs),
    /// Print the instance's configuration.
    #[command(after_help = "Example:\n  tentacle show-configuration --instance Web --format json")]
    ShowConfiguration {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Print the version.
    Version {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Writes man pages (DIR/man) and shell completions (DIR/completions) of
    /// this command line (used by scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long)]
        out: PathBuf,
    },
    /// Watches an upgrade of this tentacle until the server confirms it, and
    /// puts the previous binary back if the new one does not come back
    /// (started by the upgrade itself, from the previous binary).
    #[command(hide = true)]
    UpgradeGuard {
        /// The upgrade record, HOME/Upgrade/state.json.
        #[arg(long)]
        state: PathBuf,
        /// Start the guard in a session of its own and return.
        #[arg(long)]
        detach: bool,
        /// Where the detached guard writes what it does.
        #[arg(long, requires = "detach")]
        log: Option<PathBuf>,
    },
    /// Interactive setup: asks listening or polling, port or server, thumbprint.
    #[command(
        after_help = "Answers may be piped in, one per line, e.g.:\n  printf 'Web\\nlistening\\n10933\\n0.0.0.0\\nTHUMBPRINT\\n\\n' | tentacle setup"
    )]
    Setup,
}

/// Options of `run` (alias `agent`).
#[derive(Args, Debug, Default)]
struct RunArgs {
    /// Configure the instance from the original container's environment variables
    /// (ServerUrl, ServerApiKey or ServerUsername/ServerPassword, Space,
    /// TargetEnvironment, TargetRole, TargetWorkerPool, ...), creating it when
    /// missing and registering it once, then run. See docs/container.md.
    #[arg(long)]
    from_env: bool,
    /// Wait this many milliseconds before starting.
    #[arg(long, value_name = "MS")]
    wait: Option<u64>,
}

#[derive(Args, Debug, Default)]
#[command(
    after_help = "Examples:\n  tentacle configure --instance Web --port 10933 --trust 0123...CDEF\n  tentacle configure --instance Web --no-listen           (polling only)\n  tentacle configure --port 10933 --noListen False --reset-trust --app /home/Octopus/Applications/"
)]
struct ConfigureArgs {
    /// Home directory.
    #[arg(long, alias = "homedir")]
    home: Option<PathBuf>,
    /// Applications directory.
    #[arg(long, alias = "appdir")]
    app: Option<PathBuf>,
    /// Listening port (0 picks a free port at each start).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on.
    #[arg(long, alias = "listenIpAddress", alias = "listen-ip-address")]
    listen_ip: Option<String>,
    /// Stop listening (polling only); `--no-listen false` listens again. The
    /// original's `--noListen True|False` is the same option.
    #[arg(
        long,
        alias = "noListen",
        conflicts_with = "listen",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = compat::parse_bool,
        value_name = "True|False"
    )]
    no_listen: Option<bool>,
    /// Listen again.
    #[arg(long)]
    listen: bool,
    /// Trust a server thumbprint (repeatable).
    #[arg(long)]
    trust: Vec<String>,
    /// Stop trusting a server thumbprint (repeatable).
    #[arg(long, alias = "removeTrust")]
    remove_trust: Vec<String>,
    /// Forget every trusted server first.
    #[arg(long, alias = "resetTrust")]
    reset_trust: bool,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Each call adds a server (or replaces the entry with the same address); the agent polls all of them and serves requests from any.\n\nExamples:\n  tentacle poll-server --instance Web --server-comms-address octopus.example:10943 --server-thumbprint 0123...CDEF\n  tentacle poll-server --instance Web --server-web-socket wss://octopus.example:443/tentacle --server-thumbprint 0123...CDEF\n  tentacle poll-server --instance Web --server-comms-address https://alpha.example:443 --connect-to 10.1.2.3:443 --server-thumbprint 0123...CDEF\n  tentacle poll-server --instance Web --server-comms-address octopus.example:10943 --remove"
)]
struct PollServerArgs {
    /// The server's polling endpoint: HOST[:PORT] or https://HOST[:PORT] (default port 10943). HOST is sent as TLS SNI.
    #[arg(
        long,
        alias = "serverCommsAddress",
        alias = "server",
        required_unless_present = "server_web_socket",
        conflicts_with = "server_web_socket"
    )]
    server_comms_address: Option<String>,
    /// Poll over WebSocket instead: the server's wss://HOST[:PORT]/PATH (port 443 and path /tentacle by default; `octopus server run --web-socket-listen-port`).
    #[arg(long, alias = "serverWebSocket", value_name = "URL")]
    server_web_socket: Option<String>,
    /// Dial HOST:PORT instead of the address's host and port; the address's host is still sent as TLS SNI (for SNI routers and names DNS does not know here).
    #[arg(long, alias = "connectTo", value_name = "HOST:PORT")]
    connect_to: Option<String>,
    /// The server's thumbprint (`octopus server show-thumbprint`). Required when adding.
    #[arg(long, alias = "serverThumbprint", alias = "thumbprint")]
    server_thumbprint: Option<String>,
    /// Subscription id the server knows this tentacle by (default: a new random one).
    #[arg(long, alias = "subscriptionId")]
    subscription_id: Option<String>,
    /// Connections to keep open to this server.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Stop polling this server.
    #[arg(long)]
    remove: bool,
}

#[derive(Args)]
#[command(
    after_help = "Without this setting the HTTPS_PROXY and NO_PROXY environment variables decide.\n\nExamples:\n  tentacle polling-proxy --instance Web --proxy-enable true --proxy-host proxy.example --proxy-port 3128\n  tentacle polling-proxy --instance Web --proxy-enable true --proxy-host proxy.example --proxy-port 3128 --proxy-username octo --proxy-password secret\n  tentacle polling-proxy --instance Web --proxy-enable true     (the proxy from HTTPS_PROXY)\n  tentacle polling-proxy --instance Web --proxy-enable false    (direct; HTTPS_PROXY ignored)"
)]
struct PollingProxyArgs {
    /// Use a proxy: true (with --proxy-host: that proxy; without: HTTPS_PROXY) or false (connect directly, ignoring HTTPS_PROXY).
    #[arg(
        long,
        alias = "proxyEnable",
        required = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
        value_name = "true|false"
    )]
    proxy_enable: bool,
    /// The HTTP proxy's host name or IP address.
    #[arg(long, alias = "proxyHost")]
    proxy_host: Option<String>,
    /// The HTTP proxy's port (default 80).
    #[arg(long, alias = "proxyPort")]
    proxy_port: Option<u16>,
    /// User name for the proxy (Basic authentication).
    #[arg(long, alias = "proxyUsername")]
    proxy_username: Option<String>,
    /// Password for the proxy (stored in the instance's configuration file, mode 0600).
    #[arg(long, alias = "proxyPassword")]
    proxy_password: Option<String>,
}

impl std::fmt::Debug for PollingProxyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollingProxyArgs")
            .field("proxy_enable", &self.proxy_enable)
            .field("proxy_host", &self.proxy_host)
            .field("proxy_port", &self.proxy_port)
            .field("proxy_username", &self.proxy_username)
            .field(
                "proxy_password",
                &self.proxy_password.as_ref().map(|_| "(set)"),
            )
            .finish()
    }
}

#[derive(Args, Debug)]
#[command(
    after_help = "Without systemd (e.g. in a container) nothing can be started or stopped as a service: --install still writes the unit, --stop and --uninstall do what can be done, and --start/--restart fail saying to run the agent with `tentacle run`.\n\nExamples:\n  tentacle service --instance Web --install --start --username octopus\n  tentacle service --instance Web --stop --uninstall"
)]
struct ServiceArgs {
    /// Write and enable the systemd unit.
    #[arg(long)]
    install: bool,
    /// Write the unit again (after moving the binary or changing --username).
    #[arg(long)]
    reconfigure: bool,
    /// Stop, disable and remove the unit.
    #[arg(long, conflicts_with = "install")]
    uninstall: bool,
    /// Start the service.
    #[arg(long)]
    start: bool,
    /// Stop the service.
    #[arg(long)]
    stop: bool,
    /// Restart the service.
    #[arg(long)]
    restart: bool,
    /// Run the service as this user (default root).
    #[arg(long, alias = "user", env = "OCTOPUS_SERVICE_USERNAME")]
    username: Option<String>,
    /// Start the service after this systemd unit (e.g. a mount or a database).
    #[arg(long, alias = "dependOn", value_name = "UNIT")]
    depend_on: Option<String>,
}

/// The instance a command acts on.
pub(crate) struct Target {
    pub name: String,
    pub config_path: PathBuf,
    pub explicit_config: bool,
}

impl Target {
    fn resolve(cli_instance: &str, cli_config: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(p) = cli_config {
            return Ok(Self {
                name: cli_instance.to_string(),
                config_path: p.to_path_buf(),
                explicit_config: true,
            });
        }
        let inst = Registry::locate().get(cli_instance)?;
        Ok(Self {
            name: inst.name,
            config_path: inst.config,
            explicit_config: false,
        })
    }

    pub fn load(&self) -> anyhow::Result<TentacleConfig> {
        if !self.config_path.exists() {
            bail!(
                "the configuration file {} of instance '{}' does not exist; recreate it with `tentacle create-instance --instance {}`",
                self.config_path.display(),
                self.name,
                self.name
            );
        }
        Ok(TentacleConfig::load(&self.config_path)?)
    }

    fn save(&self, cfg: &TentacleConfig) -> anyhow::Result<()> {
        Ok(cfg.save(&self.config_path)?)
    }
}

pub(crate) fn parse_thumbprint(s: &str) -> anyhow::Result<Thumbprint> {
    Ok(s.parse::<Thumbprint>()?)
}

pub(crate) fn load_identity(cfg: &TentacleConfig) -> anyhow::Result<Identity> {
    let t = &cfg.tentacle;
    if !t.certificate.exists() {
        bail!(
            "instance '{}' has no certificate yet ({} is missing); create one with `tentacle new-certificate --instance {}`",
            t.instance,
            t.certificate.display(),
            t.instance
        );
    }
    Ok(Identity::load(&t.certificate, &t.private_key)?)
}

/// Runs the `tentacle` command line and exits.
pub fn main() {
    run_command_line(octo_agent::VERSION);
}

/// As [`main`], for a binary that reports `version` instead of this crate's
/// (to servers, scripts and `tentacle version`): the upgrade tests build an
/// older tentacle this way (`src/bin/tentacle-old-for-tests.rs`).
pub fn main_reporting(version: &'static str) {
    octo_agent::report_version(version);
    run_command_line(version);
}

fn run_command_line(version: &'static str) {
    octo_comms::tune_allocator();
    let command = last_wins(Cli::command().version(version));
    let args = compat::normalise(std::env::args_os().collect(), &command);
    let cli = command
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
        .unwrap_or_else(|e| e.exit());
    if let Err(e) = dispatch(cli) {
        // Errors carry a server's words and configured names: escaped.
        eprintln!("error: {}", terminal::safe(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// Every option given twice keeps its last value, as in the original (its
/// documented archive worker script passes `--space` twice); options that
/// collect values (`--role`, `--environment`, `--trust`) still collect.
fn last_wins(cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let mut cmd = cmd.args_override_self(true);
    for name in names {
        cmd = cmd.mut_subcommand(name, last_wins);
    }
    cmd
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::CreateInstance { home, app } => {
            create_instance(&cli.instance, config, home, app.as_deref()).map(|_| ())
        }
        Command::DeleteInstance => delete_instance(&cli.instance, config),
        Command::ListInstances { format } => list_instances(format),
        Command::NewCertificate { if_blank } => {
            new_certificate(&Target::resolve(&cli.instance, config)?, if_blank)
        }
        Command::ImportCertificate {
            from_file,
            password,
        } => import_certificate(
            &Target::resolve(&cli.instance, config)?,
            &from_file,
            password.as_deref(),
        ),
        Command::ShowThumbprint {
            format,
            export_file,
            thumbprint_only: _,
        } => show_thumbprint(
            &Target::resolve(&cli.instance, config)?,
            format,
            export_file.as_deref(),
        ),
        Command::UpdateTrust {
            old_thumbprint,
            new_thumbprint,
        } => update_trust(
            &Target::resolve(&cli.instance, config)?,
            &old_thumbprint,
            &new_thumbprint,
        ),
        Command::ClearTrustedServers { keep } => {
            clear_trusted_servers(&Target::resolve(&cli.instance, config)?, &keep)
        }
        Command::CheckServices { instances } => check_services(&instances),
        Command::RotateCertificate { wait, force } => {
            rotate::rotate_certificate(&Target::resolve(&cli.instance, config)?, wait, force)
        }
        Command::Configure(a) => configure(&Target::resolve(&cli.instance, config)?, a),
        Command::PollServer(a) => poll_server(&Target::resolve(&cli.instance, config)?, a),
        Command::PollingProxy(a) => polling_proxy(&Target::resolve(&cli.instance, config)?, a),
        Command::Service(a) => service(&Target::resolve(&cli.instance, config)?, &a),
        Command::Run(a) => {
            if let Some(ms) = a.wait {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            if a.from_env {
                let target = container::prepare(&cli.instance, config)?;
                return run::run(&target);
            }
            run::run(&Target::resolve(&cli.instance, config)?)
        }
        Command::RegisterWith(a) => register::register(
            &Target::resolve(&cli.instance, config)?,
            &a,
            register::Kind::Target,
        ),
        Command::RegisterWorker {
            worker_pool,
            mut args,
        } => {
            args.set_worker_pool(worker_pool);
            register::register(
                &Target::resolve(&cli.instance, config)?,
                &args,
                register::Kind::Worker,
            )
        }
        Command::DeregisterFrom(a) => {
            register::deregister(&Target::resolve(&cli.instance, config)?, &a)
        }
        Command::CheckConnectivity(a) => check::run(&Target::resolve(&cli.instance, config)?, &a),
        Command::ShowConfiguration { format } => {
            show_configuration(&Target::resolve(&cli.instance, config)?, format)
        }
        Command::Version { format } => {
            match format {
                Format::Text => println!("tentacle {}", octo_agent::version()),
                Format::Json => println!(
                    "{}",
                    serde_json::json!({
                        "version": octo_agent::version(),
                        "protocol": octo_proto::PROTOCOL_VERSION,
                        "features": octo_agent::upgrade::FEATURES,
                    })
                ),
            }
            Ok(())
        }
        Command::Setup => setup::run(std::io::stdin().lock(), &mut std::io::stdout()),
        Command::GenerateDocs { out } => {
            let cmd = Cli::command().version(octo_agent::version());
            octo_agent::cli_docs::generate(cmd, &out)
                .with_context(|| format!("writing the docs under {}", out.display()))
        }
        Command::UpgradeGuard { state, detach, log } => {
            if detach {
                let log = log.unwrap_or_else(|| state.with_extension("guard.log"));
                octo_agent::upgrade::detach_guard(&state, &log)
                    .with_context(|| format!("starting the upgrade guard (log {})", log.display()))
            } else {
                octo_agent::upgrade::guard(&state).map_err(anyhow::Error::msg)
            }
        }
    }
}

pub(crate) fn create_instance(
    name: &str,
    config: Option<&Path>,
    home: Option<PathBuf>,
    app: Option<&Path>,
) -> anyhow::Result<Target> {
    let registry = Registry::locate();
    Registry::check_name(name)?;
    let config_path = config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| registry.default_config(name));
    let config_path = absolute(&config_path)?;
    // As the original: with --config and no --home, the home is the config's folder.
    let home = match (home, config) {
        (Some(h), _) => h,
        (None, Some(_)) => config_path
            .parent()
            .map_or_else(|| registry.default_home(name), Path::to_path_buf),
        (None, None) => registry.default_home(name),
    };
    let home = absolute(&home)?;
    if let Ok(existing) = registry.get(name) {
        bail!(
            "a tentacle instance named '{name}' already exists (configuration {}); use it, or remove it first with `tentacle delete-instance --instance {name}`",
            existing.config.display()
        );
    }
    if config_path.exists() {
        bail!(
            "{} already exists; pass another --config, or delete the file if it is not in use",
            config_path.display()
        );
    }
    std::fs::create_dir_all(&home)
        .with_context(|| format!("creating home directory {}", home.display()))?;
    let cfg = TentacleConfig::new(name, &home, app);
    cfg.save(&config_path)?;
    registry.add(&Instance {
        name: name.to_string(),
        config: config_path.clone(),
    })?;
    println!("Created instance '{name}'");
    println!("  configuration: {}", config_path.display());
    println!("  home:          {}", home.display());
    println!("Next: tentacle new-certificate --instance {name}");
    Ok(Target {
        name: name.to_string(),
        config_path,
        explicit_config: false,
    })
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn delete_instance(name: &str, config: Option<&Path>) -> anyhow::Result<()> {
    let registry = Registry::locate();
    let inst = registry.get(name)?;
    if let Some(c) = config {
        if absolute(c)? != inst.config {
            bail!(
                "instance '{name}' uses {}, not {}",
                inst.config.display(),
                c.display()
            );
        }
    }
    let home = TentacleConfig::load(&inst.config)
        .ok()
        .map(|c| c.tentacle.home);
    registry.remove(name)?;
    match std::fs::remove_file(&inst.config) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", inst.config.display())),
    }
    println!(
        "Deleted instance '{name}' (configuration {} removed)",
        inst.config.display()
    );
    if let Some(h) = home {
        println!(
            "Its home directory {} was kept; remove it by hand if no longer needed.",
            h.display()
        );
    }
    Ok(())
}

fn list_instances(format: Format) -> anyhow::Result<()> {
    let list = Registry::locate().list()?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        Format::Text if list.is_empty() => {
            println!("No instances. Create one with `tentacle create-instance`.")
        }
        Format::Text => {
            let w = list.iter().map(|i| i.name.len()).max().unwrap_or(4).max(4);
            println!("{:w$}  CONFIGURATION", "NAME");
            for i in list {
                println!("{:w$}  {}", i.name, i.config.display());
            }
        }
    }
    Ok(())
}

pub(crate) fn new_certificate(target: &Target, if_blank: bool) -> anyhow::Result<()> {
    let cfg = target.load()?;
    let t = &cfg.tentacle;
    if t.certificate.exists() {
        let existing = Identity::load(&t.certificate, &t.private_key)?;
        if if_blank {
            println!(
                "Instance '{}' already has a certificate; kept it (--if-blank).",
                target.name
            );
            println!("Thumbprint: {}", existing.thumbprint());
            return Ok(());
        }
        println!(
            "Replacing the certificate (old thumbprint {}); servers must be told the new thumbprint.",
            existing.thumbprint()
        );
    }
    let identity = Identity::generate(&format!("Octopus Tentacle {}", target.name))?;
    identity.save(&t.certificate, &t.private_key)?;
    println!("Thumbprint: {}", identity.thumbprint());
    println!("  certificate: {}", t.certificate.display());
    println!("  private key: {} (mode 0600)", t.private_key.display());
    Ok(())
}

fn import_certificate(target: &Target, file: &Path, password: Option<&str>) -> anyhow::Result<()> {
    let cfg = target.load()?;
    let identity = Identity::import_file(file, password)?;
    identity.save(&cfg.tentacle.certificate, &cfg.tentacle.private_key)?;
    println!("Imported certificate from {}", file.display());
    println!("Thumbprint: {}", identity.thumbprint());
    Ok(())
}

fn show_thumbprint(target: &Target, format: Format, export: Option<&Path>) -> anyhow::Result<()> {
    let cfg = target.load()?;
    let identity = load_identity(&cfg)?;
    if let Some(file) = export {
        std::fs::write(file, identity.thumbprint().to_string())
            .with_context(|| format!("writing the thumbprint to {}", file.display()))?;
    }
    // A rotation goes to stderr in text: stdout stays the bare thumbprint scripts read.
    let rotation = rotate::describe(&cfg);
    match format {
        Format::Text => {
            println!("{}", identity.thumbprint());
            if let Some((text, _)) = &rotation {
                eprintln!("certificate rotation: {text}");
            }
        }
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "instance": target.name,
                "thumbprint": identity.thumbprint().to_string(),
                "rotation": rotation.map(|(_, json)| json),
            })
        ),
    }
    Ok(())
}

fn configure(target: &Target, a: ConfigureArgs) -> anyhow::Result<()> {
    let mut cfg = target.load()?;
    // Validate everything before changing anything.
    let trust: Vec<Thumbprint> = a
        .trust
        .iter()
        .map(|t| parse_thumbprint(t))
        .collect::<Result<_, _>>()?;
    let untrust: Vec<Thumbprint> = a
        .remove_trust
        .iter()
        .map(|t| parse_thumbprint(t))
        .collect::<Result<_, _>>()?;
    if let Some(ip) = &a.listen_ip {
        if ip.parse::<std::net::IpAddr>().is_err() && ip != "localhost" {
            bail!("--listen-ip '{ip}' is not an IP address (e.g. 0.0.0.0, ::, 127.0.0.1)");
        }
    }
    let mut changes = Vec::new();
    if let Some(h) = a.home {
        let h = absolute(&h)?;
        std::fs::create_dir_all(&h)
            .with_context(|| format!("creating home directory {}", h.display()))?;
        changes.push(format!("home = {}", h.display()));
        cfg.tentacle.home = h;
    }
    if let Some(p) = a.app {
        let p = absolute(&p)?;
        changes.push(format!("applications = {}", p.display()));
        cfg.tentacle.applications = p;
    }
    if let Some(port) = a.port {
        cfg.listen.port = port;
        changes.push(format!("port = {port}"));
    }
    if let Some(ip) = a.listen_ip {
        changes.push(format!("listen address = {ip}"));
        cfg.listen.address = ip;
    }
    if a.no_listen == Some(true) {
        cfg.listen.enabled = false;
        changes.push("listening off".into());
    }
    if a.listen || a.no_listen == Some(false) {
        cfg.listen.enabled = true;
        changes.push("listening on".into());
    }
    if a.reset_trust {
        cfg.trusted_servers.clear();
        changes.push("trusted servers cleared".into());
    }
    for t in trust {
        if cfg.trust(t) {
            changes.push(format!("trust {t}"));
        }
    }
    for t in untrust {
        if !cfg.remove_trust(t) {
            bail!(
                "{t} is not a trusted server of instance '{}'; nothing changed",
                target.name
            );
        }
        changes.push(format!("no longer trust {t}"));
    }
    target.save(&cfg)?;
    if changes.is_empty() {
        println!(
            "Nothing to change; configuration of '{}' is unchanged.",
            target.name
        );
    } else {
        println!("Updated instance '{}': {}", target.name, changes.join(", "));
        println!(
            "A running agent applies trust changes within seconds; restart it for other changes."
        );
    }
    Ok(())
}

/// `update-trust`: wherever `old` is trusted (listening trust, polled
/// servers), trust `new` instead.
fn update_trust(target: &Target, old: &str, new: &str) -> anyhow::Result<()> {
    let (old, new) = (parse_thumbprint(old)?, parse_thumbprint(new)?);
    let mut cfg = target.load()?;
    let mut changed = 0;
    if cfg.remove_trust(old) {
        cfg.trust(new);
        changed += 1;
    }
    for p in &mut cfg.polling_servers {
        if p.thumbprint.parse::<Thumbprint>().ok() == Some(old) {
            p.thumbprint = new.to_string();
            changed += 1;
        }
    }
    if changed == 0 {
        bail!(
            "instance '{}' does not trust {old}; `tentacle show-configuration --instance {}` shows what it trusts",
            target.name,
            target.name
        );
    }
    target.save(&cfg)?;
    println!(
        "Instance '{}' now trusts {new} instead of {old} ({changed} place(s)). A running agent applies it within seconds.",
        target.name
    );
    Ok(())
}

/// `clear-trusted-servers --keep A,B`: stops trusting and polling every server
/// whose polling address is not kept (listening trust has no address, so it
/// goes too).
fn clear_trusted_servers(target: &Target, keep: &[String]) -> anyhow::Result<()> {
    let keep: Vec<String> = keep
        .iter()
        .map(|k| k.trim())
        .filter(|k| !k.is_empty())
        .map(|k| polling_address(Some(k), None).or_else(|_| polling_address(None, Some(k))))
        .collect::<Result<_, _>>()?;
    let mut cfg = target.load()?;
    let before = (cfg.trusted_servers.len(), cfg.polling_servers.len());
    cfg.polling_servers.retain(|p| keep.contains(&p.address));
    let missing: Vec<&String> = keep
        .iter()
        .filter(|k| !cfg.polling_servers.iter().any(|p| &p.address == *k))
        .collect();
    if !missing.is_empty() {
        bail!(
            "instance '{}' does not poll {}; nothing changed (`tentacle show-configuration` lists the polled servers)",
            target.name,
            missing
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    cfg.trusted_servers.clear();
    target.save(&cfg)?;
    println!(
        "Instance '{}' no longer trusts {} listening server(s) nor polls {} server(s); it keeps polling {}.",
        target.name,
        before.0,
        before.1 - cfg.polling_servers.len(),
        if keep.is_empty() {
            "nothing".to_string()
        } else {
            keep.join(", ")
        }
    );
    Ok(())
}

/// `checkservices --instances A,B|*`: starts the installed services of those
/// instances that are not running.
fn check_services(instances: &str) -> anyhow::Result<()> {
    let registered = Registry::locate().list()?;
    let wanted: Vec<String> = if instances.trim() == "*" {
        registered.iter().map(|i| i.name.clone()).collect()
    } else {
        instances
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    };
    if !service_unit::systemd_running() {
        bail!("systemd is not running on this machine, so there are no services to check; run each instance with `tentacle run --instance NAME`");
    }
    for name in &wanted {
        let Some(inst) = registered
            .iter()
            .find(|i| i.name.eq_ignore_ascii_case(name))
        else {
            bail!("there is no tentacle instance named '{name}'; `tentacle list-instances` lists them");
        };
        let unit = service_unit::unit_name(&inst.name);
        if !service_unit::unit_dir().join(&unit).exists() {
            println!(
                "Instance '{}' is not installed as a service; skipped.",
                inst.name
            );
            continue;
        }
        let active = std::process::Command::new("systemctl")
            .args(["is-active", "--quiet", &unit])
            .status()
            .with_context(|| format!("running systemctl is-active {unit}"))?
            .success();
        if active {
            println!("{unit} is running.");
        } else {
            systemctl(&["start", &unit])?;
            println!("{unit} was not running; started it.");
        }
    }
    Ok(())
}

/// Normalises HOST, HOST:PORT or https://HOST[:PORT][/] to HOST:PORT.
pub(crate) fn normalise_server_address(s: &str) -> anyhow::Result<String> {
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("'{s}' is not a server address; use HOST:PORT, e.g. octopus.example:10943");
    }
    if octo_comms::net::split_host_port(authority).is_some() {
        return Ok(authority.to_string());
    }
    if authority.contains(':') && !authority.starts_with('[') {
        bail!("'{s}' is not a server address; use HOST:PORT, e.g. octopus.example:10943");
    }
    Ok(format!("{authority}:{DEFAULT_SERVER_COMMS_PORT}"))
}

pub(crate) fn new_subscription_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// The polling address from `--server-comms-address` or `--server-web-socket`:
/// HOST:PORT, or the normalised wss:// URL.
pub(crate) fn polling_address(
    comms_address: Option<&str>,
    web_socket: Option<&str>,
) -> anyhow::Result<String> {
    match (comms_address, web_socket) {
        (_, Some(url)) => {
            let url = octo_comms::websocket::WebSocketUrl::parse(url)
                .map_err(|e| anyhow::anyhow!("--server-web-socket {e}"))?;
            Ok(url.to_string())
        }
        (Some(addr), None) if octo_comms::websocket::is_web_socket_url(addr) => bail!(
            "'{addr}' is a WebSocket URL: pass it with --server-web-socket, not --server-comms-address"
        ),
        (Some(addr), None) => normalise_server_address(addr),
        (None, None) => bail!("pass --server-comms-address HOST:PORT or --server-web-socket wss://HOST:PORT/PATH"),
    }
}

/// Checks a `--connect-to` value (HOST:PORT).
pub(crate) fn parse_connect_to(c: Option<&str>) -> anyhow::Result<Option<String>> {
    match c.map(str::trim).filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(c) if octo_comms::net::split_host_port(c).is_some() => Ok(Some(c.to_string())),
        Some(c) => bail!(
            "--connect-to '{c}' is not HOST:PORT (the address actually dialled, e.g. 10.1.2.3:443)"
        ),
    }
}

fn poll_server(target: &Target, a: PollServerArgs) -> anyhow::Result<()> {
    let mut cfg = target.load()?;
    let address = polling_address(
        a.server_comms_address.as_deref(),
        a.server_web_socket.as_deref(),
    )?;
    if a.remove {
        let before = cfg.polling_servers.len();
        cfg.polling_servers.retain(|p| p.address != address);
        if before == cfg.polling_servers.len() {
            let polled: Vec<&str> = cfg
                .polling_servers
                .iter()
                .map(|p| p.address.as_str())
                .collect();
            let polled = if polled.is_empty() {
                "no server".to_string()
            } else {
                polled.join(", ")
            };
            bail!(
                "instance '{}' does not poll {address} (it polls {polled}); see `tentacle show-configuration`",
                target.name
            );
        }
        target.save(&cfg)?;
        println!("Instance '{}' no longer polls {address}.", target.name);
        println!("A running agent closes its connections to it within seconds; the other servers are not affected.");
        return Ok(());
    }
    let Some(tp) = a.server_thumbprint.as_deref() else {
        bail!("--server-thumbprint is required to poll a server (the server prints it with `octopus server show-thumbprint`)");
    };
    let tp = parse_thumbprint(tp)?;
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let connect_to = parse_connect_to(a.connect_to.as_deref())?;
    let subscription_id = a.subscription_id.unwrap_or_else(new_subscription_id);
    let replaced = cfg.polling_servers.iter().any(|p| p.address == address);
    cfg.polling_servers.retain(|p| p.address != address);
    cfg.polling_servers.push(PollingServer {
        address: address.clone(),
        thumbprint: tp.to_string(),
        subscription_id: subscription_id.clone(),
        connections: a.connections,
        connect_to: connect_to.clone(),
        rotating_to: None,
    });
    target.save(&cfg)?;
    let via = connect_to
        .map(|c| format!(", dialled at {c}"))
        .unwrap_or_default();
    println!(
        "Instance '{}' will poll {address}{via} (server thumbprint {tp}){}",
        target.name,
        if replaced {
            "; its previous entry was replaced"
        } else {
            ""
        }
    );
    println!("  subscription: poll://{subscription_id}/");
    let others = cfg.polling_servers.len() - 1;
    if others > 0 {
        println!("  it also polls {others} other server(s); see `tentacle show-configuration`");
    }
    println!("A running agent starts polling it within seconds.");
    Ok(())
}

fn polling_proxy(target: &Target, a: PollingProxyArgs) -> anyhow::Result<()> {
    let mut cfg = target.load()?;
    // Empty values count as not given (automation often passes --proxyHost="").
    let given = |o: Option<String>| o.filter(|s| !s.trim().is_empty());
    let (host, username, password) = (
        given(a.proxy_host).map(|h| h.trim().to_string()),
        given(a.proxy_username),
        a.proxy_password.filter(|p| !p.is_empty()),
    );
    let section = if a.proxy_enable {
        ProxySection {
            enabled: true,
            host,
            port: a.proxy_port,
            username,
            password,
        }
    } else {
        if host.is_some() || a.proxy_port.is_some() || username.is_some() || password.is_some() {
            bail!("--proxy-enable false means no proxy: leave out --proxy-host, --proxy-port, --proxy-username and --proxy-password");
        }
        ProxySection {
            enabled: false,
            host: None,
            port: None,
            username: None,
            password: None,
        }
    };
    if let Some(problem) = section.problem() {
        bail!("{problem}; see `tentacle polling-proxy --help`");
    }
    let setting = section.setting();
    cfg.polling_proxy = Some(section);
    target.save(&cfg)?;
    let name = &target.name;
    match &setting {
        ProxySetting::Direct => println!(
            "Instance '{name}' polls servers directly; proxy environment variables (HTTPS_PROXY) are ignored."
        ),
        ProxySetting::FromEnvironment => println!(
            "Instance '{name}' polls servers through the proxy in HTTPS_PROXY when it is set (destinations in NO_PROXY directly)."
        ),
        ProxySetting::Explicit(p) => {
            println!("Instance '{name}' polls servers through the proxy {p}.");
            if p.password.is_some() {
                println!(
                    "  The password is stored in {} (mode 0600).",
                    target.config_path.display()
                );
            }
        }
    }
    println!("A running agent uses it for its next polling connections; restart it to reconnect at once.");
    Ok(())
}

fn show_configuration(target: &Target, format: Format) -> anyhow::Result<()> {
    // Never show secrets: the proxy password appears as "(set)".
    let cfg = target.load()?.redacted();
    let thumbprint = load_identity(&cfg).ok().map(|i| i.thumbprint().to_string());
    match format {
        Format::Json => {
            let mut v = serde_json::to_value(&cfg)?;
            v["thumbprint"] = serde_json::json!(thumbprint);
            v["config_file"] = serde_json::json!(target.config_path);
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Text => {
            println!("# {}", target.config_path.display());
            println!(
                "# thumbprint: {}",
                thumbprint
                    .as_deref()
                    .unwrap_or("(none: run `tentacle new-certificate`)")
            );
            println!("# polling proxy: {}", cfg.polling_proxy_setting());
            print!("{}", toml::to_string_pretty(&cfg)?);
        }
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .with_context(|| format!("running systemctl {}", args.join(" ")))?;
    if !status.success() {
        bail!(
            "`systemctl {}` failed ({status}); see `journalctl -xe`",
            args.join(" ")
        );
    }
    Ok(())
}

/// `tentacle service`, in the original's order within one call: restart,
/// stop, uninstall, install (or reconfigure), start.
fn service(target: &Target, a: &ServiceArgs) -> anyhow::Result<()> {
    if !(a.install || a.reconfigure || a.uninstall || a.start || a.stop || a.restart) {
        bail!("say what to do: --install, --reconfigure, --uninstall, --start, --stop or --restart (see `tentacle service --help`)");
    }
    let unit = service_unit::unit_name(&target.name);
    let dir = service_unit::unit_dir();
    let path = dir.join(&unit);
    let systemd = service_unit::systemd_manages(&dir);
    let name = &target.name;
    let no_systemd = |verb: &str| {
        anyhow::anyhow!(
            "systemd is not running on this machine, so the service cannot {verb}; run the agent in the foreground instead: `tentacle run --instance {name}` (in a container: `tentacle agent --from-env`)"
        )
    };
    if a.restart {
        if !systemd {
            return Err(no_systemd("restart"));
        }
        systemctl(&["restart", &unit])?;
        println!("Restarted {unit}.");
    }
    if a.stop {
        if systemd {
            if path.exists() {
                systemctl(&["stop", &unit])?;
                println!("Stopped {unit}.");
            } else {
                println!("{unit} is not installed; nothing to stop.");
            }
        } else {
            println!("systemd is not running on this machine, so no service of instance '{name}' runs; nothing to stop.");
        }
    }
    if a.uninstall {
        if systemd && path.exists() {
            systemctl(&["disable", "--now", &unit])?;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => println!("Removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("{} was not installed", path.display())
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        if systemd {
            systemctl(&["daemon-reload"])?;
        }
    }
    if a.install || a.reconfigure {
        let cfg = target.load()?;
        load_identity(&cfg)?; // a service that cannot start is no use
        if let Some(u) = &a.username {
            if nix::unistd::User::from_name(u).ok().flatten().is_none() {
                bail!("there is no user '{u}' on this machine; create it first (e.g. `useradd --system {u}`)");
            }
        }
        let spec = service_unit::UnitSpec {
            instance: target.name.clone(),
            binary: this_binary()?,
            config: target
                .explicit_config
                .then(|| absolute(&target.config_path))
                .transpose()?,
            config_dir: std::env::var_os("TENTACLE_CONFIG_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            user: a.username.clone(),
            after: a.depend_on.clone(),
        };
        octo_agent::config::write_atomic(&path, service_unit::render(&spec).as_bytes(), 0o644)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("Wrote {}", path.display());
        if systemd {
            systemctl(&["daemon-reload"])?;
            systemctl(&["enable", &unit])?;
            println!("Enabled {unit}. Logs: journalctl -u {unit}");
        } else {
            println!(
                "systemd is not running on this machine, so the unit was written but not enabled."
            );
            println!("Start the agent by hand with: tentacle run --instance {name}");
        }
    }
    if a.start {
        if !systemd {
            return Err(no_systemd("start"));
        }
        systemctl(&["start", &unit])?;
        println!("Started {unit}.");
    }
    Ok(())
}

/// The path of the running `tentacle` binary as the service should run it:
/// the path it was started by when that names it (a symlink such as
/// /usr/bin/tentacle is resolved, so the unit names the installed file).
fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding the tentacle binary")
}
