//! The client commands of `octopus` (`environment`, `machine`, `api-key`, `user`,
//! `health-check`, `run-script`, `task`): calls to a running server's REST API.
//!
//! - [`http`]: [`ApiClient`], the one HTTP client, and its typed errors.
//! - [`follow`]: following a task's log stream until it ends, reconnecting.
//! - [`sse`]: the `text/event-stream` parser.
//! - [`output`]: tables, label/value blocks, times.
//!
//! Every command prints a table (or label/value lines) by default, or the
//! server's JSON with `--output json`. Errors are one line on stderr, `error: `
//! then what failed and what to do, with exit code 1.

// A command-line tool reports on stderr by design.
#![allow(clippy::print_stderr)]

mod deploy;
mod follow;
mod http;
mod output;
mod sse;

use std::collections::HashSet;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{ArgGroup, Subcommand, ValueEnum};
use octo_api_types::{ApiKey, Environment, Machine, Task, TaskLogLine, TaskState, TaskStep, User};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use self::follow::{follow, print_line, Names};
use self::http::{ApiClient, ClientError};
use self::output::{
    duration, fields, list, or_dash, out, out_json, out_json_line, table, time, time_opt,
};

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
    /// API key to call the server with (client commands). The first admin key is
    /// in DATA/admin-api-key; make more with `octopus api-key create`.
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
#[derive(Debug, Subcommand)]
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
    /// Create, list and revoke API keys (of the caller; admins see everyone's).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus api-key create --purpose \"CI pipeline\"\n  octopus api-key revoke 3"
    )]
    ApiKey(ApiKeyCommand),
    /// Manage users (administrators only).
    #[command(
        subcommand,
        after_help = "Example:\n  printf '%s\\n' \"$PASSWORD\" | octopus user create --username alice --password-stdin --admin"
    )]
    User(UserCommand),
    /// Check machines' health now, wait for the result and show it.
    #[command(
        after_help = "Examples:\n  octopus health-check --environment Production\n  octopus health-check --machine web01 --machine web02 --no-wait\n\n\
Exit status: 0 when the health-check task succeeded, 1 when it failed or on an error, 3 when it was canceled."
    )]
    HealthCheck(HealthCheckArgs),
    /// Run a script on machines and print their output as it comes.
    #[command(
        after_help = "Examples:\n  octopus run-script --script 'uname -a' --environment Production --role web\n  octopus run-script --file deploy.py --machine web01 --machine web02\n  octopus run-script --script 'sleep 600' --environment Test --no-wait\n\n\
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
        after_help = "Examples:\n  octopus deploy --package Acme.Web --environment Production --role web\n  octopus deploy --package Acme.Web --version 1.2.3 --environment Test --variable Greeting=Hello --variables-file vars.json\n\n\
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
    /// List, show, follow and cancel server tasks (health checks, script runs).
    #[command(
        subcommand,
        after_help = "Examples:\n  octopus task list --limit 5\n  octopus task log ServerTasks-12 --follow\n  octopus task cancel ServerTasks-12"
    )]
    Task(TaskCommand),
}

/// `octopus environment ...`
#[derive(Debug, Subcommand)]
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

/// Options of `machine add-listening`.
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
    #[command(after_help = "Example:\n  octopus api-key list")]
    List,
    /// Revoke an API key: it stops working at once.
    #[command(after_help = "Example:\n  octopus api-key revoke 3")]
    Revoke {
        /// The key's id, from `octopus api-key list`.
        id: i64,
    },
}

/// `octopus user ...`
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user. Without a password the user can only use API keys.
    #[command(
        after_help = "Example:\n  printf '%s\\n' \"$PASSWORD\" | octopus user create --username alice --password-stdin --display-name \"Alice Smith\""
    )]
    Create(UserCreateArgs),
}

