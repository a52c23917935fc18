//! The `calamari` command line: parses the arguments, resolves defaults from the
//! tentacle's environment (`TentacleApplications`, `TentacleHome`) and calls the
//! library. Exit codes: 0 success, 1 a deploy script failed, 2 usage error, 3 package
//! refused, 4 any other error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use octo_calamari::extract::{DEFAULT_MAX_ENTRIES, DEFAULT_MAX_EXTRACTED_BYTES, DEFAULT_MAX_RATIO};
use octo_calamari::{console, journal, DeployError, DeployOptions, Limits, VERSION};

/// Deploys packages on a tentacle: extracts them, substitutes variables, runs their
/// deploy scripts, keeps a journal and removes old versions.
#[derive(Debug, Parser)]
#[command(
    name = "calamari",
    disable_version_flag = true,
    arg_required_else_help = true,
    after_help = "Exit codes: 0 success, 1 a deploy script failed, 2 usage error, 3 package refused, 4 any other error."
)]
struct Cli {
    /// Print the version and exit.
    #[arg(short = 'V', long = "version")]
    version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Extract a package into APPLICATIONS/<environment>/<package id>/<version>, substitute
    /// variables, run PreDeploy/Deploy/PostDeploy scripts, record it and apply retention.
    DeployPackage(DeployArgs),
}

#[derive(Debug, Args)]
struct DeployArgs {
    /// The package file (zip or tar.gz, detected by content).
    #[arg(long, value_name = "PATH")]
    package: PathBuf,
    /// The package id (a folder name).
    #[arg(long, value_name = "ID")]
    package_id: String,
    /// The package version (a folder name).
    #[arg(long, value_name = "V")]
    package_version: String,
    /// The environment deployed to (a folder name).
    #[arg(long, value_name = "NAME")]
    environment: String,
    /// A JSON object of variable names to string values.
    #[arg(long, value_name = "FILE.json")]
    variables: Option<PathBuf>,
    /// The applications root [default: $TentacleApplications, else $TentacleHome/Applications].
    #[arg(long, value_name = "DIR")]
    applications: Option<PathBuf>,
    /// The deployment journal [default: $TentacleHome/DeploymentJournal.json].
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
    /// How many versions of this package to keep in this environment (at least 1).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    retention: u32,
    /// Refuse a package that extracts to more bytes than this.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_EXTRACTED_BYTES)]
    max_extracted_bytes: u64,
    /// Refuse a package with more entries than this.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ENTRIES)]
    max_entries: u64,
    /// Refuse a package that extracts to more than N times its size (past 16 MiB).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_RATIO)]
    max_ratio: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        _ if cli.version => print_version(),
        Some(Command::Version) => print_version(),
        Some(Command::DeployPackage(args)) => deploy_package(args),
        None => Err(DeployError::usage(
            "no command given\nrun `calamari --help` for the commands",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            console::error(&e.message);
            ExitCode::from(e.exit_code())
        }
    }
}

#[allow(clippy::print_stdout)]
fn print_version() -> Result<(), DeployError> {
    println!("{VERSION}");
    Ok(())
}

fn deploy_package(args: DeployArgs) -> Result<(), DeployError> {
    let home = env_path("TentacleHome");
    let applications = match (args.applications, env_path("TentacleApplications"), &home) {
        (Some(dir), _, _) => dir,
        (None, Some(dir), _) => dir,
        (None, None, Some(home)) => home.join("Applications"),
        (None, None, None) => {
            return Err(DeployError::usage(
                "no applications folder: neither --applications nor the TentacleApplications or TentacleHome environment variables are set\npass --applications DIR, or run calamari through a tentacle, which sets them",
            ))
        }
    };
    let journal = match (args.journal, &home) {
        (Some(file), _) => file,
        (None, Some(home)) => home.join(journal::FILE_NAME),
        (None, None) => {
            return Err(DeployError::usage(
                "no deployment journal: neither --journal nor the TentacleHome environment variable is set\npass --journal FILE, or run calamari through a tentacle, which sets it",
            ))
        }
    };
    let opts = DeployOptions {
        package: absolute(&args.package)?,
        package_id: args.package_id,
        package_version: args.package_version,
        environment: args.environment,
        variables_file: args.variables.as_deref().map(absolute).transpose()?,
        applications: absolute(&applications)?,
        journal: absolute(&journal)?,
        retention: usize::try_from(args.retention).unwrap_or(usize::MAX),
        limits: Limits {
            max_extracted_bytes: args.max_extracted_bytes,
            max_entries: args.max_entries,
            max_ratio: args.max_ratio,
        },
    };
    octo_calamari::deploy(&opts).map(drop)
}

/// An environment variable as a path, when set and not empty.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn absolute(path: &Path) -> Result<PathBuf, DeployError> {
    std::path::absolute(path).map_err(|e| DeployError::io("resolving the path", path, &e))
}
