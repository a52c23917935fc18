//! One machine's part of each kind of task. A step runner gets the step as
//! stored and a [`StepContext`], does its work, and returns a [`StepEnd`]: the
//! engine records it.

pub(crate) mod deploy;
pub(crate) mod health;
pub(crate) mod script;
pub(crate) mod tentacle_upgrade;
mod transfer;

use std::future::Future;
use std::pin::Pin;

use octo_comms::Endpoint;
use octo_store::{HealthStatus, Machine, NewLogLine, TaskState, TaskStep};

use crate::context::StepContext;
use crate::endpoint_of;

/// Work that may follow a step's end (e.g. removing its work directory on the
/// tentacle): run after the outcome is recorded, so it never delays it.
pub(crate) type Afterwards = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a step ended.
// One value per step, moved once: not worth a box.
#[allow(clippy::large_enum_variant)]
pub(crate) enum StepEnd {
    /// The step is over: the engine records `state` and `error` on `step`.
    Finished {
        step: TaskStep,
        state: TaskState,
        error: Option<String>,
        /// The machine's health, for a health check's summary.
        health: Option<HealthStatus>,
        afterwards: Option<Afterwards>,
        /// Work to start, not to wait for, once the step's end is stored (the
        /// tentacle's cleanup, which frees the script's ticket): never before,
        /// so that a server restarted before the end was stored resumes the
        /// step and finds its script there, ended, rather than starting it
        /// again. Dropped, never run, when the end could not be stored.
        release: Option<Afterwards>,
        /// The step's last lines ("MACHINE: ..."), not stored yet: the engine
        /// stores them with the step's end, in one call where that saves one.
        lines: Vec<NewLogLine>,
    },
    /// The server is stopping: the step stays as stored, to resume.
    Interrupted,
}

impl StepEnd {
    pub(crate) fn finished(step: TaskStep, state: TaskState, error: Option<String>) -> Self {
        StepEnd::Finished {
            step,
            state,
            error,
            health: None,
            afterwards: None,
            release: None,
            lines: Vec::new(),
        }
    }

    /// The step failed for `why`, which is also written to the task's log.
    pub(crate) async fn failed(ctx: &StepContext, step: TaskStep, why: String) -> Self {
        ctx.say(format!("failed: {why}")).await;
        Self::finished(step, TaskState::Failed, Some(why))
    }
}

/// The step's machine and its endpoint, or why not (already written to the log).
pub(crate) async fn load_machine(
    ctx: &StepContext,
    step: &TaskStep,
) -> Result<(Machine, Endpoint), String> {
    // Its row alone: a step reaches its machine by endpoint, never by its lists.
    let why = match ctx.machine_row(step.machine_id).await {
        Ok(Some(m)) => match endpoint_of(&m) {
            Ok(ep) => return Ok((m, ep)),
            Err(e) => e.to_string(),
        },
        Ok(None) => format!("machine '{}' no longer exists", step.machine_name),
        Err(e) => format!("loading machine '{}': {e}", step.machine_name),
    };
    ctx.say(&why).await;
    Err(why)
}

/// The step's machine as it is now, read again before another attempt to
/// reach it: an attempt made with the endpoint read when the step started
/// would keep dialling an address the machine has left, or expect a
/// certificate it no longer presents, until the step gives up. Some(endpoint)
/// (written to the task's log) when the machine is now reached otherwise:
/// registered again (a new address or certificate) or rotating its certificate
/// since the step read it. None when unchanged, or when it cannot be read: the
/// step keeps what it has (a deleted machine's steps are canceled by its
/// deletion).
pub(crate) async fn machine_now(
    ctx: &StepContext,
    step: &TaskStep,
    current: &Endpoint,
) -> Option<Endpoint> {
    let name = &step.machine_name;
    let read = match ctx.machine_row(step.machine_id).await {
        Ok(Some(m)) => endpoint_of(&m).map_err(|e| e.to_string()),
        Ok(None) => return None,
        Err(e) => Err(e.to_string()),
    };
    match read {
        Ok(now) if now == *current => None,
        Ok(now) => {
            let also = match now.accepted().get(1) {
                Some(next) => format!(" (or {next}, the certificate it is rotating to)"),
                None => String::new(),
            };
            ctx.say(format!(
                "its registration changed since the step read it: reaching it at {now}, thumbprint {}{also}",
                now.thumbprint()
            ))
            .await;
            Some(now)
        }
        Err(e) => {
            tracing::warn!(
                machine = %name,
                "could not read the machine again before another attempt to reach it ({e}); trying {current} as before"
            );
            None
        }
    }
}
