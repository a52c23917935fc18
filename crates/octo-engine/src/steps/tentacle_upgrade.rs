//! One machine's part of `octopus tentacle upgrade`: replace the tentacle's own
//! binary with the one this server carries, and make sure it came back.
//!
//! 1. connect and ask the tentacle its version and `boot_id`; a tentacle at the
//!    server's version (or newer) is left alone;
//! 2. upload the binary to `HOME/Upgrade/<version>/tentacle` through the file
//!    service (SHA-256 verified on the tentacle; resumed after an interruption);
//! 3. call `Upgrade`: the tentacle checks the file again, waits for running
//!    scripts (bounded: otherwise it refuses naming their tickets, and the step
//!    fails with that), swaps the binary in beside a copy of the old one and
//!    restarts;
//! 4. wait for the tentacle to answer with another `boot_id` (a restarted
//!    process): at the new version the server confirms the upgrade and the step
//!    succeeds; at any other version, or not back in time, the step fails with
//!    what the tentacle's upgrade record says (its guards put the previous
//!    binary back when the upgrade is not confirmed).
//!
//! A step resumed after a server restart finds the tentacle's upgrade record
//! Pending and goes straight to step 4.

use std::time::Duration;

use octo_comms::{Connection, Endpoint};
use octo_proto::v1::upgrade_state::Phase;
use octo_proto::v1::{
    CapabilitiesReply, ConfirmUpgradeRequest, GetCapabilitiesRequest, GetUpgradeStateRequest,
    RollbackUpgradeRequest, UpgradeRequest, UpgradeState,
};
use octo_store::{now_ms, TaskState, TaskStep};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;

use super::deploy::{with_retries, Prepared};
use super::transfer::{upload_file, upload_state, PhaseError};
use super::{load_machine, StepEnd};
use crate::context::StepContext;
use crate::tentacle_build::{is_older, TentacleBuild};

/// Bound on one call while waiting for the tentacle to come back.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Beyond the confirmation window: the tentacle's guards restore the previous
/// binary at its end (the guard process up to 10 s later), and the restored
/// tentacle needs time to start and connect.
const AFTER_DEADLINE: Duration = Duration::from_secs(45);
/// Pause between looks while the tentacle restarts.
const POLL: Duration = Duration::from_millis(300);
/// Pause after a look that found no tentacle answering while it restarts: a
/// refused dial costs little, and the new process may be up any moment.
const LOOK_AGAIN: Duration = Duration::from_millis(100);

/// Stored arguments of a tentacle upgrade task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TentacleUpgradeArgs {
    /// The version the server carried when the task was created.
    pub version: String,
    /// How long each tentacle waits for its running scripts before refusing.
    pub wait_for_scripts_s: u64,
    /// How long the restarted tentacle has to come back at the new version
    /// (the tentacle restores the previous binary after it).
    pub confirm_within_s: u64,
}

/// What the first phase found or did.
enum Started {
    /// Nothing to do: the tentacle runs this version (or a newer one).
    Current(CapabilitiesReply),
    /// The binary is swapped in (now or before a server restart); the tentacle
    /// restarts. `boot_id` is the process's before the restart.
    Restarting { from: String, boot_id: String },
}

