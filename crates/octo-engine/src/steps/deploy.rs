//! Deployments and deployment tool upgrades: one machine's part of each.
//!
//! A deployment step, per machine:
//! 1. connect (a polling machine is waited for);
//! 2. make sure the server's deployment tool version is installed
//!    (`transfer::ensure_tool`: upload the binary, verified by hash, mode 0755, then
//!    the `.complete` marker);
//! 3. transfer the package to `HOME/Files/<id>@<version>@<sha256>.<format>`
//!    unless the tentacle has that file with that hash ("found in cache"); an
//!    interrupted transfer resumes from the bytes the tentacle holds;
//! 4. run `calamari deploy-package` through the script service (the shared
//!    script runner in `script`, so cancel, live logs, and resuming after a lost
//!    connection or a server restart work as for scripts), then record the
//!    output variables it printed.
//!
//! Steps 1–3 are idempotent, so a step interrupted anywhere is simply run
//! again; failures that retrying can fix are retried with backoff for up to
//! [`GIVE_UP_AFTER`].

use std::collections::BTreeMap;
use std::time::Duration;

use octo_api_types::Guidance;
use octo_comms::{Backoff, Connection, Endpoint};
use octo_proto::v1::{IsolationLevel, ScriptFile, ScriptSyntax, StartScriptRequest};
use octo_store::{now_ms, Package, TaskState, TaskStep};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;

use super::script::{self, ScriptEnd, ScriptSpec, ATTEMPT_SHIFT};
use super::transfer::{ensure_tool, transfer, PhaseError};
use super::{load_machine, machine_now, StepEnd};
use crate::context::StepContext;
use crate::tool::ToolBuild;

/// How long a step keeps trying to reach its machine before the script phase.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// Retry delays, jittered as a script step's are.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Stored arguments of a deployment task (what `POST /api/tasks/deploy` resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeployArgs {
    pub package_id: String,
    pub version: String,
    pub sha256: String,
    pub format: String,
    pub size: i64,
    pub environment: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// The names of the secret variables (their values are stored encrypted,
    /// apart from the arguments).
    #[serde(default)]
    pub sensitive_variables: Vec<String>,
    /// Extracted versions kept per package on each machine.
    pub retention: u32,
    /// A failed machine waits for a person's decision (retry, ignore, fail).
    #[serde(default)]
    pub guided_failure: bool,
}

impl DeployArgs {
    /// The package as the feed stores it (what the step transfers).
    fn package(&self) -> Package {
        Package {
            id: 0,
            space_id: 0,
            package_id: self.package_id.clone(),
            version: self.version.clone(),
            format: self.format.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            file_name: String::new(),
            uploaded_at: 0,
        }
    }
}

/// How the preparation of a step ended.
#[allow(clippy::large_enum_variant)] // One per step, moved once.
pub(crate) enum Prepared<T> {
    Ready(T),
    /// The step ended (failed, canceled) or the server stops.
    Stop(StepEnd),
}

/// Starts a step: its endpoint, the step marked Executing (kept as it is when
/// resumed), and the tool to push; or how the step ended.
async fn begin(
    ctx: &StepContext,
    step: &mut TaskStep,
) -> Result<(Endpoint, std::sync::Arc<ToolBuild>), StepEnd> {
    let (_, endpoint) = match load_machine(ctx, step).await {
        Ok(m) => m,
        Err(why) => {
            return Err(StepEnd::finished(
                step.clone(),
                TaskState::Failed,
                Some(why),
            ))
        }
    };
    if step.state != TaskState::Executing {
        step.state = TaskState::Executing;
        step.started_at = Some(now_ms());
        ctx.save(step).await;
    }
    match ctx.tool() {
        Ok(tool) => Ok((endpoint, tool)),
        Err(why) => Err(StepEnd::failed(ctx, step.clone(), why).await),
    }
}

