//! The client commands of `octopus`: calls to a running server's REST API.
//!
//! - In a space (`--space NAME`, `OCTOPUS_SPACE`, default `Default`):
//!   `environment`, `machine`, `health-check`, `run-script`, `package`,
//!   `deploy`, `calamari`, `tentacle`, `task`, `team`, `audit`.
//! - The server's own: `space`, `user`, `role`, `api-key`, `login`, `logout`,
//!   `whoami`.
//!
//! Modules:
//! - [`http`]: [`ApiClient`], the one HTTP client, its typed errors, and the
//!   one place API paths are built (`space_url` for routes of the `--space`
//!   space, `/api/spaces/{space}/...`; `system_url` for the server's own).
//! - [`follow`]: following a task's log stream until it ends, reconnecting.
//! - [`sse`]: the `text/event-stream` parser.
//! - [`output`]: tables, label/value blocks, times, and escaping: nothing the
//!   server sends reaches the terminal with its control characters.
//! - [`deploy`]: packages, deployments, variables (`NAME=VALUE`, sensitive ones
//!   from the environment).
//! - [`security`]: spaces, users, teams, roles, the audit log, logging in.
//! - [`session`]: the sessions file of `octopus login`
//!   (`$XDG_CONFIG_HOME/octopus/sessions.json`, private, written atomically).
//! - [`prompt`]: passwords from the terminal without echo, or from stdin.
//! - [`when`]: `--since` times (RFC 3339, dates, ages such as `2h`).
//!
//! The API key of a call is `--api-key` or `OCTOPUS_API_KEY` when given, else
//! the session key `octopus login` stored for the `--server`.
//!
//! Every command prints a table (or label/value lines) by default, or the
//! server's JSON with `--output json`. Errors are one line on stderr, `error: `
//! then what failed and what to do, with exit code 1.

// A command-line tool reports on stderr by design.
#![allow(clippy::print_stderr)]

mod deploy;
mod follow;
mod http;
mod nodes;
mod output;
mod policies;
mod prompt;
mod security;
mod session;
mod sse;
mod when;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Subcommand, ValueEnum};
use octo_api_types::{ApiKey, Environment, Machine, Task, TaskLogLine, TaskState, TaskStep, User};

/// `s` made safe for a terminal: its control characters (ESC, NUL, C1, the
/// bidirectional overrides...) escaped, line breaks and tabs kept. Every line
/// the client prints for people goes through this or a stricter form; the
/// binary's own error line must too (error messages carry the server's text).
pub fn terminal_text(s: &str) -> std::borrow::Cow<'_, str> {
    output::text(s)
}

pub use self::security::{
    AuditCommand, LoginArgs, RoleCommand, SpaceCommand, TeamCommand, UserCommand, UserCreateArgs,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use self::follow::{follow, print_line, Names};
use self::http::{ApiClient, ClientError};
use self::output::{
    duration, fields, list, note, or_dash, out, out_json, out_json_line, table, time, time_opt,
};

/// How [`Cx::create_and_follow`] ended.
enum Followed {
    /// `--no-wait`: the task's id was printed.
    NotWaited,
    /// Ctrl-C while following (the task goes on).
    Interrupted,
    /// The task ended: its final state and steps.
    Ended(Box<TaskDetail>),
}

/// Exit code of `run-script`, `health-check` and `task log --follow` when the
/// task was canceled.
const EXIT_CANCELED: u8 = 3;
/// Exit code after Ctrl-C while following a task (128 + SIGINT, as shells do).
const EXIT_INTERRUPTED: u8 = 130;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The server's JSON, for programs.
    Json,
}

/// Options every client command takes (they may come before or after the
/// command's name).
#[derive(Debug, clap::Args)]
pub struct ClientOpts {
    /// The server's web address (client commands).
    #[arg(
        long,
        global = true,
        env = "OCTOPUS_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:8080",
        value_name = "URL",
        help_heading = "Client options"
    )]
    pub server: String,
    /// The space to work in (client commands): its name or id (Spaces-N).
    /// Spaces, users, roles and API keys are the server's, in no space.
    #[arg(
        long,
        global = true,
        env = "OCTOPUS_SPACE",
        hide_env_values = true,
        default_value = "Default",
        value_name = "NAME",
        help_heading = "Client options"
    )]
    pub space: String,
    /// API key to call the server with (client commands; default: the session of
    /// `octopus login` for this server). The first admin key is in
    /// DATA/admin-api-key; make more with `octopus api-key create`.
    #[arg(
        long,
        alias = "apiKey",
        global = true,
        env = "OCTOPUS_API_KEY",
        hide_env_values = true,
        value_name = "KEY",
        help_heading = "Client options"
    )]
    pub api_key: Option<String>,
    /// Print tables for people or the server's JSON for programs (client commands).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = Output::Table,
        value_name = "FORMAT",
        help_heading = "Client options"
    )]
    pub output: Output,
}

