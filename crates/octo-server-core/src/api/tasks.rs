//! `/api/tasks`: create tasks (script runs, health checks, deployments, tool
//! upgrades) in the request's space, list and read them, follow their logs
//! ([`super::sse`]), cancel them, and guide deployments waiting under guided
//! failure. The engine ([`octo_engine::Engine`]) runs them.
//!
//! Who may: creating a task needs its permission on every machine it selects
//! (a task that selects machines by environment or role is refused as a whole,
//! naming those out of the caller's scope); a task is seen by whoever sees one
//! of its environments, and changed (cancel, guidance) by whoever may act on
//! all of them. Its variables show only to holders of `VariableView`; secret
//! values never show: they are stored encrypted, apart from the task.

use std::collections::BTreeMap;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::{
    CancelReply, DeployRequest, ErrorBody, GuidanceRequest, HealthRequest, Permission,
    ScriptRequest, Space, Task, TaskLogLine, TaskState, TaskStreamEvent, TaskView,
    TentacleUpgradeRequest, Validate,
};
use octo_engine::engine::environments_of;
use octo_engine::secrets::MASK;
use octo_engine::{kind, machine_list, DeployArgs};
use octo_store::{
    now_ms, Machine, MachineFilter, NewAuditEvent, NewTask, Store, StoreError, TaskQuery,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::guard::{get, post, Route};
use super::machines::sees_machine;
use super::{sse, ApiError, ApiJson, ApiResult};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// Extracted versions of a package kept per machine unless the request says otherwise.
const DEFAULT_RETENTION: u32 = 3;

/// The task routes.
pub(super) fn routes() -> Vec<Route> {
    use Permission as P;
    vec![
        get("/api/tasks", Access::Space(P::TaskView), list_tasks),
        post(
            "/api/tasks/script",
            Access::Space(P::TaskCreate),
            create_script_task,
        ),
        post(
            "/api/tasks/health",
            Access::Space(P::TaskCreate),
            create_health_task,
        ),
        post(
            "/api/tasks/deploy",
            Access::Space(P::DeploymentCreate),
            create_deploy_task,
        ),
        post(
            "/api/tasks/upgrade",
            Access::Space(P::TaskCreate),
            create_upgrade_task,
        ),
        // Replaces the agent's own binary: as much as editing the machine.
        post(
            "/api/tasks/tentacle-upgrade",
            Access::Space(P::MachineEdit),
            create_tentacle_upgrade_task,
        ),
        get("/api/tasks/{id}", Access::Space(P::TaskView), get_task),
        get("/api/tasks/{id}/log", Access::Space(P::TaskView), get_log),
        get(
            "/api/tasks/{id}/log/stream",
            Access::Space(P::TaskView),
            sse::stream_log,
        ),
        post(
            "/api/tasks/{id}/cancel",
            Access::Space(P::TaskCancel),
            cancel_task,
        ),
        post(
            "/api/tasks/{id}/guidance",
            Access::Space(P::InterruptionSubmit),
            guide_task,
        ),
    ]
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

/// Whether the caller may see the task.
fn sees_task(caller: &Caller, space: &Space, t: &Task) -> bool {
    t.space_id == space.id && caller.sees(Permission::TaskView, space, &t.environments, &[])
}

/// The task as the caller may see it: its variables only with `VariableView`.
fn shown(caller: &Caller, space: &Space, mut task: Task) -> Task {
    if !caller.sees(Permission::VariableView, space, &task.environments, &[]) {
        if let Some(args) = task.arguments.as_object_mut() {
            for field in ["variables", "sensitive_variables"] {
                if args.contains_key(field) {
                    args.insert(
                        field.into(),
                        serde_json::json!("(hidden: needs VariableView)"),
                    );
                }
            }
        }
    }
    task
}

/// A task of the space the caller may see, or 404 as if it did not exist.
pub async fn visible_task(
    store: &dyn Store,
    caller: &Caller,
    space: &Space,
    id: &str,
) -> ApiResult<Task> {
    store
        .task(id)
        .await?
        .filter(|t| sees_task(caller, space, t))
        .map(|t| shown(caller, space, t))
        .ok_or_else(|| task_not_found(id))
}

/// The task and its steps; 404 when there is no such task the caller may see.
pub async fn load_view(
    store: &dyn Store,
    caller: &Caller,
    space: &Space,
    id: &str,
) -> ApiResult<TaskView> {
    // Both reads at once (one round trip's wait, not two); the steps are
    // dropped unseen when the task is not the caller's to see.
    let (task, steps) = tokio::join!(visible_task(store, caller, space, id), store.task_steps(id));
    Ok(TaskView {
        task: task?,
        steps: steps?,
    })
}

/// The task and its steps, and its lines after `after_id` (at most `limit`),
/// read together (one store call on SQLite); 404 when there is no such task
/// the caller may see (its steps and lines are then dropped unseen). Every
/// line stored before the task was read is among the lines (up to `limit`).
pub(crate) async fn load_view_with_log(
    store: &dyn Store,
    caller: &Caller,
    space: &Space,
    id: &str,
    after_id: i64,
    limit: i64,
) -> ApiResult<(TaskView, Vec<octo_store::TaskLogLine>)> {
    let read = store
        .task_with_log(id, after_id, limit)
        .await?
        .filter(|r| sees_task(caller, space, &r.task))
        .ok_or_else(|| task_not_found(id))?;
    let view = TaskView {
        task: shown(caller, space, read.task),
        steps: read.steps,
    };
    Ok((view, read.lines))
}

/// Variable names must be usable as environment variables, and a name is
/// either secret or not.
fn check_variables(
    variables: &BTreeMap<String, String>,
    sensitive: &BTreeMap<String, String>,
) -> ApiResult<()> {
    // Names and values were checked by `Validate`; a name given twice is not.
    if let Some(name) = sensitive.keys().find(|k| variables.contains_key(*k)) {
        return Err(ApiError::bad_request(format!(
            "variable '{name}' is in both `variables` and `sensitive_variables`; give it once"
        )));
    }
    Ok(())
}

/// The secret values, encrypted with the master key.
fn encrypt_secrets(
    s: &AppState,
    sensitive: &BTreeMap<String, String>,
) -> ApiResult<Vec<(String, String)>> {
    sensitive
        .iter()
        .map(|(name, value)| {
            s.master_key
                .encrypt(value)
                .map(|c| (name.clone(), c))
                .map_err(|e| ApiError::internal(format!("encrypting variable {name}: {e}")))
        })
        .collect()
}

/// The names of secret variables, their values shown as set, not as values.
fn masked(sensitive: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    sensitive
        .keys()
        .map(|k| (k.clone(), MASK.to_string()))
        .collect()
}

/// Runs a script on machines.
#[utoipa::path(
    post,
    path = "/api/tasks/script",
    tag = "tasks",
    request_body = ScriptRequest,
    responses(
        CreatedTask,
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches (the message says why)", body = ErrorBody),
    )
)]
pub(crate) async fn create_script_task(
    call: Creation,
    ApiJson(req): ApiJson<ScriptRequest>,
) -> ApiResult<axum::response::Response> {
    call.create(req).await
}

