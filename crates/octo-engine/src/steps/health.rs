//! One machine's part of a health check: connect and `GetCapabilities` within the
//! machine policy's timeout, then record the result on the machine.
//!
//! Healthy: reachable, trusted, answering, with at least [`LOW_DISK_BYTES`] free
//! in the tentacle's home (Unhealthy otherwise). Unavailable: the reason names
//! what failed (connection refused, timed out, untrusted thumbprints, polling
//! tentacle not connected within the wait). Polling machines are waited for
//! `polling_wait_s` of the policy, capped at the health check timeout.

use std::time::Duration;

use octo_comms::Endpoint;
use octo_proto::v1::{CapabilitiesReply, GetCapabilitiesRequest};
use octo_store::{now_ms, HealthStatus, HealthUpdate, Machine, TaskState, TaskStep};
use tokio::time::Instant;

use super::StepEnd;
use crate::context::StepContext;
use crate::endpoint_of;

/// Below this much free space in the tentacle's home, a machine is Unhealthy.
const LOW_DISK_BYTES: u64 = 100 << 20;
/// Used when a machine's policy cannot be read.
const DEFAULT_TIMEOUT_S: i64 = 60;
const DEFAULT_POLLING_WAIT_S: i64 = 120;

/// Checks one machine and records its health on it; the step's end carries
/// the health for the task's summary.
pub(crate) async fn run_step(ctx: &StepContext, mut step: TaskStep) -> StepEnd {
    let name = step.machine_name.clone();
    let machine = match ctx.machine_row(step.machine_id).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            let why = format!("machine '{name}' no longer exists");
            ctx.say(&why).await;
            return StepEnd::finished(step, TaskState::Failed, Some(why));
        }
        Err(e) => {
            let why = format!("loading machine '{name}': {e}");
            return StepEnd::finished(step, TaskState::Failed, Some(why));
        }
    };
    step.state = TaskState::Executing;
    step.started_at = Some(now_ms());
    ctx.save(&step).await;

    let checked = tokio::select! {
        r = check(ctx, &machine) => r,
        _ = ctx.shutdown.cancelled() => return StepEnd::Interrupted,
        _ = ctx.cancel.cancelled() => {
            ctx.say("health check canceled").await;
            return StepEnd::finished(step, TaskState::Canceled, None);
        }
    };
    let at = now_ms();
    let (update, line) = match checked {
        Ok((caps, presented)) => {
            let tool = ctx.tool.as_ref().as_ref().ok();
            let tentacle = ctx.tentacle.as_ref().as_ref().ok();
            let (update, line) = judge(
                &caps,
                at,
                tool.map(|t| t.version.as_str()),
                tentacle.map(|t| t.version.as_str()),
            );
            // The certificate it presented (after a rotation: the new one).
            (update, format!("{line}; certificate {presented}"))
        }
        Err(reason) => {
            let reason = with_listening_hint(&machine, reason);
            (
                HealthUpdate {
                    status: HealthStatus::Unavailable,
                    reason: reason.clone(),
                    at,
                    tentacle_version: None,
                    tool_version: None,
                    os: None,
                    free_bytes: None,
                },
                format!("Unavailable: {reason}"),
            )
        }
    };
    if let Err(e) = ctx.store.record_health(machine.id, &update).await {
        tracing::error!("recording the health of {name}: {e}");
    }
    let (state, error) = match update.status {
        HealthStatus::Healthy => (TaskState::Success, None),
        status => (
            TaskState::Failed,
            Some(format!("{status:?}: {}", update.reason)),
        ),
    };
    StepEnd::Finished {
        step,
        state,
        error,
        health: Some(update.status),
        afterwards: None,
        release: None,
        // Stored with the step's end.
        lines: vec![ctx
            .log
            .server_line(&format!("{}: {line}", ctx.machine_name))],
    }
}

/// What to record for a machine that answered, and the log line. A missing or
/// outdated deployment tool (compared with `server_tool`, the version this
/// server pushes), and a tentacle older than `server_tentacle` (the one this
/// server carries), are warnings: the machine stays Healthy, and the reason
/// says what to do.
pub(crate) fn judge(
    caps: &CapabilitiesReply,
    at: i64,
    server_tool: Option<&str>,
    server_tentacle: Option<&str>,
) -> (HealthUpdate, String) {
    let free_mib = caps.home_free_bytes >> 20;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let (status, reason) = if caps.home_free_bytes < LOW_DISK_BYTES {
        (
            HealthStatus::Unhealthy,
            format!("low disk space: {free_mib} MiB free"),
        )
    } else {
        let warnings: Vec<String> = [
            tentacle_warning(&caps.tentacle_version, server_tentacle),
            tool_warning(&caps.tool_version, server_tool),
        ]
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect();
        (HealthStatus::Healthy, warnings.join("; "))
    };
    let mut line = format!(
        "{status:?} (tentacle {}, {} {} {}, {free_mib} MiB free",
        caps.tentacle_version, caps.os, caps.os_version, caps.arch
    );
    if !caps.tool_version.is_empty() {
        line.push_str(&format!(", deployment tool {}", caps.tool_version));
    }
    line.push(')');
    if !reason.is_empty() {
        if status == HealthStatus::Healthy {
            line.push_str(&format!("; warning: {reason}"));
        } else {
            line.push_str(&format!(": {reason}"));
        }
    }
    (
        HealthUpdate {
            status,
            reason,
            at,
            tentacle_version: non_empty(&caps.tentacle_version),
            tool_version: non_empty(&caps.tool_version),
            os: non_empty(format!("{} {} {}", caps.os, caps.os_version, caps.arch).trim()),
            free_bytes: i64::try_from(caps.home_free_bytes).ok(),
        },
        line,
    )
}

