//! `/api/tasks`: create tasks (script runs, health checks, deployments, tool
//! upgrades), list and read them, follow their logs ([`super::sse`]), cancel
//! them, and guide deployments waiting under guided failure. The engine
//! ([`octo_engine::Engine`]) runs them.
//!
//! - `POST /api/tasks/script`: `{"script", "syntax", "isolation", "machines",
//!   "environment", "role", "tenant"}` → 201 `{"task", "steps"}`.
//! - `POST /api/tasks/health`: `{"machines"?, "environment"?}` → 201 `{"task", "steps"}`.
//! - `GET /api/tasks?limit=N` → tasks, newest first.
//! - `GET /api/tasks/{id}` → `{"task", "steps"}`.
//! - `GET /api/tasks/{id}/log?after=ID&limit=N` → log lines with id > after.
//! - `GET /api/tasks/{id}/log/stream?after=ID` → events `log`, `task`, `end`.
//! - `POST /api/tasks/{id}/cancel` → 202 `{"task"}`.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use octo_api_types::{
    CancelReply, DeployRequest, ErrorBody, GuidanceRequest, HealthRequest, ScriptRequest, Task,
    TaskLogLine, TaskView,
};
use octo_engine::{kind, machine_list, DeployArgs};
use octo_store::{now_ms, Machine, MachineFilter, Store, StoreError};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{sse, ApiError, ApiJson, ApiResult};
use crate::state::AppState;

/// Extracted versions of a package kept per machine unless the request says otherwise.
const DEFAULT_RETENTION: u32 = 3;

/// The task routes.
pub(super) fn routes() -> Router<AppState> {
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

/// Default and largest page sizes.
const DEFAULT_TASK_LIMIT: i64 = 50;
const MAX_TASK_LIMIT: i64 = 1000;
const DEFAULT_LOG_LIMIT: i64 = 1000;
const MAX_LOG_LIMIT: i64 = 10_000;

pub(crate) fn task_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "task '{id}' does not exist; `GET /api/tasks` lists tasks"
    ))
}

/// The task and its steps; 404 when there is no such task.
pub(crate) async fn load_view(store: &dyn Store, id: &str) -> ApiResult<TaskView> {
    let task = store.task(id).await?.ok_or_else(|| task_not_found(id))?;
    let steps = store.task_steps(id).await?;
    Ok(TaskView { task, steps })
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
pub(crate) async fn create_script_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ScriptRequest>,
) -> ApiResult<impl IntoResponse> {
    if req.script.trim().is_empty() {
        return Err(ApiError::bad_request("field `script` must not be empty"));
    }
    let filter = filter_of(&req.environment, &req.role, &req.tenant);
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = &req;
    let description = format!(
        "Run a {} script on {}",
        req.syntax.as_str(),
        machine_list(&machines)
    );
    create_and_start(&s, kind::SCRIPT, &description, arguments, &machines).await
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
pub(crate) async fn create_health_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<HealthRequest>,
) -> ApiResult<impl IntoResponse> {
    let filter = filter_of(&req.environment, &None, &None);
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = &req;
    let description = format!("Check the health of {}", machine_list(&machines));
    create_and_start(&s, kind::HEALTH, &description, arguments, &machines).await
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
pub(crate) async fn create_deploy_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<DeployRequest>,
) -> ApiResult<impl IntoResponse> {
    if req.environment.trim().is_empty() {
        return Err(ApiError::bad_request(
            "field `environment` must name the environment to deploy to",
        ));
    }
    let retention = req.retention.unwrap_or(DEFAULT_RETENTION);
    if retention == 0 {
        return Err(ApiError::bad_request(
            "field `retention` must be at least 1 (the version just deployed is always kept)",
        ));
    }
    if let Some(name) = req.variables.keys().find(|k| k.trim().is_empty()) {
        return Err(ApiError::bad_request(format!(
            "variable name '{name}' is empty"
        )));
    }
    let package = super::packages::find(
        s.store.as_ref(),
        req.package_id.trim(),
        req.version.as_deref(),
    )
    .await?;
    if let Err(why) = s.tool.as_ref() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("this server cannot deploy: {why}"),
        ));
    }
    let file = s.packages.file_of(&package);
    if !file.is_file() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the file of package {} {} is missing from {}; push it again with `octopus package push --replace`",
                package.package_id,
                package.version,
                file.display()
            ),
        ));
    }
    let filter = filter_of(&Some(req.environment.clone()), &req.role, &req.tenant);
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
    let arguments = &args;
    let description = format!(
        "Deploy {} {} to {} ({})",
        package.package_id,
        package.version,
        args.environment,
        machine_list(&machines)
    );
    create_and_start(&s, kind::DEPLOY, &description, arguments, &machines).await
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
pub(crate) async fn create_upgrade_task(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<HealthRequest>,
) -> ApiResult<impl IntoResponse> {
    let tool = match s.tool.as_ref() {
        Ok(t) => t.clone(),
        Err(why) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("there is no deployment tool to push: {why}"),
            ))
        }
    };
    let filter = filter_of(&req.environment, &None, &None);
    let machines = select_machines(s.store.as_ref(), &req.machines, &filter).await?;
    let arguments = &req;
    let description = format!(
        "Upgrade the deployment tool to {} on {}",
        tool.version,
        machine_list(&machines)
    );
    create_and_start(&s, kind::UPGRADE, &description, arguments, &machines).await
}

