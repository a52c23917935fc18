//! The server's store.
//!
//! [`Store`] is everything the server persists, as one async trait. Each database
//! engine is a crate of its own that implements it (`octo-store-sqlite`, the
//! embedded default; PostgreSQL can sit beside it), with its own migrations, and
//! every engine runs the same contract suite (`octo-store-tests`). Queries are
//! built at run time (no compile-time checked macros: those bind a build to one
//! database).
//!
//! Conventions: ids are `i64` row ids except task ids, which are strings shown to
//! people ("ServerTasks-42"); times are Unix milliseconds (`i64`); names are unique
//! and compared case-insensitively; lists come back ordered by name (or, for tasks,
//! newest first).
//!
//! For engines, what does not depend on the database: [`error`] (messages and
//! database failures as [`StoreError`]s), [`input`] (validation and the rules
//! of tasks and logs), [`text`] (enums as stored text), [`rows`] (row structs
//! that derive `sqlx::FromRow` for any engine, and the records they become) and
//! [`machines`] (a machine's lists).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub mod error;
pub mod input;
pub mod machines;
pub mod rows;
pub mod text;

pub use octo_api_types::model::*;

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

/// The policy every new machine gets unless told otherwise.
pub const DEFAULT_POLICY: &str = "Default Machine Policy";

/// What is needed to add a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewMachine {
    pub name: String,
    pub kind: EndpointKind,
    pub uri: String,
    pub thumbprint: String,
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
    pub tenant_tags: Vec<String>,
    /// None: the default policy.
    pub policy: Option<String>,
    pub worker_pool: Option<String>,
}

/// Which machines a task targets. Empty lists match everything; non-empty lists
/// must all match (a machine must be in one of `environments` AND have one of
/// `roles` AND ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachineFilter {
    pub names: Vec<String>,
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
}

/// Result of a health check, to record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HealthUpdate {
    pub status: HealthStatus,
    pub reason: String,
    pub at: i64,
    pub tentacle_version: Option<String>,
    pub tool_version: Option<String>,
}

/// What is needed to add a package (the file is already stored by hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPackage {
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

/// Everything the server persists.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    // Users and API keys.
    /// Adds a user; `password_hash` is an argon2 PHC string (None: API keys only).
    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: Option<&str>,
        is_admin: bool,
    ) -> Result<User>;
    /// A user and their password hash, by username.
    async fn user_by_name(&self, username: &str) -> Result<Option<(User, Option<String>)>>;
    /// Number of users (0 means first start).
    async fn count_users(&self) -> Result<i64>;
    /// Adds an API key given its SHA-256 hex and display prefix.
    async fn create_api_key(
        &self,
        user_id: i64,
        purpose: &str,
        key_sha256: &str,
        prefix: &str,
    ) -> Result<ApiKey>;
    /// The (not revoked) key with this SHA-256 and its user; records the use time.
    async fn authenticate_api_key(
        &self,
        key_sha256: &str,
        now: i64,
    ) -> Result<Option<(ApiKey, User)>>;
    /// Keys of a user, or of everyone.
    async fn list_api_keys(&self, user_id: Option<i64>) -> Result<Vec<ApiKey>>;
    /// Revokes a key by id; NotFound when there is none.
    async fn revoke_api_key(&self, id: i64) -> Result<()>;

    // Environments and tenants.
    async fn create_environment(&self, name: &str, description: &str) -> Result<Environment>;
    async fn list_environments(&self) -> Result<Vec<Environment>>;
    async fn environment(&self, name: &str) -> Result<Option<Environment>>;
    /// Refused (Invalid) while machines are in it.
    async fn delete_environment(&self, name: &str) -> Result<()>;
    async fn create_tenant(&self, name: &str, tags: &[String]) -> Result<Tenant>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>>;

    // Machine policies.
    /// The policy by name (the default policy always exists after migrations).
    async fn policy(&self, name: &str) -> Result<Option<MachinePolicy>>;

    // Machines.
    /// Adds a machine. Conflict when the name exists; Invalid when an environment,
    /// tenant or the policy does not exist.
    async fn create_machine(&self, m: &NewMachine) -> Result<Machine>;
    /// Replaces the machine of the same name (register-with --force), keeping its id.
    async fn replace_machine(&self, m: &NewMachine) -> Result<Machine>;
    async fn machine(&self, name: &str) -> Result<Option<Machine>>;
    async fn machine_by_id(&self, id: i64) -> Result<Option<Machine>>;
    /// Machines presenting this thumbprint (more than one means a cloned image).
    async fn machines_by_thumbprint(&self, thumbprint: &str) -> Result<Vec<Machine>>;
    async fn list_machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>>;
    async fn delete_machine(&self, name: &str) -> Result<()>;
    async fn record_health(&self, machine_id: i64, h: &HealthUpdate) -> Result<()>;

    // Tasks.
    /// Creates a task with one Queued step per machine; tickets are derived from the
    /// task id and machine id.
    async fn create_task(
        &self,
        kind: &str,
        description: &str,
        arguments: &serde_json::Value,
        machine_ids: &[i64],
        now: i64,
    ) -> Result<Task>;
    async fn task(&self, id: &str) -> Result<Option<Task>>;
    /// Newest first.
    async fn list_tasks(&self, limit: i64) -> Result<Vec<Task>>;
    /// Tasks not in a final state (to resume after a restart).
    async fn unfinished_tasks(&self) -> Result<Vec<Task>>;
    async fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
    ) -> Result<()>;
    async fn request_cancel(&self, id: &str) -> Result<()>;
    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>>;
    async fn update_step(&self, step: &TaskStep) -> Result<()>;
    /// Appends lines (ignoring (task, machine, sequence) duplicates) and, for the
    /// lines' machine, advances the step's next_sequence past the highest sequence.
    async fn append_log(&self, task_id: &str, lines: &[NewLogLine]) -> Result<()>;
    /// Lines with id > `after_id`, oldest first, at most `limit`.
    async fn task_log(&self, task_id: &str, after_id: i64, limit: i64) -> Result<Vec<TaskLogLine>>;
    /// Every line one machine's part of a task produced, oldest first.
    async fn step_log(&self, task_id: &str, machine_id: i64) -> Result<Vec<TaskLogLine>>;

    // Packages.
    /// Adds a package; Conflict when that ID and version exist, unless `replace`
    /// (then the row is updated in place and the previous row returned second).
    async fn put_package(
        &self,
        p: &NewPackage,
        replace: bool,
        now: i64,
    ) -> Result<(Package, Option<Package>)>;
    /// One version of a package (ID case-insensitive, version exact).
    async fn package(&self, package_id: &str, version: &str) -> Result<Option<Package>>;
    /// Every version of one package ID, or of all packages; by ID then upload time.
    async fn list_packages(&self, package_id: Option<&str>) -> Result<Vec<Package>>;
    /// Deletes one version; NotFound when there is none. Returns the deleted row.
    async fn delete_package(&self, package_id: &str, version: &str) -> Result<Package>;
    /// How many package rows use a file (to know when the file can be removed).
    async fn count_packages_with_sha256(&self, sha256: &str) -> Result<i64>;
}