/// Runs `work` on a connection to the machine until it succeeds, fails for
/// good, is canceled (nothing was started on the machine yet: the step ends
/// Canceled) or the server stops. Retryable failures are retried with backoff.
pub(crate) async fn with_retries<T, F>(
    ctx: &StepContext,
    step: &TaskStep,
    mut endpoint: Endpoint,
    mut work: F,
) -> Prepared<T>
where
    F: for<'c> FnMut(
        &'c Connection,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, PhaseError>> + Send + 'c>,
    >,
{
    let name = &step.machine_name;
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    let since = Instant::now();
    loop {
        let attempt = async {
            let conn = ctx.comms.connect(&endpoint).await.map_err(|e| PhaseError {
                retryable: e.is_retryable(),
                message: e.to_string(),
            })?;
            work(&conn).await
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = ctx.shutdown.cancelled() => return Prepared::Stop(StepEnd::Interrupted),
            _ = ctx.cancel.cancelled() => Err(PhaseError::fatal("")),
        };
        if ctx.cancel.is_cancelled() {
            ctx.say("canceled before the deployment started").await;
            return Prepared::Stop(StepEnd::finished(step.clone(), TaskState::Canceled, None));
        }
        let e = match result {
            Ok(v) => return Prepared::Ready(v),
            Err(e) => e,
        };
        // Registered again or rotating since the step read it: the machine is
        // tried again at once, as it is now.
        if let Some(now) = machine_now(ctx, step, &endpoint).await {
            ctx.say(format!(
                "{} (as it was registered); trying again at once",
                e.message
            ))
            .await;
            endpoint = now;
            continue;
        }
        if !e.retryable || since.elapsed() >= GIVE_UP_AFTER {
            let why = if e.retryable {
                format!(
                    "could not reach {name} for {} minutes: {}",
                    GIVE_UP_AFTER.as_secs() / 60,
                    e.message
                )
            } else {
                e.message
            };
            return Prepared::Stop(StepEnd::failed(ctx, step.clone(), why).await);
        }
        let delay = backoff.next_delay();
        ctx.say(format!(
            "{}; retrying in {:.1} s",
            e.message,
            delay.as_secs_f32()
        ))
        .await;
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Prepared::Stop(StepEnd::Interrupted),
            _ = ctx.cancel.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One machine's part of a deployment (see the module documentation).
pub(crate) async fn run_deploy_step(
    ctx: &StepContext,
    mut step: TaskStep,
    args: &DeployArgs,
    secrets: &BTreeMap<String, String>,
) -> StepEnd {
    let mut resumed = step.state == TaskState::Executing;
    let (endpoint, tool) = match begin(ctx, &mut step).await {
        Ok(r) => r,
        Err(end) => return end,
    };
    let package = args.package();
    // This node's copy of the content (filled from the database when the
    // package was pushed through another node), which transfers resume from.
    let local = match ctx.packages.local_copy(&package.sha256).await {
        Ok(path) => path,
        Err(e) => {
            let why = format!(
                "cannot read package {} {}: {e}",
                package.package_id, package.version
            );
            return StepEnd::failed(ctx, step, why).await;
        }
    };
    let prepared = with_retries(ctx, &step, endpoint, |conn| {
        let (ctx, tool, local, package) =
            (ctx.clone(), tool.clone(), local.clone(), package.clone());
        Box::pin(async move {
            ensure_tool(&ctx, conn, &tool).await?;
            transfer(&ctx, conn, &local, &package).await
        })
    })
    .await;
    let remote = match prepared {
        Prepared::Ready(path) => path,
        Prepared::Stop(end) => return end,
    };
    let request = deploy_request(args, secrets, &tool, &remote);
    let mut attempt =
        u32::try_from(u64::try_from(step.next_sequence).unwrap_or(0) >> ATTEMPT_SHIFT).unwrap_or(0);
    loop {
        let spec = ScriptSpec {
            request: request.clone(),
            label: "the deployment",
            record_outputs: true,
            attempt,
            hold_failure: args.guided_failure,
        };
        let (held, why) = match script::run_step(ctx, step, &spec, resumed).await {
            ScriptEnd::Held { step, why } => (step, why),
            end => return end.into(),
        };
        match ask_for_guidance(ctx, held, &why).await {
            Ok(mut next) => {
                attempt += 1;
                next.error = None;
                next.next_sequence =
                    i64::try_from(u64::from(attempt) << ATTEMPT_SHIFT).unwrap_or(i64::MAX);
                ctx.save(&next).await;
                ctx.say(format!(
                    "retrying the deployment (run {}) as asked",
                    attempt + 1
                ))
                .await;
                step = next;
                resumed = false;
            }
            Err(end) => return end,
        }
    }
}

/// Waits for a person's decision about a failed machine. Ok(step) to retry;
/// otherwise how the step ended (ignored, failed, canceled, or the server stops).
async fn ask_for_guidance(
    ctx: &StepContext,
    mut step: TaskStep,
    why: &str,
) -> Result<TaskStep, StepEnd> {
    let (task_id, name) = (step.task_id.clone(), step.machine_name.clone());
    step.error = Some(format!("waiting for guidance: {why}"));
    let announce = format!(
        "the deployment failed: {why}. Guided failure: waiting for a decision: \
         `octopus task guide {task_id} --machine {name} --action retry|ignore|fail`"
    );
    match ctx.wait_for_guidance(&step, announce).await {
        Some(Guidance::Retry) => Ok(step),
        Some(Guidance::Ignore) => {
            ctx.say("failure ignored as asked").await;
            let note = format!("failed, ignored by guided failure: {why}");
            Err(StepEnd::finished(step, TaskState::Success, Some(note)))
        }
        Some(Guidance::Fail) => {
            ctx.say("marked failed as asked").await;
            Err(StepEnd::finished(
                step,
                TaskState::Failed,
                Some(why.to_string()),
            ))
        }
        None if ctx.shutdown.is_cancelled() => Err(StepEnd::Interrupted),
        None => {
            ctx.say("canceled while waiting for guidance").await;
            Err(StepEnd::finished(
                step,
                TaskState::Canceled,
                Some(why.to_string()),
            ))
        }
    }
}

/// The StartScript request that runs `calamari deploy-package`.
/// The environment variable that carries a deployment's secret values (a JSON
/// object) to calamari: they never travel in a file.
pub const SENSITIVE_VARIABLES_ENV: &str = "OCTOPUS_SENSITIVE_VARIABLES";

fn deploy_request(
    args: &DeployArgs,
    secrets: &BTreeMap<String, String>,
    tool: &ToolBuild,
    remote_package: &str,
) -> StartScriptRequest {
    let body = format!(
        "exec \"$TentacleHome\"/{tool} deploy-package --package \"$TentacleHome\"/{package} \
         --package-id={id} --package-version={version} --environment={env} \
         --variables variables.json --retention {retention}\n",
        tool = sh_quote(&tool.remote_path()),
        package = sh_quote(remote_package),
        id = sh_quote(&args.package_id),
        version = sh_quote(&args.version),
        env = sh_quote(&args.environment),
        retention = args.retention,
    );
    let variables = serde_json::to_vec_pretty(&args.variables).unwrap_or_else(|_| b"{}".to_vec());
    let mut environment = std::collections::HashMap::new();
    if !secrets.is_empty() {
        let json = serde_json::to_string(secrets).unwrap_or_else(|_| "{}".into());
        environment.insert(SENSITIVE_VARIABLES_ENV.to_string(), json);
    }
    StartScriptRequest {
        script_body: body,
        syntax: ScriptSyntax::Bash as i32,
        isolation: IsolationLevel::Full as i32,
        files: vec![ScriptFile {
            name: "variables.json".into(),
            contents: variables,
        }],
        environment,
        ..StartScriptRequest::default()
    }
}

/// `s` as one POSIX shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One machine's part of `octopus calamari upgrade`: push the tool when the
/// machine does not have the server's version, then record its health.
pub(crate) async fn run_upgrade_step(ctx: &StepContext, mut step: TaskStep) -> StepEnd {
    let (endpoint, tool) = match begin(ctx, &mut step).await {
        Ok(r) => r,
        Err(end) => return end,
    };
    let done = with_retries(ctx, &step, endpoint, |conn| {
        let (ctx, tool) = (ctx.clone(), tool.clone());
        Box::pin(async move {
            ensure_tool(&ctx, conn, &tool).await?;
            let mut client = conn.capabilities();
            let caps = client
                .get_capabilities(octo_proto::v1::GetCapabilitiesRequest {})
                .await
                .map_err(|s| PhaseError::from_status("GetCapabilities", &s))?
                .into_inner();
            Ok(caps)
        })
    })
    .await;
    let caps = match done {
        Prepared::Ready(c) => c,
        Prepared::Stop(end) => return end,
    };
    let tentacle = ctx.tentacle.as_ref().as_ref().ok();
    let (update, line) = super::health::judge(
        &caps,
        now_ms(),
        Some(&tool.version),
        tentacle.map(|t| t.version.as_str()),
    );
    if let Err(e) = ctx.store.record_health(step.machine_id, &update).await {
        tracing::error!("recording the health of {}: {e}", step.machine_name);
    }
    ctx.say(line).await;
    StepEnd::finished(step, TaskState::Success, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("Prod"), "'Prod'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
