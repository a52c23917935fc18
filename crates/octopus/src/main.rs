//! `octopus`: the Octopus server.
//!
//! For now it has one subcommand, `octopus demo`, which runs a server and two
//! tentacles (one listening, one polling) in this process and has them exchange
//! calls over pinned mutual TLS on loopback.

// A command-line tool prints its results by design.
#![allow(clippy::print_stdout)]
// The server returns large futures from its handlers; boxing them all buys nothing.
#![allow(clippy::large_futures)]

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod demo;

use octo_server::server;

/// The Octopus server.
#[derive(Debug, Parser)]
#[command(name = "octopus", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server and two tentacles (one listening, one polling) in this
    /// process and show them exchanging calls over pinned mutual TLS on 127.0.0.1.
    Demo(DemoArgs),
    /// Run or inspect the server.
    #[command(subcommand)]
    Server(ServerCommand),
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Run the server: web API, polling port, embedded SQLite in the data directory.
    #[command(
        after_help = "Example:\n  octopus server run --data /var/lib/octopus --listen 0.0.0.0:8080 --comms-listen-port 10943"
    )]
    Run(server::RunArgs),
    /// Print the server's comms thumbprint, which tentacles must trust.
    ShowThumbprint {
        /// Data directory of the server.
        #[arg(long, default_value = "octopus-data")]
        data: PathBuf,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Demo(args) => Box::pin(demo::run(args)).await,
        Command::Server(ServerCommand::Run(args)) => server::run(args).await,
        Command::Server(ServerCommand::ShowThumbprint { data }) => server::show_thumbprint(&data),
    }
}