/// The client commands, flattened into `octopus`'s own.
///
/// `defer`, here and on every command group below: a command's arguments are
/// built only when that command is the one run (or its help or the docs are
/// asked for). Building all of them cost a new process 0.3-0.5 ms on every
/// call, most of it first touches of code and heap (BENCHMARKS.md, `bench
/// fleet`, twelfth session). A deferred command's arguments are added after
/// its own settings, so an argument struct must not carry a doc comment: clap
/// would make it the command's about, in place of the variant's (a test says
/// so).
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ClientCommand {
    /// List, create and delete environments.
    #[command(
        subcommand,
        alias = "env",
        after_help = "Examples:\n  octopus environment create Production --description \"Live customers\"\n  octopus environment list --output json"
    )]
    Environment(EnvironmentCommand),
    /// List, show, add and delete machines (deployment targets).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus machine add-listening --name web01 --url https://web01:10933 --thumbprint 9F3C... --environment Production --role web\n  octopus machine list --environment Production --role web"
    )]
    Machine(MachineCommand),
    /// Create, list and revoke API keys (the caller's; `list --all` shows everyone's).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus api-key create --purpose \"CI pipeline\"\n  octopus api-key list --all\n  octopus api-key revoke 3"
    )]
    ApiKey(ApiKeyCommand),
    /// List, show, create and delete spaces (each holds its own environments,
    /// machines, packages, tasks, teams and audit log).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus space create Platform --description \"Platform team's servers\"\n  octopus space list\n  octopus --space Platform machine list"
    )]
    Space(SpaceCommand),
    /// Manage users: create, list, disable, enable, set passwords.
    #[command(
        subcommand,
        after_help = "Examples:\n  printf '%s\\n' \"$PASSWORD\" | octopus user create --username alice --password-stdin --admin\n  octopus user list\n  octopus user disable alice\n  octopus user set-password"
    )]
    User(UserCommand),
    /// Teams of the space: their members, and the roles they are granted.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus team create Deployers\n  octopus team add-member Deployers alice\n  octopus team grant Deployers --role \"Deployment creator\" --environment Test\n  octopus team show Deployers"
    )]
    Team(TeamCommand),
    /// Roles: named sets of permissions that teams are granted.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus role list\n  octopus role show \"Deployment creator\"\n  octopus role create \"Script runner\" --permission TaskView --permission TaskCreate"
    )]
    Role(RoleCommand),
    /// The space's audit log: who changed what, when, from where.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus audit list --since 2h\n  octopus audit list --user alice --since 2026-12-01"
    )]
    Audit(AuditCommand),
    /// The server nodes sharing the database: list, drain, undrain.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus node list\n  octopus node drain node-2 --wait\n  octopus node undrain node-2"
    )]
    Node(nodes::NodeCommand),
    /// The space's machine policies: health check timing, and whether health
    /// checks keep tentacles up to date (`--tentacle-update always`).
    #[command(
        subcommand,
        visible_alias = "machine-policy",
        after_help = "Examples:\n  octopus policy list\n  octopus policy update \"Default Machine Policy\" --tentacle-update always\n  octopus policy create \"Keep up to date\" --tentacle-update always --health-check-interval 900"
    )]
    Policy(policies::PolicyCommand),
    /// Log in with a username and password; later commands to this server use the session.
    #[command(
        after_help = "Examples:\n  octopus login --username alice              # asks for the password, without echo\n  printf '%s\\n' \"$PASSWORD\" | octopus login --username alice --password-stdin\n\n\
The session key is kept for this --server in $XDG_CONFIG_HOME/octopus/sessions.json\n\
(~/.config/octopus/ by default), readable by you only. Commands use it when neither\n\
--api-key nor OCTOPUS_API_KEY is given, until it expires or `octopus logout`."
    )]
    Login(LoginArgs),
    /// End the session of `octopus login` for this server: revoke its key and forget it.
    #[command(
        after_help = "Examples:\n  octopus logout\n  octopus logout --server http://octopus.example:8080"
    )]
    Logout,
    /// Show who the server takes you for, and what you may do in the space.
    #[command(after_help = "Examples:\n  octopus whoami\n  octopus --space Platform whoami")]
    Whoami,
    /// Check machines' health now, wait for the result and show it.
    #[command(
        after_help = "Examples:\n  octopus health-check --environment Production\n  octopus health-check --machine web01 --machine web02 --no-wait\n\n\
Exit status: 0 when the health-check task succeeded, 1 when it failed or on an error, 3 when it was canceled."
    )]
    HealthCheck(HealthCheckArgs),
    /// Run a script on machines and print their output as it comes.
    #[command(
        after_help = "Examples:\n  octopus run-script --script 'uname -a' --environment Production --role web\n  octopus run-script --file deploy.py --machine web01 --machine web02\n  octopus run-script --script 'sleep 600' --environment Test --no-wait\n  read -rs DbPassword && export DbPassword\n  octopus run-script --file migrate.sh --machine db01 --variable Db=orders --sensitive-variable DbPassword\n\n\
Variables reach the script as environment variables. --sensitive-variable NAME alone takes the\n\
value from this command's environment variable NAME, so the secret is not in the process list;\n\
sensitive values are never shown and are masked in the log.\n\n\
Each output line is prefixed with its machine's name, `[web01] hello`; lines the script wrote\n\
to stderr are marked `[web01]! oops`; the server's own lines are `[server] ...`. With --output\n\
json each line is a JSON log line and the last line is the final task and steps.\n\n\
Exit status: 0 when the task succeeded on every machine, 1 when it failed or on an error,\n\
3 when it was canceled, 130 after Ctrl-C (which stops following, not the task)."
    )]
    RunScript(RunScriptArgs),
    /// Push, list, show and delete packages in the server's feed.
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus package push Acme.Web.1.2.3.zip\n  octopus package list"
    )]
    Package(deploy::PackageCommand),
    /// Deploy a package to the machines of an environment and follow it live.
    #[command(
        after_help = "Examples:\n  octopus deploy --package Acme.Web --environment Production --role web\n  octopus deploy --package Acme.Web --version 1.2.3 --environment Test --variable Greeting=Hello --variables-file vars.json\n  DbPassword=$(cat /run/secrets/db) octopus deploy --package Acme.Web --environment Production --sensitive-variable DbPassword\n\n\
--sensitive-variable NAME alone takes the value from this command's environment variable NAME,\n\
so the secret is not in the process list; sensitive values are never shown and are masked in\n\
the log.\n\n\
Each machine gets the deployment tool (pushed when missing or outdated) and the package\n\
(\"found in cache\" when it has it), then extracts it, substitutes variables and runs the\n\
package's PreDeploy/Deploy/PostDeploy scripts. Output as for run-script.\n\n\
Exit status: 0 when every machine succeeded, 1 when any failed or on an error, 3 when\n\
canceled, 130 after Ctrl-C (which stops following, not the deployment)."
    )]
    Deploy(deploy::DeployCliArgs),
    /// The deployment tool (calamari) on the machines.
    #[command(subcommand)]
    Calamari(deploy::CalamariCommand),
    /// The tentacles themselves: upgrade them to the server's version.
    #[command(subcommand)]
    Tentacle(deploy::TentacleCommand),
    /// List, show, follow and cancel server tasks (health checks, script runs).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus task list --limit 5\n  octopus task log ServerTasks-12 --follow\n  octopus task cancel ServerTasks-12"
    )]
    Task(TaskCommand),
}

/// `octopus environment ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum EnvironmentCommand {
    /// List environments.
    #[command(after_help = "Example:\n  octopus environment list")]
    List,
    /// Create an environment.
    #[command(
        after_help = "Example:\n  octopus environment create Production --description \"Live customers\""
    )]
    Create {
        /// The environment's name (unique, compared ignoring case).
        name: String,
        /// What the environment is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete an environment (refused while machines are in it).
    #[command(after_help = "Example:\n  octopus environment delete Staging")]
    Delete {
        /// The environment's name.
        name: String,
    },
}

/// `octopus machine ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum MachineCommand {
    /// List machines, optionally only those in an environment, with a role or tenant.
    #[command(after_help = "Example:\n  octopus machine list --environment Production --role web")]
    List {
        /// Only machines in this environment.
        #[arg(long, alias = "env")]
        environment: Option<String>,
        /// Only machines with this role.
        #[arg(long)]
        role: Option<String>,
        /// Only machines of this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Show one machine in full.
    #[command(after_help = "Example:\n  octopus machine show web01")]
    Show {
        /// The machine's name.
        name: String,
    },
    /// Delete a machine; the server stops trusting its certificate.
    #[command(after_help = "Example:\n  octopus machine delete web01")]
    Delete {
        /// The machine's name.
        name: String,
    },
    /// Add a listening tentacle (the server dials it).
    #[command(
        after_help = "Example:\n  octopus machine add-listening --name web01 --url https://web01.example:10933 \\\n    --thumbprint 9F3C... --environment Production --role web\n\n\
The thumbprint is what `tentacle show-thumbprint` prints on the machine. The tentacle must\n\
also trust this server: `tentacle configure --trust $(octopus server show-thumbprint)`."
    )]
    AddListening(AddListeningArgs),
}

