//! The REST API under `/api`, JSON in and out, authenticated with the
//! `X-Octopus-ApiKey` header.
//!
//! Errors are `{"error": "..."}` with a status that says who must act: 400 for a
//! malformed request (naming the field), 401 without valid credentials (saying
//! nothing else), 404/409 for missing or duplicate things.
//!
//! `GET /api/openapi.json` (no key needed) is the OpenAPI 3 description of all
//! of this, generated from the handlers' `#[utoipa::path]` annotations
//! ([`ApiDoc`]).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use octo_store::{
    ApiKey, EndpointKind, Environment, HealthStatus, Machine, MachineFilter, NewMachine,
    StoreError, Task, TaskLogLine, TaskState, TaskStep, User,
};
use octo_tls::Thumbprint;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::server::{hash_api_key, new_api_key, now_ms, AppState};
use crate::tasks::{HealthRequest, Isolation, ScriptRequest, Syntax, TaskView};

/// Header carrying the API key.
pub(crate) const API_KEY_HEADER: &str = "X-Octopus-ApiKey";

/// Name of the API key security scheme in the OpenAPI document.
pub(crate) const SECURITY_SCHEME: &str = "api_key";

/// The OpenAPI description of the REST API, served at `GET /api/openapi.json`.
///
/// Every route of [`router`] (and of `tasks::routes`) must be listed in `paths`;
/// `tests/openapi.rs` checks the document against the list of routes.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Octopus server API",
        description = "REST API of the Octopus server. JSON in and out; errors are \
            `{\"error\": \"...\"}`. Every route but `GET /api`, `GET /api/openapi.json` and \
            `POST /api/users/login` needs an API key in the `X-Octopus-ApiKey` header."
    ),
    paths(
        api_root,
        openapi_json,
        server_info,
        list_environments,
        create_environment,
        delete_environment,
        list_machines,
        create_machine,
        register,
        get_machine,
        delete_machine,
        list_api_keys,
        create_api_key,
        revoke_api_key,
        create_user,
        login,
        crate::tasks::list_tasks,
        crate::tasks::create_script_task,
        crate::tasks::create_health_task,
        crate::tasks::get_task,
        crate::tasks::get_log,
        crate::tasks::stream_log_doc,
        crate::tasks::cancel_task,
        crate::tasks::create_deploy_task,
        crate::tasks::create_upgrade_task,
        crate::tasks::guide_task,
        crate::packages::push_package,
        crate::packages::list_packages,
        crate::packages::get_package,
        crate::packages::delete_package,
    ),
    components(schemas(
        ErrorBody,
        ApiInfo,
        ServerInfo,
        NewEnvironment,
        Environment,
        MachineRequest,
        Machine,
        EndpointKind,
        HealthStatus,
        RegisterReply,
        NewApiKey,
        ApiKey,
        CreatedApiKey,
        NewUser,
        User,
        Login,
        LoginReply,
        Task,
        TaskState,
        TaskStep,
        TaskView,
        TaskLogLine,
        ScriptRequest,
        Syntax,
        Isolation,
        HealthRequest,
        crate::tasks::CancelReply,
        crate::tasks::DeployRequest,
        crate::tasks::GuidanceRequest,
        crate::tasks::Guidance,
        octo_store::Package,
        crate::packages::PushReply,
    )),
    modifiers(&SecurityAddon),
    tags(
        (name = "server", description = "The server itself"),
        (name = "environments", description = "Environments"),
        (name = "machines", description = "Deployment targets and workers"),
        (name = "api-keys", description = "API keys"),
        (name = "users", description = "Users and login"),
        (name = "tasks", description = "Server tasks: health checks, scripts, deployments, tool upgrades"),
        (name = "packages", description = "The built-in package feed"),
    )
)]
pub struct ApiDoc;

/// Declares the `X-Octopus-ApiKey` header scheme the authenticated paths refer to.
#[derive(Debug)]
struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::with_description(
                API_KEY_HEADER,
                "An API key (`octopus api-key create`) or a session key from `POST /api/users/login`.",
            ))),
        );
    }
}

/// The error body of every failed request.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes `ApiError`'s body for the OpenAPI document only.
pub(crate) struct ErrorBody {
    /// What went wrong and, where possible, how to fix it.
    error: String,
}

