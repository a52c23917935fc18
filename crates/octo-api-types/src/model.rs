//! The records the server keeps and the API returns: users, keys, environments,
//! machines, tasks, packages. The store persists them; the API serializes them as
//! they are.
//!
//! Conventions: ids are `i64` row ids except task ids, which are strings shown to
//! people ("ServerTasks-42"); times are Unix milliseconds (`i64`).

use serde::{Deserialize, Serialize};

/// The id of the `Default` space (records without one belong to it).
pub const DEFAULT_SPACE_ID: i64 = 1;

fn default_space() -> i64 {
    DEFAULT_SPACE_ID
}

/// A person (or automation) who can call the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    /// Holds the System administrator role in every space.
    pub is_admin: bool,
    /// A disabled user cannot log in, and their API keys stop working.
    #[serde(default)]
    pub disabled: bool,
    pub created_at: i64,
}

/// An API key. The key itself is never stored: only its SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: i64,
    pub user_id: i64,
    /// What the key is for, e.g. "admin (created at first start)".
    pub purpose: String,
    /// The key's first characters, shown in listings so people can tell keys apart.
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked: bool,
    /// A login's session key: it expires after a time without use.
    #[serde(default)]
    pub session: bool,
}

/// An environment, e.g. "Production".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Environment {
    pub id: i64,
    /// The space it belongs to.
    #[serde(default = "default_space")]
    pub space_id: i64,
    pub name: String,
    pub description: String,
    pub created_at: i64,
}

/// A tenant and its tags ("Tier/Gold" style, free text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tenant {
    pub id: i64,
    /// The space it belongs to.
    #[serde(default = "default_space")]
    pub space_id: i64,
    pub name: String,
    pub tags: Vec<String>,
    pub created_at: i64,
}

/// How machines are checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MachinePolicy {
    pub id: i64,
    /// The space it belongs to.
    #[serde(default = "default_space")]
    pub space_id: i64,
    pub name: String,
    /// Seconds between scheduled health checks.
    pub health_check_interval_s: i64,
    /// Seconds a health check may take per machine.
    pub health_check_timeout_s: i64,
    /// Seconds a request waits for a polling machine to connect.
    pub polling_wait_s: i64,
    /// Whether a health check that finds a tentacle older than the server's
    /// upgrades it (`Always`) or only warns (`Manual`, the default).
    #[serde(default)]
    pub tentacle_update: TentacleUpdate,
}

/// A machine policy's tentacle update behaviour (the original's "Tentacle
/// update behaviour": "Update only when manually requested" or "Always keep
/// up to date").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TentacleUpdate {
    /// Only `octopus tentacle upgrade` or the portal's Upgrade button upgrade
    /// the tentacle; a health check warns that an upgrade is available.
    #[default]
    Manual,
    /// A health check that finds the tentacle older than the one the server
    /// carries starts a tentacle upgrade task for it.
    Always,
}

impl TentacleUpdate {
    /// "Manual" or "Always", as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            TentacleUpdate::Manual => "Manual",
            TentacleUpdate::Always => "Always",
        }
    }
}

impl std::str::FromStr for TentacleUpdate {
    type Err = String;
    /// "Manual" or "Always", ignoring case.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "manual" => Ok(TentacleUpdate::Manual),
            "always" => Ok(TentacleUpdate::Always),
            _ => Err(format!(
                "'{s}' is not a tentacle update behaviour: Manual (upgrade only when asked) or Always (keep up to date)"
            )),
        }
    }
}

/// How the server reaches a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EndpointKind {
    /// The tentacle listens; `uri` is `https://host:port/`.
    Listening,
    /// The tentacle polls; `uri` is `poll://subscription/`.
    Polling,
}

/// Last known health of a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum HealthStatus {
    /// Never checked.
    Unknown,
    /// Reachable, trusted, and well.
    Healthy,
    /// Reachable but something is wrong (e.g. low disk).
    Unhealthy,
    /// Not reachable, not trusted, or timed out (the reason says which).
    Unavailable,
}

impl EndpointKind {
    /// "listening" or "polling".
    pub fn name(self) -> &'static str {
        match self {
            EndpointKind::Listening => "listening",
            EndpointKind::Polling => "polling",
        }
    }
}

/// A deployment target or worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Machine {
    pub id: i64,
    /// The space it belongs to.
    #[serde(default = "default_space")]
    pub space_id: i64,
    pub name: String,
    pub kind: EndpointKind,
    pub uri: String,
    /// SHA-256 thumbprint the tentacle must present, 64 upper-case hex.
    pub thumbprint: String,
    /// A certificate the tentacle is rotating to (`tentacle rotate-certificate`),
    /// accepted beside `thumbprint` until the tentacle presents it.
    #[serde(default)]
    pub next_thumbprint: Option<String>,
    /// Environment names (empty for workers).
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
    pub tenant_tags: Vec<String>,
    pub policy: String,
    /// Set for workers: the worker pool's name.
    pub worker_pool: Option<String>,
    pub status: HealthStatus,
    /// Why it is unhealthy or unavailable; empty when healthy.
    pub status_reason: String,
    pub last_health_at: Option<i64>,
    pub tentacle_version: Option<String>,
    pub tool_version: Option<String>,
    /// Operating system, version and architecture, as the last health check found them.
    #[serde(default)]
    pub os: Option<String>,
    /// Free bytes in the tentacle's home, as the last health check found them.
    #[serde(default)]
    pub free_bytes: Option<i64>,
    /// A disabled machine is kept but no task or health check reaches it.
    #[serde(default)]
    pub disabled: bool,
    pub created_at: i64,
}