/// Checks the health of machines.
#[utoipa::path(
    post,
    path = "/api/tasks/health",
    tag = "tasks",
    request_body = HealthRequest,
    responses(
        CreatedTask,
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches (the message says why)", body = ErrorBody),
    )
)]
pub(crate) async fn create_health_task(
    call: Creation,
    ApiJson(req): ApiJson<HealthRequest>,
) -> ApiResult<axum::response::Response> {
    call.create(req).await
}

/// Deploys a package.
#[utoipa::path(
    post,
    path = "/api/tasks/deploy",
    tag = "tasks",
    request_body = DeployRequest,
    responses(
        CreatedTask,
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such package or version (the message lists what exists)", body = ErrorBody),
        (status = 422, description = "No machine matches, or the server has no deployment tool (the message says why)", body = ErrorBody),
    )
)]
pub(crate) async fn create_deploy_task(
    call: Creation,
    ApiJson(req): ApiJson<DeployRequest>,
) -> ApiResult<axum::response::Response> {
    call.create(req).await
}

/// Pushes the server's deployment tool to machines that do not have its version.
#[utoipa::path(
    post,
    path = "/api/tasks/upgrade",
    tag = "tasks",
    request_body = HealthRequest,
    responses(
        CreatedTask,
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches, or the server has no deployment tool", body = ErrorBody),
    )
)]
pub(crate) async fn create_upgrade_task(
    call: Creation,
    ApiJson(req): ApiJson<HealthRequest>,
) -> ApiResult<axum::response::Response> {
    call.create(ToolUpgrade(req)).await
}

/// Upgrades tentacles to the tentacle binary this server carries.
#[utoipa::path(
    post,
    path = "/api/tasks/tentacle-upgrade",
    tag = "tasks",
    request_body = TentacleUpgradeRequest,
    responses(
        CreatedTask,
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "A named machine does not exist", body = ErrorBody),
        (status = 422, description = "No machine matches, or the server carries no tentacle binary", body = ErrorBody),
    )
)]
pub(crate) async fn create_tentacle_upgrade_task(
    call: Creation,
    ApiJson(req): ApiJson<TentacleUpgradeRequest>,
) -> ApiResult<axum::response::Response> {
    call.create(req).await
}

/// The `201` of every task-creating route: the task, or its events when the
/// request accepts them ([`created_answer`]).
pub(crate) struct CreatedTask;

