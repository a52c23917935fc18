//! Machine policy "Always keep up to date" (`tentacle_update: Always`): after a
//! health check, the machines it found running a tentacle older than the one
//! this server carries, whose policy says Always, get one tentacle upgrade
//! task together, started by the system.
//!
//! A machine is left out while a tentacle upgrade task that includes it is
//! unfinished (so a health check during an upgrade, or a failing upgrade
//! checked again, never piles up tasks), and when it is disabled or the check
//! did not reach it. The engine serialises these decisions on one node; two
//! nodes finishing health checks of the same machine at the same instant
//! could each start one (the tentacle then finds the second one has nothing
//! to do).

use std::collections::{HashMap, HashSet};

use octo_store::{
    now_ms, Machine, MachinePolicy, NewAuditEvent, NewTask, Store, Task, TaskState, TentacleUpdate,
};

use crate::steps::tentacle_upgrade::TentacleUpgradeArgs;
use crate::tentacle_build::is_older;
use crate::{engine::environments_of, kind, machine_list};

/// How long an automatic upgrade waits for running scripts (as the API's default).
const WAIT_FOR_SCRIPTS_S: u64 = 300;
/// How long the restarted tentacle has to come back (as the API's default).
const CONFIRM_WITHIN_S: u64 = 120;
/// Who the audit log says started an automatic upgrade.
pub const SYSTEM: &str = "system";

/// The machines of health check `health_task` that its policy says to
/// upgrade now to `carried`: checked successfully, older, policy Always, not
/// disabled, and in no unfinished tentacle upgrade task.
pub(crate) async fn due(
    store: &dyn Store,
    health_task: &str,
    carried: &str,
) -> octo_store::Result<Vec<Machine>> {
    let mut policies: HashMap<(i64, String), Option<MachinePolicy>> = HashMap::new();
    let mut candidates = Vec::new();
    for step in store.task_steps(health_task).await? {
        if step.state != TaskState::Success {
            continue;
        }
        let Some(m) = store.machine_by_id(step.machine_id).await? else {
            continue;
        };
        let older = m
            .tentacle_version
            .as_deref()
            .is_some_and(|running| is_older(running, carried));
        if m.disabled || !older {
            continue;
        }
        let key = (m.space_id, m.policy.clone());
        if !policies.contains_key(&key) {
            let policy = store.policy(m.space_id, &m.policy).await?;
            policies.insert(key.clone(), policy);
        }
        let always = policies
            .get(&key)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.tentacle_update == TentacleUpdate::Always);
        if always {
            candidates.push(m);
        }
    }
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let mut busy: HashSet<i64> = HashSet::new();
    for t in store.unfinished_tasks().await? {
        if t.kind == kind::TENTACLE_UPGRADE {
            busy.extend(store.task_steps(&t.id).await?.iter().map(|s| s.machine_id));
        }
    }
    candidates.retain(|m| !busy.contains(&m.id));
    Ok(candidates)
}

/// Creates the upgrade task of `machines` (all of one space) to `version`,
/// and records in the audit log that the system started it after
/// `health_task`. The task is not started here.
pub(crate) async fn create(
    store: &dyn Store,
    health_task: &Task,
    machines: &[Machine],
    version: &str,
    sha256: &str,
) -> octo_store::Result<Task> {
    let space_id = machines
        .first()
        .map_or(health_task.space_id, |m| m.space_id);
    let description = format!(
        "Upgrade the tentacle to {version} on {} (machine policy: always keep up to date)",
        machine_list(machines)
    );
    let args = TentacleUpgradeArgs {
        version: version.to_string(),
        wait_for_scripts_s: WAIT_FOR_SCRIPTS_S,
        confirm_within_s: CONFIRM_WITHIN_S,
    };
    let now = now_ms();
    let audit = NewAuditEvent {
        at: now,
        user_id: None,
        username: SYSTEM.into(),
        source: format!("health check {}", health_task.id),
        action: "started".into(),
        kind: "task".into(),
        // The new task's id, set when it is stored.
        object: String::new(),
        space_id: Some(space_id),
        details: format!("{description}; tentacle {version} (SHA-256 {sha256})"),
    };
    let task = store
        .create_task(
            &NewTask {
                space_id,
                kind: kind::TENTACLE_UPGRADE.into(),
                description,
                arguments: serde_json::to_value(&args).unwrap_or_default(),
                machine_ids: machines.iter().map(|m| m.id).collect(),
                environments: environments_of(machines),
                secrets: Vec::new(),
                audit: Some(audit),
            },
            now,
        )
        .await?;
    Ok(task)
}
