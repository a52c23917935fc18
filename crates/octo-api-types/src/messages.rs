//! Request and reply bodies of the REST API (beside the records in
//! [`crate::model`], which replies carry as they are).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::model::{ApiKey, Machine, Package, Task, TaskStep, User};

/// An optional count, written `3` or `3.0` (JSON has one number type: a
/// whole number may come with a fractional part of zero).
fn optional_whole_number<'de, D>(d: D) -> Result<Option<u32>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => u32::try_from(u).ok(),
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
            Some(f as u32)
        }
        _ => None,
    };
    whole.map(Some).ok_or_else(|| {
        D::Error::custom(format!("{n} is not a whole number from 0 to {}", u32::MAX))
    })
}

/// Header carrying the API key.
pub const API_KEY_HEADER: &str = "X-Octopus-ApiKey";

/// The error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where possible, how to fix it.
    pub error: String,
}

/// `GET /api`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiInfo {
    /// Always "octopus".
    pub application: String,
    pub version: String,
}

/// `GET /api/server`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    pub version: String,
    /// The server's comms certificate thumbprint, which tentacles must trust.
    pub thumbprint: String,
    /// The port polling tentacles connect to.
    pub comms_port: u16,
    /// The TLS port for polling over WebSocket (`wss://HOST:PORT/PATH`) and the API
    /// over TLS; null when off.
    pub web_socket_port: Option<u16>,
    /// The WebSocket path, e.g. "/tentacle"; null when off.
    pub web_socket_path: Option<String>,
    /// The deployment tool version this server pushes; null when it has none.
    pub tool_version: Option<String>,
    /// The tentacle version this server upgrades tentacles to; null when it
    /// carries no tentacle binary.
    #[serde(default)]
    pub tentacle_version: Option<String>,
}

/// `POST /api/server/rotate-certificate`'s answer: what each machine learned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CertificateRotationReport {
    /// The comms certificate replaced.
    pub previous_thumbprint: String,
    /// The comms certificate the server presents from now on.
    pub thumbprint: String,
    /// Every machine, in every space, and whether it trusts the new certificate.
    pub machines: Vec<MachineRotation>,
}

/// One machine in a [`CertificateRotationReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineRotation {
    /// Its space's name.
    pub space: String,
    pub name: String,
    /// "Listening" or "Polling".
    pub kind: String,
    /// The tentacle trusts the new certificate.
    pub learned: bool,
    /// Why it did not learn it (empty when it did).
    pub reason: String,
    /// The command that makes it trust the new certificate by hand (empty when
    /// it learned it).
    pub fix: String,
}

/// `POST /api/environments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnvironment {
    #[schema(value_type = crate::validate::EnvironmentName)]
    pub name: String,
    #[serde(default)]
    #[schema(value_type = crate::validate::Text)]
    pub description: String,
}

/// A machine as the API accepts it (add-listening, register).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineRequest {
    #[schema(value_type = crate::validate::Name)]
    pub name: String,
    /// "TentaclePassive" (listening) or "TentacleActive" (polling).
    pub comms_style: String,
    /// Listening: https://HOST:PORT/. Polling: poll://SUBSCRIPTION/ or the subscription id.
    pub uri: String,
    pub thumbprint: String,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub environments: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub roles: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub tenants: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub tenant_tags: Vec<String>,
    #[schema(value_type = Option<crate::validate::Name>)]
    pub policy: Option<String>,
    #[schema(value_type = Option<crate::validate::Name>)]
    pub worker_pool: Option<String>,
    /// Replace a machine of the same name.
    #[serde(default)]
    pub force: bool,
}

/// `POST /api/machines/register`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegisterReply {
    pub machine: Machine,
    /// The server's comms thumbprint, which the tentacle must trust.
    pub server_thumbprint: String,
    /// The server's polling port.
    pub comms_port: u16,
}

/// `POST /api/api-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub purpose: String,
}

/// `POST /api/api-keys`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    /// The key, shown this once only.
    pub api_key: String,
    pub key: ApiKey,
}

/// `POST /api/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[schema(value_type = crate::validate::Name)]
    pub username: String,
    pub password: Option<String>,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub is_admin: bool,
}

/// `POST /api/users/login`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    #[schema(value_type = crate::validate::Name)]
    pub username: String,
    pub password: String,
}