/// A listening machine that cannot be dialled (no answer) may sit behind NAT or a
/// firewall: say what to do about it.
fn with_listening_hint(machine: &Machine, reason: String) -> String {
    if machine.kind == octo_store::EndpointKind::Listening && reason.contains("timed out") {
        format!(
            "{reason}; if {} is behind NAT or a firewall that the server cannot cross, make it a polling tentacle (`tentacle register-with --comms-style TentacleActive --server-comms-address SERVER:10943 ... --force`)",
            machine.name
        )
    } else {
        reason
    }
}

/// "Tentacle upgrade available (X -> Y)" when the machine's tentacle is older
/// than the one this server carries, else "".
fn tentacle_warning(running: &str, carried: Option<&str>) -> String {
    match carried {
        Some(carried) if crate::tentacle_build::is_older(running, carried) => format!(
            "Tentacle upgrade available ({running} -> {carried}); `octopus tentacle upgrade` installs it"
        ),
        _ => String::new(),
    }
}

/// The warning about the machine's deployment tool, or "" when it is current.
fn tool_warning(installed: &str, server_tool: Option<&str>) -> String {
    use crate::tool::{compare, ToolStatus};
    let Some(server) = server_tool else {
        return String::new();
    };
    let fix = "the next deployment pushes it, or run `octopus calamari upgrade`";
    match compare(installed, server) {
        ToolStatus::Current => String::new(),
        ToolStatus::Missing => {
            format!("the deployment tool is not installed (the server has {server}); {fix}")
        }
        ToolStatus::Older(v) => {
            format!("the deployment tool {v} is older than the server's {server}; {fix}")
        }
        ToolStatus::Different(v) => {
            format!("the deployment tool {v} is not the server's version {server}; {fix}")
        }
    }
}

/// Connects and asks for capabilities within the policy's timeout; the reply and
/// the thumbprint the tentacle presented. Err names why not.
async fn check(
    ctx: &StepContext,
    machine: &Machine,
) -> Result<(CapabilitiesReply, octo_tls::Thumbprint), String> {
    let policy = match ctx.store.policy(machine.space_id, &machine.policy).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("reading machine policy '{}': {e}", machine.policy);
            None
        }
    };
    let timeout_s = policy
        .as_ref()
        .map_or(DEFAULT_TIMEOUT_S, |p| p.health_check_timeout_s)
        .max(1);
    let polling_wait_s = policy
        .as_ref()
        .map_or(DEFAULT_POLLING_WAIT_S, |p| p.polling_wait_s)
        .clamp(1, timeout_s);
    let timeout = Duration::from_secs(timeout_s.unsigned_abs());
    let deadline = Instant::now() + timeout;
    let endpoint = endpoint_of(machine).map_err(|e| e.to_string())?;
    let conn = match &endpoint {
        Endpoint::Polling {
            subscription_id, ..
        } => ctx
            .comms
            .polling()
            .wait_for(
                subscription_id,
                &endpoint.accepted(),
                Duration::from_secs(polling_wait_s.unsigned_abs()),
            )
            .await
            .map_err(|e| e.to_string())?,
        Endpoint::Listening { .. } => {
            match tokio::time::timeout_at(deadline, ctx.comms.connect(&endpoint)).await {
                Ok(r) => r.map_err(|e| e.to_string())?,
                Err(_) => {
                    return Err(format!(
                        "could not connect to {endpoint} within {timeout_s} s (the machine policy's health check timeout)"
                    ))
                }
            }
        }
    };
    let mut client = conn.capabilities();
    let call = client.get_capabilities(GetCapabilitiesRequest {});
    match tokio::time::timeout_at(deadline, call).await {
        Ok(Ok(reply)) => Ok((reply.into_inner(), conn.peer_thumbprint())),
        Ok(Err(status)) => Err(format!(
            "connected to {endpoint}, but GetCapabilities failed: {} ({:?})",
            status.message(),
            status.code()
        )),
        Err(_) => Err(format!(
            "connected to {endpoint}, but it did not answer GetCapabilities within {timeout_s} s (the machine policy's health check timeout)"
        )),
    }
}