impl utoipa::IntoResponses for CreatedTask {
    fn responses() -> BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
        use utoipa::openapi::schema::ArrayBuilder;
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let task = ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("TaskView")))
            .build();
        let events = ArrayBuilder::new().items(Ref::from_schema_name("TaskStreamEvent"));
        let events = ContentBuilder::new().schema(Some(events)).build();
        let created = ResponseBuilder::new()
            .description(
                "Created and started: the task (`application/json`), or, when the request \
                 accepts `text/event-stream`, the task's events from its creation in this \
                 response, as `GET /api/tasks/{id}/log/stream` sends them (`task` with the task \
                 as created first, then `log`, `task` and `end`)",
            )
            .content("application/json", task)
            .content("text/event-stream", events)
            .build();
        BTreeMap::from([("201".to_string(), created.into())])
    }
}

/// What a task-creating route takes from its request besides the body: the
/// caller and space the gate resolved, and whether the answer may be events.
pub(crate) struct Creation {
    s: AppState,
    caller: Caller,
    space: Space,
    follow: bool,
}

impl axum::extract::FromRequestParts<AppState> for Creation {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &AppState,
    ) -> Result<Self, ApiError> {
        // The gate puts both there before any route runs.
        let missing = |what: &str| ApiError::internal(format!("the request has no {what}"));
        let caller = parts.extensions.get::<Caller>().cloned();
        let space = parts.extensions.get::<RequestSpace>().cloned();
        Ok(Self {
            s: s.clone(),
            caller: caller.ok_or_else(|| missing("authenticated caller"))?,
            space: space.ok_or_else(|| missing("space"))?.0,
            follow: accepts_events(&parts.headers),
        })
    }
}

impl Creation {
    /// Creates and starts the task `req` asks for, and answers as
    /// [`created_answer`] does.
    async fn create<R: TaskRequest>(self, req: R) -> ApiResult<axum::response::Response> {
        let Self {
            s,
            caller,
            space,
            follow,
        } = self;
        let created = start_with(&s, &caller, &space, req, follow).await?;
        Ok(created_answer(&s, caller, space, created))
    }
}

/// Checks, creates and starts the task `req` asks for: the API's task routes
/// and the portal's forms both come here.
pub async fn start<R: TaskRequest>(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    req: R,
) -> ApiResult<TaskView> {
    Ok(start_with(s, caller, space, req, false).await?.0)
}

/// [`start`]; with `follow`, the task's changes are subscribed to before it
/// starts.
async fn start_with<R: TaskRequest>(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    req: R,
    follow: bool,
) -> ApiResult<(TaskView, Option<sse::Early>)> {
    let planned = req.plan(s, caller, space).await?;
    create_then_start(s, caller, space, planned, follow).await
}

/// The answer to a task's creation: 201 with the task as JSON, or with its
/// events when they were subscribed to (the request accepted them).
fn created_answer(
    s: &AppState,
    caller: Caller,
    space: Space,
    (view, early): (TaskView, Option<sse::Early>),
) -> axum::response::Response {
    match early {
        None => (StatusCode::CREATED, Json(view)).into_response(),
        Some(early) => {
            let events = sse::created_stream(s, caller, space, view, early);
            (StatusCode::CREATED, events).into_response()
        }
    }
}

/// Whether the request's `Accept` names `text/event-stream` (whatever else it
/// names: a client that can read the events wants them).
fn accepts_events(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let media = range.split(';').next().unwrap_or_default().trim();
            media.eq_ignore_ascii_case("text/event-stream")
        })
}

/// A request for a task: its checks, and the task it makes.
pub trait TaskRequest: Send {
    /// Checks the request (a 400 naming the field), what it names (404, 422)
    /// and the caller's permissions on it (403); the task to create.
    fn plan(
        self,
        s: &AppState,
        caller: &Caller,
        space: &Space,
    ) -> impl std::future::Future<Output = ApiResult<Planned>> + Send;
}

/// A task checked and ready to be created ([`TaskRequest::plan`]).
#[derive(Debug)]
pub struct Planned {
    kind: &'static str,
    description: String,
    /// The arguments stored with the task (secrets masked).
    arguments: serde_json::Value,
    max_parallel_steps: Option<u32>,
    machines: Vec<Machine>,
    /// The secret variables, encrypted (their ciphertexts are never shown:
    /// see the `Debug` of [`Secrets`]).
    secrets: Secrets,
    /// What the audit event adds to the description.
    details: String,
}