/// Creates the task, starts it in the background, answers 201 with it.
pub(crate) async fn create_and_start(
    s: &AppState,
    kind: &str,
    description: &str,
    arguments: &impl serde::Serialize,
    machines: &[Machine],
) -> ApiResult<(StatusCode, Json<TaskView>)> {
    let arguments = serde_json::to_value(arguments)
        .map_err(|e| ApiError::internal(format!("encoding the task's arguments: {e}")))?;
    let ids: Vec<i64> = machines.iter().map(|m| m.id).collect();
    let task = s
        .store
        .create_task(kind, description, &arguments, &ids, now_ms())
        .await?;
    let steps = s.store.task_steps(&task.id).await?;
    tracing::info!("created task {} ({description})", task.id);
    s.engine.start(task.clone());
    Ok((StatusCode::CREATED, Json(TaskView { task, steps })))
}

/// The machines in `environment`, with `role`, of `tenant` (each when given).
fn filter_of(
    environment: &Option<String>,
    role: &Option<String>,
    tenant: &Option<String>,
) -> MachineFilter {
    MachineFilter {
        names: vec![],
        environments: non_empty(environment),
        roles: non_empty(role),
        tenants: non_empty(tenant),
    }
}

fn non_empty(v: &Option<String>) -> Vec<String> {
    v.iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The machines a task targets: exactly `names` when given (404 naming the first
/// unknown one), otherwise those matching `filter` (422 saying why when none does).
pub(crate) async fn select_machines(
    store: &dyn Store,
    names: &[String],
    filter: &MachineFilter,
) -> ApiResult<Vec<Machine>> {
    let names: Vec<&str> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    if !names.is_empty() {
        let mut out: Vec<Machine> = Vec::with_capacity(names.len());
        for name in names {
            let m = store.machine(name).await?.ok_or_else(|| {
                ApiError::not_found(format!(
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
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            explain_no_match(store, filter).await?,
        ));
    }
    Ok(machines)
}

/// Why no machine matches `filter`, criterion by criterion.
pub(crate) async fn explain_no_match(
    store: &dyn Store,
    filter: &MachineFilter,
) -> ApiResult<String> {
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

pub(crate) async fn count(store: &dyn Store, filter: MachineFilter) -> ApiResult<usize> {
    Ok(store.list_machines(&filter).await?.len())
}

/// Paging of `GET /api/tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
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
pub(crate) async fn list_tasks(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Task>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_TASK_LIMIT);
    if limit < 1 {
        return Err(ApiError::bad_request("`limit` must be at least 1"));
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
pub(crate) async fn get_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(id) = id?;
    Ok(Json(load_view(s.store.as_ref(), &id).await?))
}

/// Paging of `GET /api/tasks/{id}/log`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
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
pub(crate) async fn get_log(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if limit < 1 {
        return Err(ApiError::bad_request("`limit` must be at least 1"));
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
pub(crate) async fn cancel_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    match s.store.request_cancel(&id).await {
        Ok(()) => {}
        Err(StoreError::NotFound { .. }) => return Err(task_not_found(&id)),
        Err(e) => return Err(e.into()),
    }
    s.engine.cancel(&id);
    let task = s
        .store
        .task(&id)
        .await?
        .ok_or_else(|| task_not_found(&id))?;
    if task.cancel_requested {
        tracing::info!("cancel requested for task {id}");
    }
    Ok((StatusCode::ACCEPTED, Json(CancelReply { task })))
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
pub(crate) fn stream_log_doc() {}

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
pub(crate) async fn guide_task(
    State(s): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<GuidanceRequest>,
) -> ApiResult<impl IntoResponse> {
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
            ApiError::not_found(format!(
                "machine '{}' is not part of task {id} (its machines: {})",
                req.machine,
                names.join(", ")
            ))
        })?;
    if !s.engine.guide(&id, step.machine_id, req.action) {
        return Err(ApiError::new(
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
