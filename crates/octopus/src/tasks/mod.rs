//! Server tasks: health checks and script runs, the engine that runs them and
//! their API.
//!
//! - `engine`: the per-server engine: which tasks run, their cancel tokens, the
//!   in-memory change notifiers that live log streams wait on, restart resume and
//!   scheduled health checks.
//! - `script`: one machine's part of a script task (start, stream the log,
//!   resume across lost connections, cancel).
//! - `health`: one machine's part of a health check.
//! - `sse`: `GET /api/tasks/{id}/log/stream`, server-sent events.
//!
//! # API
//!
//! - `POST /api/tasks/script`: `{"script", "syntax", "isolation", "machines",
//!   "environment", "role", "tenant"}` → 201 `{"task", "steps"}`.
//! - `POST /api/tasks/health`: `{"machines"?, "environment"?}` → 201 `{"task", "steps"}`.
//! - `GET /api/tasks?limit=N` → tasks, newest first.
//! - `GET /api/tasks/{id}` → `{"task", "steps"}`.
//! - `GET /api/tasks/{id}/log?after=ID&limit=N` → log lines with id > after.
//! - `GET /api/tasks/{id}/log/stream?after=ID` → events `log`, `task`, `end`.
//! - `POST /api/tasks/{id}/cancel` → 202 `{"task"}`.
//!
//! # Durability
//!
//! Everything a task has done is in the store: its steps' states, and for each
//! step the next tentacle log sequence not yet stored. A lost connection or a
//! server restart resumes from there (StartScript is idempotent on the step's
//! ticket; StreamLogs resumes from the sequence), so no line is lost or repeated.

mod deploy;
mod engine;
mod health;
mod outputs;
mod script;
mod sse;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use octo_store::{Machine, MachineFilter, Store, StoreError, Task, TaskLogLine, TaskStep};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::api::{ApiError, ApiJson, ErrorBody};
use crate::server::{now_ms, AppState};

pub(crate) use deploy::{DeployArgs, Guidance};
pub use engine::{spawn_background, Engine};

/// Steps of one task that run at once.
pub const MAX_PARALLEL_STEPS: usize = 20;

/// Task kind of script runs.
const KIND_SCRIPT: &str = "Script";
/// Task kind of health checks.
const KIND_HEALTH: &str = "Health";
/// Task kind of package deployments.
const KIND_DEPLOY: &str = "Deploy";
/// Task kind of deployment tool upgrades.
const KIND_UPGRADE: &str = "Upgrade";
/// Extracted versions of a package kept per machine unless the request says otherwise.
const DEFAULT_RETENTION: u32 = 3;

/// Default and largest page sizes.
const DEFAULT_TASK_LIMIT: i64 = 50;
const MAX_TASK_LIMIT: i64 = 1000;
const DEFAULT_LOG_LIMIT: i64 = 1000;
const MAX_LOG_LIMIT: i64 = 10_000;

/// The task endpoints, merged into the authenticated API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/tasks", get(list_tasks))
        .route("/api/tasks/script", post(create_script_task))
        .route("/api/tasks/health", post(create_health_task))
        .route("/api/tasks/deploy", post(create_deploy_task))
        .route("/api/tasks/upgrade", post(create_upgrade_task))
        .route("/api/tasks/{id}", get(get_task))
        .route("/api/tasks/{id}/log", get(get_log))
        .route("/api/tasks/{id}/log/stream", get(sse::stream_log))
        .route("/api/tasks/{id}/cancel", post(cancel_task))
        .route("/api/tasks/{id}/guidance", post(guide_task))
}

/// Task API errors are the API's errors.
pub(crate) type TaskApiError = ApiError;

pub(crate) fn task_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "task '{id}' does not exist; `GET /api/tasks` lists tasks"
    ))
}

type TaskResult<T> = Result<T, TaskApiError>;

/// A task and its steps, as the API returns them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct TaskView {
    pub task: Task,
    pub steps: Vec<TaskStep>,
}

/// The task and its steps; 404 when there is no such task.
async fn load_view(store: &dyn Store, id: &str) -> TaskResult<TaskView> {
    let task = store.task(id).await?.ok_or_else(|| task_not_found(id))?;
    let steps = store.task_steps(id).await?;
    Ok(TaskView { task, steps })
}

