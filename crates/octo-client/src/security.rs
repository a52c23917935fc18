//! Who may do what: `octopus space`, `user`, `team`, `role`, `audit`,
//! `login`, `logout` and `whoami`.
//!
//! Spaces, users, roles, API keys and logging in are the server's own routes
//! ([`ApiClient::system_url`](super::http::ApiClient::system_url)); teams and
//! the audit log belong to the `--space` space
//! ([`ApiClient::space_url`](super::http::ApiClient::space_url)).

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use octo_api_types::{AuditEvent, Grant, LoginReply, Permission, Role, Space, Team, User, WhoAmI};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{ClientError, KeySource};
use super::output::{fields, note, or_dash, out, out_json, table, time};
use super::prompt::{next_line, Interrupted, Passwords};
use super::session::{self, Session};
use super::when::{now_ms, parse_since};
use super::{decode, say, shell_word, Cx, Output, EXIT_INTERRUPTED};

/// `octopus space ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum SpaceCommand {
    /// List the spaces you may see.
    #[command(after_help = "Example:\n  octopus space list")]
    List,
    /// Show one space.
    #[command(
        after_help = "Examples:\n  octopus space show Platform\n  octopus space show Spaces-2"
    )]
    Show {
        /// The space's name or id (Spaces-N).
        name: String,
    },
    /// Create a space: its own environments, machines, packages, tasks and teams.
    #[command(
        after_help = "Example:\n  octopus space create Platform --description \"Platform team's servers\"\n  octopus --space Platform environment create Production"
    )]
    Create {
        /// The space's name (unique, compared ignoring case).
        name: String,
        /// What the space is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a space (refused while it holds machines).
    #[command(after_help = "Example:\n  octopus space delete Sandbox")]
    Delete {
        /// The space's name or id (Spaces-N).
        name: String,
    },
}

/// `octopus user ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum UserCommand {
    /// Create a user. Without a password the user can only use API keys.
    #[command(
        after_help = "Example:\n  printf '%s\\n' \"$PASSWORD\" | octopus user create --username alice --password-stdin --display-name \"Alice Smith\""
    )]
    Create(UserCreateArgs),
    /// List users.
    #[command(after_help = "Example:\n  octopus user list")]
    List,
    /// Show one user.
    #[command(after_help = "Example:\n  octopus user show alice")]
    Show {
        /// The login name.
        username: String,
    },
    /// Disable a user: they can no longer log in and their API keys stop working.
    #[command(after_help = "Example:\n  octopus user disable alice")]
    Disable {
        /// The login name.
        username: String,
    },
    /// Enable a disabled user again.
    #[command(after_help = "Example:\n  octopus user enable alice")]
    Enable {
        /// The login name.
        username: String,
    },
    /// Change your own password, or (with USERNAME, for administrators) set another's.
    #[command(
        after_help = "Examples:\n  octopus user set-password                # yours: asks for the current and the new one\n  printf '%s\\n%s\\n' \"$OLD\" \"$NEW\" | octopus user set-password --password-stdin\n  printf '%s\\n' \"$NEW\" | octopus user set-password bob --password-stdin\n\n\
On a terminal the passwords are asked for without echo (the new one twice). Otherwise, or\n\
with --password-stdin, they are read from standard input: for your own password the current\n\
one on the first line (empty if you have none yet) and the new one on the second; for another\n\
user's, the new one only."
    )]
    SetPassword {
        /// Whose password to set (default: yours, which needs the current one).
        username: Option<String>,
        /// Read the passwords from standard input's lines, even on a terminal.
        #[arg(long)]
        password_stdin: bool,
    },
}

// Options of `user create`: not a doc comment, which clap would make the command's about (`ClientCommand`).
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