/// An API error.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(r: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(format!("malformed query: {}", r.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(r: axum::extract::rejection::PathRejection) -> Self {
        Self::bad_request(format!("malformed path: {}", r.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Database(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("store: {e}");
        }
        Self::new(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!("{e:#}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// `Json` whose rejections are 400s naming what is wrong (the field, line and column).
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "malformed request: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub User);

async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let unauthorized = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("authentication required: send a valid API key in the {API_KEY_HEADER} header"),
        )
        .into_response()
    };
    let Some(key) = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    else {
        return unauthorized();
    };
    match state
        .store
        .authenticate_api_key(&hash_api_key(key.trim()), now_ms())
        .await
    {
        Ok(Some((_, user))) => {
            req.extensions_mut().insert(Caller(user));
            next.run(req).await
        }
        Ok(None) => unauthorized(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/server", get(server_info))
        .route(
            "/api/environments",
            get(list_environments).post(create_environment),
        )
        .route("/api/environments/{name}", delete(delete_environment))
        .route("/api/machines", get(list_machines).post(create_machine))
        .route("/api/machines/register", post(register))
        .route(
            "/api/machines/{name}",
            get(get_machine).delete(delete_machine),
        )
        .route("/api/api-keys", get(list_api_keys).post(create_api_key))
        .route("/api/api-keys/{id}", delete(revoke_api_key))
        .route("/api/users", post(create_user))
        .merge(crate::tasks::routes())
        .merge(crate::packages::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .route("/api", get(api_root))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/users/login", post(login))
        .merge(api)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such API route; see /api/server")
        })
        .with_state(state)
}

/// `GET /api`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes the `json!` body for the OpenAPI document only.
struct ApiInfo {
    /// Always "octopus".
    application: String,
    version: String,
}

/// What is serving here (no key needed).
#[utoipa::path(
    get,
    path = "/api",
    tag = "server",
    responses((status = 200, description = "The application and its version", body = ApiInfo))
)]
async fn api_root() -> Json<serde_json::Value> {
    Json(json!({ "application": "octopus", "version": env!("CARGO_PKG_VERSION") }))
}

/// This document (no key needed).
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "server",
    responses((status = 200, description = "The OpenAPI 3 description of this API", content_type = "application/json", body = Object))
)]
async fn openapi_json() -> Json<&'static utoipa::openapi::OpenApi> {
    static DOC: std::sync::LazyLock<utoipa::openapi::OpenApi> =
        std::sync::LazyLock::new(ApiDoc::openapi);
    Json(&DOC)
}

/// `GET /api/server`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes the `json!` body for the OpenAPI document only.
struct ServerInfo {
    version: String,
    /// The server's comms certificate thumbprint, which tentacles must trust.
    thumbprint: String,
    /// The port polling tentacles connect to.
    comms_port: u16,
    /// The TLS port for polling over WebSocket (`wss://HOST:PORT/PATH`) and the API
    /// over TLS; null when off.
    web_socket_port: Option<u16>,
    /// The WebSocket path, e.g. "/tentacle"; null when off.
    web_socket_path: Option<String>,
    /// The deployment tool version this server pushes; null when it has none.
    tool_version: Option<String>,
}

/// The server's version, comms thumbprint and polling port.
#[utoipa::path(
    get,
    path = "/api/server",
    tag = "server",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "About the server", body = ServerInfo),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn server_info(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "thumbprint": s.thumbprint.to_string(),
        "comms_port": s.comms_port,
        "web_socket_port": s.web_socket.as_ref().map(|(p, _)| *p),
        "web_socket_path": s.web_socket.as_ref().map(|(_, path)| path.clone()),
        "tool_version": s.tool.as_ref().as_ref().ok().map(|t| t.version.clone()),
    }))
}

/// `POST /api/environments`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewEnvironment {
    name: String,
    #[serde(default)]
    description: String,
}

/// All environments, by name.
#[utoipa::path(
    get,
    path = "/api/environments",
    tag = "environments",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The environments", body = [Environment]),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_environments(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.store.list_environments().await?))
}