impl Planned {
    fn new(
        kind: &'static str,
        description: String,
        arguments: &impl serde::Serialize,
        max_parallel_steps: Option<u32>,
        machines: Vec<Machine>,
    ) -> ApiResult<Self> {
        let arguments = serde_json::to_value(arguments)
            .map_err(|e| ApiError::internal(format!("encoding the task's arguments: {e}")))?;
        Ok(Self {
            kind,
            description,
            arguments,
            max_parallel_steps,
            machines,
            secrets: Secrets(Vec::new()),
            details: String::new(),
        })
    }

    fn with_secrets(self, secrets: Vec<(String, String)>, details: String) -> Self {
        Self {
            secrets: Secrets(secrets),
            details,
            ..self
        }
    }
}

/// A task's secret variables, as (name, ciphertext); shown by name only.
struct Secrets(Vec<(String, String)>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl TaskRequest for ScriptRequest {
    async fn plan(self, s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Planned> {
        let req = self;
        req.validate()?;
        parallelism(req.max_parallel_steps)?;
        if req.script.trim().is_empty() {
            return Err(ApiError::bad_request("field `script` must not be empty"));
        }
        check_variables(&req.variables, &req.sensitive_variables)?;
        let filter = filter_of(space.id, &req.environment, &req.role, &req.tenant);
        let target = Target::select(s, caller, space, &req.machines, &filter).await?;
        target.require(caller, space, Permission::TaskCreate)?;
        let secrets = encrypt_secrets(s, &req.sensitive_variables)?;
        let description = format!(
            "Run a {} script on {}",
            req.syntax.as_str(),
            machine_list(&target.machines)
        );
        let details = variable_names(&req.variables, &req.sensitive_variables);
        let stored = ScriptRequest {
            sensitive_variables: masked(&req.sensitive_variables),
            ..req
        };
        let parallel = stored.max_parallel_steps;
        Ok(Planned::new(
            kind::SCRIPT,
            description,
            &stored,
            parallel,
            target.machines,
        )?
        .with_secrets(secrets, details))
    }
}

impl TaskRequest for HealthRequest {
    async fn plan(self, s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Planned> {
        let req = self;
        req.validate()?;
        parallelism(req.max_parallel_steps)?;
        let filter = filter_of(space.id, &req.environment, &None, &None);
        let target = Target::select(s, caller, space, &req.machines, &filter).await?;
        target.require(caller, space, Permission::TaskCreate)?;
        let description = format!("Check the health of {}", machine_list(&target.machines));
        let parallel = req.max_parallel_steps;
        Planned::new(kind::HEALTH, description, &req, parallel, target.machines)
    }
}

impl TaskRequest for DeployRequest {
    async fn plan(self, s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Planned> {
        let req = self;
        req.validate()?;
        parallelism(req.max_parallel_steps)?;
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
        check_variables(&req.variables, &req.sensitive_variables)?;
        let package = super::packages::find(
            s.store.as_ref(),
            space.id,
            req.package_id.trim(),
            req.version.as_deref(),
        )
        .await?;
        if let Err(why) = s.tool.as_ref() {
            return Err(ApiError::unprocessable(format!(
                "this server cannot deploy: {why}"
            )));
        }
        if s.packages.content(&package.sha256).await?.is_none() {
            return Err(ApiError::internal(format!(
                "the content of package {} {} (SHA-256 {}) is missing from the database; push it again with `octopus package push --replace`",
                package.package_id, package.version, package.sha256
            )));
        }
        let environment = req.environment.trim().to_string();
        caller.require_on(
            Permission::DeploymentCreate,
            space,
            std::slice::from_ref(&environment),
            &[],
            &format!("environment '{environment}'"),
        )?;
        let filter = filter_of(space.id, &Some(environment.clone()), &req.role, &req.tenant);
        let target = Target::select(s, caller, space, &[], &filter).await?;
        target.require(caller, space, Permission::DeploymentCreate)?;
        let args = DeployArgs {
            package_id: package.package_id.clone(),
            version: package.version.clone(),
            sha256: package.sha256.clone(),
            format: package.format.clone(),
            size: package.size,
            environment,
            role: req.role.clone(),
            tenant: req.tenant.clone(),
            variables: req.variables.clone(),
            sensitive_variables: req.sensitive_variables.keys().cloned().collect(),
            retention,
            guided_failure: req.guided_failure,
        };
        let secrets = encrypt_secrets(s, &req.sensitive_variables)?;
        let description = format!(
            "Deploy {} {} to {} ({})",
            package.package_id,
            package.version,
            args.environment,
            machine_list(&target.machines)
        );
        let details = format!(
            "package {} {}; {}",
            package.package_id,
            package.version,
            variable_names(&req.variables, &req.sensitive_variables)
        );
        let parallel = req.max_parallel_steps;
        Ok(
            Planned::new(kind::DEPLOY, description, &args, parallel, target.machines)?
                .with_secrets(secrets, details),
        )
    }
}

/// A push of the server's deployment tool, to the machines a [`HealthRequest`]
/// names (`POST /api/tasks/upgrade`).
#[derive(Debug)]
pub struct ToolUpgrade(pub HealthRequest);

impl TaskRequest for ToolUpgrade {
    async fn plan(self, s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Planned> {
        let Self(req) = self;
        req.validate()?;
        parallelism(req.max_parallel_steps)?;
        let tool = match s.tool.as_ref() {
            Ok(t) => t.clone(),
            Err(why) => {
                return Err(ApiError::unprocessable(format!(
                    "there is no deployment tool to push: {why}"
                )))
            }
        };
        let filter = filter_of(space.id, &req.environment, &None, &None);
        let target = Target::select(s, caller, space, &req.machines, &filter).await?;
        target.require(caller, space, Permission::TaskCreate)?;
        let description = format!(
            "Upgrade the deployment tool to {} on {}",
            tool.version,
            machine_list(&target.machines)
        );
        let parallel = req.max_parallel_steps;
        Planned::new(kind::UPGRADE, description, &req, parallel, target.machines)
    }
}

impl TaskRequest for TentacleUpgradeRequest {
    async fn plan(self, s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Planned> {
        let req = self;
        let build = match s.tentacle.as_ref() {
            Ok(t) => t.clone(),
            Err(why) => {
                return Err(ApiError::unprocessable(format!(
                    "this server carries no tentacle binary to upgrade to: {why}"
                )))
            }
        };
        if req.machines.is_empty() && req.environment.is_none() {
            return Err(ApiError::bad_request(
                "machines or environment: say which tentacles to upgrade",
            ));
        }
        let wait_for_scripts_s = req.wait_for_scripts_s.unwrap_or(300);
        if !(1..=3600).contains(&wait_for_scripts_s) {
            return Err(ApiError::bad_request(
                "wait_for_scripts_s: must be 1 to 3600 seconds",
            ));
        }
        let confirm_within_s = req.confirm_within_s.unwrap_or(120);
        if !(5..=3600).contains(&confirm_within_s) {
            return Err(ApiError::bad_request(
                "confirm_within_s: must be 5 to 3600 seconds",
            ));
        }
        let filter = filter_of(space.id, &req.environment, &None, &None);
        let target = Target::select(s, caller, space, &req.machines, &filter).await?;
        target.require(caller, space, Permission::MachineEdit)?;
        let description = format!(
            "Upgrade the tentacle to {} on {}",
            build.version,
            machine_list(&target.machines)
        );
        let args = octo_engine::TentacleUpgradeArgs {
            version: build.version.clone(),
            wait_for_scripts_s,
            confirm_within_s,
        };
        let details = format!("tentacle {} (SHA-256 {})", build.version, build.sha256);
        let planned = Planned::new(
            kind::TENTACLE_UPGRADE,
            description,
            &args,
            None,
            target.machines,
        )?;
        Ok(planned.with_secrets(Vec::new(), details))
    }
}

/// "variables A, B; secret variables C" (names only), for the audit log.
fn variable_names(
    variables: &BTreeMap<String, String>,
    sensitive: &BTreeMap<String, String>,
) -> String {
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>().join(", ");
    match (variables.is_empty(), sensitive.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("variables {}", names(variables)),
        (true, false) => format!("secret variables {}", names(sensitive)),
        (false, false) => format!(
            "variables {}; secret variables {}",
            names(variables),
            names(sensitive)
        ),
    }
}

/// A task's `max_parallel_steps`, checked (400 naming the field).
fn parallelism(n: Option<u32>) -> ApiResult<Option<u32>> {
    match n {
        Some(n) if !(1..=octo_engine::MAX_PARALLEL_STEPS_ALLOWED).contains(&n) => {
            Err(ApiError::bad_request(format!(
                "max_parallel_steps must be from 1 to {} (machines of the task that run at once), not {n}",
                octo_engine::MAX_PARALLEL_STEPS_ALLOWED
            )))
        }
        n => Ok(n),
    }
}

/// Creates the task and starts it; with `follow`, subscribes to its changes
/// between the two, so that whoever follows it misses nothing it does.
async fn create_then_start(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    what: Planned,
    follow: bool,
) -> ApiResult<(TaskView, Option<sse::Early>)> {
    let Planned {
        kind,
        description,
        mut arguments,
        max_parallel_steps,
        machines,
        secrets,
        details,
    } = what;
    if let (Some(n), Some(map)) = (max_parallel_steps, arguments.as_object_mut()) {
        map.insert("max_parallel_steps".into(), n.into());
    }
    let details = if details.is_empty() {
        description.clone()
    } else {
        format!("{description}; {details}")
    };
    let now = now_ms();
    let new = NewTask {
        space_id: space.id,
        kind: kind.into(),
        description,
        arguments,
        machine_ids: machines.iter().map(|m| m.id).collect(),
        environments: environments_of(&machines),
        secrets: secrets.0,
        // Recorded with the task, in its commit (the object is its id).
        audit: Some(NewAuditEvent {
            details,
            ..crate::state::audit_event(caller, Some(space), "started", "task", now)
        }),
    };
    let mark = s.engine.creation_mark();
    let (task, steps) = s.store.create_task_with_steps(&new, now).await?;
    tracing::info!("created task {} ({})", task.id, new.description);
    let early = follow.then(|| sse::Early::subscribe(&s.engine, &task.id));
    s.engine
        .start_created(task.clone(), steps.clone(), new.secrets, mark);
    Ok((
        TaskView {
            task: shown(caller, space, task),
            steps,
        },
        early,
    ))
}

/// The machines in `environment`, with `role`, of `tenant` (each when given), in a space.
fn filter_of(
    space_id: i64,
    environment: &Option<String>,
    role: &Option<String>,
    tenant: &Option<String>,
) -> MachineFilter {
    MachineFilter {
        space_id: Some(space_id),
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

/// The machines a task targets.
struct Target {
    machines: Vec<Machine>,
}

impl Target {
    /// Exactly `names` when given (404 naming the first unknown or unseen one),
    /// otherwise those matching `filter` (422 saying why when none does).
    async fn select(
        s: &AppState,
        caller: &Caller,
        space: &Space,
        names: &[String],
        filter: &MachineFilter,
    ) -> ApiResult<Target> {
        let store = s.store.as_ref();
        let names: Vec<&str> = names
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .collect();
        if !names.is_empty() {
            // Several names: one read for all of them (a task may name
            // hundreds), each then paired with its row by name; a name the
            // read's case folding paired with none is looked up alone.
            let found = if names.len() > 1 {
                store
                    .list_machines(&MachineFilter {
                        names: names.iter().map(|n| n.to_string()).collect(),
                        ..MachineFilter::space(space.id)
                    })
                    .await?
            } else {
                Vec::new()
            };
            let mut out: Vec<Machine> = Vec::with_capacity(names.len());
            for name in names {
                let m = match found.iter().find(|m| m.name.eq_ignore_ascii_case(name)) {
                    Some(m) => Some(m.clone()),
                    None => store.machine(space.id, name).await?,
                };
                let m = m
                    .filter(|m| sees_machine(caller, space, m))
                    .ok_or_else(|| {
                        ApiError::not_found(format!(
                            "machine '{name}' does not exist; `GET /api/machines` lists machines"
                        ))
                    })?;
                if m.disabled {
                    return Err(ApiError::unprocessable(format!(
                        "machine '{}' is disabled: no task reaches it; enable it first",
                        m.name
                    )));
                }
                if !out.iter().any(|o| o.id == m.id) {
                    out.push(m);
                }
            }
            return Ok(Target { machines: out });
        }
        // Disabled machines are left out of what a filter selects.
        let machines: Vec<Machine> = store
            .list_machines(filter)
            .await?
            .into_iter()
            .filter(|m| !m.disabled)
            .collect();
        if machines.is_empty() {
            return Err(ApiError::unprocessable(
                explain_no_match(store, filter).await?,
            ));
        }
        Ok(Target { machines })
    }

    /// `p` on every machine, or 403 naming those out of the caller's scope
    /// (and counting those they may not even see). Nothing is queued then.
    fn require(&self, caller: &Caller, space: &Space, p: Permission) -> ApiResult<()> {
        let out: Vec<&Machine> = self
            .machines
            .iter()
            .filter(|m| {
                !caller.grants.covers(
                    p,
                    space.id,
                    &m.environments,
                    &m.tenants,
                    crate::authz::Cover::All,
                )
            })
            .collect();
        if out.is_empty() {
            return Ok(());
        }
        let (seen, unseen): (Vec<&&Machine>, Vec<&&Machine>) =
            out.iter().partition(|m| sees_machine(caller, space, m));
        let mut parts: Vec<String> = seen
            .iter()
            .map(|m| format!("{} ({})", m.name, m.environments.join(", ")))
            .collect();
        if !unseen.is_empty() {
            parts.push(format!("{} machine(s) you cannot see", unseen.len()));
        }
        Err(ApiError::forbidden(format!(
            "permission {p} is needed on every machine the task selects; out of your scope: {}. \
             Nothing was started: narrow the task (--machine, --environment, --role) to machines you may use",
            parts.join(", ")
        )))
    }
}

/// Why no machine matches `filter`, criterion by criterion (in its space).
pub(crate) async fn explain_no_match(
    store: &dyn Store,
    filter: &MachineFilter,
) -> ApiResult<String> {
    let space_id = filter.space_id.unwrap_or(octo_store::DEFAULT_SPACE_ID);
    let in_space = MachineFilter::space(space_id);
    let total = store.list_machines(&in_space).await?.len();
    let mut criteria = Vec::new();
    let mut why = Vec::new();
    for env in &filter.environments {
        criteria.push(format!("environment '{env}'"));
        if store.environment(space_id, env).await?.is_none() {
            why.push(format!("environment '{env}' does not exist"));
            continue;
        }
        let f = MachineFilter {
            environments: vec![env.clone()],
            ..in_space.clone()
        };
        if count(store, f).await? == 0 {
            why.push(format!("environment '{env}' has no machines"));
        }
    }
    for role in &filter.roles {
        criteria.push(format!("role '{role}'"));
        let f = MachineFilter {
            roles: vec![role.clone()],
            ..in_space.clone()
        };
        if count(store, f).await? == 0 {
            why.push(format!("no machine has role '{role}'"));
        }
    }
    if !filter.tenants.is_empty() {
        let tenants = store.list_tenants(space_id).await?;
        for tenant in &filter.tenants {
            criteria.push(format!("tenant '{tenant}'"));
            if !tenants.iter().any(|t| t.name.eq_ignore_ascii_case(tenant)) {
                why.push(format!("tenant '{tenant}' does not exist"));
                continue;
            }
            let f = MachineFilter {
                tenants: vec![tenant.clone()],
                ..in_space.clone()
            };
            if count(store, f).await? == 0 {
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

/// Filters and paging of `GET /api/tasks` (the header `X-Total-Count` says
/// how many match in all).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many tasks (default 50, at most 1000).
    #[param(minimum = 1)]
    pub limit: Option<i64>,
    /// Tasks to skip (paging).
    #[param(minimum = 0)]
    pub skip: Option<i64>,
    /// Only tasks in these states, comma-separated (Queued, Executing, Success, Failed, Canceled).
    pub state: Option<String>,
    /// Only this kind: Script, Health, Deploy, Upgrade.
    pub kind: Option<String>,
    /// Only tasks with a step on this machine.
    pub machine: Option<String>,
    /// Only tasks whose machines were in this environment.
    pub environment: Option<String>,
}

/// One page of the space's tasks the caller may see, newest first, and how
/// many match in all (the portal's list uses this too).
pub async fn task_page(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    q: &ListQuery,
) -> ApiResult<(Vec<Task>, i64)> {
    let limit = q.limit.unwrap_or(DEFAULT_TASK_LIMIT);
    if limit < 1 {
        return Err(ApiError::bad_request("`limit` must be at least 1"));
    }
    let skip = q.skip.unwrap_or(0);
    if skip < 0 {
        return Err(ApiError::bad_request("`skip` must not be negative"));
    }
    let states = match q.state.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|t| {
                let t = t.trim();
                [
                    TaskState::Queued,
                    TaskState::Executing,
                    TaskState::Success,
                    TaskState::Failed,
                    TaskState::Canceled,
                ]
                .into_iter()
                .find(|st| format!("{st:?}").eq_ignore_ascii_case(t))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "field `state`: '{t}' is not one of Queued, Executing, Success, Failed, Canceled"
                    ))
                })
            })
            .collect::<ApiResult<Vec<_>>>()?,
    };
    let query = TaskQuery {
        space_id: Some(space.id),
        states,
        kind: q.kind.clone(),
        machine: q.machine.clone(),
        environment: q.environment.clone(),
        visible_environments: caller
            .grants
            .environments_with(Permission::TaskView, space.id),
        offset: skip,
        limit: limit.min(MAX_TASK_LIMIT),
    };
    let (tasks, total) = s.store.task_page(&query).await?;
    Ok((
        tasks
            .into_iter()
            .filter(|t| sees_task(caller, space, t))
            .map(|t| shown(caller, space, t))
            .collect(),
        total,
    ))
}

/// The space's tasks the caller may see, newest first.
#[utoipa::path(
    get,
    path = "/api/tasks",
    tag = "tasks",
    params(ListQuery),
    responses(
        (status = 200, description = "The tasks (header X-Total-Count: how many match in all)", body = [Task]),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn list_tasks(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = q?;
    let (tasks, total) = task_page(&s, &caller, &space, &q).await?;
    let mut resp = Json(tasks).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&total.to_string()) {
        resp.headers_mut().insert("x-total-count", v);
    }
    Ok(resp)
}

/// A task and its steps.
#[utoipa::path(
    get,
    path = "/api/tasks/{id}",
    tag = "tasks",
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub(crate) async fn get_task(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<TaskView>> {
    let Path(id) = id?;
    Ok(Json(
        load_view(s.store.as_ref(), &caller, &space, &id).await?,
    ))
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
    params(
        ("id" = String, Path, description = "The task's id, e.g. ServerTasks-42"),
        LogQuery,
    ),
    responses(
        (status = 200, description = "The lines", body = [TaskLogLine]),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub(crate) async fn get_log(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if limit < 1 {
        return Err(ApiError::bad_request("`limit` must be at least 1"));
    }
    visible_task(s.store.as_ref(), &caller, &space, &id).await?;
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
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    responses(
        (status = 202, description = "Cancel requested", body = CancelReply),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_task(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let task = cancel(&s, &caller, &space, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(CancelReply { task })))
}

/// Asks a task to cancel (the portal's Cancel too).
pub async fn cancel(s: &AppState, caller: &Caller, space: &Space, id: &str) -> ApiResult<Task> {
    let task = visible_task(s.store.as_ref(), caller, space, id).await?;
    caller.require_on(
        Permission::TaskCancel,
        space,
        &task.environments,
        &[],
        &format!("task {id}"),
    )?;
    match s.store.request_cancel(id).await {
        Ok(()) => {}
        Err(StoreError::NotFound { .. }) => return Err(task_not_found(id)),
        Err(e) => return Err(e.into()),
    }
    s.engine.cancel(id);
    // On a cluster, the nodes running its steps are told too.
    if s.store.shared() {
        if let Err(e) = s
            .store
            .publish(&octo_store::ClusterEvent::TaskCancel {
                task_id: id.to_string(),
            })
            .await
        {
            tracing::warn!("telling the other nodes to cancel task {id}: {e} (they see the request at their next look at the task)");
        }
    }
    let task = visible_task(s.store.as_ref(), caller, space, id).await?;
    if task.cancel_requested {
        tracing::info!("cancel requested for task {id}");
        s.audit(
            caller,
            Some(space),
            "canceled",
            "task",
            id,
            task.description.clone(),
        )
        .await;
    }
    Ok(task)
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
    params(
        ("id" = String, Path, description = "The task's id, e.g. ServerTasks-42"),
        ("after" = Option<i64>, Query, description = "Only lines with a greater id (default: `Last-Event-ID`, else 0)"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this line id (when `after` is not given)"),
    ),
    responses(
        (status = 200, description = "A stream of server-sent events (`text/event-stream`), each one of `TaskStreamEvent`: `task` (data: a TaskView) first and on every change of state, `log` (id: the line's id; data: a TaskLogLine) per line, `end` (data: the final TaskView) last. Comment lines keep the stream alive.", content_type = "text/event-stream", body = [TaskStreamEvent]),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 404, description = "No such task", body = ErrorBody),
    )
)]
#[allow(dead_code)] // Documentation only; see `sse::stream_log`.
pub(crate) fn stream_log_doc() {}

/// Decides what happens to a machine whose deployment failed under guided failure.
#[utoipa::path(
    post,
    path = "/api/tasks/{id}/guidance",
    tag = "tasks",
    params(("id" = String, Path, description = "The task's id, e.g. ServerTasks-42")),
    request_body = GuidanceRequest,
    responses(
        (status = 202, description = "Delivered", body = TaskView),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such task, or the machine is not part of it", body = ErrorBody),
        (status = 409, description = "The machine is not waiting for a decision", body = ErrorBody),
    )
)]
pub(crate) async fn guide_task(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    id: Result<Path<String>, PathRejection>,
    ApiJson(req): ApiJson<GuidanceRequest>,
) -> ApiResult<impl IntoResponse> {
    let Path(id) = id?;
    let view = guide(&s, &caller, &space, &id, &req).await?;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Delivers a decision to a machine waiting under guided failure (the
/// portal's Retry / Ignore / Fail too).
pub async fn guide(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    id: &str,
    req: &GuidanceRequest,
) -> ApiResult<TaskView> {
    req.validate()?;
    let view = load_view(s.store.as_ref(), caller, space, id).await?;
    caller.require_on(
        Permission::InterruptionSubmit,
        space,
        &view.task.environments,
        &[],
        &format!("task {id}"),
    )?;
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
    // On a cluster the step may wait on another node: it is told there, and
    // that node confirms.
    let delivered = step.state == TaskState::Executing
        && s.engine
            .guide_anywhere(id, step.machine_id, req.action)
            .await?;
    if !delivered {
        return Err(ApiError::conflict(format!(
            "machine '{}' of task {id} is not waiting for a decision (its state: {:?}); only a failed machine of a deployment started with --guided-failure waits for one",
            step.machine_name, step.state
        )));
    }
    tracing::info!(
        "guidance for {} in task {id}: {:?}",
        step.machine_name,
        req.action
    );
    s.audit(
        caller,
        Some(space),
        "guided",
        "task",
        id,
        format!("{}: {:?}", step.machine_name, req.action),
    )
    .await;
    Ok(view)
}
