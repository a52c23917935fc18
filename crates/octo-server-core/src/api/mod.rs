//! The REST API under `/api`, JSON in and out, authenticated with the
//! `X-Octopus-ApiKey` header ([`crate::auth`]).
//!
//! One module per area: [`environments`], [`machines`], [`api_keys`],
//! [`users`], [`tasks`] (and the live log, [`sse`]), [`packages`] (the
//! built-in feed). Errors are [`ApiError`]s (see [`error`]).
//!
//! `GET /api/openapi.json` (no key needed) is the OpenAPI 3 description of all
//! of this, generated from the handlers' `#[utoipa::path]` annotations
//! ([`ApiDoc`]); a new route must be added there and to `tests/openapi.rs`.

pub mod api_keys;
pub mod environments;
pub mod error;
pub mod machines;
pub mod packages;
pub mod sse;
pub mod tasks;
pub mod users;

use axum::routing::{get, post};
use axum::{Json, Router};
use octo_api_types::{
    ApiInfo, ApiKey, CancelReply, CreatedApiKey, DeployRequest, EndpointKind, Environment,
    ErrorBody, Guidance, GuidanceRequest, HealthRequest, HealthStatus, Isolation, Login,
    LoginReply, Machine, MachineRequest, NewApiKey, NewEnvironment, NewUser, Package, PushReply,
    RegisterReply, ScriptRequest, ServerInfo, Syntax, Task, TaskLogLine, TaskState, TaskStep,
    TaskView, User, API_KEY_HEADER,
};
use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, SecurityScheme};
use utoipa::OpenApi;

pub use error::{ApiError, ApiJson, ApiResult};

use crate::state::AppState;

/// Name of the API key security scheme in the OpenAPI document.
pub(crate) const SECURITY_SCHEME: &str = "api_key";

/// The OpenAPI description of the REST API, served at `GET /api/openapi.json`.
///
/// Every route of [`router`] (and of the modules' `routes`) must be listed in `paths`;
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
        environments::list_environments,
        environments::create_environment,
        environments::delete_environment,
        machines::list_machines,
        machines::create_machine,
        machines::register,
        machines::get_machine,
        machines::delete_machine,
        api_keys::list_api_keys,
        api_keys::create_api_key,
        api_keys::revoke_api_key,
        users::create_user,
        users::login,
        tasks::list_tasks,
        tasks::create_script_task,
        tasks::create_health_task,
        tasks::get_task,
        tasks::get_log,
        tasks::stream_log_doc,
        tasks::cancel_task,
        tasks::create_deploy_task,
        tasks::create_upgrade_task,
        tasks::guide_task,
        packages::push_package,
        packages::list_packages,
        packages::get_package,
        packages::delete_package,
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
        CancelReply,
        DeployRequest,
        GuidanceRequest,
        Guidance,
        Package,
        PushReply,
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

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/server", get(server_info))
        .merge(environments::routes())
        .merge(machines::routes())
        .merge(api_keys::routes())
        .merge(users::routes())
        .merge(tasks::routes())
        .merge(packages::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::authenticate,
        ));
    Router::new()
        .route("/api", get(api_root))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/users/login", post(users::login))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such API route; see /api/server") })
        .with_state(state)
}

/// What is serving here (no key needed).
#[utoipa::path(
    get,
    path = "/api",
    tag = "server",
    responses((status = 200, description = "The application and its version", body = ApiInfo))
)]
async fn api_root() -> Json<ApiInfo> {
    Json(ApiInfo {
        application: "octopus".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
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
async fn server_info(axum::extract::State(s): axum::extract::State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        thumbprint: s.thumbprint.to_string(),
        comms_port: s.comms_port,
        web_socket_port: s.web_socket.as_ref().map(|(p, _)| *p),
        web_socket_path: s.web_socket.as_ref().map(|(_, path)| path.clone()),
        tool_version: s.tool.as_ref().as_ref().ok().map(|t| t.version.clone()),
    })
}
