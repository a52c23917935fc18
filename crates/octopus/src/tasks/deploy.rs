//! Deployments and deployment tool upgrades: one machine's part of each.
//!
//! A deployment step, per machine:
//! 1. connect (a polling machine is waited for);
//! 2. make sure the server's deployment tool version is installed
//!    ([`ensure_tool`]: upload the binary, verified by hash, mode 0755, then
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use octo_comms::{Connection, Endpoint};
use octo_proto::v1::{
    upload_request, FileChunk, IsolationLevel, ScriptFile, ScriptSyntax, StartScriptRequest,
    UploadFinish, UploadRequest, UploadStart, UploadStateRequest,
};
use octo_store::{Machine, Package, TaskState, TaskStep};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::engine::Engine;
use super::script::{self, ScriptSpec, ATTEMPT_SHIFT};
use crate::api::endpoint_of;
use crate::server::now_ms;
use crate::tool::ToolBuild;

/// How long a step keeps trying to reach its machine before the script phase.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Upload chunk size (well under tonic's 4 MiB message limit).
const CHUNK: usize = 256 << 10;
/// Bound on single unary file calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Stored arguments of a deployment task (what `POST /api/tasks/deploy` resolved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct DeployArgs {
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
    /// Extracted versions kept per package on each machine.
    pub retention: u32,
    /// A failed machine waits for a person's decision (retry, ignore, fail).
    #[serde(default)]
    pub guided_failure: bool,
}

/// A person's decision for a machine whose deployment failed under guided failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Guidance {
    /// Run the deployment on the machine again.
    Retry,
    /// Record the machine as succeeded (the failure noted) and go on.
    Ignore,
    /// Record the machine as failed.
    Fail,
}

/// A phase failure: what happened, and whether trying again may help.
#[derive(Debug)]
pub(super) struct PhaseError {
    pub message: String,
    pub retryable: bool,
}

impl PhaseError {
    fn fatal(message: impl Into<String>) -> Self {
        PhaseError {
            message: message.into(),
            retryable: false,
        }
    }

    fn from_status(what: &str, status: &tonic::Status) -> Self {
        PhaseError {
            message: format!("{what}: {} ({:?})", status.message(), status.code()),
            retryable: octo_comms::is_retryable(status),
        }
    }
}

/// How the preparation of a step ended.
enum Prepared<T> {
    Ready(T),
    /// The step is final (recorded).
    Done,
    /// The server is stopping: leave the step as it is.
    Shutdown,
}

/// The machine of a step, or the step failed (recorded).
async fn load_machine(eng: &Arc<Engine>, step: &mut TaskStep) -> Option<(Machine, Endpoint)> {
    let task_id = step.task_id.clone();
    let why = match eng.state.store.machine_by_id(step.machine_id).await {
        Ok(Some(m)) => match endpoint_of(&m) {
            Ok(ep) => return Some((m, ep)),
            Err(e) => e.to_string(),
        },
        Ok(None) => format!("machine '{}' no longer exists", step.machine_name),
        Err(e) => format!("loading machine '{}': {e}", step.machine_name),
    };
    eng.server_log(&task_id, format!("{}: {why}", step.machine_name))
        .await;
    eng.finish_step(step, TaskState::Failed, Some(why)).await;
    None
}

/// Starts a step: its machine and endpoint, the step marked Executing (kept as
/// it is when resumed), and the tool to push; None when the step failed (recorded).
async fn begin(
    eng: &Arc<Engine>,
    step: &mut TaskStep,
) -> Option<(Machine, Endpoint, Arc<ToolBuild>)> {
    let (machine, endpoint) = load_machine(eng, step).await?;
    if step.state != TaskState::Executing {
        step.state = TaskState::Executing;
        step.started_at = Some(now_ms());
        eng.save_step(step).await;
    }
    match tool_of(eng) {
        Ok(tool) => Some((machine, endpoint, tool)),
        Err(e) => {
            eng.server_log(
                &step.task_id,
                format!("{}: failed: {}", step.machine_name, e.message),
            )
            .await;
            eng.finish_step(step, TaskState::Failed, Some(e.message))
                .await;
            None
        }
    }
}