/// State of a task or of one machine's part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum TaskState {
    Queued,
    Executing,
    Success,
    Failed,
    Canceled,
}

impl TaskState {
    /// Final states never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Success | TaskState::Failed | TaskState::Canceled
        )
    }
}

/// A server task: a health check, a script run, a deployment...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    /// "ServerTasks-<n>".
    pub id: String,
    /// The space it runs in.
    #[serde(default = "default_space")]
    pub space_id: i64,
    /// "Health", "Script", ...
    pub kind: String,
    pub description: String,
    pub state: TaskState,
    /// What the task does (script body, syntax, ...), as given when it was created.
    #[schema(value_type = Object)]
    pub arguments: serde_json::Value,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// The environments of its machines when it was created (what an
    /// environment-scoped grant is checked against).
    #[serde(default)]
    pub environments: Vec<String>,
}

/// One machine's part of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskStep {
    pub task_id: String,
    pub machine_id: i64,
    pub machine_name: String,
    pub state: TaskState,
    /// The script ticket used on the tentacle (derived from the task).
    pub ticket: String,
    pub exit_code: Option<i32>,
    /// The next tentacle log sequence not yet stored for this step (resume point).
    pub next_sequence: i64,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// Output variables the machine's part produced (deployments), by name.
    #[serde(default)]
    pub output_variables: std::collections::BTreeMap<String, String>,
}

/// A package in the built-in feed. The file is stored once per SHA-256 under
/// the server's data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Package {
    pub id: i64,
    /// The space whose feed holds it.
    #[serde(default = "default_space")]
    pub space_id: i64,
    /// The package's ID, e.g. "Acme.Web" (unique with `version`, case-insensitive).
    pub package_id: String,
    /// Semantic version, e.g. "1.2.3".
    pub version: String,
    /// "zip" or "tar.gz".
    pub format: String,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
    pub size: i64,
    /// The file name it was pushed with.
    pub file_name: String,
    pub uploaded_at: i64,
}

/// One stored log line of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskLogLine {
    /// Row id, increasing in the order lines were stored (across all tasks); within a
    /// task, "lines since" queries use `id > after_id`.
    pub id: i64,
    pub task_id: String,
    /// None for lines written by the server about the task as a whole.
    pub machine_id: Option<i64>,
    /// The tentacle's sequence number within the step (None for server lines).
    pub sequence: Option<i64>,
    pub timestamp: i64,
    /// "stdout", "stderr", "service" (tentacle), "server".
    pub stream: String,
    pub text: String,
}

/// How often a server node writes its heartbeat (milliseconds).
pub const NODE_HEARTBEAT_MS: i64 = 5_000;
/// A node whose last heartbeat is older than this is [`NodeState::Offline`]
/// (milliseconds: six missed heartbeats).
pub const NODE_OFFLINE_AFTER_MS: i64 = 30_000;

/// What a server node is doing, from its heartbeats and its drain flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum NodeState {
    /// Heartbeating and taking new tasks.
    Running,
    /// Heartbeating, finishing what it runs, taking no new tasks.
    Draining,
    /// No heartbeat for [`NODE_OFFLINE_AFTER_MS`].
    Offline,
}

impl NodeState {
    /// The state of a node last seen at `last_seen` (Unix ms), at `now`.
    pub fn at(now: i64, last_seen: i64, draining: bool) -> NodeState {
        if now.saturating_sub(last_seen) > NODE_OFFLINE_AFTER_MS {
            NodeState::Offline
        } else if draining {
            NodeState::Draining
        } else {
            NodeState::Running
        }
    }
}

/// A server node of the cluster (`GET /api/nodes`), as its last heartbeat left it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// The node's name (`octopus server run --node-name`; default: the host name).
    pub name: String,
    pub state: NodeState,
    /// When the node last started (Unix milliseconds).
    pub started_at: i64,
    /// Its last heartbeat (Unix milliseconds).
    pub last_seen: i64,
    /// Set by `octopus node drain`, cleared by `undrain`; kept across restarts.
    pub draining: bool,
    /// At most this many tasks run on the node at once (`--task-cap`).
    pub task_cap: i64,
    /// Tasks running on the node at its last heartbeat.
    pub running_tasks: i64,
    /// Machine steps running on the node at its last heartbeat.
    pub running_steps: i64,
}