// Options of `machine add-listening`: not a doc comment, which clap would make the command's about (`ClientCommand`).
#[derive(Debug, clap::Args)]
pub struct AddListeningArgs {
    /// The machine's name on the server.
    #[arg(long)]
    name: String,
    /// Where the tentacle listens: https://HOST:PORT (default port 10933).
    #[arg(long, alias = "uri", value_name = "URL")]
    url: String,
    /// The tentacle's certificate thumbprint (SHA-256, 64 hex digits).
    #[arg(long)]
    thumbprint: String,
    /// Environments the machine belongs to (repeatable; at least one).
    #[arg(
        long = "environment",
        alias = "env",
        value_name = "ENV",
        required = true
    )]
    environments: Vec<String>,
    /// Roles of the machine (repeatable).
    #[arg(long = "role", value_name = "ROLE")]
    roles: Vec<String>,
    /// Tenants (repeatable).
    #[arg(long = "tenant", value_name = "TENANT")]
    tenants: Vec<String>,
    /// Tenant tags (repeatable).
    #[arg(long = "tenant-tag", value_name = "TAG")]
    tenant_tags: Vec<String>,
    /// Machine policy (default: the server's default policy).
    #[arg(long)]
    policy: Option<String>,
    /// Replace a machine of the same name.
    #[arg(long)]
    force: bool,
}

/// `octopus api-key ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum ApiKeyCommand {
    /// Create an API key for the caller. The key is printed once, here, and never again.
    #[command(
        after_help = "Example:\n  export OCTOPUS_API_KEY=$(octopus api-key create --purpose \"CI pipeline\")"
    )]
    Create {
        /// What the key is for, shown in listings.
        #[arg(long)]
        purpose: String,
    },
    /// List API keys (only their first characters; the server keeps no more).
    #[command(
        after_help = "Examples:\n  octopus api-key list\n  octopus api-key list --all   # everyone's (needs ApiKeyEdit)"
    )]
    List {
        /// Everyone's keys, not only yours (needs the ApiKeyEdit permission).
        #[arg(long)]
        all: bool,
    },
    /// Revoke an API key: it stops working at once.
    #[command(after_help = "Example:\n  octopus api-key revoke 3")]
    Revoke {
        /// The key's id, from `octopus api-key list`.
        id: i64,
    },
}

// Options of `health-check`: not a doc comment, which clap would make the command's about (`ClientCommand`).
#[derive(Debug, clap::Args)]
pub struct HealthCheckArgs {
    /// Check this machine (repeatable; default: every machine, or those of --environment).
    #[arg(long = "machine", value_name = "NAME")]
    machines: Vec<String>,
    /// Check the machines of this environment.
    #[arg(long, alias = "env")]
    environment: Option<String>,
    /// Print the task's id and return at once instead of waiting for the result.
    #[arg(long)]
    no_wait: bool,
}

/// Script languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Syntax {
    Bash,
    Sh,
    Python3,
}

impl Syntax {
    fn as_str(self) -> &'static str {
        match self {
            Syntax::Bash => "bash",
            Syntax::Sh => "sh",
            Syntax::Python3 => "python3",
        }
    }
}

/// Whether scripts on a machine run one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// One script at a time on each machine.
    Full,
    /// Alongside other scripts.
    None,
}

// Options of `run-script`: not a doc comment, which clap would make the command's about (`ClientCommand`).
#[derive(Debug, clap::Args)]
#[command(group(ArgGroup::new("source").required(true).args(["script", "file"])))]
#[command(group(ArgGroup::new("target").required(true).args(["machines", "environment"])))]
pub struct RunScriptArgs {
    /// The script's text.
    #[arg(long, value_name = "TEXT")]
    script: Option<String>,
    /// Read the script from FILE (`-` for standard input).
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// The script's language (default: python3 for a .py file, else bash).
    #[arg(long, value_enum)]
    syntax: Option<Syntax>,
    /// Run alone on each machine (full) or beside other scripts (none).
    #[arg(long, value_enum, default_value_t = Isolation::Full)]
    isolation: Isolation,
    /// Run on this machine (repeatable).
    #[arg(long = "machine", value_name = "NAME")]
    machines: Vec<String>,
    /// Run on the machines of this environment.
    #[arg(long, alias = "env")]
    environment: Option<String>,
    /// Only the environment's machines with this role.
    #[arg(long, requires = "environment", conflicts_with = "machines")]
    role: Option<String>,
    /// Only the environment's machines of this tenant.
    #[arg(long, requires = "environment", conflicts_with = "machines")]
    tenant: Option<String>,
    /// An environment variable of the script, NAME=VALUE (repeatable).
    #[arg(long = "variable", short = 'v', value_name = "NAME=VALUE")]
    variables: Vec<String>,
    /// A secret variable (repeatable): NAME=VALUE, or NAME alone to take the value
    /// from this command's environment variable NAME, which keeps it out of the
    /// process list (`ps`). Its value is never shown and is masked in the log.
    #[arg(long = "sensitive-variable", value_name = "NAME[=VALUE]")]
    sensitive_variables: Vec<String>,
    /// Machines that run it at once (default: the server's --max-parallel-steps).
    #[arg(long, value_name = "N")]
    max_parallel_steps: Option<u32>,
    /// Print the task's id and return at once instead of following its output.
    #[arg(long)]
    no_wait: bool,
}

/// `octopus task ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TaskCommand {
    /// List tasks, newest first.
    #[command(after_help = "Example:\n  octopus task list --limit 5")]
    List {
        /// How many tasks to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show a task and its machines' states.
    #[command(after_help = "Example:\n  octopus task show ServerTasks-12")]
    Show {
        /// The task's id.
        id: String,
    },
    /// Print a task's log; with --follow, keep printing until the task ends.
    #[command(
        after_help = "Examples:\n  octopus task log ServerTasks-12\n  octopus task log ServerTasks-12 --follow\n\n\
With --follow the exit status is the task's, as for run-script: 0 success, 1 failed, 3 canceled."
    )]
    Log {
        /// The task's id.
        id: String,
        /// Keep printing new lines until the task ends, then summarise it.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Ask the server to cancel a task (its scripts are stopped on the machines).
    #[command(after_help = "Example:\n  octopus task cancel ServerTasks-12")]
    Cancel {
        /// The task's id.
        id: String,
    },
    /// Decide for a machine waiting under guided failure: retry its deployment,
    /// ignore its failure, or fail it.
    #[command(
        after_help = "Example:\n  octopus task guide ServerTasks-12 --machine web01 --action retry"
    )]
    Guide {
        /// The task's id.
        id: String,
        /// The machine waiting for a decision.
        #[arg(long)]
        machine: String,
        /// What to do.
        #[arg(long, value_enum)]
        action: GuideAction,
    },
}

/// Decisions of `octopus task guide`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuideAction {
    /// Run the deployment on the machine again.
    Retry,
    /// Count the machine as succeeded (the failure is noted) and go on.
    Ignore,
    /// Count the machine as failed.
    Fail,
}

/// A task and its steps, as the task API returns them.
pub(crate) type TaskDetail = octo_api_types::TaskView;