/// `octopus team ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum TeamCommand {
    /// List the teams of the space (and those outside any space).
    #[command(after_help = "Examples:\n  octopus team list\n  octopus --space Platform team list")]
    List,
    /// Show a team: its members and its grants.
    #[command(after_help = "Example:\n  octopus team show Deployers")]
    Show {
        /// The team's name.
        name: String,
    },
    /// Create a team in the space, or with --system outside any space.
    #[command(
        after_help = "Examples:\n  octopus team create Deployers --description \"Deploy to test and staging\"\n  octopus team create Auditors --system   # its grants may cover every space"
    )]
    Create {
        /// The team's name.
        name: String,
        /// What the team is for.
        #[arg(long)]
        description: Option<String>,
        /// Outside any space: its grants may apply in every space (--all-spaces).
        #[arg(long)]
        system: bool,
    },
    /// Delete a team (built-in teams cannot be deleted).
    #[command(after_help = "Example:\n  octopus team delete Deployers")]
    Delete {
        /// The team's name.
        name: String,
    },
    /// Add a user to a team.
    #[command(after_help = "Example:\n  octopus team add-member Deployers alice")]
    AddMember {
        /// The team's name.
        team: String,
        /// The user's login name.
        username: String,
    },
    /// Remove a user from a team.
    #[command(after_help = "Example:\n  octopus team remove-member Deployers alice")]
    RemoveMember {
        /// The team's name.
        team: String,
        /// The user's login name.
        username: String,
    },
    /// Give a team a role in the space, optionally only for some environments and tenants.
    #[command(
        after_help = "Examples:\n  octopus team grant Deployers --role \"Deployment creator\" --environment Test --environment Staging\n  octopus team grant Auditors --role \"Space viewer\" --all-spaces\n\n\
List the roles with `octopus role list`. Without --environment (or --tenant) the grant\n\
covers all of them."
    )]
    Grant {
        /// The team's name.
        team: String,
        /// The role to give (`octopus role list`).
        #[arg(long)]
        role: String,
        /// Only in this environment (repeatable; default: all).
        #[arg(long = "environment", alias = "env", value_name = "ENV")]
        environments: Vec<String>,
        /// Only for this tenant (repeatable; default: all).
        #[arg(long = "tenant", value_name = "TENANT")]
        tenants: Vec<String>,
        /// In every space rather than --space (teams made with --system only).
        #[arg(long)]
        all_spaces: bool,
    },
    /// Take a grant back from a team.
    #[command(
        after_help = "Example:\n  octopus team revoke Deployers 12   # the id from `octopus team show Deployers`"
    )]
    Revoke {
        /// The team's name.
        team: String,
        /// The grant's id, from `octopus team show TEAM`.
        grant_id: i64,
    },
}

/// `octopus role ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum RoleCommand {
    /// List the roles.
    #[command(after_help = "Example:\n  octopus role list")]
    List,
    /// Show a role's permissions.
    #[command(after_help = "Example:\n  octopus role show \"Deployment creator\"")]
    Show {
        /// The role's name.
        name: String,
    },
    /// Create a custom role from permissions.
    #[command(
        after_help = "Example:\n  octopus role create \"Script runner\" --permission TaskView --permission TaskCreate --permission MachineView\n\n\
Permission names are checked before anything is sent; a wrong one lists the valid names.\n\
Several may be given at once, comma-separated: --permission TaskView,TaskCreate"
    )]
    Create {
        /// The role's name.
        name: String,
        /// A permission the role gives (repeatable, or comma-separated).
        #[arg(long = "permission", value_name = "PERMISSION", required = true)]
        permissions: Vec<String>,
        /// What the role is for.
        #[arg(long)]
        description: Option<String>,
    },
}

/// `octopus audit ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum AuditCommand {
    /// List the space's audit events, newest first.
    #[command(
        after_help = "Examples:\n  octopus audit list --since 2h\n  octopus audit list --user alice --since 2026-12-01 --limit 200\n  octopus audit list --since 2026-12-01T10:00:00Z --output json\n\n\
--since takes an RFC 3339 time (2026-12-01T10:00:00Z, 2026-12-01T11:00:00+01:00), a date\n\
(2026-12-01, from midnight UTC) or an age (30m, 2h, 7d, 1h30m)."
    )]
    List {
        /// Only what this user did.
        #[arg(long, value_name = "USERNAME")]
        user: Option<String>,
        /// Only events since WHEN: a time, a date or an age (30m, 2h, 7d).
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

// Options of `octopus login`: not a doc comment, which clap would make the command's about (`ClientCommand`).
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The login name.
    #[arg(long)]
    username: String,
    /// Read the password from the first line of standard input (default: ask
    /// on the terminal, without echo).
    #[arg(long)]
    password_stdin: bool,
}

/// What `octopus login` says of the exchange in JSON: the server's answer
/// without the key, where it went.
#[derive(Debug, serde::Serialize)]
struct LoginJson<'a> {
    server: String,
    sessions_file: String,
    user: &'a User,
    key: &'a octo_api_types::ApiKey,
}

/// `POST /api/teams/{name}/grants` answers the new grant (or the team).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum GrantReply {
    Grant(Grant),
    Team(Team),
}