/// Runs `work` on a connection to the machine until it succeeds, fails for
/// good, is canceled (nothing was started on the machine yet: the step ends
/// Canceled) or the server stops. Retryable failures are retried with backoff.
async fn with_retries<T, F>(
    eng: &Arc<Engine>,
    step: &mut TaskStep,
    endpoint: &Endpoint,
    cancel: &CancellationToken,
    mut work: F,
) -> Prepared<T>
where
    F: for<'c> FnMut(
        &'c Connection,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<T, PhaseError>> + Send + 'c>,
    >,
{
    let name = step.machine_name.clone();
    let task_id = step.task_id.clone();
    let mut delay = RETRY_FIRST;
    let since = Instant::now();
    loop {
        let attempt = async {
            let conn = eng
                .state
                .comms
                .connect(endpoint)
                .await
                .map_err(|e| PhaseError {
                    retryable: e.is_retryable(),
                    message: e.to_string(),
                })?;
            work(&conn).await
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = eng.shutdown.cancelled() => return Prepared::Shutdown,
            _ = cancel.cancelled() => Err(PhaseError::fatal("")),
        };
        if cancel.is_cancelled() {
            eng.server_log(
                &task_id,
                format!("{name}: canceled before the deployment started"),
            )
            .await;
            eng.finish_step(step, TaskState::Canceled, None).await;
            return Prepared::Done;
        }
        let e = match result {
            Ok(v) => return Prepared::Ready(v),
            Err(e) => e,
        };
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
            eng.server_log(&task_id, format!("{name}: failed: {why}"))
                .await;
            eng.finish_step(step, TaskState::Failed, Some(why)).await;
            return Prepared::Done;
        }
        eng.server_log(
            &task_id,
            format!(
                "{name}: {}; retrying in {:.1} s",
                e.message,
                delay.as_secs_f32()
            ),
        )
        .await;
        tokio::select! {
            _ = eng.shutdown.cancelled() => return Prepared::Shutdown,
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

/// The server's tool, or why there is none (a fatal phase error).
fn tool_of(eng: &Engine) -> Result<Arc<ToolBuild>, PhaseError> {
    match eng.state.tool.as_ref() {
        Ok(t) => Ok(Arc::new(t.clone())),
        Err(why) => Err(PhaseError::fatal(format!(
            "this server has no deployment tool to push: {why}"
        ))),
    }
}

/// One machine's part of a deployment (see the module documentation).
pub(super) async fn run_deploy_step(
    eng: &Arc<Engine>,
    mut step: TaskStep,
    args: &DeployArgs,
    cancel: &CancellationToken,
) {
    let resumed = step.state == TaskState::Executing;
    let Some((_machine, endpoint, tool)) = begin(eng, &mut step).await else {
        return;
    };
    let package = Package {
        id: 0,
        package_id: args.package_id.clone(),
        version: args.version.clone(),
        format: args.format.clone(),
        sha256: args.sha256.clone(),
        size: args.size,
        file_name: String::new(),
        uploaded_at: 0,
    };
    let local = crate::packages::package_file(&eng.state.data, &package);
    let (task_id, name) = (step.task_id.clone(), step.machine_name.clone());
    let prepared = with_retries(eng, &mut step, &endpoint, cancel, |conn| {
        let (eng, tool, local, package) =
            (eng.clone(), tool.clone(), local.clone(), package.clone());
        let (task_id, name) = (task_id.clone(), name.clone());
        Box::pin(async move {
            ensure_tool(&eng, conn, &tool, &task_id, &name).await?;
            transfer(&eng, conn, &local, &package, &task_id, &name).await
        })
    })
    .await;
    let remote = match prepared {
        Prepared::Ready(path) => path,
        Prepared::Done | Prepared::Shutdown => return,
    };
    let request = deploy_request(args, &tool, &remote);
    let mut attempt =
        u32::try_from(u64::try_from(step.next_sequence).unwrap_or(0) >> ATTEMPT_SHIFT).unwrap_or(0);
    let mut resumed = resumed;
    loop {
        let spec = ScriptSpec {
            request: request.clone(),
            label: "the deployment",
            record_outputs: true,
            attempt,
            hold_failure: args.guided_failure,
        };
        let Some((held, why)) = script::run_step(eng, step, &spec, cancel, resumed).await else {
            return;
        };
        match ask_for_guidance(eng, held, &why, cancel).await {
            Some((next, Guidance::Retry)) => {
                attempt += 1;
                step = next;
                step.error = None;
                step.next_sequence =
                    i64::try_from(u64::from(attempt) << ATTEMPT_SHIFT).unwrap_or(i64::MAX);
                eng.save_step(&step).await;
                eng.server_log(
                    &task_id,
                    format!(
                        "{name}: retrying the deployment (run {}) as asked",
                        attempt + 1
                    ),
                )
                .await;
                resumed = false;
            }
            Some(_) | None => return,
        }
    }
}

/// Waits for a person's decision about a failed machine; records Ignore and Fail
/// (and a cancel) itself. Returns the step and the decision, or None when the
/// step is final or the server stops.
async fn ask_for_guidance(
    eng: &Arc<Engine>,
    mut step: TaskStep,
    why: &str,
    cancel: &CancellationToken,
) -> Option<(TaskStep, Guidance)> {
    let (task_id, name) = (step.task_id.clone(), step.machine_name.clone());
    step.error = Some(format!("waiting for guidance: {why}"));
    let rx = eng.await_guidance(&task_id, step.machine_id);
    eng.save_step(&step).await;
    eng.server_log(
        &task_id,
        format!(
            "{name}: the deployment failed: {why}. Guided failure: waiting for a decision: \
             `octopus task guide {task_id} --machine {name} --action retry|ignore|fail`"
        ),
    )
    .await;
    let decision = tokio::select! {
        d = rx => d.ok(),
        _ = cancel.cancelled() => None,
        _ = eng.shutdown.cancelled() => {
            eng.forget_guidance(&task_id, step.machine_id);
            return None;
        }
    };
    eng.forget_guidance(&task_id, step.machine_id);
    match decision {
        Some(Guidance::Retry) => Some((step, Guidance::Retry)),
        Some(Guidance::Ignore) => {
            eng.server_log(&task_id, format!("{name}: failure ignored as asked"))
                .await;
            let note = format!("failed, ignored by guided failure: {why}");
            eng.finish_step(&mut step, TaskState::Success, Some(note))
                .await;
            None
        }
        Some(Guidance::Fail) => {
            eng.server_log(&task_id, format!("{name}: marked failed as asked"))
                .await;
            eng.finish_step(&mut step, TaskState::Failed, Some(why.to_string()))
                .await;
            None
        }
        None => {
            eng.server_log(
                &task_id,
                format!("{name}: canceled while waiting for guidance"),
            )
            .await;
            eng.finish_step(&mut step, TaskState::Canceled, Some(why.to_string()))
                .await;
            None
        }
    }
}

/// The StartScript request that runs `calamari deploy-package`.
fn deploy_request(args: &DeployArgs, tool: &ToolBuild, remote_package: &str) -> StartScriptRequest {
    let body = format!(
        "exec \"$TentacleHome\"/{tool} deploy-package --package \"$TentacleHome\"/{package} \
         --package-id {id} --package-version {version} --environment {env} \
         --variables variables.json --retention {retention}\n",
        tool = sh_quote(&tool.remote_path()),
        package = sh_quote(remote_package),
        id = sh_quote(&args.package_id),
        version = sh_quote(&args.version),
        env = sh_quote(&args.environment),
        retention = args.retention,
    );
    let variables = serde_json::to_vec_pretty(&args.variables).unwrap_or_else(|_| b"{}".to_vec());
    StartScriptRequest {
        script_body: body,
        syntax: ScriptSyntax::Bash as i32,
        isolation: IsolationLevel::Full as i32,
        files: vec![ScriptFile {
            name: "variables.json".into(),
            contents: variables,
        }],
        ..StartScriptRequest::default()
    }
}

/// `s` as one POSIX shell word.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One machine's part of `octopus calamari upgrade`: push the tool when the
/// machine does not have the server's version, then record its health.
pub(super) async fn run_upgrade_step(
    eng: &Arc<Engine>,
    mut step: TaskStep,
    cancel: &CancellationToken,
) {
    let Some((machine, endpoint, tool)) = begin(eng, &mut step).await else {
        return;
    };
    let (task_id, name) = (step.task_id.clone(), step.machine_name.clone());
    let done = with_retries(eng, &mut step, &endpoint, cancel, |conn| {
        let (eng, tool) = (eng.clone(), tool.clone());
        let (task_id, name) = (task_id.clone(), name.clone());
        Box::pin(async move {
            ensure_tool(&eng, conn, &tool, &task_id, &name).await?;
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
        Prepared::Done | Prepared::Shutdown => return,
    };
    let (update, line) = super::health::judge(&caps, now_ms(), Some(&tool.version));
    if let Err(e) = eng.state.store.record_health(machine.id, &update).await {
        tracing::error!("recording the health of {}: {e}", machine.name);
    }
    eng.server_log(&step.task_id, format!("{}: {line}", step.machine_name))
        .await;
    eng.finish_step(&mut step, TaskState::Success, None).await;
}

/// Makes sure the machine has the server's tool version, verified and marked
/// complete. Returns whether it was pushed now.
pub(super) async fn ensure_tool(
    eng: &Engine,
    conn: &Connection,
    tool: &ToolBuild,
    task_id: &str,
    name: &str,
) -> Result<bool, PhaseError> {
    let binary = upload_state(conn, &tool.remote_path()).await?;
    let marker = upload_state(conn, &tool.remote_marker()).await?;
    if binary.exists && binary.sha256.eq_ignore_ascii_case(&tool.sha256) && marker.exists {
        eng.server_log(
            task_id,
            format!("{name}: deployment tool {} is installed", tool.version),
        )
        .await;
        return Ok(false);
    }
    eng.server_log(
        task_id,
        format!(
            "{name}: pushing deployment tool {} ({:.1} MiB)",
            tool.version,
            tool.size as f64 / (1 << 20) as f64
        ),
    )
    .await;
    let started = Instant::now();
    let resume_from = if binary.exists {
        0
    } else {
        binary.received_bytes
    };
    upload_file(
        conn,
        &tool.path,
        &tool.remote_path(),
        &tool.sha256,
        tool.size,
        resume_from,
        0o755,
    )
    .await?;
    // Only now, with the binary verified in place, does the version count.
    let marker_body = format!("{}\n", tool.sha256);
    upload_bytes(conn, &tool.remote_marker(), marker_body.into_bytes()).await?;
    eng.server_log(
        task_id,
        format!(
            "{name}: deployment tool {} installed in {:.1} s (SHA-256 verified)",
            tool.version,
            started.elapsed().as_secs_f32()
        ),
    )
    .await;
    Ok(true)
}

/// Puts the package in the machine's `Files/` unless it is there; returns its
/// path relative to the tentacle's home.
async fn transfer(
    eng: &Engine,
    conn: &Connection,
    local: &std::path::Path,
    package: &Package,
    task_id: &str,
    name: &str,
) -> Result<String, PhaseError> {
    let remote = format!(
        "Files/{}@{}@{}.{}",
        package.package_id,
        package.version,
        package.sha256.to_ascii_lowercase(),
        package.format
    );
    let state = upload_state(conn, &remote).await?;
    let size = u64::try_from(package.size).unwrap_or(0);
    let mib = size as f64 / (1 << 20) as f64;
    if state.exists && state.sha256.eq_ignore_ascii_case(&package.sha256) {
        eng.server_log(
            task_id,
            format!(
                "{name}: package {} {} found in cache ({mib:.1} MiB, SHA-256 matches)",
                package.package_id, package.version
            ),
        )
        .await;
        return Ok(remote);
    }
    let resume_from = if state.exists {
        0
    } else {
        state.received_bytes
    };
    let started = Instant::now();
    if resume_from > 0 && resume_from < size {
        eng.server_log(
            task_id,
            format!(
                "{name}: resuming the transfer of {} {} at {:.1} of {mib:.1} MiB",
                package.package_id,
                package.version,
                resume_from as f64 / (1 << 20) as f64
            ),
        )
        .await;
    } else {
        eng.server_log(
            task_id,
            format!(
                "{name}: uploading package {} {} ({mib:.1} MiB)",
                package.package_id, package.version
            ),
        )
        .await;
    }
    let resume_from = if resume_from <= size { resume_from } else { 0 };
    upload_file(conn, local, &remote, &package.sha256, size, resume_from, 0).await?;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    let moved = (size - resume_from) as f64 / (1 << 20) as f64;
    eng.server_log(
        task_id,
        format!(
            "{name}: package uploaded in {secs:.2} s ({:.0} MiB/s, SHA-256 verified by the tentacle)",
            moved / secs
        ),
    )
    .await;
    Ok(remote)
}

async fn upload_state(
    conn: &Connection,
    path: &str,
) -> Result<octo_proto::v1::UploadStateReply, PhaseError> {
    let mut client = conn.files();
    match tokio::time::timeout(
        CALL_TIMEOUT,
        client.get_upload_state(UploadStateRequest { path: path.into() }),
    )
    .await
    {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(PhaseError::from_status(
            &format!("asking the tentacle about {path}"),
            &s,
        )),
        Err(_) => Err(PhaseError {
            message: format!(
                "the tentacle did not answer about {path} within {} s",
                CALL_TIMEOUT.as_secs()
            ),
            retryable: true,
        }),
    }
}

/// Uploads a local file from `resume_from` (the tentacle verifies the whole
/// file's SHA-256 before it moves it into place).
async fn upload_file(
    conn: &Connection,
    local: &std::path::Path,
    remote: &str,
    sha256: &str,
    size: u64,
    resume_from: u64,
    mode: u32,
) -> Result<(), PhaseError> {
    let mut file = tokio::fs::File::open(local).await.map_err(|e| {
        PhaseError::fatal(format!(
            "cannot read {} on the server: {e}",
            local.display()
        ))
    })?;
    if resume_from > 0 {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(resume_from))
            .await
            .map_err(|e| PhaseError::fatal(format!("cannot seek in {}: {e}", local.display())))?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadRequest>(8);
    let start = UploadRequest {
        part: Some(upload_request::Part::Start(UploadStart {
            path: remote.into(),
            total_length: size,
            resume_from,
            overwrite: true,
            mode,
        })),
    };
    let local_path: PathBuf = local.to_path_buf();
    let finish_sha = sha256.to_string();
    let reader = tokio::spawn(async move {
        if tx.send(start).await.is_err() {
            return Ok(());
        }
        let mut offset = resume_from;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            let chunk = UploadRequest {
                part: Some(upload_request::Part::Chunk(FileChunk {
                    offset,
                    data: buf.into(),
                })),
            };
            offset += n as u64;
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
        let finish = UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: finish_sha,
                total_length: offset,
            })),
        };
        let _ = tx.send(finish).await;
        Ok::<(), std::io::Error>(())
    });
    let mut client = conn.files();
    let reply = client
        .upload_file(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(PhaseError::fatal(format!(
                "reading {} on the server failed: {e}",
                local_path.display()
            )))
        }
        Err(e) => return Err(PhaseError::fatal(format!("the upload reader failed: {e}"))),
    }
    reply
        .map(|_| ())
        .map_err(|s| PhaseError::from_status(&format!("uploading {remote}"), &s))
}

/// Uploads a small file from memory (overwriting).
async fn upload_bytes(conn: &Connection, remote: &str, data: Vec<u8>) -> Result<(), PhaseError> {
    use sha2::{Digest, Sha256};
    let sha = crate::tool::hex_upper(&Sha256::digest(&data));
    let total = data.len() as u64;
    let parts = vec![
        UploadRequest {
            part: Some(upload_request::Part::Start(UploadStart {
                path: remote.into(),
                total_length: total,
                resume_from: 0,
                overwrite: true,
                mode: 0,
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Chunk(FileChunk {
                offset: 0,
                data: data.into(),
            })),
        },
        UploadRequest {
            part: Some(upload_request::Part::Finish(UploadFinish {
                sha256: sha,
                total_length: total,
            })),
        },
    ];
    let mut client = conn.files();
    client
        .upload_file(tokio_stream::iter(parts))
        .await
        .map(|_| ())
        .map_err(|s| PhaseError::from_status(&format!("uploading {remote}"), &s))
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