/// `POST /api/users/login`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoginReply {
    /// The session key, to send in `X-Octopus-ApiKey`; shown this once only.
    pub api_key: String,
    pub key: ApiKey,
    pub user: User,
}

/// Script interpreter, as the API names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Syntax {
    #[default]
    Bash,
    Sh,
    Python3,
}

impl Syntax {
    /// The name the API uses: "bash", "sh", "python3".
    pub fn as_str(self) -> &'static str {
        match self {
            Syntax::Bash => "bash",
            Syntax::Sh => "sh",
            Syntax::Python3 => "python3",
        }
    }
}

/// Script isolation, as the API names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    #[default]
    Full,
    None,
}

/// `POST /api/tasks/script`; also the stored arguments of a script task.
///
/// Targets exactly `machines` when given, otherwise the machines matching all of
/// `environment`, `role` and `tenant` that are given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScriptRequest {
    pub script: String,
    #[serde(default)]
    pub syntax: Syntax,
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub machines: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub environment: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub role: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub tenant: Option<String>,
    /// Environment variables of the script, by name.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Environment variables whose values are secret: encrypted at rest, never
    /// shown (stored task arguments show them as "********"), masked in every
    /// log line.
    #[serde(default)]
    pub sensitive_variables: BTreeMap<String, String>,
    /// Machines of this task that run at once (1 to 10000; default: the
    /// server's `--max-parallel-steps`). The node's `--max-running-steps`
    /// still bounds every task together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_steps: Option<u32>,
}

/// `POST /api/tasks/health` and `/api/tasks/upgrade`: exactly `machines` when
/// given, otherwise those in `environment`, otherwise all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthRequest {
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub machines: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub environment: Option<String>,
    /// Machines of this task that run at once (1 to 10000; default: the
    /// server's `--max-parallel-steps`). The node's `--max-running-steps`
    /// still bounds every task together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_steps: Option<u32>,
}

/// `POST /api/tasks/tentacle-upgrade`: upgrade the tentacles of exactly
/// `machines` when given, otherwise those in `environment` (one of the two is
/// required) to the tentacle this server carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TentacleUpgradeRequest {
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub environment: Option<String>,
    /// How long each tentacle waits for its running scripts before it refuses
    /// (1-3600 s; default 300). New scripts are refused meanwhile.
    #[serde(default)]
    pub wait_for_scripts_s: Option<u64>,
    /// How long a restarted tentacle has to come back at the new version
    /// before its previous binary is put back (5-3600 s; default 120).
    #[serde(default)]
    pub confirm_within_s: Option<u64>,
}

/// `POST /api/tasks/deploy`: deploy a package from the feed to the machines of
/// an environment (narrowed by `role` and `tenant` when given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    #[schema(value_type = crate::validate::PackageId)]
    pub package_id: String,
    /// Default: the highest version in the feed.
    #[serde(default)]
    pub version: Option<String>,
    #[schema(value_type = crate::validate::Name)]
    pub environment: String,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub role: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<crate::validate::Name>)]
    pub tenant: Option<String>,
    /// Variables for substitution and scripts, by name.
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Variables whose values are secret: encrypted at rest, never shown,
    /// masked in every log line.
    #[serde(default)]
    pub sensitive_variables: BTreeMap<String, String>,
    /// Extracted versions kept per package on each machine (default 3).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 1, maximum = 1000)]
    pub retention: Option<u32>,
    /// A machine whose deployment fails waits for a decision
    /// (`POST /api/tasks/{id}/guidance`) instead of failing.
    #[serde(default)]
    pub guided_failure: bool,
    /// Machines of this task that run at once (1 to 10000; default: the
    /// server's `--max-parallel-steps`). The node's `--max-running-steps`
    /// still bounds every task together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel_steps: Option<u32>,
}

/// A person's decision for a machine whose deployment failed under guided failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Guidance {
    /// Run the deployment on the machine again.
    Retry,
    /// Record the machine as succeeded (the failure noted) and go on.
    Ignore,
    /// Record the machine as failed.
    Fail,
}

/// `POST /api/tasks/{id}/guidance`: the decision for a machine waiting under
/// guided failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuidanceRequest {
    /// The machine's name.
    #[schema(value_type = crate::validate::Name)]
    pub machine: String,
    pub action: Guidance,
}