/// Runs a client command.
pub async fn run(opts: ClientOpts, command: ClientCommand) -> anyhow::Result<ExitCode> {
    let mut client = ApiClient::new(&opts.server, opts.api_key, &opts.space)?;
    // Logging in and out use the sessions file their own way.
    if !client.has_key() && !matches!(command, ClientCommand::Login(_) | ClientCommand::Logout) {
        use_stored_session(&mut client);
    }
    let cx = Cx {
        client,
        output: opts.output,
    };
    match command {
        ClientCommand::Environment(c) => cx.environment(c).await,
        ClientCommand::Machine(c) => cx.machine(c).await,
        ClientCommand::ApiKey(c) => cx.api_key(c).await,
        ClientCommand::Space(c) => cx.space(c).await,
        ClientCommand::User(c) => cx.user(c).await,
        ClientCommand::Team(c) => cx.team(c).await,
        ClientCommand::Role(c) => cx.role(c).await,
        ClientCommand::Audit(c) => cx.audit(c).await,
        ClientCommand::Node(c) => cx.node(c).await,
        ClientCommand::Policy(c) => cx.policy(c).await,
        ClientCommand::Login(a) => cx.login(a).await,
        ClientCommand::Logout => cx.logout().await,
        ClientCommand::Whoami => cx.whoami().await,
        ClientCommand::HealthCheck(a) => cx.health_check(a).await,
        ClientCommand::RunScript(a) => cx.run_script(a).await,
        ClientCommand::Task(c) => cx.task(c).await,
        ClientCommand::Package(c) => cx.package(c).await,
        ClientCommand::Deploy(a) => cx.deploy(a).await,
        ClientCommand::Calamari(c) => cx.calamari(c).await,
        ClientCommand::Tentacle(c) => cx.tentacle(c).await,
    }
}

