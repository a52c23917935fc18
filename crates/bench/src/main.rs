//! Benchmarks, one subcommand per area. Each prints human-readable progress and
//! then one JSON object on its last line.
//!
//! `comms`: this process is the server; a child process (this binary, hidden
//! subcommand `comms-child`) hosts a listening tentacle and polling connections,
//! so the server's memory growth per idle connection is measured on its own.
//!
//! `tasks`: this process runs the Octopus server; a child process (hidden
//! subcommand `tasks-child`) runs polling tentacles with the real agent services.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod comms;
mod deploy;
mod feed;
mod fleet;
mod portal;
mod scripts;
mod tasks;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Benchmarks; each prints one JSON object on its last line")]
struct Cli {
    #[command(subcommand)]
    area: Area,
}

#[derive(Subcommand, Debug)]
enum Area {
    /// Round trips (listening, polling), 1 GiB hash-verified upload, memory per idle polling connection.
    Comms(comms::Options),
    /// Script round trip on the real tentacle binary (both modes), its idle memory and size.
    Scripts(scripts::Options),
    /// Script tasks through the server's HTTP API: round trip on one machine, fan-out to 100.
    Tasks(tasks::Options),
    /// Deploy a 100 MiB package to a listening and a polling tentacle, cold and warm (and scp for comparison).
    Deploy(deploy::Options),
    /// Push and download of a 100 MiB package through the built-in feed (content in the database).
    Feed(feed::Options),
    /// One node and 5,000 polling tentacles: fan-outs, health, restart storm, RSS, list page, CLI vs ssh.
    Fleet(fleet::Options),
    /// The portal's big lists: a page of 50 of 5,000 targets (first, last, filtered) and of the tasks list.
    Portal(portal::Options),
    /// Internal: the tentacle side of `comms`, run as a child process.
    #[command(hide = true)]
    CommsChild(comms::ChildOptions),
    /// Internal: the tentacles of `tasks`, run as a child process.
    #[command(hide = true)]
    TasksChild(tasks::ChildOptions),
}

fn main() -> anyhow::Result<()> {
    octo_comms::tune_allocator();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let shown = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
        // Printed as the environment asks; the comms' warnings counted apart
        // (`bench fleet`'s reconnect errors), whatever is printed.
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(shown),
            )
            .with(fleet::CommsProblems.with_filter(tracing_subscriber::filter::LevelFilter::WARN))
            .init();
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.area {
        // The server side runs on a worker thread, as a real server's calls do
        // (they come from tasks, not from `block_on` on the main thread, which
        // adds a cross-thread park/unpark to every round trip).
        Area::Comms(o) => rt.block_on(async { tokio::spawn(comms::run(o)).await? }),
        Area::CommsChild(o) => rt.block_on(comms::child(o)),
        Area::Scripts(o) => rt.block_on(async { tokio::spawn(scripts::run(o)).await? }),
        Area::Tasks(o) => rt.block_on(async { tokio::spawn(tasks::run(o)).await? }),
        Area::Deploy(o) => rt.block_on(async { tokio::spawn(deploy::run(o)).await? }),
        Area::Feed(o) => rt.block_on(async { tokio::spawn(feed::run(o)).await? }),
        Area::Fleet(o) => rt.block_on(async { tokio::spawn(fleet::run(o)).await? }),
        Area::Portal(o) => rt.block_on(async { tokio::spawn(portal::run(o)).await? }),
        Area::TasksChild(o) => rt.block_on(tasks::child(o)),
    }
}

/// Raises this process's open-file limit to its hard limit (thousands of
/// connections in one process).
pub(crate) fn raise_fd_limit() {
    if let Ok((_, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
}

/// Builds `bin` of workspace package `package` in release mode and returns its
/// path (beside this binary). With `BENCH_PREBUILT=1`, takes the one beside
/// this binary as it is (to compare saved builds: copy `bench` and the
/// binaries it runs into one directory per build).
pub(crate) fn release_binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    if std::env::var_os("BENCH_PREBUILT").is_none_or(|v| v != "1") {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "-q", "-p", package, "--bin", bin])
            .status()
            .with_context(|| format!("running cargo build for the {bin} binary"))?;
        if !status.success() {
            bail!("building the {bin} binary failed");
        }
    }
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("bench binary directory")?.join(bin);
    if !path.exists() {
        bail!("{} not found after the build", path.display());
    }
    Ok(path)
}
