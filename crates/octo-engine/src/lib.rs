//! The server's task engine.
//!
//! A task (health check, script run, deployment, tool upgrade) is one row plus
//! one step per machine in the store. [`Engine`] runs tasks: it hands each
//! unfinished step to the step runner of the task's kind with a
//! [`StepContext`] (the step's log sink, the store, comms, cancellation and
//! guided-failure decisions; never the engine itself), at most
//! [`StepLimits`] allow at once, records each step's outcome, then the task's.
//!
//! - [`engine`]: the engine (start, cancel, guidance, resume after a restart,
//!   scheduled health checks).
//! - [`context`]: [`StepContext`] and [`TaskLog`], what a step may use.
//! - [`notify`]: per-task change counters that live log readers wait on.
//! - `steps`: one machine's part of each kind of task (`script`, `health`,
//!   `deploy` and tool upgrades, `tentacle_upgrade`, `transfer` of files to tentacles).
//! - [`tool`]: the deployment tool (`calamari`) the server pushes.
//! - [`tentacle_build`]: the tentacle binary the server upgrades tentacles to.
//! - [`feed`]: where the built-in feed keeps package files.
//! - [`secrets`]: the master key that encrypts secret values, and the
//!   masking of secrets in task logs.
//!
//! # Durability
//!
//! Everything a task has done is in the store: its steps' states, and for each
//! step the next tentacle log sequence not yet stored. A lost connection or a
//! server restart resumes from there (StartScript is idempotent on the step's
//! ticket; StreamLogs resumes from the sequence), so no line is lost or repeated.

mod auto_upgrade;
mod binaries;
pub mod context;
pub mod engine;
pub mod feed;
pub mod notify;
mod outputs;
pub mod secrets;
mod steps;
pub mod tentacle_build;
pub mod tool;

use octo_store::{EndpointKind, Machine};
use octo_tls::Thumbprint;

pub use context::{StepContext, TaskLog};
pub use engine::{CreationMark, Engine, EngineDeps, Load, DEFAULT_HEALTH_SCAN_INTERVAL};
pub use feed::PackageFiles;
pub use notify::Changes;
pub use steps::deploy::DeployArgs;
pub use steps::script::CLEANUP_DEFER;
pub use steps::tentacle_upgrade::TentacleUpgradeArgs;
pub use tentacle_build::TentacleBuild;
pub use tool::ToolBuild;

/// The default of [`StepLimits::per_task`] (`octopus server run --max-parallel-steps`).
pub const DEFAULT_MAX_PARALLEL_STEPS: usize = 20;
/// The default of [`StepLimits::per_node`] (`octopus server run --max-running-steps`).
pub const DEFAULT_MAX_RUNNING_STEPS: usize = 200;
/// The most steps one task may ask to run at once (`max_parallel_steps` of a task).
pub const MAX_PARALLEL_STEPS_ALLOWED: u32 = 10_000;

/// How many machine steps run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Steps of one task at once, unless the task asks otherwise (its stored
    /// `max_parallel_steps` argument).
    pub per_task: usize,
    /// Steps of every task together on this server node: a task's steps past
    /// it wait for a slot (Queued) rather than overload the node.
    pub per_node: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            per_task: DEFAULT_MAX_PARALLEL_STEPS,
            per_node: DEFAULT_MAX_RUNNING_STEPS,
        }
    }
}

/// The per-task limit a task's stored arguments ask for, if any (a number from
/// 1 to [`MAX_PARALLEL_STEPS_ALLOWED`]; anything else is ignored, as the API
/// refuses it before it is stored).
pub fn max_parallel_steps_of(arguments: &serde_json::Value) -> Option<usize> {
    let n = arguments.get("max_parallel_steps")?.as_u64()?;
    (1..=u64::from(MAX_PARALLEL_STEPS_ALLOWED))
        .contains(&n)
        .then(|| usize::try_from(n).ok())
        .flatten()
}

/// Task kinds, as stored and shown.
pub mod kind {
    /// Script runs.
    pub const SCRIPT: &str = "Script";
    /// Health checks.
    pub const HEALTH: &str = "Health";
    /// Package deployments.
    pub const DEPLOY: &str = "Deploy";
    /// Deployment tool upgrades.
    pub const UPGRADE: &str = "Upgrade";
    /// Tentacle upgrades (the tentacle's own binary).
    pub const TENTACLE_UPGRADE: &str = "TentacleUpgrade";
}

/// The comms endpoint of a stored machine.
pub fn endpoint_of(m: &Machine) -> Result<octo_comms::Endpoint, octo_comms::CommsError> {
    let tp: Thumbprint = m
        .thumbprint
        .parse()
        .map_err(
            |e: octo_tls::ThumbprintParseError| octo_comms::CommsError::InvalidEndpoint {
                endpoint: m.uri.clone(),
                reason: e.to_string(),
            },
        )?;
    let next = m.next_thumbprint.as_deref().and_then(|t| t.parse().ok());
    Ok(match m.kind {
        EndpointKind::Listening => octo_comms::Endpoint::listening(&m.uri, tp)?,
        EndpointKind::Polling => octo_comms::Endpoint::polling(&m.uri, tp)?,
    }
    .with_next(next))
}

/// "machine web-1" / "3 machines (a, b, c)" / "12 machines".
pub fn machine_list(machines: &[Machine]) -> String {
    match machines {
        [one] => format!("machine {}", one.name),
        many if many.len() <= 5 => format!(
            "{} machines ({})",
            many.len(),
            many.iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        many => format!("{} machines", many.len()),
    }
}