/// Adds an environment.
#[utoipa::path(
    post,
    path = "/api/environments",
    tag = "environments",
    security(("api_key" = [])),
    request_body = NewEnvironment,
    responses(
        (status = 201, description = "Created", body = Environment),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "An environment of that name exists", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_environment(
    State(s): State<AppState>,
    ApiJson(e): ApiJson<NewEnvironment>,
) -> ApiResult<impl IntoResponse> {
    if e.name.trim().is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    Ok((
        StatusCode::CREATED,
        Json(
            s.store
                .create_environment(e.name.trim(), &e.description)
                .await?,
        ),
    ))
}

/// Deletes an environment (refused while machines are in it).
#[utoipa::path(
    delete,
    path = "/api/environments/{name}",
    tag = "environments",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "The environment's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such environment", body = ErrorBody),
        (status = 422, description = "Machines are in it", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn delete_environment(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_environment(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters of `GET /api/machines`; all given ones must match.
#[derive(Debug, Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
struct MachineQuery {
    /// Only machines in this environment.
    environment: Option<String>,
    /// Only machines with this role.
    role: Option<String>,
    /// Only machines connected to this tenant.
    tenant: Option<String>,
}

/// Machines, by name, optionally filtered.
#[utoipa::path(
    get,
    path = "/api/machines",
    tag = "machines",
    security(("api_key" = [])),
    params(MachineQuery),
    responses(
        (status = 200, description = "The machines", body = [Machine]),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_machines(
    State(s): State<AppState>,
    Query(q): Query<MachineQuery>,
) -> ApiResult<impl IntoResponse> {
    let filter = MachineFilter {
        names: vec![],
        environments: q.environment.into_iter().collect(),
        roles: q.role.into_iter().collect(),
        tenants: q.tenant.into_iter().collect(),
    };
    Ok(Json(s.store.list_machines(&filter).await?))
}

/// One machine.
#[utoipa::path(
    get,
    path = "/api/machines/{name}",
    tag = "machines",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "The machine", body = Machine),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn get_machine(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Machine>> {
    s.store.machine(&name).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("machine '{name}' does not exist"),
        )
    })
}

/// Deletes a machine (a polling one is no longer trusted at once).
#[utoipa::path(
    delete,
    path = "/api/machines/{name}",
    tag = "machines",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn delete_machine(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let machine = s.store.machine(&name).await?;
    s.store.delete_machine(&name).await?;
    if let Some(m) = machine {
        if let Ok(ep) = endpoint_of(&m) {
            s.comms.forget(&ep);
        }
    }
    s.refresh_polling_trust().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The comms endpoint of a stored machine.
pub(crate) fn endpoint_of(m: &Machine) -> Result<octo_comms::Endpoint, octo_comms::CommsError> {
    let tp: Thumbprint = m
        .thumbprint
        .parse()
        .map_err(
            |e: octo_tls::ThumbprintParseError| octo_comms::CommsError::InvalidEndpoint {
                endpoint: m.uri.clone(),
                reason: e.to_string(),
            },
        )?;
    match m.kind {
        EndpointKind::Listening => octo_comms::Endpoint::listening(&m.uri, tp),
        EndpointKind::Polling => octo_comms::Endpoint::polling(&m.uri, tp),
    }
}

/// A machine as the API accepts it (add-listening, register).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct MachineRequest {
    name: String,
    /// "TentaclePassive" (listening) or "TentacleActive" (polling).
    comms_style: String,
    /// Listening: https://HOST:PORT/. Polling: poll://SUBSCRIPTION/ or the subscription id.
    uri: String,
    thumbprint: String,
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    tenant_tags: Vec<String>,
    policy: Option<String>,
    worker_pool: Option<String>,
    /// Replace a machine of the same name.
    #[serde(default)]
    force: bool,
}

/// `POST /api/machines/register`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct RegisterReply {
    machine: Machine,
    /// The server's comms thumbprint, which the tentacle must trust.
    server_thumbprint: String,
    /// The server's polling port.
    comms_port: u16,
}