/// `octopus server rotate-certificate`: asks the server to replace its comms
/// certificate and prints what each machine learned, with the fix for the others.
/// Exits 0 when every machine learned it, 1 otherwise (the server has switched
/// either way).
pub async fn rotate_server_certificate(opts: ClientOpts) -> anyhow::Result<ExitCode> {
    let mut client = ApiClient::new(&opts.server, opts.api_key, &opts.space)?;
    if !client.has_key() {
        use_stored_session(&mut client);
    }
    let report: octo_api_types::CertificateRotationReport = client
        .post(
            client.system_url(&["server", "rotate-certificate"], &[]),
            &json!({}),
        )
        .await
        .context("rotating the server's comms certificate")?;
    let missed: Vec<&octo_api_types::MachineRotation> =
        report.machines.iter().filter(|m| !m.learned).collect();
    match opts.output {
        Output::Json => out_json(&report),
        Output::Table => {
            out(&format!(
                "The server now presents comms certificate {} (was {}).",
                report.thumbprint, report.previous_thumbprint
            ));
            let rows: Vec<Vec<String>> = report
                .machines
                .iter()
                .map(|m| {
                    vec![
                        m.space.clone(),
                        m.name.clone(),
                        m.kind.clone(),
                        if m.learned { "yes".into() } else { "NO".into() },
                        m.reason.clone(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                out(&table(
                    &["SPACE", "MACHINE", "KIND", "LEARNED", "WHY NOT"],
                    &rows,
                ));
            }
            if missed.is_empty() {
                out(&format!(
                    "Every machine trusts the new certificate. Once none needs the old one, tentacles may drop it: `tentacle configure --remove-trust {}`.",
                    report.previous_thumbprint
                ));
            } else {
                out(&format!(
                    "{} machine(s) did not learn it and will refuse the server until fixed by hand on the tentacle:",
                    missed.len()
                ));
                for m in &missed {
                    out(&format!("  {} ({}): {}", m.name, m.space, m.fix));
                }
            }
        }
    }
    Ok(if missed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Calls with the session key `octopus login` stored for the client's server,
/// if any. A sessions file that cannot be read is reported and left alone.
fn use_stored_session(client: &mut ApiClient) {
    let Ok(path) = session::default_path() else {
        return;
    };
    match session::load(&path) {
        Ok(sessions) => {
            if let Some(s) = sessions.sessions.get(&client.base()) {
                if let Some(w) = session::loose_permissions(&path) {
                    note(&w);
                }
                client.use_session(&s.api_key, &s.username);
            }
        }
        Err(e) => note(&format!("warning: ignoring the sessions file: {e:#}")),
    }
}

/// What every command needs.
#[derive(Debug)]
struct Cx {
    client: ApiClient,
    output: Output,
}

/// Decodes a successful answer into the type a table needs.
fn decode<T: DeserializeOwned>(v: Value, what: &str) -> anyhow::Result<T> {
    // The error may quote the server's text: escaped like everything else from it.
    serde_json::from_value(v).map_err(|e| {
        anyhow::anyhow!(
            "unexpected answer from the server for {what} (is it another version than this client?): {}",
            output::cell(&e.to_string())
        )
    })
}

/// Prints a message for people in table mode; nothing in JSON mode.
fn say(output: Output, text: &str) {
    if output == Output::Table {
        out(text);
    }
}

impl Cx {
    async fn environment(&self, c: EnvironmentCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            EnvironmentCommand::List => {
                let v: Value = c_
                    .get(c_.space_url(&["environments"], &[]))
                    .await
                    .context("listing environments")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let envs: Vec<Environment> = decode(v, "the environments")?;
                if envs.is_empty() {
                    out("No environments yet; create one with `octopus environment create NAME`.");
                } else {
                    let rows: Vec<_> = envs
                        .iter()
                        .map(|e| vec![e.name.clone(), or_dash(&e.description), time(e.created_at)])
                        .collect();
                    out(&table(&["NAME", "DESCRIPTION", "CREATED (UTC)"], &rows));
                }
            }
            EnvironmentCommand::Create { name, description } => {
                let body = json!({ "name": name, "description": description.unwrap_or_default() });
                let v: Value = c_
                    .post(c_.space_url(&["environments"], &[]), &body)
                    .await
                    .with_context(|| format!("creating environment '{name}'"))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => {
                        let e: Environment = decode(v, "the new environment")?;
                        out(&format!("Created environment '{}'.", e.name));
                    }
                }
            }
            EnvironmentCommand::Delete { name } => {
                c_.delete(c_.space_url(&["environments", &name], &[]))
                    .await
                    .with_context(|| format!("deleting environment '{name}'"))?;
                say(self.output, &format!("Deleted environment '{name}'."));
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn machine(&self, c: MachineCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            MachineCommand::List {
                environment,
                role,
                tenant,
            } => {
                let url = c_.space_url(
                    &["machines"],
                    &[
                        ("environment", environment),
                        ("role", role),
                        ("tenant", tenant),
                    ],
                );
                let v: Value = c_.get(url).await.context("listing machines")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let machines: Vec<Machine> = decode(v, "the machines")?;
                if machines.is_empty() {
                    out("No machines match. Add one with `octopus machine add-listening` or `tentacle register-with`.");
                } else {
                    let rows: Vec<_> = machines
                        .iter()
                        .map(|m| {
                            vec![
                                m.name.clone(),
                                format!("{:?}", m.kind),
                                m.uri.clone(),
                                format!("{:?}", m.status),
                                list(&m.environments),
                                list(&m.roles),
                            ]
                        })
                        .collect();
                    out(&table(
                        &["NAME", "KIND", "URI", "STATUS", "ENVIRONMENTS", "ROLES"],
                        &rows,
                    ));
                }
            }
            MachineCommand::Show { name } => {
                let v: Value = c_
                    .get(c_.space_url(&["machines", &name], &[]))
                    .await
                    .with_context(|| format!("reading machine '{name}'"))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => out(&machine_fields(&decode(v, "the machine")?)),
                }
            }
            MachineCommand::Delete { name } => {
                c_.delete(c_.space_url(&["machines", &name], &[]))
                    .await
                    .with_context(|| format!("deleting machine '{name}'"))?;
                say(
                    self.output,
                    &format!(
                        "Deleted machine '{name}'; the server no longer trusts its certificate."
                    ),
                );
            }
            MachineCommand::AddListening(a) => {
                let url = if a.url.contains("://") {
                    a.url.clone()
                } else {
                    format!("https://{}", a.url)
                };
                let mut body = json!({
                    "name": a.name,
                    "comms_style": "TentaclePassive",
                    "uri": url,
                    "thumbprint": a.thumbprint.trim(),
                    "environments": a.environments,
                    "roles": a.roles,
                    "tenants": a.tenants,
                    "tenant_tags": a.tenant_tags,
                    "policy": a.policy,
                });
                if a.force {
                    body["force"] = json!(true);
                }
                let v: Value = c_
                    .post(c_.space_url(&["machines"], &[]), &body)
                    .await
                    .with_context(|| format!("adding machine '{}'", a.name))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => {
                        let m: Machine = decode(v, "the new machine")?;
                        out(&format!(
                            "Added listening machine '{}' at {} (environments {}; roles {}).\nCheck that the server can reach it: `octopus health-check --machine {}`",
                            m.name,
                            m.uri,
                            list(&m.environments),
                            list(&m.roles),
                            shell_word(&m.name),
                        ));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn api_key(&self, c: ApiKeyCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            ApiKeyCommand::Create { purpose } => {
                let v: Value = c_
                    .post(
                        c_.system_url(&["api-keys"], &[]),
                        &json!({ "purpose": purpose }),
                    )
                    .await
                    .context("creating an API key")?;
                #[derive(Deserialize)]
                struct Created {
                    api_key: String,
                    key: ApiKey,
                }
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => {
                        let created: Created = decode(v, "the new API key")?;
                        // The key alone on stdout, so `$(octopus api-key create ...)` captures it.
                        out(&created.api_key);
                        note(&format!(
                            "Created API key {} ({}). It is shown only now: store it somewhere safe; the server keeps only its hash.",
                            created.key.id, created.key.purpose
                        ));
                    }
                }
            }
            ApiKeyCommand::List { all } => {
                let v: Value = c_
                    .get(c_.system_url(&["api-keys"], &[("all", all.then(|| "true".to_string()))]))
                    .await
                    .context(if all {
                        "listing everyone's API keys"
                    } else {
                        "listing API keys"
                    })?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let keys: Vec<ApiKey> = decode(v, "the API keys")?;
                // Everyone's keys: their owners by name when the caller may see users.
                let names: std::collections::HashMap<i64, String> = if all {
                    match c_.get::<Value>(c_.system_url(&["users"], &[])).await {
                        Ok(v) => serde_json::from_value::<Vec<User>>(v)
                            .map(|us| us.into_iter().map(|u| (u.id, u.username)).collect())
                            .unwrap_or_default(),
                        Err(_) => Default::default(),
                    }
                } else {
                    Default::default()
                };
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            format!("{}...", k.prefix),
                            names
                                .get(&k.user_id)
                                .cloned()
                                .unwrap_or_else(|| k.user_id.to_string()),
                            if k.revoked { "revoked" } else { "active" }.into(),
                            if k.session { "session" } else { "api key" }.into(),
                            time(k.created_at),
                            time_opt(k.last_used_at),
                            k.purpose.clone(),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "ID",
                        "KEY",
                        if all { "USER" } else { "USER ID" },
                        "STATE",
                        "KIND",
                        "CREATED (UTC)",
                        "LAST USED (UTC)",
                        "PURPOSE",
                    ],
                    &rows,
                ));
            }
            ApiKeyCommand::Revoke { id } => {
                c_.delete(c_.system_url(&["api-keys", &id.to_string()], &[]))
                    .await
                    .with_context(|| format!("revoking API key {id}"))?;
                say(
                    self.output,
                    &format!("Revoked API key {id}; it no longer works."),
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn health_check(&self, a: HealthCheckArgs) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        let mut body = json!({ "machines": a.machines });
        if let Some(e) = &a.environment {
            body["environment"] = json!(e);
        }
        let url = c_.space_url(&["tasks", "health"], &[]);
        let followed = self
            .create_and_follow(url, &body, a.no_wait, "health check")
            .await
            .context("starting a health check")?;
        let end = match followed {
            Followed::NotWaited => return Ok(ExitCode::SUCCESS),
            Followed::Interrupted => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
            Followed::Ended(end) => end,
        };
        // The machines as the check left them.
        let names: HashSet<String> = end
            .steps
            .iter()
            .map(|s| s.machine_name.to_lowercase())
            .collect();
        let v: Value = c_
            .get(c_.space_url(&["machines"], &[]))
            .await
            .context("reading the machines after the health check")?;
        let machines: Vec<Machine> = decode::<Vec<Machine>>(v, "the machines")?
            .into_iter()
            .filter(|m| names.contains(&m.name.to_lowercase()))
            .collect();
        match self.output {
            Output::Json => out_json_line(&json!({
                "task": end.task,
                "steps": end.steps,
                "machines": machines,
            })),
            Output::Table => {
                let rows: Vec<_> = machines
                    .iter()
                    .map(|m| {
                        vec![
                            m.name.clone(),
                            format!("{:?}", m.status),
                            m.tentacle_version.clone().unwrap_or_else(|| "-".into()),
                            or_dash(&m.status_reason),
                        ]
                    })
                    .collect();
                out("");
                out(&table(
                    &["NAME", "STATUS", "TENTACLE VERSION", "REASON"],
                    &rows,
                ));
            }
        }
        Ok(task_exit(&end.task))
    }

    async fn run_script(&self, a: RunScriptArgs) -> anyhow::Result<ExitCode> {
        let (script, inferred) = match (&a.script, &a.file) {
            (Some(s), _) => (s.clone(), Syntax::Bash),
            (None, Some(f)) => {
                let text = if f.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_to_string(&mut s)
                        .context("reading the script from standard input")?;
                    s
                } else {
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading the script {}", f.display()))?
                };
                let syntax = match f.extension().and_then(|e| e.to_str()) {
                    Some("py") => Syntax::Python3,
                    _ => Syntax::Bash,
                };
                (text, syntax)
            }
            (None, None) => anyhow::bail!("give the script with --script TEXT or --file FILE"),
        };
        if script.trim().is_empty() {
            anyhow::bail!("the script is empty; give its text with --script or --file");
        }
        let mut body = json!({
            "script": script,
            "syntax": a.syntax.unwrap_or(inferred).as_str(),
            "isolation": match a.isolation { Isolation::Full => "full", Isolation::None => "none" },
            "machines": a.machines,
        });
        for (k, v) in [
            ("environment", &a.environment),
            ("role", &a.role),
            ("tenant", &a.tenant),
        ] {
            if let Some(v) = v {
                body[k] = json!(v);
            }
        }
        let (variables, sensitive) = deploy::variables_from_args(
            std::collections::BTreeMap::new(),
            &a.variables,
            &a.sensitive_variables,
            |name| std::env::var_os(name),
        )?;
        // Sent only when given, so that older servers still take the request.
        if !variables.is_empty() {
            body["variables"] = json!(variables);
        }
        if !sensitive.is_empty() {
            body["sensitive_variables"] = json!(sensitive);
        }
        if let Some(n) = a.max_parallel_steps {
            body["max_parallel_steps"] = json!(n);
        }
        let url = self.client.space_url(&["tasks", "script"], &[]);
        let followed = self
            .create_and_follow(url, &body, a.no_wait, "script")
            .await
            .context("starting the script")?;
        Ok(self.exit_of(followed))
    }

    /// The exit code of a command that created a task and followed it.
    fn exit_of(&self, followed: Followed) -> ExitCode {
        match followed {
            Followed::NotWaited => ExitCode::SUCCESS,
            Followed::Interrupted => ExitCode::from(EXIT_INTERRUPTED),
            Followed::Ended(end) => self.finish(&end),
        }
    }

    /// POSTs `body` to `url` to create a task of kind `what` and, unless
    /// `no_wait`, follows it to its end: from the events its creation answered
    /// with (one request; nothing read twice), or, from a server that answers
    /// with the task as JSON, from its stream. Errors before the task exists
    /// are returned as they are (the caller says what was being started).
    async fn create_and_follow(
        &self,
        url: reqwest::Url,
        body: &Value,
        no_wait: bool,
        what: &str,
    ) -> anyhow::Result<Followed> {
        if no_wait {
            let v: Value = self.client.post(url, body).await?;
            self.started(v, true, what)?;
            return Ok(Followed::NotWaited);
        }
        let (detail, opened) = match self.client.post_following(url, body).await? {
            http::Created::Json(v) => match self.started(v, false, what)? {
                Some(detail) => (detail, None),
                None => return Ok(Followed::NotWaited),
            },
            http::Created::Events(resp) => {
                let (detail, events) = follow::Events::new(resp).created().await?;
                self.announce(&detail, what);
                (detail, Some(events))
            }
        };
        Ok(match self.watch(&detail, 0, opened).await? {
            Some(end) => Followed::Ended(Box::new(end)),
            None => Followed::Interrupted,
        })
    }

    /// After a task was created: with `no_wait`, prints its id (or JSON) and
    /// returns None; otherwise says what runs where and returns the task.
    fn started(&self, v: Value, no_wait: bool, what: &str) -> anyhow::Result<Option<TaskDetail>> {
        if no_wait && self.output == Output::Json {
            out_json(&v);
        }
        let detail: TaskDetail = decode(v, &format!("the new {what} task"))?;
        let id = &detail.task.id;
        let machines: Vec<&str> = detail
            .steps
            .iter()
            .map(|s| s.machine_name.as_str())
            .collect();
        if no_wait {
            if self.output == Output::Table {
                // The id alone on stdout, so `$(octopus run-script ... --no-wait)` captures it.
                out(id);
                note(&format!("Started {what} task {id} on {}; follow it with `octopus task log {id} --follow`.", machines.join(", ")));
            }
            return Ok(None);
        }
        self.announce(&detail, what);
        Ok(Some(detail))
    }

    /// Says which task was started where, and that Ctrl-C does not stop it.
    fn announce(&self, detail: &TaskDetail, what: &str) {
        let machines: Vec<&str> = detail
            .steps
            .iter()
            .map(|s| s.machine_name.as_str())
            .collect();
        note(&format!(
            "Started {what} task {} on {}; Ctrl-C stops following it, not the task.",
            detail.task.id,
            machines.join(", ")
        ));
    }

    /// Follows a task until it ends (None after Ctrl-C); `opened`: the events
    /// its creation answered with, read first.
    async fn watch(
        &self,
        detail: &TaskDetail,
        after: i64,
        opened: Option<follow::Events>,
    ) -> anyhow::Result<Option<TaskDetail>> {
        let id = &detail.task.id;
        tokio::select! {
            r = follow(&self.client, detail, after, self.output, opened) => r.map(Some),
            _ = tokio::signal::ctrl_c() => {
                note(&format!("\nStopped following task {id}; it goes on on the server. Cancel it with `octopus task cancel {id}`, or follow it again with `octopus task log {id} --follow`."));
                Ok(None)
            }
        }
    }

    /// The summary of a finished task, and its exit status.
    fn finish(&self, end: &TaskDetail) -> ExitCode {
        match self.output {
            Output::Json => out_json_line(end),
            Output::Table => {
                out("");
                out(&steps_table(&end.steps));
            }
        }
        task_exit(&end.task)
    }

    async fn task(&self, c: TaskCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            TaskCommand::List { limit } => {
                let v: Value = c_
                    .get(c_.space_url(&["tasks"], &[("limit", Some(limit.to_string()))]))
                    .await
                    .context("listing tasks")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let tasks = decode::<TaskList>(v, "the tasks")?.into_vec();
                if tasks.is_empty() {
                    out("No tasks yet. Start one with `octopus health-check` or `octopus run-script`.");
                } else {
                    let rows: Vec<_> = tasks
                        .iter()
                        .map(|t| {
                            vec![
                                t.id.clone(),
                                t.kind.clone(),
                                format!("{:?}", t.state),
                                time(t.created_at),
                                t.description.clone(),
                            ]
                        })
                        .collect();
                    out(&table(
                        &["ID", "KIND", "STATE", "CREATED (UTC)", "DESCRIPTION"],
                        &rows,
                    ));
                }
                Ok(ExitCode::SUCCESS)
            }
            TaskCommand::Show { id } => {
                let v = self.get_task(&id).await?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => {
                        let d: TaskDetail = decode(v, "the task")?;
                        out(&task_fields(&d.task));
                        if !d.steps.is_empty() {
                            out("");
                            out(&steps_table(&d.steps));
                        }
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            TaskCommand::Log { id, follow } => {
                let detail: TaskDetail = decode(self.get_task(&id).await?, "the task")?;
                if follow {
                    return Ok(match self.watch(&detail, 0, None).await? {
                        Some(end) => self.finish(&end),
                        None => ExitCode::from(EXIT_INTERRUPTED),
                    });
                }
                let mut names = Names::default();
                names.learn(&detail.steps);
                let mut after = 0i64;
                loop {
                    let url = c_.space_url(
                        &["tasks", &id, "log"],
                        &[
                            ("after", Some(after.to_string())),
                            ("limit", Some("1000".into())),
                        ],
                    );
                    let v: Value = c_
                        .get(url)
                        .await
                        .with_context(|| format!("reading the log of task {id}"))?;
                    let lines = decode::<LogPage>(v, "the task log")?.into_vec();
                    let Some(last) = lines.last().map(|l| l.id) else {
                        break;
                    };
                    if last <= after {
                        anyhow::bail!("reading the log of task {id}: the server returned lines out of order (id {last} after {after})");
                    }
                    for line in &lines {
                        print_line(&names, line, self.output);
                    }
                    after = last;
                }
                Ok(ExitCode::SUCCESS)
            }
            TaskCommand::Guide {
                id,
                machine,
                action,
            } => {
                let action = match action {
                    GuideAction::Retry => "retry",
                    GuideAction::Ignore => "ignore",
                    GuideAction::Fail => "fail",
                };
                let v: Value = c_
                    .post(
                        c_.space_url(&["tasks", &id, "guidance"], &[]),
                        &json!({ "machine": machine, "action": action }),
                    )
                    .await
                    .with_context(|| format!("guiding {machine} in task {id}"))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => out(&format!(
                        "Told task {id}: {action} on {machine}. Watch it with `octopus task log {id} --follow`."
                    )),
                }
                Ok(ExitCode::SUCCESS)
            }
            TaskCommand::Cancel { id } => {
                let v: Value = c_
                    .post(c_.space_url(&["tasks", &id, "cancel"], &[]), &json!({}))
                    .await
                    .with_context(|| format!("canceling task {id}"))?;
                match self.output {
                    Output::Json => {
                        if !v.is_null() {
                            out_json(&v);
                        }
                    }
                    Output::Table => out(&format!(
                        "Asked the server to cancel task {id}; its scripts are being stopped. Watch it end with `octopus task log {id} --follow`."
                    )),
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn get_task(&self, id: &str) -> anyhow::Result<Value> {
        let c_ = &self.client;
        c_.get(c_.space_url(&["tasks", id], &[])).await.map_err(|e| {
            let hint = if e.status() == Some(reqwest::StatusCode::NOT_FOUND)
                && !matches!(&e, ClientError::Api { message, .. } if message.starts_with("no such API route"))
            {
                "; list tasks with `octopus task list`"
            } else {
                ""
            };
            anyhow::anyhow!("reading task {id}: {e}{hint}")
        })
    }
}

/// `GET /api/tasks` as a list, or wrapped as `{"tasks": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TaskList {
    List(Vec<Task>),
    Wrapped { tasks: Vec<Task> },
}

impl TaskList {
    fn into_vec(self) -> Vec<Task> {
        match self {
            Self::List(v) | Self::Wrapped { tasks: v } => v,
        }
    }
}

/// A page of `GET /api/tasks/{id}/log` as a list, or wrapped as `{"lines": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LogPage {
    List(Vec<TaskLogLine>),
    Wrapped { lines: Vec<TaskLogLine> },
}

impl LogPage {
    fn into_vec(self) -> Vec<TaskLogLine> {
        match self {
            Self::List(v) | Self::Wrapped { lines: v } => v,
        }
    }
}

/// The exit status for a finished task, saying why when it is not success.
fn task_exit(task: &Task) -> ExitCode {
    let id = &task.id;
    match task.state {
        TaskState::Success => ExitCode::SUCCESS,
        TaskState::Canceled => {
            note(&format!("error: task {id} was canceled"));
            ExitCode::from(EXIT_CANCELED)
        }
        TaskState::Failed => {
            match &task.error {
                Some(e) if !e.trim().is_empty() => {
                    eprintln!("error: task {id} failed: {}", output::cell(e));
                }
                _ => note(&format!(
                    "error: task {id} failed; see `octopus task show {id}`"
                )),
            }
            ExitCode::FAILURE
        }
        state @ (TaskState::Queued | TaskState::Executing) => {
            note(&format!("error: task {id} is still {state:?} although the server said it ended; see `octopus task show {id}`"));
            ExitCode::FAILURE
        }
    }
}

/// MACHINE, STATE, EXIT CODE (and ERROR when any step has one).
fn steps_table(steps: &[TaskStep]) -> String {
    let with_error = steps
        .iter()
        .any(|s| s.error.as_deref().is_some_and(|e| !e.is_empty()));
    let rows: Vec<_> = steps
        .iter()
        .map(|s| {
            let mut row = vec![
                s.machine_name.clone(),
                format!("{:?}", s.state),
                s.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
                match (s.started_at, s.completed_at) {
                    (Some(a), Some(b)) => duration(b - a),
                    _ => "-".into(),
                },
            ];
            if with_error {
                row.push(or_dash(s.error.as_deref().unwrap_or_default()));
            }
            row
        })
        .collect();
    let mut headers = vec!["MACHINE", "STATE", "EXIT CODE", "DURATION"];
    if with_error {
        headers.push("ERROR");
    }
    let mut text = table(&headers, &rows);
    let outputs: Vec<Vec<String>> = steps
        .iter()
        .flat_map(|s| {
            s.output_variables
                .iter()
                .map(|(k, v)| vec![s.machine_name.clone(), k.clone(), v.clone()])
        })
        .collect();
    if !outputs.is_empty() {
        text.push_str("\n\nOutput variables:\n");
        text.push_str(&table(&["MACHINE", "NAME", "VALUE"], &outputs));
    }
    text
}

fn task_fields(t: &Task) -> String {
    let mut f = vec![
        ("Task", t.id.clone()),
        ("Kind", t.kind.clone()),
        ("State", format!("{:?}", t.state)),
        ("Description", or_dash(&t.description)),
        ("Created (UTC)", time(t.created_at)),
        ("Started (UTC)", time_opt(t.started_at)),
        ("Completed (UTC)", time_opt(t.completed_at)),
    ];
    if let (Some(s), Some(c)) = (t.started_at, t.completed_at) {
        f.push(("Duration", duration(c - s)));
    }
    if let Some(e) = &t.error {
        f.push(("Error", e.clone()));
    }
    if t.cancel_requested {
        f.push(("Cancel requested", "yes".into()));
    }
    fields(&f)
}

fn machine_fields(m: &Machine) -> String {
    let mut f = vec![
        ("Name", m.name.clone()),
        ("Kind", format!("{:?}", m.kind)),
        ("URI", m.uri.clone()),
        ("Thumbprint", m.thumbprint.clone()),
    ];
    if let Some(next) = &m.next_thumbprint {
        f.push((
            "Rotating to",
            format!("{next} (both accepted until the tentacle presents it)"),
        ));
    }
    f.extend([
        ("Environments", list(&m.environments)),
        ("Roles", list(&m.roles)),
        ("Tenants", list(&m.tenants)),
        ("Tenant tags", list(&m.tenant_tags)),
        ("Policy", m.policy.clone()),
    ]);
    if let Some(p) = &m.worker_pool {
        f.push(("Worker pool", p.clone()));
    }
    f.extend([
        ("Status", format!("{:?}", m.status)),
        ("Status reason", or_dash(&m.status_reason)),
        ("Last health check (UTC)", time_opt(m.last_health_at)),
        (
            "Tentacle version",
            m.tentacle_version.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "Tool version",
            m.tool_version.clone().unwrap_or_else(|| "-".into()),
        ),
        ("Created (UTC)", time(m.created_at)),
    ]);
    fields(&f)
}

/// A name as one shell word (quoted when it needs to be), for suggested commands.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{CommandFactory, Parser};

    /// The client part of `octopus`'s command line, as its binary builds it.
    #[derive(Debug, Parser)]
    #[command(name = "octopus")]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
        #[command(flatten)]
        client: ClientOpts,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("octopus").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent_and_every_command_has_an_example() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        // Built whole, as the docs and completions are: the groups' commands
        // are deferred until then.
        let mut cmd = cmd;
        cmd.build();
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            // `help` is clap's own, added when the command is built.
            for sub in c.get_subcommands().filter(|s| s.get_name() != "help") {
                let p = format!("{path} {}", sub.get_name());
                let help = sub
                    .get_after_help()
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                if !help.contains("Example") {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&cmd, "octopus", &mut missing);
        // `calamari` is only a group; its one command has examples.
        missing.retain(|p| p != "octopus calamari" && p != "octopus tentacle");
        assert!(missing.is_empty(), "no example: {missing:?}");
    }

    #[test]
    fn a_command_is_built_only_when_it_is_the_one_run() {
        let own_arguments = |cmd: &clap::Command, path: &[&str]| {
            let mut c = cmd;
            for name in path {
                c = c.find_subcommand(name).unwrap();
            }
            c.get_arguments()
                .map(|a| a.get_id().to_string())
                .collect::<Vec<_>>()
        };
        let cmd = Cli::command();
        for path in [&["run-script"][..], &["environment", "create"], &["deploy"]] {
            assert_eq!(
                own_arguments(&cmd, path),
                Vec::<String>::new(),
                "{path:?} built at start"
            );
        }
        let mut built = cmd;
        built.build();
        assert!(own_arguments(&built, &["run-script"]).contains(&"script".to_string()));
        assert!(
            own_arguments(&built, &["environment", "create"]).contains(&"description".to_string())
        );
        // And parsing builds the one it runs.
        let cli = parse(&["environment", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            ClientCommand::Environment(EnvironmentCommand::List)
        ));
    }

    /// Each command's about (its line in `--help` and its man page) is the
    /// one its group gives it, also once its deferred arguments are added.
    #[test]
    fn a_commands_about_survives_its_arguments() {
        type Augment = fn(clap::Command) -> clap::Command;
        let groups: [(&str, Augment); 15] = [
            ("octopus", ClientCommand::augment_subcommands),
            ("environment", EnvironmentCommand::augment_subcommands),
            ("machine", MachineCommand::augment_subcommands),
            ("api-key", ApiKeyCommand::augment_subcommands),
            ("task", TaskCommand::augment_subcommands),
            ("node", nodes::NodeCommand::augment_subcommands),
            ("policy", policies::PolicyCommand::augment_subcommands),
            ("space", SpaceCommand::augment_subcommands),
            ("user", UserCommand::augment_subcommands),
            ("team", TeamCommand::augment_subcommands),
            ("role", RoleCommand::augment_subcommands),
            ("audit", AuditCommand::augment_subcommands),
            ("package", deploy::PackageCommand::augment_subcommands),
            ("calamari", deploy::CalamariCommand::augment_subcommands),
            ("tentacle", deploy::TentacleCommand::augment_subcommands),
        ];
        let mut changed = Vec::new();
        let mut checked = 0;
        for (name, augment) in groups {
            for sub in augment(clap::Command::new(name)).get_subcommands() {
                let given = sub.get_about().map(ToString::to_string);
                let mut built = sub.clone();
                built.build();
                let now = built.get_about().map(ToString::to_string);
                if given != now {
                    changed.push(format!(
                        "{name} {}: {given:?} became {now:?}",
                        sub.get_name()
                    ));
                }
                checked += 1;
            }
        }
        assert!(checked > 60, "only {checked} commands checked");
        assert!(changed.is_empty(), "{changed:#?}");
    }

    #[test]
    fn the_space_option_is_global_with_a_default() {
        if std::env::var_os("OCTOPUS_SPACE").is_none() {
            let cli = parse(&["team", "list"]).unwrap();
            assert_eq!(cli.client.space, "Default");
        }
        let cli = parse(&["team", "list", "--space", "Platform Ops"]).unwrap();
        assert_eq!(cli.client.space, "Platform Ops");
        let cli = parse(&["--space", "Spaces-2", "machine", "list"]).unwrap();
        assert_eq!(cli.client.space, "Spaces-2");
    }

    #[test]
    fn new_commands_parse() {
        for args in [
            &["space", "create", "Platform", "--description", "d"][..],
            &["space", "list"],
            &["space", "show", "Platform"],
            &["space", "delete", "Platform"],
            &["user", "list"],
            &["user", "show", "alice"],
            &["user", "disable", "alice"],
            &["user", "enable", "alice"],
            &["user", "set-password"],
            &["user", "set-password", "bob", "--password-stdin"],
            &["team", "create", "Ops", "--system"],
            &["team", "show", "Ops"],
            &["team", "add-member", "Ops", "alice"],
            &["team", "remove-member", "Ops", "alice"],
            &[
                "team",
                "grant",
                "Ops",
                "--role",
                "Viewer",
                "--environment",
                "Test",
                "--environment",
                "Prod",
                "--tenant",
                "T",
            ],
            &["team", "grant", "Ops", "--role", "Viewer", "--all-spaces"],
            &["team", "revoke", "Ops", "12"],
            &["team", "delete", "Ops"],
            &["role", "list"],
            &["role", "show", "Viewer"],
            &[
                "role",
                "create",
                "R",
                "--permission",
                "TaskView",
                "--permission",
                "TaskCreate,MachineView",
            ],
            &["login", "--username", "alice", "--password-stdin"],
            &["logout"],
            &["whoami"],
            &[
                "audit", "list", "--user", "alice", "--since", "2h", "--limit", "5",
            ],
            &["api-key", "list", "--all"],
            &[
                "run-script",
                "--script",
                "env",
                "--machine",
                "m",
                "--variable",
                "A=1",
                "--sensitive-variable",
                "B",
            ],
            &[
                "deploy",
                "--package",
                "P",
                "--environment",
                "E",
                "--sensitive-variable",
                "S=x",
            ],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        // Passwords are not command-line arguments.
        assert!(parse(&["login", "--username", "a", "--password", "x"]).is_err());
        assert!(parse(&["user", "set-password", "--password", "x"]).is_err());
        // A role needs a permission; a grant needs a role.
        assert!(parse(&["role", "create", "R"]).is_err());
        assert!(parse(&["team", "grant", "Ops"]).is_err());
    }
}
