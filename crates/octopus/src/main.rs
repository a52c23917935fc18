//! `octopus-server`: the Octopus server, and every `octopus` command.
//!
//! - `server run|show-thumbprint|reset-admin`: the server process.
//! - `quickstart`, `demo`: a server and tentacles on loopback.
//! - the client commands (`environment`, `machine`, `run-script`, `task`, ...), as
//!   the `octopus` program (`src/cli.rs`) runs them.
//!
//! `octopus` hands the server's commands to this program (it `exec`s it with the
//! same arguments), so its usage and documentation say `octopus` throughout.

// A command-line tool prints its results by design.
#![allow(clippy::print_stdout)]
// The server returns large futures from its handlers; boxing them all buys nothing.
#![allow(clippy::large_futures)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;
mod limits;
mod quickstart;
mod shared;

use octo_client as client;
use octo_server_core as server;

/// The Octopus server, and a client for its API.
#[derive(Debug, Parser)]
#[command(
    name = "octopus",
    version,
    after_help = shared::EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: client::ClientOpts,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(
        about = shared::QUICKSTART,
        after_help = "Example:\n  octopus quickstart          # everything in a temporary directory, then stops\n  octopus quickstart --keep   # keeps running until Ctrl-C, to try commands"
    )]
    Quickstart(quickstart::QuickstartArgs),
    #[command(about = shared::DEMO)]
    Demo(DemoArgs),
    /// Run or inspect the server.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus server run --data /var/lib/octopus --listen 0.0.0.0:8080\n  octopus server show-thumbprint --data /var/lib/octopus"
    )]
    Server(ServerCommand),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Writes man pages (DIR/man) and shell completions (DIR/completions) of
    /// this command line (used by scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Run the server: web API, polling port, embedded SQLite in the data directory.
    #[command(
        after_help = "Example:\n  octopus server run --data /var/lib/octopus --listen 0.0.0.0:8080 --comms-listen-port 10943"
    )]
    Run(Box<server::RunArgs>),
    /// Print the server's comms thumbprint, which tentacles must trust.
    #[command(
        after_help = "Example:\n  tentacle configure --trust $(octopus server show-thumbprint --data /var/lib/octopus)"
    )]
    ShowThumbprint {
        /// Data directory of the server.
        #[arg(long, default_value = "octopus-data")]
        data: PathBuf,
    },
    /// Replace the server's comms certificate: every tentacle it reaches learns to
    /// trust the new one, then the server presents it; prints which machines did
    /// not learn it and how to fix them by hand. Needs AdministerSystem.
    #[command(
        after_help = "Example:\n  OCTOPUS_URL=http://octopus:8080 OCTOPUS_API_KEY=API-... octopus server rotate-certificate"
    )]
    RotateCertificate,
    /// Recover administration: give user `admin` (created if missing, enabled
    /// again if disabled) the System administrator role and a new API key,
    /// printed once. Needs local access to the data directory; the server may
    /// be running.
    #[command(
        after_help = "Example:\n  sudo -u octopus octopus server reset-admin --data /var/lib/octopus\n  export OCTOPUS_API_KEY=API-..."
    )]
    ResetAdmin {
        /// Data directory of the server.
        #[arg(long, default_value = "octopus-data")]
        data: PathBuf,
        /// Database URL, when not the default SQLite file in the data directory.
        #[arg(long)]
        database_url: Option<String>,
    },
}

/// Options of `octopus demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Write the generated certificates and keys to DIR and keep them
    /// (default: a temporary directory, removed on exit).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Keep the server and tentacles running after the demo until Ctrl-C, so
    /// you can try the friendly page with curl.
    #[arg(long)]
    keep: bool,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> ExitCode {
    octo_comms::tune_allocator();
    let cli = Cli::parse();
    init_tracing();
    // A client command is one user's requests in a row: a runtime on this
    // thread alone starts faster (no worker threads) and does the same work.
    // The server, demo and quickstart run many things at once.
    let client = matches!(
        cli.command,
        Command::Client(_) | Command::Server(ServerCommand::RotateCertificate)
    );
    // The sockets systemd passed (LISTEN_FDS), read before the runtime starts
    // threads: reading them removes the variables from the environment.
    let sockets = if matches!(cli.command, Command::Server(ServerCommand::Run(_))) {
        match server::PassedSockets::from_env() {
            Ok(s) => s,
            Err(e) => {
                shared::print_error(
                    &anyhow::Error::new(e)
                        .context("reading the sockets the service manager passed (LISTEN_FDS)"),
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        server::PassedSockets::none()
    };
    let runtime = if client {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(cli, sockets)),
        Err(e) => Err(anyhow::anyhow!("starting the async runtime: {e}")),
    };
    result.unwrap_or_else(|e| {
        shared::print_error(&e);
        ExitCode::FAILURE
    })
}

async fn run(cli: Cli, sockets: server::PassedSockets) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::GenerateDocs { out } => {
            use clap::CommandFactory;
            octo_agent::cli_docs::generate(Cli::command(), &out)
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| anyhow::anyhow!("writing the docs under {}: {e}", out.display()))
        }
        Command::Demo(args) => Box::pin(demo::run(args)).await.map(|()| ExitCode::SUCCESS),
        Command::Quickstart(args) => Box::pin(quickstart::run(args))
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Server(ServerCommand::Run(args)) => {
            limits::raise_open_files();
            limits::check_accept_queue();
            server::run_on(*args, sockets, octo_portal::router)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Server(ServerCommand::RotateCertificate) => {
            client::rotate_server_certificate(cli.client).await
        }
        Command::Server(ServerCommand::ShowThumbprint { data }) => {
            server::show_thumbprint(&data).map(|()| ExitCode::SUCCESS)
        }
        Command::Server(ServerCommand::ResetAdmin { data, database_url }) => server::reset_admin(
            &data,
            database_url.as_deref(),
        )
        .await
        .map(|key| {
            println!("User 'admin' is a System administrator again; its new API key (shown once):");
            println!("  {key}");
            ExitCode::SUCCESS
        }),
        Command::Client(command) => client::run(cli.client, command).await,
    }
}