/// One machine's part of a tentacle upgrade (see the module documentation).
pub(crate) async fn run_step(
    ctx: &StepContext,
    mut step: TaskStep,
    args: &TentacleUpgradeArgs,
) -> StepEnd {
    let (_, endpoint) = match load_machine(ctx, &step).await {
        Ok(m) => m,
        Err(why) => return StepEnd::finished(step, TaskState::Failed, Some(why)),
    };
    if step.state != TaskState::Executing {
        step.state = TaskState::Executing;
        step.started_at = Some(now_ms());
        ctx.save(&step).await;
    }
    let build = match ctx.tentacle.as_ref() {
        Ok(b) => b.clone(),
        Err(why) => {
            let why = format!("this server has no tentacle binary to upgrade to: {why}");
            return StepEnd::failed(ctx, step, why).await;
        }
    };
    if build.version != args.version {
        let why = format!(
            "the server's tentacle is now {} (the task was for {}); start the upgrade again",
            build.version, args.version
        );
        return StepEnd::failed(ctx, step, why).await;
    }
    let started = with_retries(ctx, &step, endpoint.clone(), |conn| {
        let (ctx, build, args) = (ctx.clone(), build.clone(), args.clone());
        Box::pin(async move { start(&ctx, conn, &build, &args).await })
    })
    .await;
    let (from, boot_id) = match started {
        Prepared::Ready(Started::Current(caps)) => {
            record_health(ctx, &step, &caps).await;
            return StepEnd::finished(step, TaskState::Success, None);
        }
        Prepared::Ready(Started::Restarting { from, boot_id }) => (from, boot_id),
        Prepared::Stop(end) => return end,
    };
    let confirm = Duration::from_secs(args.confirm_within_s);
    let deadline = Instant::now() + confirm + AFTER_DEADLINE;
    let restarting = Instant::now();
    let back = tokio::select! {
        r = come_back(ctx, &endpoint, &boot_id, deadline) => r,
        _ = ctx.shutdown.cancelled() => return StepEnd::Interrupted,
    };
    let (conn, caps) = match back {
        Some((conn, caps, attempts)) => {
            ctx.say(format!(
                "the tentacle answered from its new process {:.2} s after the swap ({attempts} attempt{})",
                restarting.elapsed().as_secs_f64(),
                if attempts == 1 { "" } else { "s" }
            ))
            .await;
            (conn, caps)
        }
        None => {
            let why = format!(
                "the tentacle did not come back within {} s of restarting into {}; its guard puts the previous binary ({from}) back when the upgrade is not confirmed; look at HOME/Upgrade/state.json and HOME/Logs on the machine",
                (confirm + AFTER_DEADLINE).as_secs(),
                build.version
            );
            return StepEnd::failed(ctx, step, why).await;
        }
    };
    if caps.tentacle_version == build.version {
        let mut client = conn.upgrades();
        let call = client.confirm_upgrade(ConfirmUpgradeRequest {
            version: build.version.clone(),
        });
        return match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(state)) => {
                ctx.say(state.into_inner().message).await;
                record_health(ctx, &step, &caps).await;
                StepEnd::finished(step, TaskState::Success, None)
            }
            Ok(Err(s)) => {
                let why = format!(
                    "the tentacle came back as {} but refused the confirmation: {}",
                    build.version,
                    s.message()
                );
                StepEnd::failed(ctx, step, why).await
            }
            Err(_) => {
                let why = format!(
                    "the tentacle came back as {} but did not answer the confirmation within {} s; unconfirmed, it puts the previous binary back",
                    build.version,
                    CALL_TIMEOUT.as_secs()
                );
                StepEnd::failed(ctx, step, why).await
            }
        };
    }
    // Back, but not at the new version: say what the tentacle knows.
    let state = settled_state(&conn).await;
    let mut why = format!(
        "the tentacle came back as {}, not {}",
        caps.tentacle_version, build.version
    );
    match state {
        Ok(s) if s.phase == Phase::Pending as i32 => {
            let reason = format!("{why}; the server rolled the upgrade back");
            let mut client = conn.upgrades();
            match client
                .rollback_upgrade(RollbackUpgradeRequest { reason })
                .await
            {
                Ok(s) => why = format!("{why}: {}", s.into_inner().message),
                Err(e) => why = format!("{why}; rolling back failed: {}", e.message()),
            }
        }
        Ok(s) if !s.message.is_empty() => why = format!("{why}: {}", s.message),
        Ok(_) => {}
        Err(e) => why = format!("{why} (its upgrade state is unknown: {e})"),
    }
    record_health(ctx, &step, &caps).await;
    StepEnd::failed(ctx, step, why).await
}

/// Connects, and unless the tentacle is current, uploads the binary and starts
/// the upgrade (see the module documentation).
async fn start(
    ctx: &StepContext,
    conn: &Connection,
    build: &TentacleBuild,
    args: &TentacleUpgradeArgs,
) -> Result<Started, PhaseError> {
    let caps = capabilities(conn).await?;
    let running = caps.tentacle_version.clone();
    let mut upgrades = conn.upgrades();
    let state = upgrades
        .get_upgrade_state(GetUpgradeStateRequest {})
        .await
        .map(tonic::Response::into_inner);
    if running == build.version || !is_older(&running, &build.version) {
        if let Ok(s) = &state {
            if s.phase == Phase::Pending as i32 && s.to_version == running {
                // Swapped before a server restart, back since: confirm it.
                upgrades
                    .confirm_upgrade(ConfirmUpgradeRequest {
                        version: running.clone(),
                    })
                    .await
                    .map_err(|s| PhaseError::from_status("ConfirmUpgrade", &s))?;
            }
        }
        ctx.say(if running == build.version {
            format!("tentacle {running} is the server's version; nothing to do")
        } else {
            format!(
                "tentacle {running} is not older than the server's {}; nothing to do",
                build.version
            )
        })
        .await;
        return Ok(Started::Current(caps));
    }
    let state = match state {
        Ok(s) => s,
        Err(s) if s.code() == tonic::Code::Unimplemented => {
            return Err(PhaseError::fatal(format!(
                "tentacle {running} cannot be upgraded from the server (it has no upgrade service); upgrade it with its package"
            )))
        }
        Err(s) => return Err(PhaseError::from_status("GetUpgradeState", &s)),
    };
    if state.phase == Phase::Pending as i32 && state.to_version == build.version {
        ctx.say(format!(
            "the upgrade to {} was started before; waiting for the tentacle",
            build.version
        ))
        .await;
        return Ok(Started::Restarting {
            from: running,
            boot_id: caps.boot_id,
        });
    }
    let remote = build.remote_path();
    let held = upload_state(conn, &remote).await?;
    if held.exists && held.sha256.eq_ignore_ascii_case(&build.sha256) {
        ctx.say(format!(
            "tentacle {} is on the machine already",
            build.version
        ))
        .await;
    } else {
        ctx.say(format!(
            "sending tentacle {} ({:.1} MiB)",
            build.version,
            build.size as f64 / (1 << 20) as f64
        ))
        .await;
        let resume_from = if held.exists { 0 } else { held.received_bytes };
        upload_file(
            conn,
            &build.path,
            &remote,
            &build.sha256,
            build.size,
            resume_from,
            0o755,
        )
        .await?;
        ctx.say("sent (SHA-256 verified by the tentacle)").await;
    }
    ctx.say(format!(
        "upgrading tentacle {running} to {} (waiting up to {} s for running scripts)",
        build.version, args.wait_for_scripts_s
    ))
    .await;
    let call = upgrades.upgrade(UpgradeRequest {
        path: remote,
        sha256: build.sha256.clone(),
        version: build.version.clone(),
        wait_for_scripts_ms: args.wait_for_scripts_s.saturating_mul(1000),
        confirm_within_ms: args.confirm_within_s.saturating_mul(1000),
    });
    let limit = Duration::from_secs(args.wait_for_scripts_s) + Duration::from_secs(120);
    let reply = match tokio::time::timeout(limit, call).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
            return Err(PhaseError::fatal(format!(
                "the tentacle refused the upgrade: {}",
                s.message()
            )))
        }
        Ok(Err(s)) => return Err(PhaseError::from_status("Upgrade", &s)),
        Err(_) => {
            return Err(PhaseError {
                message: format!(
                    "the tentacle did not answer Upgrade within {} s",
                    limit.as_secs()
                ),
                retryable: true,
            })
        }
    };
    ctx.say(format!(
        "tentacle {} swapped in at {} (the previous binary is kept beside it); restarting ({})",
        build.version, reply.binary, reply.restart
    ))
    .await;
    Ok(Started::Restarting {
        from: reply.previous_version,
        boot_id: caps.boot_id,
    })
}