/// Options of `user create`.
#[derive(Debug, clap::Args)]
pub struct UserCreateArgs {
    /// The login name.
    #[arg(long)]
    username: String,
    /// The password (at least 8 characters). Visible to other local users in the
    /// process list: prefer --password-stdin.
    #[arg(long, conflicts_with = "password_stdin")]
    password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    password_stdin: bool,
    /// The name shown to people (default: the username).
    #[arg(long)]
    display_name: Option<String>,
    /// Make the user an administrator.
    #[arg(long)]
    admin: bool,
}

/// Options of `health-check`.
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

/// Options of `run-script`.
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
    /// Print the task's id and return at once instead of following its output.
    #[arg(long)]
    no_wait: bool,
}

/// `octopus task ...`
#[derive(Debug, Subcommand)]
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
    let client = ApiClient::new(&opts.server, opts.api_key)?;
    let cx = Cx {
        client,
        output: opts.output,
    };
    match command {
        ClientCommand::Environment(c) => cx.environment(c).await,
        ClientCommand::Machine(c) => cx.machine(c).await,
        ClientCommand::ApiKey(c) => cx.api_key(c).await,
        ClientCommand::User(UserCommand::Create(a)) => cx.user_create(a).await,
        ClientCommand::HealthCheck(a) => cx.health_check(a).await,
        ClientCommand::RunScript(a) => cx.run_script(a).await,
        ClientCommand::Task(c) => cx.task(c).await,
        ClientCommand::Package(c) => cx.package(c).await,
        ClientCommand::Deploy(a) => cx.deploy(a).await,
        ClientCommand::Calamari(c) => cx.calamari(c).await,
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
    serde_json::from_value(v)
        .with_context(|| format!("unexpected answer from the server for {what} (is it another version than this client?)"))
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
                    .get(c_.url(&["environments"], &[]))
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
                    .post(c_.url(&["environments"], &[]), &body)
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
                c_.delete(c_.url(&["environments", &name], &[]))
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
                let url = c_.url(
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
                    .get(c_.url(&["machines", &name], &[]))
                    .await
                    .with_context(|| format!("reading machine '{name}'"))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => out(&machine_fields(&decode(v, "the machine")?)),
                }
            }
            MachineCommand::Delete { name } => {
                c_.delete(c_.url(&["machines", &name], &[]))
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
                    .post(c_.url(&["machines"], &[]), &body)
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
                    .post(c_.url(&["api-keys"], &[]), &json!({ "purpose": purpose }))
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
                        eprintln!(
                            "Created API key {} ({}). It is shown only now: store it somewhere safe; the server keeps only its hash.",
                            created.key.id, created.key.purpose
                        );
                    }
                }
            }
            ApiKeyCommand::List => {
                let v: Value = c_
                    .get(c_.url(&["api-keys"], &[]))
                    .await
                    .context("listing API keys")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let keys: Vec<ApiKey> = decode(v, "the API keys")?;
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            format!("{}...", k.prefix),
                            k.user_id.to_string(),
                            if k.revoked { "revoked" } else { "active" }.into(),
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
                        "USER ID",
                        "STATE",
                        "CREATED (UTC)",
                        "LAST USED (UTC)",
                        "PURPOSE",
                    ],
                    &rows,
                ));
            }
            ApiKeyCommand::Revoke { id } => {
                c_.delete(c_.url(&["api-keys", &id.to_string()], &[]))
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

    async fn user_create(&self, a: UserCreateArgs) -> anyhow::Result<ExitCode> {
        let password = if a.password_stdin {
            let mut text = String::new();
            std::io::stdin()
                .read_line(&mut text)
                .context("reading the password from standard input")?;
            let first = text.trim_end_matches(['\n', '\r']).to_string();
            if first.is_empty() {
                anyhow::bail!("--password-stdin: standard input held no password; pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | octopus user create ...`");
            }
            Some(first)
        } else {
            a.password
        };
        let mut body = Map::new();
        body.insert("username".into(), json!(a.username));
        if let Some(p) = password {
            body.insert("password".into(), json!(p));
        }
        if let Some(d) = &a.display_name {
            body.insert("display_name".into(), json!(d));
        }
        body.insert("is_admin".into(), json!(a.admin));
        let c_ = &self.client;
        let v: Value = c_
            .post(c_.url(&["users"], &[]), &Value::Object(body))
            .await
            .with_context(|| format!("creating user '{}'", a.username))?;
        match self.output {
            Output::Json => out_json(&v),
            Output::Table => {
                let u: User = decode(v, "the new user")?;
                out(&format!(
                    "Created {} '{}' ({}, id {}).",
                    if u.is_admin { "administrator" } else { "user" },
                    u.username,
                    u.display_name,
                    u.id
                ));
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
        let v: Value = c_
            .post(c_.url(&["tasks", "health"], &[]), &body)
            .await
            .context("starting a health check")?;
        let Some(detail) = self.started(v, a.no_wait, "health check")? else {
            return Ok(ExitCode::SUCCESS);
        };
        let Some(end) = self.watch(&detail, 0).await? else {
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        };
        // The machines as the check left them.
        let names: HashSet<String> = end
            .steps
            .iter()
            .map(|s| s.machine_name.to_lowercase())
            .collect();
        let v: Value = c_
            .get(c_.url(&["machines"], &[]))
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
        let c_ = &self.client;
        let v: Value = c_
            .post(c_.url(&["tasks", "script"], &[]), &body)
            .await
            .context("starting the script")?;
        let Some(detail) = self.started(v, a.no_wait, "script")? else {
            return Ok(ExitCode::SUCCESS);
        };
        let Some(end) = self.watch(&detail, 0).await? else {
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        };
        Ok(self.finish(&end))
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
                eprintln!("Started {what} task {id} on {}; follow it with `octopus task log {id} --follow`.", machines.join(", "));
            }
            return Ok(None);
        }
        eprintln!(
            "Started {what} task {id} on {}; Ctrl-C stops following it, not the task.",
            machines.join(", ")
        );
        Ok(Some(detail))
    }

    /// Follows a task until it ends (None after Ctrl-C).
    async fn watch(&self, detail: &TaskDetail, after: i64) -> anyhow::Result<Option<TaskDetail>> {
        let id = &detail.task.id;
        tokio::select! {
            r = follow(&self.client, detail, after, self.output) => r.map(Some),
            _ = tokio::signal::ctrl_c() => {
                eprintln!("\nStopped following task {id}; it goes on on the server. Cancel it with `octopus task cancel {id}`, or follow it again with `octopus task log {id} --follow`.");
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
                    .get(c_.url(&["tasks"], &[("limit", Some(limit.to_string()))]))
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
                    return Ok(match self.watch(&detail, 0).await? {
                        Some(end) => self.finish(&end),
                        None => ExitCode::from(EXIT_INTERRUPTED),
                    });
                }
                let mut names = Names::default();
                names.learn(&detail.steps);
                let mut after = 0i64;
                loop {
                    let url = c_.url(
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
                        c_.url(&["tasks", &id, "guidance"], &[]),
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
                    .post(c_.url(&["tasks", &id, "cancel"], &[]), &json!({}))
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
        c_.get(c_.url(&["tasks", id], &[])).await.map_err(|e| {
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
            eprintln!("error: task {id} was canceled");
            ExitCode::from(EXIT_CANCELED)
        }
        TaskState::Failed => {
            match &task.error {
                Some(e) if !e.trim().is_empty() => eprintln!("error: task {id} failed: {e}"),
                _ => eprintln!("error: task {id} failed; see `octopus task show {id}`"),
            }
            ExitCode::FAILURE
        }
        state @ (TaskState::Queued | TaskState::Executing) => {
            eprintln!("error: task {id} is still {state:?} although the server said it ended; see `octopus task show {id}`");
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
        ("Environments", list(&m.environments)),
        ("Roles", list(&m.roles)),
        ("Tenants", list(&m.tenants)),
        ("Tenant tags", list(&m.tenant_tags)),
        ("Policy", m.policy.clone()),
    ];
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
