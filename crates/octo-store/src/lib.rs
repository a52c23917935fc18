//! The server's store.
//!
//! [`Store`] is everything the server persists, as one async trait. It is
//! implemented once, in SQL, for every [`sql::Engine`] ([`sql`]); each
//! database engine is a crate of its own that supplies its connections, the
//! few pieces of SQL that differ ([`sql::Dialect`]) and its migrations
//! (`octo-store-sqlite`, the embedded default; `octo-store-postgres`), and
//! every engine runs the same contract suite (`octo-store-tests`). Queries are
//! built at run time (no compile-time checked macros: those bind a build to one
//! database).
//!
//! Conventions: ids are `i64` row ids except task ids, which are strings shown to
//! people ("ServerTasks-42"); times are Unix milliseconds (`i64`); names are unique
//! and compared case-insensitively; lists come back ordered by name (or, for tasks,
//! newest first).
//!
//! Beside [`sql`], what does not depend on the database: [`error`] (messages
//! and database failures as [`StoreError`]s), [`input`] (validation and the
//! rules of tasks and logs), [`text`] (enums as stored text), [`rows`] (row
//! structs read from any engine's rows, and the records they become) and
//! [`machines`] (a machine's lists).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod error;
pub mod input;
pub mod machines;
pub mod rows;
pub mod sql;
pub mod text;

pub use octo_api_types::model::*;
pub use octo_api_types::security::*;

/// What went wrong in the store, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A thing with that name (or key) does not exist.
    #[error("{kind} '{name}' does not exist")]
    NotFound {
        /// "environment", "machine", ...
        kind: &'static str,
        /// The name or id asked for.
        name: String,
    },
    /// A thing with that name already exists.
    #[error("{kind} '{name}' already exists")]
    Conflict {
        /// "environment", "machine", ...
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The operation would break a rule (e.g. deleting an environment that machines use).
    #[error("{0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The script ticket of a machine's part of a task: `<task id>-m<machine id>`,
/// e.g. `ServerTasks-12-m3`, which fits the tentacle's rule `[A-Za-z0-9._-]{1,128}`.
pub fn ticket(task_id: &str, machine_id: i64) -> String {
    format!("{task_id}-m{machine_id}")
}

/// How stale an API key's recorded use time may be before a use records it
/// again: a minute, or a tenth of the session idle time when that is shorter
/// (a session then ends at most a tenth of its idle time early). Recording
/// every use made every API request a database write.
pub fn api_key_use_grain_ms(session_idle_ms: i64) -> i64 {
    (session_idle_ms / 10).clamp(0, 60_000)
}

/// The policy every new machine gets unless told otherwise (each space has one).
pub const DEFAULT_POLICY: &str = "Default Machine Policy";

/// The built-in role that may do everything (the server defines its permissions).
pub const SYSTEM_ADMINISTRATOR: &str = "System administrator";

/// The built-in team of System administrators in every space.
pub const ADMINISTRATORS_TEAM: &str = "Octopus Administrators";

pub use octo_api_types::DEFAULT_SPACE_ID;

/// What is needed to add a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewMachine {
    /// The space it joins.
    pub space_id: i64,
    pub name: String,
    pub kind: EndpointKind,
    pub uri: String,
    pub thumbprint: String,
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
    pub tenant_tags: Vec<String>,
    /// None: the space's default policy.
    pub policy: Option<String>,
    pub worker_pool: Option<String>,
}

/// Which machines a task targets. Empty lists match everything; non-empty lists
/// must all match (a machine must be in one of `environments` AND have one of
/// `roles` AND ...). `space_id` None: every space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachineFilter {
    pub space_id: Option<i64>,
    pub names: Vec<String>,
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
}

impl MachineFilter {
    /// Every machine of one space.
    pub fn space(space_id: i64) -> Self {
        MachineFilter {
            space_id: Some(space_id),
            ..MachineFilter::default()
        }
    }
}

/// A machine's settings to change (each given field is set).
pub use octo_api_types::MachineUpdate;
pub use octo_api_types::PolicySettings;

/// Which tasks a page of tasks shows, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskQuery {
    pub space_id: Option<i64>,
    /// Only tasks in these states (empty: any).
    pub states: Vec<TaskState>,
    /// Only this kind ("Script", "Health", ...).
    pub kind: Option<String>,
    /// Only tasks with a step on the machine of this name.
    pub machine: Option<String>,
    /// Only tasks whose machines were in this environment.
    pub environment: Option<String>,
    /// Only tasks in one of these environments (what an environment-scoped
    /// caller may see); None: no such limit.
    pub visible_environments: Option<Vec<String>>,
    pub offset: i64,
    pub limit: i64,
}