fn validate(r: &MachineRequest) -> ApiResult<NewMachine> {
    if r.name.trim().is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    let thumbprint: Thumbprint =
        r.thumbprint
            .parse()
            .map_err(|e: octo_tls::ThumbprintParseError| {
                ApiError::bad_request(format!("field `thumbprint`: {e}"))
            })?;
    let (kind, uri) = match r.comms_style.as_str() {
        "TentaclePassive" | "Listening" => {
            let ep = octo_comms::Endpoint::listening(&r.uri, thumbprint).map_err(|e| ApiError::bad_request(format!("field `uri`: {e}")))?;
            (EndpointKind::Listening, ep.to_string())
        }
        "TentacleActive" | "Polling" => {
            let ep = octo_comms::Endpoint::polling(&r.uri, thumbprint).map_err(|e| ApiError::bad_request(format!("field `uri`: {e}")))?;
            (EndpointKind::Polling, ep.to_string())
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "field `comms_style`: '{other}' is not TentaclePassive (listening) or TentacleActive (polling)"
            )))
        }
    };
    if r.worker_pool.is_none() && r.environments.is_empty() {
        return Err(ApiError::bad_request(
            "field `environments`: a deployment target needs at least one environment",
        ));
    }
    Ok(NewMachine {
        name: r.name.trim().to_string(),
        kind,
        uri,
        thumbprint: thumbprint.to_string(),
        environments: r.environments.clone(),
        roles: r.roles.clone(),
        tenants: r.tenants.clone(),
        tenant_tags: r.tenant_tags.clone(),
        policy: r.policy.clone(),
        worker_pool: r.worker_pool.clone(),
    })
}

async fn save_machine(s: &AppState, r: &MachineRequest) -> ApiResult<Machine> {
    let new = validate(r)?;
    // One certificate, one machine: a second machine with the same thumbprint is
    // almost always a cloned VM image, and requests would reach the wrong one.
    let clash: Vec<String> = s
        .store
        .machines_by_thumbprint(&new.thumbprint)
        .await?
        .into_iter()
        .filter(|m| !m.name.eq_ignore_ascii_case(&new.name))
        .map(|m| m.name)
        .collect();
    if !clash.is_empty() {
        tracing::warn!(
            "refused machine '{}': thumbprint {} is already used by {}",
            new.name,
            new.thumbprint,
            clash.join(", ")
        );
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "thumbprint {} is already used by machine {} (a cloned VM image?); run `tentacle new-certificate` on the new machine and register it again",
                new.thumbprint,
                clash.join(", ")
            ),
        ));
    }
    let existing = s.store.machine(&new.name).await?;
    let machine = match (existing, r.force) {
        (Some(old), true) => {
            if let Ok(ep) = endpoint_of(&old) {
                s.comms.forget(&ep);
            }
            s.store.replace_machine(&new).await?
        }
        (Some(_), false) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "machine '{}' already exists; pass --force to replace it",
                    new.name
                ),
            ))
        }
        (None, _) => s.store.create_machine(&new).await?,
    };
    s.refresh_polling_trust().await?;
    Ok(machine)
}

/// Adds a machine.
#[utoipa::path(
    post,
    path = "/api/machines",
    tag = "machines",
    security(("api_key" = [])),
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Created (or replaced, with `force`)", body = Machine),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_machine(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(save_machine(&s, &r).await?)))
}

/// Registers a machine (`tentacle register-with`): as adding one, answering with the server's comms thumbprint and polling port.
#[utoipa::path(
    post,
    path = "/api/machines/register",
    tag = "machines",
    security(("api_key" = [])),
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Registered; the answer carries the server's thumbprint to trust", body = RegisterReply),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn register(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    let machine = save_machine(&s, &r).await?;
    tracing::info!(
        "registered machine '{}' ({}, thumbprint {})",
        machine.name,
        machine.uri,
        machine.thumbprint
    );
    Ok((
        StatusCode::CREATED,
        Json(RegisterReply {
            machine,
            server_thumbprint: s.thumbprint.to_string(),
            comms_port: s.comms_port,
        }),
    ))
}

/// `POST /api/api-keys`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewApiKey {
    purpose: String,
}