/// A task and its steps, as the API returns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub task: Task,
    pub steps: Vec<TaskStep>,
}

/// `POST /api/tasks/{id}/cancel`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CancelReply {
    pub task: Task,
}

/// The answer of a package push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PushReply {
    pub package: Package,
    /// "created", "replaced" or "unchanged" (same ID, version and content).
    pub outcome: String,
}

/// `PUT /api/machines/{name}`: a machine's settings (each given field is set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineUpdate {
    #[schema(value_type = Option<Vec<crate::validate::Name>>)]
    pub environments: Option<Vec<String>>,
    #[schema(value_type = Option<Vec<crate::validate::Name>>)]
    pub roles: Option<Vec<String>>,
    #[schema(value_type = Option<Vec<crate::validate::Name>>)]
    pub tenants: Option<Vec<String>>,
    #[schema(value_type = Option<Vec<crate::validate::Name>>)]
    pub tenant_tags: Option<Vec<String>>,
    #[schema(value_type = Option<crate::validate::Name>)]
    pub policy: Option<String>,
    pub disabled: Option<bool>,
}

/// `POST /api/machine-policies`: a new machine policy; each setting left out
/// takes the default policy's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    #[schema(value_type = crate::validate::Name)]
    pub name: String,
    /// As in [`PolicySettings`].
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 60, maximum = 2678400)]
    pub health_check_interval_s: Option<u32>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 1, maximum = 3600)]
    pub health_check_timeout_s: Option<u32>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 1, maximum = 3600)]
    pub polling_wait_s: Option<u32>,
    pub tentacle_update: Option<crate::model::TentacleUpdate>,
}

impl NewPolicy {
    /// Its settings, apart from the name.
    pub fn settings(&self) -> PolicySettings {
        PolicySettings {
            health_check_interval_s: self.health_check_interval_s,
            health_check_timeout_s: self.health_check_timeout_s,
            polling_wait_s: self.polling_wait_s,
            tentacle_update: self.tentacle_update,
        }
    }
}

/// `PUT /api/machine-policies/{name}`: a policy's settings; those left out
/// stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    /// Seconds between scheduled health checks (60 to 2678400, 31 days).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 60, maximum = 2678400)]
    pub health_check_interval_s: Option<u32>,
    /// Seconds a health check may take per machine (1 to 3600).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 1, maximum = 3600)]
    pub health_check_timeout_s: Option<u32>,
    /// Seconds a request waits for a polling machine to connect (1 to 3600).
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 1, maximum = 3600)]
    pub polling_wait_s: Option<u32>,
    /// `Manual` (upgrade only when asked) or `Always` (a health check that
    /// finds an older tentacle upgrades it).
    pub tentacle_update: Option<crate::model::TentacleUpdate>,
}

/// `PUT /api/environments/{name}`: rename, describe, or move an environment
/// (`position`: 0 is first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentUpdate {
    #[schema(value_type = Option<crate::validate::EnvironmentName>)]
    pub name: Option<String>,
    #[schema(value_type = Option<crate::validate::Text>)]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "optional_whole_number")]
    #[schema(minimum = 0, maximum = 1000000)]
    pub position: Option<u32>,
}

/// `POST /api/machines/discover`: where a listening tentacle is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    /// `https://HOST:PORT/` (or `HOST:PORT`, or `HOST` for port 10933).
    pub uri: String,
}

/// `POST /api/machines/discover`'s answer: what the tentacle presented.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiscoverReply {
    /// The endpoint, normalised: `https://HOST:PORT/`.
    pub uri: String,
    /// The thumbprint of the certificate the tentacle presented.
    pub thumbprint: String,
}

/// A worker pool: the workers that name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerPool {
    pub name: String,
    pub workers: u32,
}

/// One server-sent event of `GET /api/tasks/{id}/log/stream`, as its fields:
/// `event` names it, `data` is its JSON, `id` (on `log` events) is the line's
/// id, which a client sends back as `Last-Event-ID` to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum TaskStreamEvent {
    /// First, and whenever the task or one of its steps changes state.
    Task { data: TaskView },
    /// One log line, in order: stored ones first, then live ones.
    Log {
        /// The line's id (as text, as server-sent events carry it).
        id: String,
        data: crate::model::TaskLogLine,
    },
    /// Last, once the task is final and its last line was sent; the stream ends.
    End { data: TaskView },
}