/// What a page of machines shows (see `Store::machine_page`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineQuery {
    /// Space, names, environments, roles, tenants (as for `list_machines`).
    pub filter: MachineFilter,
    /// Only names containing this (ignoring case).
    pub name_contains: Option<String>,
    /// Only these healths (empty: any).
    pub health: Vec<HealthFilter>,
    /// Only this kind of endpoint.
    pub kind: Option<EndpointKind>,
    /// Only workers (`Some(true)`), only deployment targets (`Some(false)`), or both.
    pub workers: Option<bool>,
    /// Only machines in one of these environments (what an environment-scoped
    /// caller may see); None: no such limit.
    pub visible_environments: Option<Vec<String>>,
    /// Rows to skip, and at most how many to return.
    pub offset: i64,
    pub limit: i64,
}

/// A health as people tell them apart: Healthy with warnings is a Healthy
/// machine with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthFilter {
    Healthy,
    HealthyWithWarnings,
    Unhealthy,
    Unavailable,
    Unknown,
}

impl HealthFilter {
    /// The SQL condition on `machines m`.
    pub fn sql(self) -> &'static str {
        match self {
            HealthFilter::Healthy => "(m.status = 'Healthy' AND m.status_reason = '')",
            HealthFilter::HealthyWithWarnings => "(m.status = 'Healthy' AND m.status_reason <> '')",
            HealthFilter::Unhealthy => "m.status = 'Unhealthy'",
            HealthFilter::Unavailable => "m.status = 'Unavailable'",
            HealthFilter::Unknown => "m.status = 'Unknown'",
        }
    }
}

/// Result of a health check, to record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthUpdate {
    pub status: HealthStatus,
    pub reason: String,
    pub at: i64,
    pub tentacle_version: Option<String>,
    pub tool_version: Option<String>,
    /// Operating system, version and architecture, when learned.
    pub os: Option<String>,
    /// Free bytes in the tentacle's home, when learned.
    pub free_bytes: Option<i64>,
}

/// Bytes per chunk of package content (1 MiB). Each chunk is one row and one
/// statement: small enough that a read or write holds little in memory (a
/// reader streams a few chunks at a time, whatever the package's size) and
/// stays far below every limit (SQLite's 1 GB blobs, PostgreSQL's 1 GB
/// fields, the drivers' message sizes), large enough that a 500 MB package
/// is 500 rows and the per-statement round trip costs little next to the
/// bytes. It matches the ~1 MiB messages the file service sends tentacles.
/// Stored per content, so it may change without rewriting what is stored.
pub const PACKAGE_CHUNK_SIZE: usize = 1 << 20;

/// Complete package content in the store: `size` bytes whose SHA-256 is
/// `sha256`, in chunks of `chunk_size` bytes (the last may be shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageContent {
    /// Its row (what [`Store::package_chunks`] reads by).
    pub id: i64,
    /// Lower-case hex.
    pub sha256: String,
    pub size: i64,
    pub chunk_size: i64,
}

impl PackageContent {
    /// How many chunks it has.
    pub fn chunks(&self) -> i64 {
        chunks_of(self.size, self.chunk_size)
    }
}

/// How many chunks of `chunk_size` bytes hold `size` bytes.
pub fn chunks_of(size: i64, chunk_size: i64) -> i64 {
    if size <= 0 || chunk_size <= 0 {
        0
    } else {
        (size - 1) / chunk_size + 1
    }
}

/// What is needed to add a package (the file is already stored by hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPackage {
    pub space_id: i64,
    pub package_id: String,
    pub version: String,
    pub format: String,
    pub sha256: String,
    pub size: i64,
    pub file_name: String,
}

/// A log line to add. Lines of a step are unique by (task, machine, sequence):
/// adding one that exists is ignored, so a resumed stream never duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewLogLine {
    pub machine_id: Option<i64>,
    pub sequence: Option<i64>,
    pub timestamp: i64,
    pub stream: String,
    pub text: String,
}

/// What is needed to create a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    pub space_id: i64,
    /// "Health", "Script", ...
    pub kind: String,
    pub description: String,
    /// What the task does, as shown (never a secret value).
    pub arguments: serde_json::Value,
    /// One Queued step per machine.
    pub machine_ids: Vec<i64>,
    /// The environments of the machines (for environment-scoped permissions).
    pub environments: Vec<String>,
    /// Secret values (variable name, ciphertext), stored apart from the arguments.
    pub secrets: Vec<(String, String)>,
    /// Who started the task, recorded in the audit log with it (in the same
    /// commit: no task without its record); its `object` is replaced by the
    /// new task's id.
    pub audit: Option<NewAuditEvent>,
}

/// A task, its steps and the lines of its log after a given one (see
/// [`Store::task_with_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskWithLog {
    pub task: Task,
    pub steps: Vec<TaskStep>,
    pub lines: Vec<TaskLogLine>,
}

/// A task's secret values (name, ciphertext), by name, and its masks
/// (ciphertexts), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskSecretsAndMasks {
    pub secrets: Vec<(String, String)>,
    pub masks: Vec<String>,
}