/// The caller's API keys (an administrator's: everyone's).
#[utoipa::path(
    get,
    path = "/api/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The keys (never the keys themselves)", body = [ApiKey]),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn list_api_keys(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
) -> ApiResult<impl IntoResponse> {
    let scope = if caller.0.is_admin {
        None
    } else {
        Some(caller.0.id)
    };
    Ok(Json(s.store.list_api_keys(scope).await?))
}

/// `POST /api/api-keys`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes the `json!` body for the OpenAPI document only.
struct CreatedApiKey {
    /// The key, shown this once only.
    api_key: String,
    key: ApiKey,
}

/// Creates an API key for the caller.
#[utoipa::path(
    post,
    path = "/api/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    request_body = NewApiKey,
    responses(
        (status = 201, description = "Created; the only time the key is shown", body = CreatedApiKey),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_api_key(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(r): ApiJson<NewApiKey>,
) -> ApiResult<impl IntoResponse> {
    let key = new_api_key();
    let stored = s
        .store
        .create_api_key(caller.0.id, &r.purpose, &hash_api_key(&key), &key[..8])
        .await?;
    // The only time the key is ever shown.
    Ok((
        StatusCode::CREATED,
        Json(json!({ "api_key": key, "key": stored })),
    ))
}

/// Revokes an API key.
#[utoipa::path(
    delete,
    path = "/api/api-keys/{id}",
    tag = "api-keys",
    security(("api_key" = [])),
    params(("id" = i64, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn revoke_api_key(
    State(s): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    s.store.revoke_api_key(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: Option<String>,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    is_admin: bool,
}

/// Hashes a password with argon2id (PHC string, salted).
pub(crate) fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("making a salt: {e}"))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))
}

fn verify_password(password: &str, phc: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Adds a user (administrators only). Without a password the user can only use API keys.
#[utoipa::path(
    post,
    path = "/api/users",
    tag = "users",
    security(("api_key" = [])),
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 403, description = "The caller is not an administrator", body = ErrorBody),
        (status = 409, description = "The username exists", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
async fn create_user(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(u): ApiJson<NewUser>,
) -> ApiResult<impl IntoResponse> {
    if !caller.0.is_admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only administrators can create users",
        ));
    }
    if u.username.trim().is_empty() {
        return Err(ApiError::bad_request("field `username` must not be empty"));
    }
    if let Some(p) = &u.password {
        if p.chars().count() < 8 {
            return Err(ApiError::bad_request(
                "field `password` must have at least 8 characters",
            ));
        }
    }
    let hash = match &u.password {
        Some(p) => {
            let p = p.clone();
            Some(
                tokio::task::spawn_blocking(move || hash_password(&p))
                    .await
                    .map_err(|e| anyhow::anyhow!(e))??,
            )
        }
        None => None,
    };
    let display = if u.display_name.is_empty() {
        u.username.clone()
    } else {
        u.display_name.clone()
    };
    let user = s
        .store
        .create_user(u.username.trim(), &display, hash.as_deref(), u.is_admin)
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// `POST /api/users/login`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

/// `POST /api/users/login`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)] // Describes the `json!` body for the OpenAPI document only.
struct LoginReply {
    /// The session key, to send in `X-Octopus-ApiKey`; shown this once only.
    api_key: String,
    key: ApiKey,
    user: User,
}

/// Username and password in, a session key out. The session key is an API key
/// (stored hashed, revocable with `api-key revoke`) used in the same header.
#[utoipa::path(
    post,
    path = "/api/users/login",
    tag = "users",
    request_body = Login,
    responses(
        (status = 200, description = "Logged in", body = LoginReply),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
    )
)]
async fn login(
    State(s): State<AppState>,
    ApiJson(l): ApiJson<Login>,
) -> ApiResult<impl IntoResponse> {
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "wrong username or password");
    let Some((user, Some(hash))) = s.store.user_by_name(&l.username).await? else {
        return Err(refused());
    };
    let password = l.password.clone();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if !ok {
        tracing::warn!("failed login for '{}'", l.username);
        return Err(refused());
    }
    let key = new_api_key();
    let purpose = format!("session of {} (login at {})", user.username, now_ms());
    let stored = s
        .store
        .create_api_key(user.id, &purpose, &hash_api_key(&key), &key[..8])
        .await?;
    Ok(Json(json!({ "api_key": key, "key": stored, "user": user })))
}