/// Checks permission names (repeatable and comma-separated) against the ones
/// this client knows; a wrong one is refused with the list of valid names.
pub(crate) fn parse_permissions(names: &[String]) -> anyhow::Result<Vec<Permission>> {
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for name in names.iter().flat_map(|n| n.split(',')).map(str::trim) {
        if name.is_empty() {
            continue;
        }
        match Permission::parse(name) {
            Some(p) if !found.contains(&p) => found.push(p),
            Some(_) => {}
            None => unknown.push(format!("'{name}'")),
        }
    }
    let valid = || {
        Permission::ALL
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !unknown.is_empty() {
        anyhow::bail!(
            "--permission: no permission is named {}; the valid names are: {}",
            unknown.join(", "),
            valid()
        );
    }
    if found.is_empty() {
        anyhow::bail!(
            "--permission: give at least one permission; the valid names are: {}",
            valid()
        );
    }
    Ok(found)
}

/// `Spaces-N`, as the API names spaces by id.
fn space_id(id: i64) -> String {
    format!("Spaces-{id}")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// `-`-free cell of a grant's scope: `all` when empty.
fn all_or_list(items: &[String]) -> String {
    if items.is_empty() {
        "all".into()
    } else {
        items.join(",")
    }
}

fn grant_space(g: &Grant) -> String {
    match (&g.space, g.space_id) {
        (_, None) => "all spaces".into(),
        (Some(s), Some(_)) => s.clone(),
        (None, Some(id)) => space_id(id),
    }
}

fn grants_table(grants: &[Grant], with_id: bool) -> String {
    let rows: Vec<_> = grants
        .iter()
        .map(|g| {
            let mut row = Vec::with_capacity(5);
            if with_id {
                row.push(g.id.to_string());
            }
            row.extend([
                g.role.clone(),
                grant_space(g),
                all_or_list(&g.environments),
                all_or_list(&g.tenants),
            ]);
            row
        })
        .collect();
    let mut headers = Vec::with_capacity(5);
    if with_id {
        headers.push("ID");
    }
    headers.extend(["ROLE", "SPACE", "ENVIRONMENTS", "TENANTS"]);
    table(&headers, &rows)
}

/// Names wrapped into indented lines of at most about `width` characters.
fn wrapped(names: &[&str], width: usize) -> String {
    let mut lines = Vec::new();
    let mut line = String::from(" ");
    for n in names {
        if line.len() > 1 && line.len() + n.len() + 2 > width {
            lines.push(std::mem::replace(&mut line, String::from(" ")));
        }
        line.push(' ');
        line.push_str(n);
    }
    if line.len() > 1 {
        lines.push(line);
    }
    lines.join("\n")
}

fn user_fields(u: &User) -> String {
    fields(&[
        ("Username", u.username.clone()),
        ("Display name", u.display_name.clone()),
        ("Id", u.id.to_string()),
        ("Administrator", yes_no(u.is_admin)),
        (
            "State",
            if u.disabled { "disabled" } else { "active" }.into(),
        ),
        ("Created (UTC)", time(u.created_at)),
    ])
}

impl Cx {
    /// The server's JSON in JSON mode (when there is any), else `text`.
    fn done(&self, v: &Value, text: &str) {
        match self.output {
            Output::Json => {
                if !v.is_null() {
                    out_json(v);
                }
            }
            Output::Table => out(text),
        }
    }

    pub(super) async fn space(&self, c: SpaceCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            SpaceCommand::List => {
                let v: Value = c_
                    .get(c_.system_url(&["spaces"], &[]))
                    .await
                    .context("listing spaces")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let spaces: Vec<Space> = decode(v, "the spaces")?;
                let rows: Vec<_> = spaces
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            space_id(s.id),
                            if s.is_default { "yes" } else { "-" }.into(),
                            time(s.created_at),
                            or_dash(&s.description),
                        ]
                    })
                    .collect();
                out(&table(
                    &["NAME", "ID", "DEFAULT", "CREATED (UTC)", "DESCRIPTION"],
                    &rows,
                ));
            }
            SpaceCommand::Show { name } => {
                let v: Value = c_
                    .get(c_.system_url(&["spaces", &name], &[]))
                    .await
                    .with_context(|| format!("reading space '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let s: Space = decode(v, "the space")?;
                out(&fields(&[
                    ("Name", s.name.clone()),
                    ("Id", space_id(s.id)),
                    ("Default", yes_no(s.is_default)),
                    ("Description", or_dash(&s.description)),
                    ("Created (UTC)", time(s.created_at)),
                ]));
            }
            SpaceCommand::Create { name, description } => {
                let body = json!({ "name": name, "description": description.unwrap_or_default() });
                let v: Value = c_
                    .post(c_.system_url(&["spaces"], &[]), &body)
                    .await
                    .with_context(|| format!("creating space '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let s: Space = decode(v, "the new space")?;
                out(&format!(
                    "Created space '{}' ({}). Work in it with `octopus --space {} ...` or OCTOPUS_SPACE.",
                    s.name,
                    space_id(s.id),
                    shell_word(&s.name)
                ));
            }
            SpaceCommand::Delete { name } => {
                c_.delete(c_.system_url(&["spaces", &name], &[]))
                    .await
                    .with_context(|| format!("deleting space '{name}'"))?;
                say(
                    self.output,
                    &format!("Deleted space '{name}' and everything in it."),
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn user(&self, c: UserCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            UserCommand::Create(a) => return self.user_create(a).await,
            UserCommand::List => {
                let v: Value = c_
                    .get(c_.system_url(&["users"], &[]))
                    .await
                    .context("listing users")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let users: Vec<User> = decode(v, "the users")?;
                let rows: Vec<_> = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.username.clone(),
                            u.id.to_string(),
                            if u.is_admin { "yes" } else { "-" }.into(),
                            if u.disabled { "disabled" } else { "active" }.into(),
                            time(u.created_at),
                            u.display_name.clone(),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "USERNAME",
                        "ID",
                        "ADMIN",
                        "STATE",
                        "CREATED (UTC)",
                        "DISPLAY NAME",
                    ],
                    &rows,
                ));
            }
            UserCommand::Show { username } => {
                let v: Value = c_
                    .get(c_.system_url(&["users", &username], &[]))
                    .await
                    .with_context(|| format!("reading user '{username}'"))?;
                match self.output {
                    Output::Json => out_json(&v),
                    Output::Table => out(&user_fields(&decode(v, "the user")?)),
                }
            }
            UserCommand::Disable { username } => {
                let v: Value = c_
                    .post(
                        c_.system_url(&["users", &username, "disable"], &[]),
                        &json!({}),
                    )
                    .await
                    .with_context(|| format!("disabling user '{username}'"))?;
                self.done(
                    &v,
                    &format!("Disabled user '{username}': they can no longer log in, and their API keys and sessions stop working."),
                );
            }
            UserCommand::Enable { username } => {
                let v: Value = c_
                    .post(
                        c_.system_url(&["users", &username, "enable"], &[]),
                        &json!({}),
                    )
                    .await
                    .with_context(|| format!("enabling user '{username}'"))?;
                self.done(
                    &v,
                    &format!(
                        "Enabled user '{username}': they can log in and use their API keys again."
                    ),
                );
            }
            UserCommand::SetPassword {
                username,
                password_stdin,
            } => return self.set_password(username, password_stdin).await,
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn user_create(&self, a: UserCreateArgs) -> anyhow::Result<ExitCode> {
        let password = if a.password_stdin {
            let mut stdin = std::io::stdin().lock();
            Some(next_line(
                &mut stdin,
                1,
                "the password",
                "pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | octopus user create --username NAME --password-stdin`",
            )?)
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
            .post(c_.system_url(&["users"], &[]), &Value::Object(body))
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

    async fn set_password(
        &self,
        username: Option<String>,
        password_stdin: bool,
    ) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        let mut pw = Passwords::new(password_stdin);
        let (target, current) = match username {
            Some(u) => (u, None),
            None => {
                // Whose password "mine" is: asked first, so a refused key fails
                // before any password is typed.
                let me: WhoAmI = decode(
                    c_.get(c_.system_url(&["users", "me"], &[]))
                        .await
                        .context("finding out who you are")?,
                    "who you are",
                )?;
                let usage = "give the current password on the first line of standard input (an empty line if you have none) and the new one on the second";
                // Empty: the user has none yet (API keys only), and sets a first one.
                let current = match pw
                    .read_maybe_empty(
                        &format!(
                            "Current password of {} (Enter if you have none): ",
                            me.user.username
                        ),
                        "the current password",
                        usage,
                    )
                    .await?
                {
                    Ok(p) => p,
                    Err(Interrupted::CtrlC) => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
                };
                (me.user.username, Some(current))
            }
        };
        let usage = if current.is_some() {
            "give the current password on the first line of standard input (an empty line if you have none) and the new one on the second"
        } else {
            "give the new password on the first line of standard input"
        };
        let new = match pw
            .read(
                &format!("New password of {target}: "),
                "the new password",
                usage,
            )
            .await?
        {
            Ok(p) => p,
            Err(Interrupted::CtrlC) => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
        };
        if pw.is_terminal() {
            match pw
                .read("Repeat the new password: ", "the repeated password", usage)
                .await?
            {
                Ok(again) if again == new => {}
                Ok(_) => anyhow::bail!("the two new passwords differ; nothing was changed"),
                Err(Interrupted::CtrlC) => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
            }
        }
        let mut body = json!({ "password": new });
        if let Some(c) = current.as_ref().filter(|c| !c.is_empty()) {
            body["current_password"] = json!(c);
        }
        let own = current.is_some();
        let v: Value = c_
            .put(c_.system_url(&["users", &target, "password"], &[]), &body)
            .await
            .with_context(|| {
                if own {
                    "changing your password".to_string()
                } else {
                    format!("setting the password of '{target}'")
                }
            })?;
        let text = if own {
            format!("Changed your password ({target}).")
        } else {
            format!("Set the password of '{target}'.")
        };
        self.done(&v, &text);
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn team(&self, c: TeamCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        let space = c_.space().to_string();
        match c {
            TeamCommand::List => {
                let v: Value = c_
                    .get(c_.space_url(&["teams"], &[]))
                    .await
                    .with_context(|| format!("listing the teams of space '{space}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let teams: Vec<Team> = decode(v, "the teams")?;
                if teams.is_empty() {
                    out(&format!(
                        "No teams in space '{space}'; create one with `octopus team create NAME`."
                    ));
                    return Ok(ExitCode::SUCCESS);
                }
                let rows: Vec<_> = teams
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            match (&t.space, t.space_id) {
                                (_, None) => "(system)".into(),
                                (Some(s), _) => s.clone(),
                                (None, Some(id)) => space_id(id),
                            },
                            t.members.len().to_string(),
                            t.grants.len().to_string(),
                            if t.built_in { "yes" } else { "-" }.into(),
                            or_dash(&t.description),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "NAME",
                        "SPACE",
                        "MEMBERS",
                        "GRANTS",
                        "BUILT-IN",
                        "DESCRIPTION",
                    ],
                    &rows,
                ));
            }
            TeamCommand::Show { name } => {
                let v: Value = c_
                    .get(c_.space_url(&["teams", &name], &[]))
                    .await
                    .with_context(|| format!("reading team '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let t: Team = decode(v, "the team")?;
                out(&team_text(&t));
            }
            TeamCommand::Create {
                name,
                description,
                system,
            } => {
                let body = json!({
                    "name": name,
                    "description": description.unwrap_or_default(),
                    "system": system,
                });
                let v: Value = c_
                    .post(c_.space_url(&["teams"], &[]), &body)
                    .await
                    .with_context(|| format!("creating team '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let t: Team = decode(v, "the new team")?;
                let where_ = match (&t.space, t.space_id) {
                    (_, None) => "outside any space (its grants may cover every space)".to_string(),
                    (Some(s), _) => format!("in space '{s}'"),
                    (None, Some(id)) => format!("in space {}", space_id(id)),
                };
                out(&format!(
                    "Created team '{}' {where_}. Add people with `octopus team add-member {} USERNAME` and give it a role with `octopus team grant {} --role ROLE`.",
                    t.name,
                    shell_word(&t.name),
                    shell_word(&t.name),
                ));
            }
            TeamCommand::Delete { name } => {
                c_.delete(c_.space_url(&["teams", &name], &[]))
                    .await
                    .with_context(|| format!("deleting team '{name}'"))?;
                say(
                    self.output,
                    &format!("Deleted team '{name}'; its members lost what its grants gave them."),
                );
            }
            TeamCommand::AddMember { team, username } => {
                let v: Value = c_
                    .post(
                        c_.space_url(&["teams", &team, "members"], &[]),
                        &json!({ "username": username }),
                    )
                    .await
                    .with_context(|| format!("adding '{username}' to team '{team}'"))?;
                self.done(&v, &format!("Added '{username}' to team '{team}'."));
            }
            TeamCommand::RemoveMember { team, username } => {
                c_.delete(c_.space_url(&["teams", &team, "members", &username], &[]))
                    .await
                    .with_context(|| format!("removing '{username}' from team '{team}'"))?;
                say(
                    self.output,
                    &format!("Removed '{username}' from team '{team}'."),
                );
            }
            TeamCommand::Grant {
                team,
                role,
                environments,
                tenants,
                all_spaces,
            } => {
                let body = json!({
                    "role": role,
                    "environments": environments,
                    "tenants": tenants,
                    "all_spaces": all_spaces,
                });
                let v: Value = c_
                    .post(c_.space_url(&["teams", &team, "grants"], &[]), &body)
                    .await
                    .with_context(|| format!("granting role '{role}' to team '{team}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let grant = match decode::<GrantReply>(v, "the new grant")? {
                    GrantReply::Grant(g) => Some(g),
                    GrantReply::Team(t) => t
                        .grants
                        .into_iter()
                        .filter(|g| g.role.eq_ignore_ascii_case(&role))
                        .max_by_key(|g| g.id),
                };
                match grant {
                    Some(g) => out(&format!(
                        "Granted role '{}' to team '{team}' in {} (environments: {}; tenants: {}). Its id is {}: take it back with `octopus team revoke {} {}`.",
                        g.role,
                        match g.space_id {
                            None => "every space".to_string(),
                            Some(_) => format!("space '{}'", grant_space(&g)),
                        },
                        all_or_list(&g.environments),
                        all_or_list(&g.tenants),
                        g.id,
                        shell_word(&team),
                        g.id
                    )),
                    None => out(&format!("Granted role '{role}' to team '{team}'.")),
                }
            }
            TeamCommand::Revoke { team, grant_id } => {
                c_.delete(c_.space_url(&["teams", &team, "grants", &grant_id.to_string()], &[]))
                    .await
                    .with_context(|| format!("revoking grant {grant_id} of team '{team}'"))?;
                say(
                    self.output,
                    &format!("Revoked grant {grant_id} of team '{team}'."),
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn role(&self, c: RoleCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            RoleCommand::List => {
                let v: Value = c_
                    .get(c_.system_url(&["roles"], &[]))
                    .await
                    .context("listing roles")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let roles: Vec<Role> = decode(v, "the roles")?;
                let rows: Vec<_> = roles
                    .iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            if r.built_in { "yes" } else { "-" }.into(),
                            r.permissions.len().to_string(),
                            or_dash(&r.description),
                        ]
                    })
                    .collect();
                out(&table(
                    &["NAME", "BUILT-IN", "PERMISSIONS", "DESCRIPTION"],
                    &rows,
                ));
            }
            RoleCommand::Show { name } => {
                let v: Value = c_
                    .get(c_.system_url(&["roles", &name], &[]))
                    .await
                    .with_context(|| format!("reading role '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let r: Role = decode(v, "the role")?;
                out(&role_text(&r));
            }
            RoleCommand::Create {
                name,
                permissions,
                description,
            } => {
                let permissions = parse_permissions(&permissions)?;
                let body = json!({
                    "name": name,
                    "description": description.unwrap_or_default(),
                    "permissions": permissions,
                });
                let v: Value = c_
                    .post(c_.system_url(&["roles"], &[]), &body)
                    .await
                    .with_context(|| format!("creating role '{name}'"))?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let r: Role = decode(v, "the new role")?;
                out(&format!(
                    "Created role '{}' with {} permission{}. Give it to a team with `octopus team grant TEAM --role {}`.",
                    r.name,
                    r.permissions.len(),
                    if r.permissions.len() == 1 { "" } else { "s" },
                    shell_word(&r.name)
                ));
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn audit(&self, c: AuditCommand) -> anyhow::Result<ExitCode> {
        let AuditCommand::List { user, since, limit } = c;
        let since = since
            .map(|s| parse_since(&s, now_ms()))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let c_ = &self.client;
        let url = c_.space_url(
            &["audit"],
            &[
                ("user", user),
                ("since", since.map(|s| s.to_string())),
                ("limit", Some(limit.to_string())),
            ],
        );
        let v: Value = c_
            .get(url)
            .await
            .with_context(|| format!("reading the audit log of space '{}'", c_.space()))?;
        if self.output == Output::Json {
            out_json(&v);
            return Ok(ExitCode::SUCCESS);
        }
        let events: Vec<AuditEvent> = decode(v, "the audit events")?;
        if events.is_empty() {
            out("No audit events match.");
            return Ok(ExitCode::SUCCESS);
        }
        out(&audit_table(&events));
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn whoami(&self) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        let space = c_.space().to_string();
        // The permissions are those in the request's space: ask in --space.
        let (v, in_space): (Value, bool) = match c_.get(c_.space_url(&["users", "me"], &[])).await {
            Ok(v) => (v, true),
            Err(ClientError::Api {
                status, message, ..
            }) if status == StatusCode::NOT_FOUND && message.starts_with("no such API route") => {
                let v = c_
                    .get(c_.system_url(&["users", "me"], &[]))
                    .await
                    .context("finding out who you are")?;
                (v, false)
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("finding out who you are in space '{space}'")))
            }
        };
        if self.output == Output::Json {
            out_json(&v);
            return Ok(ExitCode::SUCCESS);
        }
        let me: WhoAmI = decode(v, "who you are")?;
        let credentials = match c_.key_source() {
            KeySource::Session { .. } => "the session of `octopus login`".to_string(),
            KeySource::Given => "an API key (--api-key or OCTOPUS_API_KEY)".to_string(),
            KeySource::None => "none".to_string(),
        };
        out(&fields(&[
            ("User", me.user.username.clone()),
            ("Display name", me.user.display_name.clone()),
            ("Administrator", yes_no(me.user.is_admin)),
            ("Server", c_.base()),
            ("Signed in with", credentials),
        ]));
        out("");
        let names: Vec<&str> = me.permissions.iter().map(|p| p.name()).collect();
        let heading = if in_space {
            format!("Permissions in space '{space}'")
        } else {
            "Permissions in the Default space (the server told no others)".to_string()
        };
        if names.is_empty() {
            out(&format!("{heading}: none."));
        } else {
            out(&format!("{heading} ({}):", names.len()));
            out(&wrapped(&names, 78));
        }
        if !me.grants.is_empty() {
            out("");
            out("Grants (of your teams):");
            out(&grants_table(&me.grants, false));
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn login(&self, a: LoginArgs) -> anyhow::Result<ExitCode> {
        let base = self.client.base();
        let path = session::default_path()?;
        let mut sessions = session::load(&path)?;
        let mut pw = Passwords::new(a.password_stdin);
        let password = match pw
            .read(
                &format!("Password of {} at {base}: ", a.username),
                "the password",
                "pipe it in, e.g. `printf '%s\\n' \"$PASSWORD\" | octopus login --username NAME --password-stdin`",
            )
            .await?
        {
            Ok(p) => p,
            Err(Interrupted::CtrlC) => return Ok(ExitCode::from(EXIT_INTERRUPTED)),
        };
        let anon = self.client.without_key();
        let v: Value = anon
            .post(
                anon.system_url(&["users", "login"], &[]),
                &json!({ "username": a.username, "password": password }),
            )
            .await
            .with_context(|| format!("logging in to {base} as '{}'", a.username))?;
        let reply: LoginReply = decode(v, "the login")?;
        let old = sessions.sessions.insert(
            base.clone(),
            Session {
                api_key: reply.api_key.clone(),
                username: reply.user.username.clone(),
                key_id: reply.key.id,
                created_at: now_ms(),
            },
        );
        session::save(&path, &sessions)
            .with_context(|| format!("keeping the session in {}", path.display()))?;
        // The session this one replaces ends now rather than when it expires
        // (best effort: it may be gone already).
        if let Some(old) = old.filter(|o| o.api_key != reply.api_key) {
            let mut prev = self.client.without_key();
            prev.use_session(&old.api_key, &old.username);
            let _ = prev
                .post::<Value>(prev.system_url(&["users", "logout"], &[]), &json!({}))
                .await;
        }
        match self.output {
            Output::Json => out_json(&LoginJson {
                server: base.clone(),
                sessions_file: path.display().to_string(),
                user: &reply.user,
                key: &reply.key,
            }),
            Output::Table => out(&format!(
                "Logged in to {base} as {} ({}). Commands to this server without --api-key use this session until it expires or `octopus logout`; its key is in {}.",
                reply.user.username,
                reply.user.display_name,
                path.display()
            )),
        }
        if self.client.key_source() == &KeySource::Given {
            note(
                "note: --api-key or OCTOPUS_API_KEY is set, and wins over the session while it is.",
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) async fn logout(&self) -> anyhow::Result<ExitCode> {
        let base = self.client.base();
        let path = session::default_path()?;
        let mut sessions = session::load(&path)?;
        let Some(s) = sessions.sessions.get(&base).cloned() else {
            say(
                self.output,
                &format!(
                    "Not logged in to {base}: {} holds no session for it.",
                    path.display()
                ),
            );
            return Ok(ExitCode::SUCCESS);
        };
        let mut c_ = self.client.without_key();
        c_.use_session(&s.api_key, &s.username);
        let expired = match c_
            .post::<Value>(c_.system_url(&["users", "logout"], &[]), &json!({}))
            .await
        {
            Ok(_) => false,
            Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => true,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "logging '{}' out of {base} (the session stays in {} until the server has revoked it: run `octopus logout` again)",
                    s.username,
                    path.display()
                )))
            }
        };
        sessions.sessions.remove(&base);
        session::save(&path, &sessions)
            .with_context(|| format!("removing the session from {}", path.display()))?;
        say(
            self.output,
            &if expired {
                format!(
                    "The session of {} at {base} had already expired; removed it from {}.",
                    s.username,
                    path.display()
                )
            } else {
                format!(
                    "Logged {} out of {base}: the session key is revoked and removed from {}.",
                    s.username,
                    path.display()
                )
            },
        );
        Ok(ExitCode::SUCCESS)
    }
}

fn team_text(t: &Team) -> String {
    let space = match (&t.space, t.space_id) {
        (_, None) => "none: a system team (its grants may cover every space)".to_string(),
        (Some(s), _) => s.clone(),
        (None, Some(id)) => space_id(id),
    };
    let mut text = fields(&[
        ("Team", t.name.clone()),
        ("Description", or_dash(&t.description)),
        ("Space", space),
        ("Built-in", yes_no(t.built_in)),
        ("Id", t.id.to_string()),
    ]);
    text.push_str("\n\n");
    if t.members.is_empty() {
        text.push_str("Members: none yet (`octopus team add-member TEAM USERNAME`).");
    } else {
        let rows: Vec<_> = t.members.iter().map(|m| vec![m.clone()]).collect();
        text.push_str(&format!("Members ({}):\n", t.members.len()));
        text.push_str(&table(&["USERNAME"], &rows));
    }
    text.push_str("\n\n");
    if t.grants.is_empty() {
        text.push_str("Grants: none yet (`octopus team grant TEAM --role ROLE`).");
    } else {
        text.push_str(&format!("Grants ({}):\n", t.grants.len()));
        text.push_str(&grants_table(&t.grants, true));
    }
    text
}

fn role_text(r: &Role) -> String {
    let mut text = fields(&[
        ("Role", r.name.clone()),
        ("Description", or_dash(&r.description)),
        ("Built-in", yes_no(r.built_in)),
    ]);
    text.push_str("\n\n");
    if r.permissions.is_empty() {
        text.push_str("Permissions: none.");
    } else {
        let rows: Vec<_> = r
            .permissions
            .iter()
            .map(|p| {
                vec![
                    p.name().to_string(),
                    if p.is_system() { "system" } else { "space" }.into(),
                ]
            })
            .collect();
        text.push_str(&format!("Permissions ({}):\n", r.permissions.len()));
        text.push_str(&table(&["PERMISSION", "SCOPE"], &rows));
    }
    text
}

fn audit_table(events: &[AuditEvent]) -> String {
    let rows: Vec<_> = events
        .iter()
        .map(|e| {
            vec![
                time(e.at),
                e.username.clone(),
                e.source.clone(),
                e.action.clone(),
                e.kind.clone(),
                e.object.clone(),
                match (&e.space, e.space_id) {
                    (Some(s), _) => s.clone(),
                    (None, Some(id)) => space_id(id),
                    (None, None) => "-".into(),
                },
                or_dash(&e.details),
            ]
        })
        .collect();
    table(
        &[
            "TIME (UTC)",
            "USER",
            "SOURCE",
            "ACTION",
            "KIND",
            "OBJECT",
            "SPACE",
            "DETAILS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn permissions_are_checked_before_sending() {
        let ok = parse_permissions(&[
            "MachineView".into(),
            "taskview, TaskCreate".into(),
            "MachineView".into(),
        ])
        .unwrap();
        assert_eq!(
            ok,
            vec![
                Permission::MachineView,
                Permission::TaskView,
                Permission::TaskCreate
            ]
        );
        let e = parse_permissions(&["MachineView".into(), "Deploy".into(), "x".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("'Deploy', 'x'"), "{e}");
        assert!(
            e.contains("AdministerSystem") && e.contains("BuiltInFeedAdminister"),
            "{e}"
        );
        let e = parse_permissions(&[" , ".into()]).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
    }

    fn grant(id: i64, space: Option<(i64, &str)>, envs: &[&str]) -> Grant {
        Grant {
            id,
            role: "Deployer".into(),
            space_id: space.map(|s| s.0),
            space: space.map(|s| s.1.to_string()),
            environments: envs.iter().map(|s| s.to_string()).collect(),
            tenants: vec![],
        }
    }

    #[test]
    fn teams_show_members_and_grants() {
        let t = Team {
            id: 3,
            name: "Deployers".into(),
            description: String::new(),
            space_id: Some(1),
            space: Some("Default".into()),
            built_in: false,
            members: vec!["alice".into(), "bob\u{1b}[2J".into()],
            grants: vec![
                grant(12, Some((1, "Default")), &["Test", "Staging"]),
                grant(13, None, &[]),
            ],
        };
        let text = team_text(&t);
        assert!(text.contains("Team:         Deployers"), "{text}");
        assert!(text.contains("Description:  -"), "{text}");
        assert!(
            text.contains("Members (2):\nUSERNAME\nalice\nbob\\e[2J"),
            "{text}"
        );
        assert!(
            text.contains("ID  ROLE      SPACE       ENVIRONMENTS  TENANTS\n12  Deployer  Default     Test,Staging  all\n13  Deployer  all spaces  all           all"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn audit_rows_are_escaped() {
        let e = AuditEvent {
            id: 1,
            at: 0,
            user_id: Some(2),
            username: "alice".into(),
            source: "127.0.0.1".into(),
            action: "created".into(),
            kind: "machine".into(),
            object: "web\u{1b}]0;x\u{7}01".into(),
            space_id: None,
            space: None,
            details: "two\nlines".into(),
        };
        let t = audit_table(&[e]);
        assert_eq!(
            t.lines().nth(1).unwrap(),
            r"1970-01-01 00:00:00  alice  127.0.0.1  created  machine  web\e]0;x\x0701  -      two\nlines"
        );
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'));
    }

    #[test]
    fn permissions_wrap() {
        let names: Vec<&str> = Permission::ALL.iter().map(|p| p.name()).collect();
        let w = wrapped(&names, 40);
        assert!(
            w.lines().all(|l| l.len() <= 40 && l.starts_with("  ")),
            "{w}"
        );
        assert_eq!(w.split_whitespace().count(), names.len());
    }
}