/// One heartbeat of a server node: who it is and what it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBeat {
    pub name: String,
    /// When the node started (Unix ms).
    pub started_at: i64,
    /// Now (Unix ms).
    pub at: i64,
    pub task_cap: i64,
    pub running_tasks: i64,
    pub running_steps: i64,
}

/// One step of a task, by task and machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepRef {
    pub task_id: String,
    pub machine_id: i64,
}

/// What one node tells the others through the store (PostgreSQL's
/// LISTEN/NOTIFY; a store that only one node uses has no one to tell).
/// Every event is a hint to look at the store, which holds the truth: a node
/// that missed events (its listening connection dropped) is told
/// [`ClusterEvent::Resync`] and reads the store again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum ClusterEvent {
    /// A task's node handed one of its steps to `node` (which holds the
    /// step's polling tentacle).
    StepAssigned {
        task_id: String,
        machine_id: i64,
        node: String,
    },
    /// A step's end was recorded.
    StepFinished { task_id: String, machine_id: i64 },
    /// A task waits for a node to take it (its node is draining, or runs its
    /// task cap).
    TaskQueued { task_id: String },
    /// Someone asked for a task to be canceled.
    TaskCancel { task_id: String },
    /// A task's state changed (started, finished).
    TaskChanged { task_id: String },
    /// Log lines of a task were stored.
    LogAppended { task_id: String },
    /// A polling tentacle connected to or left `node`.
    Presence {
        subscription_id: String,
        node: String,
    },
    /// A person decided for a step waiting under guided failure (delivered by
    /// the node where the step waits).
    Guidance {
        task_id: String,
        machine_id: i64,
        guidance: octo_api_types::Guidance,
    },
    /// The node where that step waited delivered a [`ClusterEvent::Guidance`]
    /// decision (the node that took the request answers once it sees this).
    GuidanceDelivered { task_id: String, machine_id: i64 },
    /// A machine was deleted (or must stop work) by a person: every node
    /// cancels the machine's steps it runs, recording `reason`.
    MachineStop {
        machine_id: i64,
        reason: String,
        /// The node that asked (it stops its own steps itself).
        node: String,
    },
    /// A step learned a value to mask (an output variable marked sensitive):
    /// every node writing the task's log reads the task's masks again.
    MasksChanged { task_id: String },
    /// Machines changed such that the polling tentacles allowed to connect
    /// may differ: every node reads its trust again.
    TrustChanged,
    /// Events may have been missed: read the store again.
    Resync,
}

/// A [`ClusterEvent`] as a node hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub event: ClusterEvent,
    /// Published through this store (this process): the node acted on it
    /// where that was local when it published it (its own live readers were
    /// woken), so only those who wait for events hear it again.
    pub own: bool,
}

/// An event as published: the event's own fields and who published it
/// (`publisher`, a token of the publishing store). A node that does not know
/// `publisher` reads the event and ignores it; one that reads an event
/// without it takes it for another's.
#[derive(Deserialize)]
struct Published {
    #[serde(default)]
    publisher: String,
    #[serde(flatten)]
    event: ClusterEvent,
}

/// `event` as published by the store whose token is `publisher` (JSON).
pub fn cluster_payload(publisher: &str, event: &ClusterEvent) -> Result<String> {
    let encoding = |e: serde_json::Error| {
        StoreError::Database(format!("encoding a cluster event ({event:?}): {e}"))
    };
    let mut value = serde_json::to_value(event).map_err(encoding)?;
    if let serde_json::Value::Object(fields) = &mut value {
        fields.insert("publisher".into(), publisher.into());
    }
    serde_json::to_string(&value).map_err(encoding)
}

/// The event in `payload` (see [`cluster_payload`]), heard by the store whose
/// token is `me`.
pub fn read_cluster_payload(payload: &str, me: &str) -> serde_json::Result<Heard> {
    let p: Published = serde_json::from_str(payload)?;
    Ok(Heard {
        own: !p.publisher.is_empty() && p.publisher == me,
        event: p.event,
    })
}

/// A change to record in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAuditEvent {
    pub at: i64,
    pub user_id: Option<i64>,
    pub username: String,
    pub source: String,
    pub action: String,
    pub kind: String,
    pub object: String,
    pub space_id: Option<i64>,
    pub details: String,
}

/// Which audit events to list, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFilter {
    /// Events of this space; None: events of every space.
    pub space_id: Option<i64>,
    /// Also events outside any space (users, roles, spaces).
    pub include_system: bool,
    /// Only this user's (by name).
    pub username: Option<String>,
    /// Only events at or after this time (Unix ms).
    pub since: Option<i64>,
    pub limit: i64,
}

