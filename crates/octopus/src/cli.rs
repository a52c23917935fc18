//! `octopus`: the command-line client of the Octopus server.
//!
//! Client commands (`environment`, `machine`, `run-script`, `deploy`, `task`, ...)
//! run here. The commands that are the server itself (`server`, `quickstart`,
//! `demo`) are in the program `octopus-server` beside this one
//! (`src/main.rs`), which this program becomes (`exec`, same process id) with
//! the same arguments. So a client command does not load the server, its store
//! engines and its web portal: this program is a fifth of the size and starts
//! about a millisecond sooner (BENCHMARKS.md, `bench fleet`, the CLI against ssh).

// A command-line tool prints its results by design.
#![allow(clippy::print_stdout)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use octo_client as client;

mod shared;

/// The name of the server's program, looked for beside this one.
const SERVER_PROGRAM: &str = "octopus-server";

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

/// The server's commands are named here (for `octopus --help`) and handed
/// whole to `octopus-server`, which parses and documents them (`octopus
/// server --help`, `octopus quickstart --help`).
#[derive(Debug, Subcommand)]
enum Command {
    #[command(about = shared::QUICKSTART, disable_help_flag = true)]
    Quickstart(Handed),
    #[command(about = shared::DEMO, disable_help_flag = true)]
    Demo(Handed),
    /// Run or inspect the server (`octopus server --help`).
    #[command(disable_help_flag = true)]
    Server(Handed),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Writes man pages and shell completions (see `octopus-server`).
    #[command(hide = true, disable_help_flag = true)]
    GenerateDocs(Handed),
}

/// A server command's arguments, unparsed.
#[derive(Debug, clap::Args)]
struct Handed {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<OsString>,
}

fn main() -> ExitCode {
    octo_comms::tune_allocator();
    let cli = Cli::parse();
    let Command::Client(command) = cli.command else {
        // Every argument as given, global options before the command included.
        let err = become_server(std::env::args_os());
        shared::print_error(&err);
        return ExitCode::FAILURE;
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // Only when asked: the filter's parser is not free at every start.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    // One user's requests in a row: a runtime on this thread alone.
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(client::run(cli.client, command)),
        Err(e) => Err(anyhow::anyhow!("starting the async runtime: {e}")),
    };
    result.unwrap_or_else(|e| {
        shared::print_error(&e);
        ExitCode::FAILURE
    })
}

/// Replaces this process with `octopus-server` and `argv` (the first, this
/// program's name as invoked, kept: usage lines say `octopus`); returns only
/// when that failed, with why.
fn become_server(mut argv: impl Iterator<Item = OsString>) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let arg0 = argv.next().unwrap_or_else(|| "octopus".into());
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => {
            return anyhow::anyhow!(
                "finding this program's path (to run {SERVER_PROGRAM} beside it): {e}"
            )
        }
    };
    let server = server_program(&me);
    if !server.is_file() {
        return anyhow::anyhow!(
            "this command is run by the server's program, {SERVER_PROGRAM}, which is not beside {}: \
             install both programs in one folder (the octopus-server package does), or build them with \
             `cargo build --release -p octo-server`",
            me.display()
        );
    }
    let err = std::process::Command::new(&server)
        .arg0(arg0)
        .args(argv)
        .exec();
    anyhow::anyhow!("starting {}: {err}", server.display())
}

/// `octopus-server` in the folder of `me` (symbolic links already resolved:
/// `/usr/bin/octopus` → `/opt/octopus/server/octopus` finds the one there).
fn server_program(me: &Path) -> PathBuf {
    me.with_file_name(SERVER_PROGRAM)
}