/// Script interpreter, as the API names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Syntax {
    #[default]
    Bash,
    Sh,
    Python3,
}

/// Script isolation, as the API names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Isolation {
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
pub(crate) struct ScriptRequest {
    pub script: String,
    #[serde(default)]
    pub syntax: Syntax,
    #[serde(default)]
    pub isolation: Isolation,
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
}

/// `POST /api/tasks/health`: exactly `machines` when given, otherwise those in
/// `environment`, otherwise all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthRequest {
    #[serde(default)]
    machines: Vec<String>,
    #[serde(default)]
    environment: Option<String>,
}

/// Runs a script on machines.
#[utoipa::path(
    post,
    path = "/api/tasks/script",
    tag = "tasks",
    security(("api_key" = [])),
    request_body = ScriptRequest,
    responses(
        (status = 201, description = "Created and started", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches (the message says why)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_script_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ScriptRequest>,
) -> TaskResult<impl IntoResponse> {
    if req.script.trim().is_empty() {
        return Err(TaskApiError::bad_request(
            "field `script` must not be empty",
        ));
    }
    let filter = MachineFilter {
        names: vec![],
        environments: non_empty(&req.environment),
        roles: non_empty(&req.role),
        tenants: non_empty(&req.tenant),
    };
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = serde_json::to_value(&req)
        .map_err(|e| TaskApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let description = format!(
        "Run a {} script on {}",
        serde_json::to_value(req.syntax)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        machine_list(&machines)
    );
    create_and_start(&s, KIND_SCRIPT, &description, &arguments, &machines).await
}

/// Checks the health of machines.
#[utoipa::path(
    post,
    path = "/api/tasks/health",
    tag = "tasks",
    security(("api_key" = [])),
    request_body = HealthRequest,
    responses(
        (status = 201, description = "Created and started", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches (the message says why)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_health_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<HealthRequest>,
) -> TaskResult<impl IntoResponse> {
    let filter = MachineFilter {
        environments: non_empty(&req.environment),
        ..MachineFilter::default()
    };
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = serde_json::to_value(&req)
        .map_err(|e| TaskApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let description = format!("Check the health of {}", machine_list(&machines));
    create_and_start(&s, KIND_HEALTH, &description, &arguments, &machines).await
}

/// `POST /api/tasks/deploy`: deploy a package from the feed to the machines of
/// an environment (narrowed by `role` and `tenant` when given).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeployRequest {
    pub package_id: String,
    /// Default: the highest version in the feed.
    #[serde(default)]
    pub version: Option<String>,
    pub environment: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// Variables for substitution and scripts, by name.
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    /// Extracted versions kept per package on each machine (default 3).
    #[serde(default)]
    pub retention: Option<u32>,
    /// A machine whose deployment fails waits for a decision
    /// (`POST /api/tasks/{id}/guidance`) instead of failing.
    #[serde(default)]
    pub guided_failure: bool,
}

/// Deploys a package.
#[utoipa::path(
    post,
    path = "/api/tasks/deploy",
    tag = "tasks",
    security(("api_key" = [])),
    request_body = DeployRequest,
    responses(
        (status = 201, description = "Created and started", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such package or version (the message lists what exists)", body = ErrorBody),
        (status = 422, description = "No machine matches, or the server has no deployment tool (the message says why)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_deploy_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<DeployRequest>,
) -> TaskResult<impl IntoResponse> {
    if req.environment.trim().is_empty() {
        return Err(TaskApiError::bad_request(
            "field `environment` must name the environment to deploy to",
        ));
    }
    let retention = req.retention.unwrap_or(DEFAULT_RETENTION);
    if retention == 0 {
        return Err(TaskApiError::bad_request(
            "field `retention` must be at least 1 (the version just deployed is always kept)",
        ));
    }
    if let Some(name) = req.variables.keys().find(|k| k.trim().is_empty()) {
        return Err(TaskApiError::bad_request(format!(
            "variable name '{name}' is empty"
        )));
    }
    let package = crate::packages::find(
        s.store.as_ref(),
        req.package_id.trim(),
        req.version.as_deref(),
    )
    .await?;
    if let Err(why) = s.tool.as_ref() {
        return Err(TaskApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("this server cannot deploy: {why}"),
        ));
    }
    let file = crate::packages::package_file(&s.data, &package);
    if !file.is_file() {
        return Err(TaskApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the file of package {} {} is missing from {}; push it again with `octopus package push --replace`",
                package.package_id,
                package.version,
                file.display()
            ),
        ));
    }
    let filter = MachineFilter {
        names: vec![],
        environments: vec![req.environment.trim().to_string()],
        roles: non_empty(&req.role),
        tenants: non_empty(&req.tenant),
    };
    let machines = select_machines(s.store.as_ref(), &[], &filter).await?;
    let args = DeployArgs {
        package_id: package.package_id.clone(),
        version: package.version.clone(),
        sha256: package.sha256.clone(),
        format: package.format.clone(),
        size: package.size,
        environment: req.environment.trim().to_string(),
        role: req.role.clone(),
        tenant: req.tenant.clone(),
        variables: req.variables.clone(),
        retention,
        guided_failure: req.guided_failure,
    };
    let arguments = serde_json::to_value(&args)
        .map_err(|e| TaskApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let description = format!(
        "Deploy {} {} to {} ({})",
        package.package_id,
        package.version,
        args.environment,
        machine_list(&machines)
    );
    create_and_start(&s, KIND_DEPLOY, &description, &arguments, &machines).await
}

/// Pushes the server's deployment tool to machines that do not have its version.
#[utoipa::path(
    post,
    path = "/api/tasks/upgrade",
    tag = "tasks",
    security(("api_key" = [])),
    request_body = HealthRequest,
    responses(
        (status = 201, description = "Created and started", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches, or the server has no deployment tool", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_upgrade_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<HealthRequest>,
) -> TaskResult<impl IntoResponse> {
    let tool = match s.tool.as_ref() {
        Ok(t) => t.clone(),
        Err(why) => {
            return Err(TaskApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("there is no deployment tool to push: {why}"),
            ))
        }
    };
    let filter = MachineFilter {
        environments: non_empty(&req.environment),
        ..MachineFilter::default()
    };
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = serde_json::to_value(&req)
        .map_err(|e| TaskApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let description = format!(
        "Upgrade the deployment tool to {} on {}",
        tool.version,
        machine_list(&machines)
    );
    create_and_start(&s, KIND_UPGRADE, &description, &arguments, &machines).await
}

/// Creates the task, starts it in the background, answers 201 with it.
async fn create_and_start(
    s: &AppState,
    kind: &str,
    description: &str,
    arguments: &serde_json::Value,
    machines: &[Machine],
) -> TaskResult<(StatusCode, Json<TaskView>)> {
    let ids: Vec<i64> = machines.iter().map(|m| m.id).collect();
    let task = s
        .store
        .create_task(kind, description, arguments, &ids, now_ms())
        .await?;
    let steps = s.store.task_steps(&task.id).await?;
    tracing::info!("created task {} ({description})", task.id);
    Engine::of(s).start(task.clone());
    Ok((StatusCode::CREATED, Json(TaskView { task, steps })))
}

fn non_empty(v: &Option<String>) -> Vec<String> {
    v.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// "machine web-1" / "3 machines (a, b, c)" / "12 machines".
fn machine_list(machines: &[Machine]) -> String {
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

/// The machines a task targets: exactly `names` when given (404 naming the first
/// unknown one), otherwise those matching `filter` (422 saying why when none does).
async fn select_machines(
    store: &dyn Store,
    names: &[String],
    filter: &MachineFilter,
) -> TaskResult<Vec<Machine>> {
    let names: Vec<&str> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    if !names.is_empty() {
        let mut out: Vec<Machine> = Vec::with_capacity(names.len());
        for name in names {
            let m = store.machine(name).await?.ok_or_else(|| {
                TaskApiError::not_found(format!(
                    "machine '{name}' does not exist; `GET /api/machines` lists machines"
                ))
            })?;
            if !out.iter().any(|o| o.id == m.id) {
                out.push(m);
            }
        }
        return Ok(out);
    }
    let machines = store.list_machines(filter).await?;
    if machines.is_empty() {
        return Err(TaskApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            explain_no_match(store, filter).await?,
        ));
    }
    Ok(machines)
}

/// Why no machine matches `filter`, criterion by criterion.
async fn explain_no_match(store: &dyn Store, filter: &MachineFilter) -> TaskResult<String> {
    let total = store.list_machines(&MachineFilter::default()).await?.len();
    let mut criteria = Vec::new();
    let mut why = Vec::new();
    for env in &filter.environments {
        criteria.push(format!("environment '{env}'"));
        if store.environment(env).await?.is_none() {
            why.push(format!("environment '{env}' does not exist"));
            continue;
        }
        let n = count(
            store,
            MachineFilter {
                environments: vec![env.clone()],
                ..MachineFilter::default()
            },
        )
        .await?;
        if n == 0 {
            why.push(format!("environment '{env}' has no machines"));
        }
    }
    for role in &filter.roles {
        criteria.push(format!("role '{role}'"));
        let n = count(
            store,
            MachineFilter {
                roles: vec![role.clone()],
                ..MachineFilter::default()
            },
        )
        .await?;
        if n == 0 {
            why.push(format!("no machine has role '{role}'"));
        }
    }
    if !filter.tenants.is_empty() {
        let tenants = store.list_tenants().await?;
        for tenant in &filter.tenants {
            criteria.push(format!("tenant '{tenant}'"));
            if !tenants.iter().any(|t| t.name.eq_ignore_ascii_case(tenant)) {
                why.push(format!("tenant '{tenant}' does not exist"));
                continue;
            }
            let n = count(
                store,
                MachineFilter {
                    tenants: vec![tenant.clone()],
                    ..MachineFilter::default()
                },
            )
            .await?;
            if n == 0 {
                why.push(format!("no machine is connected to tenant '{tenant}'"));
            }
        }
    }
    if total == 0 {
        why = vec!["no machine is registered yet: register one with `tentacle register-with` (or `POST /api/machines`)".to_string()];
    } else if why.is_empty() {
        why.push(
            "machines match each criterion on its own, but none matches all of them".to_string(),
        );
    }
    let criteria = if criteria.is_empty() {
        "any machine".to_string()
    } else {
        criteria.join(", ")
    };
    let exist = if total == 1 {
        "1 machine exists".to_string()
    } else {
        format!("{total} machines exist")
    };
    Ok(format!(
        "no machine matches: {criteria} ({exist}); {}",
        why.join("; ")
    ))
}

async fn count(store: &dyn Store, filter: MachineFilter) -> TaskResult<usize> {
    Ok(store.list_machines(&filter).await?.len())
}

/// Paging of `GET /api/tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// At most this many tasks (default 50, at most 1000).
    #[param(minimum = 1)]
    limit: Option<i64>,
}

/// Tasks, newest first.
#[utoipa::path(
    get,
    path = "/api/tasks",
    tag = "tasks",
    security(("api_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "The tasks", body = [Task]),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_tasks(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> TaskResult<Json<Vec<Task>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_TASK_LIMIT);
    if limit < 1 {
        return Err(TaskApiError::bad_request("`limit` must be at least 1"));
    }
    Ok(Json(s.store.list_tasks(limit.min(MAX_TASK_LIMIT)).await?))
}

/// A task and its steps.
#[utoipa::path(
    get,
    path = "/api/tasks/{id}",
    tag = "tasks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn get_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> TaskResult<Json<TaskView>> {
    let Path(id) = id?;
    Ok(Json(load_view(s.store.as_ref(), &id).await?))
}

/// Paging of `GET /api/tasks/{id}/log`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// Only lines with a greater id (default 0: from the start).
    after: Option<i64>,
    /// At most this many lines (default 1000, at most 10000).
    #[param(minimum = 1)]
    limit: Option<i64>,
}

/// A task's stored log lines with id > `after`, oldest first.
#[utoipa::path(
    get,
    path = "/api/tasks/{id}/log",
    tag = "tasks",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The task's id, e.g. ServerTasks-42"),
        LogQuery,
    ),
    responses(
        (status = 200, description = "The lines", body = [TaskLogLine]),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn get_log(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> TaskResult<impl IntoResponse> {
    let Path(id) = id?;
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if limit < 1 {
        return Err(TaskApiError::bad_request("`limit` must be at least 1"));
    }
    if s.store.task(&id).await?.is_none() {
        return Err(task_not_found(&id));
    }
    let lines = s
        .store
        .task_log(&id, q.after.unwrap_or(0), limit.min(MAX_LOG_LIMIT))
        .await?;
    Ok(Json(lines))
}

/// `POST /api/tasks/{id}/cancel`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes the `json!` body for the OpenAPI document only.
pub(crate) struct CancelReply {
    task: Task,
}

/// Asks a task to cancel; it ends Canceled once its steps have stopped.
#[utoipa::path(
    post,
    path = "/api/tasks/{id}/cancel",
    tag = "tasks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    responses(
        (status = 202, description = "Cancel requested", body = CancelReply),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn cancel_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> TaskResult<impl IntoResponse> {
    let Path(id) = id?;
    match s.store.request_cancel(&id).await {
        Ok(()) => {}
        Err(StoreError::NotFound { .. }) => return Err(task_not_found(&id)),
        Err(e) => return Err(e.into()),
    }
    Engine::of(&s).cancel(&id);
    let task = s
        .store
        .task(&id)
        .await?
        .ok_or_else(|| task_not_found(&id))?;
    if task.cancel_requested {
        tracing::info!("cancel requested for task {id}");
    }
    Ok((StatusCode::ACCEPTED, Json(json!({ "task": task }))))
}

/// A task's log as server-sent events (`GET /api/tasks/{id}/log/stream`, served
/// by [`sse::stream_log`]; this function only carries its OpenAPI description).
///
/// Events: `task` with `{"task", "steps"}` first and whenever the task or a step
/// changes state; `log` with one log line (its id as the event id) for every
/// line after `after` (or the `Last-Event-ID` header), stored ones first, then
/// live ones; finally `end` with `{"task", "steps"}` once the task is final, and
/// the stream ends.
#[utoipa::path(
    get,
    path = "/api/tasks/{id}/log/stream",
    tag = "tasks",
    security(("api_key" = [])),
    params(
        ("id" = String, Path, description = "The task's id, e.g. ServerTasks-42"),
        ("after" = Option<i64>, Query, description = "Only lines with a greater id (default: `Last-Event-ID`, else 0)"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this line id (when `after` is not given)"),
    ),
    responses(
        (status = 200, description = "Events `task` (data: TaskView), `log` (data: TaskLogLine, id: its id) and `end` (data: TaskView)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
#[allow(dead_code)] // Documentation only; see `sse::stream_log`.
fn stream_log_doc() {}

/// `POST /api/tasks/{id}/guidance`: the decision for a machine waiting under
/// guided failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GuidanceRequest {
    /// The machine's name.
    pub machine: String,
    pub action: Guidance,
}

/// Decides what happens to a machine whose deployment failed under guided failure.
#[utoipa::path(
    post,
    path = "/api/tasks/{id}/guidance",
    tag = "tasks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    request_body = GuidanceRequest,
    responses(
        (status = 202, description = "Delivered", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such task, or the machine is not part of it", body = ErrorBody),
        (status = 409, description = "The machine is not waiting for a decision", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn guide_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<GuidanceRequest>,
) -> TaskResult<impl IntoResponse> {
    let Path(id) = id?;
    let view = load_view(s.store.as_ref(), &id).await?;
    let step = view
        .steps
        .iter()
        .find(|st| st.machine_name.eq_ignore_ascii_case(req.machine.trim()))
        .ok_or_else(|| {
            let names: Vec<&str> = view
                .steps
                .iter()
                .map(|st| st.machine_name.as_str())
                .collect();
            TaskApiError::not_found(format!(
                "machine '{}' is not part of task {id} (its machines: {})",
                req.machine,
                names.join(", ")
            ))
        })?;
    if !Engine::of(&s).guide(&id, step.machine_id, req.action) {
        return Err(TaskApiError::new(
            StatusCode::CONFLICT,
            format!(
                "machine '{}' of task {id} is not waiting for a decision (its state: {:?}); only a failed machine of a deployment started with --guided-failure waits for one",
                step.machine_name, step.state
            ),
        ));
    }
    tracing::info!(
        "guidance for {} in task {id}: {:?}",
        step.machine_name,
        req.action
    );
    Ok((StatusCode::ACCEPTED, Json(view)))
}