/// Everything the server persists.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Closes the store's connections, waiting for those in use to be
    /// returned (before a process that opened it for one command exits).
    async fn close(&self);

    // Spaces.
    /// Adds a space with its own default machine policy.
    async fn create_space(&self, name: &str, description: &str) -> Result<Space>;
    async fn list_spaces(&self) -> Result<Vec<Space>>;
    async fn space_by_name(&self, name: &str) -> Result<Option<Space>>;
    async fn space_by_id(&self, id: i64) -> Result<Option<Space>>;
    /// Deletes a space and everything in it; refused (Invalid, saying how
    /// many) while machines are in it, and for the default space.
    async fn delete_space(&self, id: i64) -> Result<Space>;

    // Users and API keys.
    /// Adds a user; `password_hash` is an argon2 PHC string (None: API keys only).
    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: Option<&str>,
    ) -> Result<User>;
    /// A user and their password hash, by username.
    async fn user_by_name(&self, username: &str) -> Result<Option<(User, Option<String>)>>;
    async fn user_by_id(&self, id: i64) -> Result<Option<User>>;
    async fn list_users(&self) -> Result<Vec<User>>;
    async fn set_user_disabled(&self, id: i64, disabled: bool) -> Result<User>;
    async fn set_password_hash(&self, id: i64, password_hash: &str) -> Result<()>;
    /// Number of users (0 means first start).
    async fn count_users(&self) -> Result<i64>;
    /// Enabled users holding `role` in every space, unnarrowed.
    async fn holders_of(&self, role: &str) -> Result<Vec<User>>;
    /// Adds an API key given its SHA-256 hex and display prefix.
    async fn create_api_key(
        &self,
        user_id: i64,
        purpose: &str,
        key_sha256: &str,
        prefix: &str,
        session: bool,
    ) -> Result<ApiKey>;
    /// The key with this SHA-256 and its user, when the key is not revoked, its
    /// user not disabled and, for a session key, it was used within
    /// `session_idle_ms`; records the use time when the recorded one is older
    /// than [`api_key_use_grain_ms`] (so most requests only read).
    async fn authenticate_api_key(
        &self,
        key_sha256: &str,
        now: i64,
        session_idle_ms: i64,
    ) -> Result<Option<(ApiKey, User)>>;
    /// Keys of a user, or of everyone.
    async fn list_api_keys(&self, user_id: Option<i64>) -> Result<Vec<ApiKey>>;
    async fn api_key(&self, id: i64) -> Result<Option<ApiKey>>;
    /// Revokes a key by id; NotFound when there is none.
    async fn revoke_api_key(&self, id: i64) -> Result<()>;

    // Roles, teams and grants.
    /// Adds a custom role.
    async fn create_role(&self, role: &Role) -> Result<Role>;
    /// The custom roles (the built-in ones are the server's).
    async fn list_roles(&self) -> Result<Vec<Role>>;
    /// Adds a team in a space, or outside any (`space_id` None).
    async fn create_team(
        &self,
        space_id: Option<i64>,
        name: &str,
        description: &str,
    ) -> Result<Team>;
    /// Teams of a space and those outside any space (`space_id` None: every team).
    async fn list_teams(&self, space_id: Option<i64>) -> Result<Vec<Team>>;
    async fn team(&self, id: i64) -> Result<Option<Team>>;
    /// Deletes a team; refused (Invalid) for a built-in team.
    async fn delete_team(&self, id: i64) -> Result<()>;
    async fn add_team_member(&self, team_id: i64, user_id: i64) -> Result<()>;
    async fn remove_team_member(&self, team_id: i64, user_id: i64) -> Result<()>;
    /// Gives a team a role in a space (None: every space), narrowed to the
    /// named environments and tenants of that space (Invalid when one does not exist).
    async fn add_grant(
        &self,
        team_id: i64,
        role: &str,
        space_id: Option<i64>,
        environments: &[String],
        tenants: &[String],
    ) -> Result<Grant>;
    async fn remove_grant(&self, team_id: i64, grant_id: i64) -> Result<()>;
    /// The grants of every team a user is in.
    async fn grants_of_user(&self, user_id: i64) -> Result<Vec<Grant>>;

    // The audit log.
    async fn append_audit(&self, event: &NewAuditEvent) -> Result<()>;
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>>;

    // Server nodes.
    /// Records a node's heartbeat (its row is made at the first): last seen,
    /// start time, cap and load; keeps its drain flag. The row as it is now, so
    /// the node learns whether an operator drained it.
    async fn node_heartbeat(&self, beat: &NodeBeat) -> Result<Node>;
    /// Every node that ever heartbeat, by name.
    async fn list_nodes(&self) -> Result<Vec<Node>>;
    async fn node(&self, name: &str) -> Result<Option<Node>>;
    /// Sets or clears a node's drain flag (NotFound when no node has that name).
    async fn set_node_draining(&self, name: &str, draining: bool) -> Result<Node>;
    /// Takes an unfinished task for node `node`: true when no node had it, `node`
    /// had it already, or the node that had it is offline (no heartbeat for
    /// [`NODE_OFFLINE_AFTER_MS`] before `now`); false when another live node runs it.
    async fn claim_task(&self, task_id: &str, node: &str, now: i64) -> Result<bool>;
    /// As [`Store::claim_task`], answering the task as it is once taken (in
    /// the same round trip); None when another live node runs it or there is
    /// no such task.
    async fn claim_task_row(&self, task_id: &str, node: &str, now: i64) -> Result<Option<Task>>;
    /// Takes or renews the cluster-wide lease `name` for `holder` until
    /// `now + ttl_ms`: true when `holder` holds it now (no one held it, it held
    /// it, or the other holder's lease ran out).
    async fn lease(&self, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool>;

    // Settings.
    async fn setting(&self, name: &str) -> Result<Option<String>>;
    async fn set_setting(&self, name: &str, value: &str) -> Result<()>;

    // Environments and tenants.
    async fn create_environment(
        &self,
        space_id: i64,
        name: &str,
        description: &str,
    ) -> Result<Environment>;
    /// In the space's order (new ones last).
    async fn list_environments(&self, space_id: i64) -> Result<Vec<Environment>>;
    async fn environment(&self, space_id: i64, name: &str) -> Result<Option<Environment>>;
    /// Refused (Invalid) while machines are in it or a grant is narrowed to it.
    async fn delete_environment(&self, space_id: i64, name: &str) -> Result<()>;
    /// Renames and redescribes an environment (Conflict when the name is taken).
    async fn update_environment(
        &self,
        space_id: i64,
        name: &str,
        new_name: &str,
        description: &str,
    ) -> Result<Environment>;
    /// Moves an environment to `position` (0: first) in the space's order.
    async fn move_environment(&self, space_id: i64, name: &str, position: u32) -> Result<()>;
    async fn create_tenant(&self, space_id: i64, name: &str, tags: &[String]) -> Result<Tenant>;
    async fn list_tenants(&self, space_id: i64) -> Result<Vec<Tenant>>;

    // Machine policies.
    /// The policy by name (each space has its default policy).
    async fn policy(&self, space_id: i64, name: &str) -> Result<Option<MachinePolicy>>;
    /// The space's policies, by name.
    async fn list_policies(&self, space_id: i64) -> Result<Vec<MachinePolicy>>;

    // Machines.
    /// Adds a machine. Conflict when the name exists in the space; Invalid when
    /// an environment, tenant or the policy does not exist there.
    async fn create_machine(&self, m: &NewMachine) -> Result<Machine>;
    /// Replaces the machine of the same name (register-with --force), keeping its id.
    async fn replace_machine(&self, m: &NewMachine) -> Result<Machine>;
    async fn machine(&self, space_id: i64, name: &str) -> Result<Option<Machine>>;
    async fn machine_by_id(&self, id: i64) -> Result<Option<Machine>>;
    /// Machines presenting this thumbprint, in one space or in all.
    async fn machines_by_thumbprint(
        &self,
        space_id: Option<i64>,
        thumbprint: &str,
    ) -> Result<Vec<Machine>>;
    /// Certificate rotation: every machine, in any space, whose thumbprint is
    /// `current` accepts `next` beside it from now on. Invalid when `next` is
    /// the thumbprint (or the next one) of a machine of another tentacle.
    /// Returns the machines as they are now (none: no machine has `current`).
    async fn offer_machine_thumbprint(&self, current: &str, next: &str) -> Result<Vec<Machine>>;
    /// Certificate rotation done: every machine accepting `next` beside its
    /// thumbprint now has `next` as its thumbprint. Returns them as they were
    /// (with their old thumbprints).
    async fn promote_machine_thumbprint(&self, next: &str) -> Result<Vec<Machine>>;
    async fn list_machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>>;
    /// One page of the machines a query matches, by name, and how many match
    /// in all.
    async fn machine_page(&self, q: &MachineQuery) -> Result<(Vec<Machine>, i64)>;
    async fn delete_machine(&self, space_id: i64, name: &str) -> Result<()>;
    /// Changes a machine's settings; Invalid when a named environment, tenant
    /// or policy does not exist in its space.
    async fn update_machine(&self, id: i64, u: &MachineUpdate) -> Result<Machine>;
    async fn record_health(&self, machine_id: i64, h: &HealthUpdate) -> Result<()>;

    // Tasks.
    /// Creates a task with one Queued step per machine; tickets are derived from the
    /// task id and machine id.
    async fn create_task(&self, task: &NewTask, now: i64) -> Result<Task> {
        self.create_task_with_steps(task, now).await.map(|(t, _)| t)
    }
    /// As [`Store::create_task`], with the steps as created (no read after),
    /// by machine name ignoring ASCII case, then machine id: the order of
    /// [`Store::task_steps`] (PostgreSQL may fold the case of other letters
    /// there too, and so order names outside ASCII differently).
    async fn create_task_with_steps(
        &self,
        task: &NewTask,
        now: i64,
    ) -> Result<(Task, Vec<TaskStep>)>;
    async fn task(&self, id: &str) -> Result<Option<Task>>;
    /// Newest first; in one space or in all.
    async fn list_tasks(&self, space_id: Option<i64>, limit: i64) -> Result<Vec<Task>>;
    /// One page of the tasks a query matches, newest first, and how many match.
    async fn task_page(&self, q: &TaskQuery) -> Result<(Vec<Task>, i64)>;
    /// Tasks not in a final state (to resume after a restart).
    async fn unfinished_tasks(&self) -> Result<Vec<Task>>;
    async fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
    ) -> Result<()>;
    /// A server line about the task (as [`Store::append_log`]), then its new
    /// state (as [`Store::set_task_state`]), in one commit where that saves
    /// one (PostgreSQL: a commit waits for its write-ahead log to reach the
    /// disk); where writes hold the whole database (SQLite) as two statements
    /// sent in one call, each its own commit, which costs less there than a
    /// transaction.
    /// When the state cannot change, the line is stored all the same and
    /// the error says why, as `set_task_state`'s does.
    async fn set_task_state_logged(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
        line: &NewLogLine,
    ) -> Result<()>;
    async fn request_cancel(&self, id: &str) -> Result<()>;
    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>>;
    async fn update_step(&self, step: &TaskStep) -> Result<()>;
    /// Server lines about a step (as [`Store::append_log`]), then the step
    /// (as [`Store::update_step`]). Where writes hold the whole database
    /// (SQLite) both statements go in one call, each its own commit as when
    /// made apart; elsewhere (PostgreSQL, where each commit waits for the
    /// disk) in one transaction. A missing step is NotFound, its lines stored
    /// all the same.
    async fn update_step_logged(&self, step: &TaskStep, lines: &[NewLogLine]) -> Result<()>;
    /// A task starts with its first step: the task's line and its new state
    /// (as [`Store::set_task_state_logged`]), then the step (as
    /// [`Store::update_step`]). Where writes hold the whole database (SQLite)
    /// the statements go in one call, each its own commit as when made apart;
    /// elsewhere as the two calls. Says how each part went (the task's, the
    /// step's): the step's part is done even when the task's failed.
    async fn start_task_with_step(
        &self,
        state: TaskState,
        now: i64,
        line: &NewLogLine,
        step: &TaskStep,
    ) -> (Result<()>, Result<()>);
    /// A task's last step ends and the task with it: the step's server lines
    /// and the step (as [`Store::update_step_logged`]), then the task's line
    /// and its new state (as [`Store::set_task_state_logged`]), in that
    /// order. Where writes hold the whole database (SQLite) the statements go
    /// in one call, each its own commit as when made apart; elsewhere as the
    /// two calls. Says how each part went: the task's part is done even when
    /// the step's failed.
    async fn finish_step_and_task(
        &self,
        step: &TaskStep,
        step_lines: &[NewLogLine],
        state: TaskState,
        error: Option<&str>,
        now: i64,
        line: &NewLogLine,
    ) -> (Result<()>, Result<()>);
    /// Appends lines (ignoring (task, machine, sequence) duplicates) and, for the
    /// lines' machine, advances the step's next_sequence past the highest sequence.
    async fn append_log(&self, task_id: &str, lines: &[NewLogLine]) -> Result<()>;
    /// Lines with id > `after_id`, oldest first, at most `limit`.
    async fn task_log(&self, task_id: &str, after_id: i64, limit: i64) -> Result<Vec<TaskLogLine>>;
    /// The task, then its steps, then its lines with id > `after_id` (oldest
    /// first, at most `limit`), read in that order: every line stored before
    /// the task was read is among them (up to `limit`). What a task's live
    /// view needs when its state changes. None when there is no such task.
    /// Where one call carries several statements (SQLite) this is one call;
    /// elsewhere the steps and the lines are read at once after the task.
    async fn task_with_log(
        &self,
        id: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Option<TaskWithLog>>;
    /// Every line one machine's part of a task produced, oldest first.
    async fn step_log(&self, task_id: &str, machine_id: i64) -> Result<Vec<TaskLogLine>>;
    /// How many lines one machine's part of a task stored, and their text's
    /// bytes (UTF-8), for the per-step log limit. (Engines should answer it
    /// without reading the lines; this default does read them.)
    async fn step_log_size(&self, task_id: &str, machine_id: i64) -> Result<(i64, i64)> {
        let lines = self.step_log(task_id, machine_id).await?;
        let bytes = lines.iter().map(|l| l.text.len() as i64).sum();
        Ok((lines.len() as i64, bytes))
    }
    /// The encrypted secret values of a task (name, ciphertext).
    async fn task_secrets(&self, task_id: &str) -> Result<Vec<(String, String)>>;
    /// How many secret values are stored (any task).
    async fn count_task_secrets(&self) -> Result<i64>;

    // Packages.
    /// Adds a package; Conflict when that ID and version exist in the space,
    /// unless `replace` (then the row is updated in place and the previous row
    /// returned second).
    async fn put_package(
        &self,
        p: &NewPackage,
        replace: bool,
        now: i64,
    ) -> Result<(Package, Option<Package>)>;
    /// One version of a package (ID case-insensitive, version exact).
    async fn package(
        &self,
        space_id: i64,
        package_id: &str,
        version: &str,
    ) -> Result<Option<Package>>;
    /// Every version of one package ID, or of all packages; by ID then upload time.
    async fn list_packages(&self, space_id: i64, package_id: Option<&str>) -> Result<Vec<Package>>;
    /// Deletes one version; NotFound when there is none. Returns the deleted row.
    async fn delete_package(
        &self,
        space_id: i64,
        package_id: &str,
        version: &str,
    ) -> Result<Package>;
    /// How many package rows use a file, in any space (to know when the file
    /// can be removed).
    async fn count_packages_with_sha256(&self, sha256: &str) -> Result<i64>;

    // Cluster work (several nodes on one database).
    /// Whether several nodes may share this store (PostgreSQL): a node then
    /// hands steps to the node holding their polling tentacle, listens for
    /// [`ClusterEvent`]s and takes over the work of nodes gone offline.
    fn shared(&self) -> bool {
        false
    }
    /// Tells every node listening (this one too) about `event`; nothing on a
    /// store no other node shares.
    async fn publish(&self, event: &ClusterEvent) -> Result<()>;
    /// [`Store::publish`] of each of `events`, in order (one round trip
    /// where the store can).
    async fn publish_all(&self, events: &[ClusterEvent]) -> Result<()> {
        for event in events {
            self.publish(event).await?;
        }
        Ok(())
    }
    /// The events every node publishes from now on (on a dedicated
    /// connection; [`ClusterEvent::Resync`] after it was lost and made
    /// again), each marked when this store published it. None on a store no
    /// other node shares.
    async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Heard>>>;
    /// Records that `node` holds (`present`) or no longer holds connections
    /// of polling subscription `subscription_id`.
    async fn set_polling_presence(
        &self,
        node: &str,
        subscription_id: &str,
        present: bool,
        now: i64,
    ) -> Result<()>;
    /// Forgets every polling connection recorded for `node` (at its start).
    async fn clear_polling_presence(&self, node: &str) -> Result<()>;
    /// The live nodes (a heartbeat within [`NODE_OFFLINE_AFTER_MS`] before
    /// `now`) holding connections of `subscription_id`, latest connected first.
    async fn polling_nodes(&self, subscription_id: &str, now: i64) -> Result<Vec<String>>;
    /// Records which node runs a step (None: the task's own node).
    async fn assign_step(&self, task_id: &str, machine_id: i64, node: Option<&str>) -> Result<()>;
    /// The node a step was handed to, if any.
    async fn step_node(&self, task_id: &str, machine_id: i64) -> Result<Option<String>>;
    /// The unfinished steps handed to `node`, oldest task first.
    async fn steps_assigned_to(&self, node: &str) -> Result<Vec<StepRef>>;
    /// Gives a task back that `node` took but will not run (it is draining):
    /// no node has it then.
    async fn release_task(&self, task_id: &str, node: &str) -> Result<()>;
    /// One step of a task.
    async fn task_step(&self, task_id: &str, machine_id: i64) -> Result<Option<TaskStep>>;
    /// Unfinished tasks no live node runs, oldest first: those of a node with
    /// no heartbeat within [`NODE_OFFLINE_AFTER_MS`] before `now`, and those
    /// no node took that were created before `unclaimed_before`.
    async fn adoptable_tasks(&self, now: i64, unclaimed_before: i64) -> Result<Vec<Task>>;

    // Package content (chunked, content-addressed).
    //
    // Several nodes share the database and nothing else, so a package's bytes
    // live here: one `package_contents` row per content (by SHA-256) and its
    // chunks. Content is written pending (invisible to readers), chunk by
    // chunk, and completed in one transaction once every chunk is there and
    // the writer's hash matched; see `octo_engine::feed` for the writer.
    /// Starts writing content on behalf of `node`: a pending row no reader
    /// finds, whose chunks are `chunk_size` bytes. Answers its id.
    async fn begin_package_content(&self, node: &str, chunk_size: i64, now: i64) -> Result<i64>;
    /// Writes chunk `index` (from 0) of pending content `id`; every chunk but
    /// the last must be the full chunk size. Invalid when `id` is not pending
    /// (completed or dropped), the chunk is empty or longer than a chunk, or
    /// `index` is written already.
    async fn put_package_chunk(&self, id: i64, index: i64, data: &[u8]) -> Result<()>;
    /// Completes pending content `id` as `sha256` (lower-case hex, what the
    /// writer hashed) of `size` bytes, in one transaction: Invalid, and
    /// nothing visible, unless its chunks are exactly `0..n`, full but the
    /// last, summing to `size`. When complete content with that SHA-256
    /// exists already (another push), the pending one is dropped and that one
    /// answered.
    async fn finish_package_content(
        &self,
        id: i64,
        sha256: &str,
        size: i64,
    ) -> Result<PackageContent>;
    /// Drops pending content `id` and its chunks (a failed push). Nothing to
    /// do when it is gone; complete content is never dropped here.
    async fn abandon_package_content(&self, id: i64) -> Result<()>;
    /// Complete content by SHA-256 (any case); none while it is pending.
    async fn package_content(&self, sha256: &str) -> Result<Option<PackageContent>>;
    /// Chunks `from .. from + count` of content `id`, in order (fewer past
    /// the end, none once the content is deleted).
    async fn package_chunks(&self, id: i64, from: i64, count: i64) -> Result<Vec<Vec<u8>>>;
    /// Deletes content `sha256` (and its chunks) when no package row uses
    /// it (the rule of [`Store::count_packages_with_sha256`]); whether it did.
    async fn delete_unused_package_content(&self, sha256: &str) -> Result<bool>;
    /// Removes pending content `node` left (call it at the node's start: none
    /// of its writes is running) and any node's started before
    /// `started_before` (abandoned); answers how many.
    async fn remove_pending_package_contents(&self, node: &str, started_before: i64)
        -> Result<u64>;

    // Machine policy settings (issue 17: the tentacle update behaviour).
    /// Adds a machine policy to the space; settings left out take the
    /// default policy's defaults (3600 s, 60 s, 120 s, Manual). Conflict when
    /// the name is taken.
    async fn create_policy(
        &self,
        space_id: i64,
        name: &str,
        settings: &PolicySettings,
    ) -> Result<MachinePolicy>;
    /// Changes the settings given of a policy; NotFound when there is none.
    async fn update_policy(
        &self,
        space_id: i64,
        name: &str,
        settings: &PolicySettings,
    ) -> Result<MachinePolicy>;

    // Values to mask (issue 16: sensitive output variables across nodes).
    /// Records a value that every line of task `task_id` stored from now on
    /// masks (a sensitive output variable a step printed), encrypted by the
    /// caller with the master key. Recording the same ciphertext twice keeps one.
    async fn add_task_mask(&self, task_id: &str, ciphertext: &str) -> Result<()>;
    /// The masks of task `task_id` (ciphertexts), oldest first.
    async fn task_masks(&self, task_id: &str) -> Result<Vec<String>>;
    /// What a task's run needs to mask its log, in one read: its secret
    /// values (as [`Store::task_secrets`]) and its masks (as
    /// [`Store::task_masks`]).
    async fn task_secrets_and_masks(&self, task_id: &str) -> Result<TaskSecretsAndMasks>;

    // Fewer store round trips per step (issue 15).
    /// Machine `id` as its row alone, in one query: its lists (environments,
    /// roles, tenants, tenant tags) are left empty. What a step needs to reach
    /// its machine; use [`Store::machine_by_id`] for the whole machine.
    async fn machine_row(&self, id: i64) -> Result<Option<Machine>> {
        self.machine_by_id(id).await.map(|m| {
            m.map(|m| Machine {
                environments: Vec::new(),
                roles: Vec::new(),
                tenants: Vec::new(),
                tenant_tags: Vec::new(),
                ..m
            })
        })
    }

    /// As [`Store::machine_row`], with the node task `task_id`'s step on
    /// the machine was handed to ([`Store::step_node`]), in one query where
    /// the engine allows it: what a step's placement reads. The node is None
    /// when the step was not handed over, and when there is no such machine.
    async fn machine_row_and_step_node(
        &self,
        task_id: &str,
        machine_id: i64,
    ) -> Result<(Option<Machine>, Option<String>)> {
        let (machine, node) = tokio::join!(
            self.machine_row(machine_id),
            self.step_node(task_id, machine_id)
        );
        let machine = machine?;
        let node = if machine.is_some() { node? } else { None };
        Ok((machine, node))
    }

    /// The thumbprints polling tentacles may connect with: every polling
    /// machine's certificate, and the next one it offered during a rotation.
    /// Read again after machines change (on every node of a cluster), so one
    /// query of those columns alone, not every machine with its lists.
    async fn polling_thumbprints(&self) -> Result<Vec<String>> {
        Ok(self
            .list_machines(&MachineFilter::default())
            .await?
            .into_iter()
            .filter(|m| m.kind == EndpointKind::Polling)
            .flat_map(|m| [Some(m.thumbprint), m.next_thumbprint])
            .flatten()
            .collect())
    }
}