async fn capabilities(conn: &Connection) -> Result<CapabilitiesReply, PhaseError> {
    let mut client = conn.capabilities();
    match tokio::time::timeout(
        CALL_TIMEOUT,
        client.get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(PhaseError::from_status("GetCapabilities", &s)),
        Err(_) => Err(PhaseError {
            message: format!(
                "the tentacle did not answer GetCapabilities within {} s",
                CALL_TIMEOUT.as_secs()
            ),
            retryable: true,
        }),
    }
}

/// Waits until the tentacle answers from a process other than `boot_id` (a
/// restart), until `deadline`; with how many attempts that took. A listening
/// tentacle that handed its socket to its new process answers the first
/// attempt once that process serves: the dial waits in the socket's queue
/// instead of being refused.
async fn come_back(
    ctx: &StepContext,
    endpoint: &Endpoint,
    boot_id: &str,
    deadline: Instant,
) -> Option<(Connection, CapabilitiesReply, u32)> {
    let mut attempts = 0;
    while Instant::now() < deadline {
        attempts += 1;
        let attempt = async {
            let conn = ctx.comms.connect(endpoint).await.ok()?;
            let caps = capabilities(&conn).await.ok()?;
            Some((conn, caps))
        };
        match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Some((conn, caps))) if caps.boot_id != boot_id => {
                return Some((conn, caps, attempts));
            }
            // The old process still answers: it closes this connection when it
            // stops, which is the moment to look again (or after POLL, if it
            // is slow to stop).
            Ok(Some((old, _))) => {
                tokio::select! {
                    () = old.closed() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            // Not answering (between processes, without a socket handed over).
            _ => tokio::time::sleep(LOOK_AGAIN).await,
        }
    }
    None
}

/// The tentacle's upgrade state, waiting a little for a guard that is still
/// writing it (phase Pending).
async fn settled_state(conn: &Connection) -> Result<UpgradeState, String> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let mut client = conn.upgrades();
        let state = match tokio::time::timeout(
            CALL_TIMEOUT,
            client.get_upgrade_state(GetUpgradeStateRequest {}),
        )
        .await
        {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(s)) => return Err(s.message().to_string()),
            Err(_) => return Err("no answer".into()),
        };
        if state.phase != Phase::Pending as i32 || Instant::now() >= until {
            return Ok(state);
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn record_health(ctx: &StepContext, step: &TaskStep, caps: &CapabilitiesReply) {
    let tool = ctx.tool.as_ref().as_ref().ok();
    let tentacle = ctx.tentacle.as_ref().as_ref().ok();
    let (update, line) = super::health::judge(
        caps,
        now_ms(),
        tool.map(|t| t.version.as_str()),
        tentacle.map(|t| t.version.as_str()),
    );
    if let Err(e) = ctx.store.record_health(step.machine_id, &update).await {
        tracing::error!("recording the health of {}: {e}", step.machine_name);
    }
    ctx.say(line).await;
}
