//! The REST API under `/api`, JSON in and out, authenticated with the
//! `X-Octopus-ApiKey` header and authorized by one gate ([`guard`], with the
//! rules in [`crate::authz`]).
//!
//! One module per area, each listing its routes with what they need
//! ([`guard::Route`]): [`spaces`], [`environments`], [`machines`], [`tasks`]
//! (and the live log, [`sse`]), [`packages`] (the built-in feed), [`users`],
//! [`api_keys`], [`teams`], [`roles`], [`audit`]. Errors are [`ApiError`]s.
//!
//! `GET /api/openapi.json` (no key needed) is the OpenAPI 3 description of all
//! of this, generated from the handlers' `#[utoipa::path]` annotations
//! ([`ApiDoc`]) and the route table (which adds to each operation the
//! permission it needs, its 401 and 403 answers, and its copy under
//! `/api/spaces/{space}`); a new route must be added there and to `tests/openapi.rs`.

pub mod api_keys;
pub mod audit;
pub mod environments;
pub mod error;
pub mod guard;
pub mod machines;
pub mod nodes;
pub mod packages;
pub mod policies;
pub mod roles;
pub mod spaces;
pub mod sse;
pub mod tasks;
pub mod teams;
pub mod users;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::{Json, Router};
use octo_api_types::{
    ApiInfo, ApiKey, AuditEvent, CancelReply, CertificateRotationReport, CreatedApiKey,
    DeployRequest, DiscoverReply, DiscoverRequest, EndpointKind, Environment, EnvironmentUpdate,
    ErrorBody, Grant, Guidance, GuidanceRequest, HealthRequest, HealthStatus, Isolation, Login,
    LoginReply, Machine, MachinePolicy, MachineRequest, MachineRotation, MachineUpdate, NewApiKey,
    NewEnvironment, NewGrant, NewMember, NewRole, NewSpace, NewTeam, NewUser, Node, NodeState,
    Package, Permission, PushReply, RegisterReply, Role, ScriptRequest, ServerInfo, SetPassword,
    Space, Syntax, Task, TaskLogLine, TaskState, TaskStep, TaskStreamEvent, TaskView, Team, Tenant,
    TentacleUpgradeRequest, User, WhoAmI, WorkerPool, API_KEY_HEADER,
};
use utoipa::openapi::security::{ApiKey as ApiKeyScheme, ApiKeyValue, SecurityScheme};
use utoipa::OpenApi;

pub use error::{ApiError, ApiJson, ApiResult};
pub use guard::Route;

use crate::authz::Access;
use crate::state::AppState;

/// Name of the API key security scheme in the OpenAPI document.
pub(crate) const SECURITY_SCHEME: &str = "api_key";

/// Every route of the API, with what it needs.
pub fn routes() -> Vec<Route> {
    use guard::get;
    let mut all = vec![
        get("/api", Access::Public, api_root),
        get("/api/openapi.json", Access::Public, openapi_json),
        get("/api/server", Access::Authenticated, server_info),
        guard::post(
            "/api/server/rotate-certificate",
            Access::System(Permission::AdministerSystem),
            rotate_certificate,
        ),
    ];
    for area in [
        spaces::routes(),
        environments::routes(),
        machines::routes(),
        tasks::routes(),
        packages::routes(),
        policies::routes(),
        users::routes(),
        api_keys::routes(),
        teams::routes(),
        roles::routes(),
        audit::routes(),
        nodes::routes(),
    ] {
        all.extend(area);
    }
    all
}

/// The route table: what each route (method, path) needs.
pub fn route_table() -> Vec<(axum::http::Method, &'static str, Access)> {
    routes()
        .into_iter()
        .map(|r| (r.method, r.path, r.access))
        .collect()
}

/// The API's routes, behind the gate.
pub fn router(state: AppState) -> Router {
    let mut inner = Router::new();
    let mut table = guard::Table::new();
    for r in routes() {
        table.insert((r.method, r.path), r.access);
        inner = inner.route(r.path, r.handler);
    }
    let inner = inner
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Arc::new(table)),
            guard::guard,
        ))
        .fallback(|| async { ApiError::not_found("no such API route; see /api/server") })
        .with_state(state);
    // Space paths are rewritten before routing; every error answer is JSON.
    let service = tower::ServiceExt::map_request(inner, guard::in_space);
    let service = tower::Layer::layer(&axum::middleware::from_fn(error::json_errors), service);
    Router::new().fallback_service(service)
}

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
            `POST /api/users/login` needs an API key (or a login's session key) in the \
            `X-Octopus-ApiKey` header, and the permission each operation names \
            (`x-octopus-permission`). Spaces: a route that works in a space is served at \
            `/api/spaces/{space}/...` (the space's name or `Spaces-N`) and, without the prefix, \
            in the `Default` space; something of another space answers 404."
    ),
    paths(
        api_root,
        openapi_json,
        server_info,
        rotate_certificate,
        spaces::list_spaces,
        spaces::create_space,
        spaces::get_space,
        spaces::delete_space,
        environments::list_environments,
        environments::create_environment,
        environments::delete_environment,
        environments::update_environment,
        machines::list_machines,
        machines::create_machine,
        machines::register,
        machines::get_machine,
        machines::delete_machine,
        machines::update_machine,
        machines::discover,
        machines::worker_pools,
        policies::list_tenants,
        policies::list_policies,
        policies::create_policy,
        policies::update_policy,
        api_keys::list_api_keys,
        api_keys::create_api_key,
        api_keys::revoke_api_key,
        users::list_users,
        users::create_user,
        users::get_user,
        users::whoami,
        users::disable_user,
        users::enable_user,
        users::set_password,
        users::login,
        users::logout,
        teams::list_teams,
        teams::create_team,
        teams::get_team,
        teams::delete_team,
        teams::add_member,
        teams::remove_member,
        teams::add_grant,
        teams::remove_grant,
        roles::list_roles,
        roles::create_role,
        roles::get_role,
        audit::list_audit,
        tasks::list_tasks,
        tasks::create_script_task,
        tasks::create_health_task,
        tasks::get_task,
        tasks::get_log,
        tasks::stream_log_doc,
        tasks::cancel_task,
        tasks::create_deploy_task,
        tasks::create_upgrade_task,
        tasks::create_tentacle_upgrade_task,
        tasks::guide_task,
        packages::push_package,
        packages::list_packages,
        packages::get_package,
        packages::download_package,
        packages::delete_package,
        nodes::list_nodes,
        nodes::ping,
        nodes::drain_node,
        nodes::undrain_node,
    ),
    components(schemas(
        ErrorBody,
        octo_api_types::validate::Name,
        octo_api_types::validate::EnvironmentName,
        octo_api_types::validate::Text,
        octo_api_types::validate::PackageId,
        ApiInfo,
        ServerInfo,
        CertificateRotationReport,
        MachineRotation,
        Space,
        NewSpace,
        NewEnvironment,
        Environment,
        MachineRequest,
        MachineUpdate,
        DiscoverRequest,
        DiscoverReply,
        WorkerPool,
        Tenant,
        MachinePolicy,
        octo_api_types::TentacleUpdate,
        octo_api_types::NewPolicy,
        octo_api_types::PolicySettings,
        EnvironmentUpdate,
        Machine,
        EndpointKind,
        HealthStatus,
        RegisterReply,
        NewApiKey,
        ApiKey,
        CreatedApiKey,
        NewUser,
        User,
        WhoAmI,
        SetPassword,
        Login,
        LoginReply,
        Permission,
        Role,
        NewRole,
        Team,
        NewTeam,
        NewMember,
        Grant,
        NewGrant,
        AuditEvent,
        Task,
        TaskState,
        Node,
        NodeState,
        TaskStep,
        TaskView,
        TaskLogLine,
        TaskStreamEvent,
        ScriptRequest,
        Syntax,
        Isolation,
        HealthRequest,
        TentacleUpgradeRequest,
        CancelReply,
        DeployRequest,
        GuidanceRequest,
        Guidance,
        Package,
        PushReply,
    )),
    modifiers(&AccessDoc),
    tags(
        (name = "server", description = "The server itself"),
        (name = "environments", description = "Environments"),
        (name = "machines", description = "Deployment targets and workers"),
        (name = "spaces", description = "Spaces: partitions of environments, machines, tasks, packages and teams"),
        (name = "api-keys", description = "API keys"),
        (name = "users", description = "Users, passwords, login and logout"),
        (name = "teams", description = "Teams: members and the roles granted to them"),
        (name = "roles", description = "Roles: named sets of permissions"),
        (name = "nodes", description = "Server nodes sharing the database: heartbeats, drain, ping"),
        (name = "audit", description = "The audit log"),
        (name = "tasks", description = "Server tasks: health checks, scripts, deployments, tool upgrades"),
        (name = "packages", description = "The built-in package feed"),
    )
)]
pub struct ApiDoc;

/// Adds to the document what the route table knows: the API key scheme; on
/// every operation that needs a caller, the key, the permission
/// (`x-octopus-permission`) and the 401 and 403 answers; and a copy of every
/// space route under `/api/spaces/{space}`.
#[derive(Debug)]
struct AccessDoc;

impl utoipa::Modify for AccessDoc {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{HttpMethod, Operation, Parameter, ParameterIn};
        use utoipa::openapi::{RefOr, Required, ResponseBuilder};

        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SECURITY_SCHEME,
            SecurityScheme::ApiKey(ApiKeyScheme::Header(ApiKeyValue::with_description(
                API_KEY_HEADER,
                "An API key (`octopus api-key create`) or a session key from `POST /api/users/login`.",
            ))),
        );
        let error = |text: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(text)
                    .content(
                        "application/json",
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        let table = route_table();
        let mut spaced: BTreeMap<String, utoipa::openapi::PathItem> = BTreeMap::new();
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Post, &mut item.post),
                (HttpMethod::Put, &mut item.put),
                (HttpMethod::Delete, &mut item.delete),
            ] {
                let Some(op) = op.as_mut() else { continue };
                let http = match method {
                    HttpMethod::Get => axum::http::Method::GET,
                    HttpMethod::Post => axum::http::Method::POST,
                    HttpMethod::Put => axum::http::Method::PUT,
                    _ => axum::http::Method::DELETE,
                };
                document_common(op, &error);
                let Some(access) = table
                    .iter()
                    .find(|(m, p, _)| *m == http && p == path)
                    .map(|(_, _, a)| *a)
                else {
                    continue;
                };
                document_access(op, access, &error);
                if let Access::Space(_) = access {
                    let mut copy: Operation = op.clone();
                    if let Some(id) = &copy.operation_id {
                        copy.operation_id = Some(format!("{id}_in_space"));
                    }
                    let mut space = Parameter::new("space");
                    space.parameter_in = ParameterIn::Path;
                    space.required = Required::True;
                    space.description = Some(
                        "The space: its name (any case) or `Spaces-N`. Without this prefix the route works in `Default`."
                            .into(),
                    );
                    space.schema = Some(RefOr::T(
                        utoipa::openapi::schema::ObjectBuilder::new()
                            .schema_type(utoipa::openapi::schema::Type::String)
                            .min_length(Some(1))
                            .into(),
                    ));
                    copy.responses
                        .responses
                        .entry("404".into())
                        .or_insert_with(|| error("No such space (or none the caller can see), or no such thing in it"));
                    let mut params = vec![space];
                    params.extend(copy.parameters.take().unwrap_or_default());
                    copy.parameters = Some(params);
                    let key = format!(
                        "/api/spaces/{{space}}{}",
                        path.strip_prefix("/api").unwrap_or(path)
                    );
                    let entry = spaced.entry(key).or_default();
                    match method {
                        HttpMethod::Get => entry.get = Some(copy),
                        HttpMethod::Post => entry.post = Some(copy),
                        HttpMethod::Put => entry.put = Some(copy),
                        _ => entry.delete = Some(copy),
                    }
                }
            }
        }
        openapi.paths.paths.extend(spaced);
    }
}

/// The answers any operation may give, whatever it does: 400 when it takes
/// parameters or a body (they are checked; the message names the field and the
/// rule), 413 for a body over the limit, 500 when the server fails (a database
/// error: the server's log says more).
fn document_common(
    op: &mut utoipa::openapi::path::Operation,
    error: &dyn Fn(&str) -> utoipa::openapi::RefOr<utoipa::openapi::Response>,
) {
    let responses = &mut op.responses.responses;
    let has_parameters = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    if op.request_body.is_some() || has_parameters {
        responses.entry("400".into()).or_insert_with(|| {
            error("Malformed request: a parameter or the body breaks a rule (the message names the field and the rule)")
        });
    }
    if op.request_body.is_some() {
        responses
            .entry("413".into())
            .or_insert_with(|| error("The request body is larger than the server accepts"));
    }
    responses
        .entry("500".into())
        .or_insert_with(|| error("The server failed (its log says why)"));
}

/// Security, permission and the 401/403 answers of one operation.
fn document_access(
    op: &mut utoipa::openapi::path::Operation,
    access: Access,
    error: &dyn Fn(&str) -> utoipa::openapi::RefOr<utoipa::openapi::Response>,
) {
    use utoipa::openapi::security::SecurityRequirement;
    if access == Access::Public {
        return;
    }
    op.security = Some(vec![SecurityRequirement::new::<&str, [&str; 0], &str>(
        SECURITY_SCHEME,
        [],
    )]);
    let needs = access.describe();
    op.description = Some(match op.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\nNeeds: {needs}."),
        _ => format!("Needs: {needs}."),
    });
    let extensions = op.extensions.get_or_insert_with(Default::default);
    extensions.insert(
        "x-octopus-permission".into(),
        serde_json::Value::String(
            access
                .permission()
                .map(|p| p.name().to_string())
                .unwrap_or_else(|| "authenticated".into()),
        ),
    );
    op.responses
        .responses
        .entry("401".into())
        .or_insert_with(|| error("No valid API key or session"));
    if access != Access::Authenticated {
        op.responses
            .responses
            .entry("403".into())
            .or_insert_with(|| error("The caller lacks the permission this needs"));
    }
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

/// Replaces the server's comms certificate: every tentacle the server reaches
/// (listening ones dialled, polling ones connected now) is asked to trust the
/// new one beside the old, then the server presents it. The answer says which
/// machines learned it, and the command that fixes each of the others.
#[utoipa::path(
    post,
    path = "/api/server/rotate-certificate",
    tag = "server",
    responses(
        (status = 200, description = "Rotated; what each machine learned", body = CertificateRotationReport),
        (status = 401, description = "No or an unknown API key", body = ErrorBody),
        (status = 403, description = "The caller lacks AdministerSystem", body = ErrorBody),
        (status = 500, description = "The new certificate could not be made or stored", body = ErrorBody),
    )
)]
async fn rotate_certificate(
    axum::extract::State(s): axum::extract::State<AppState>,
    axum::Extension(caller): axum::Extension<crate::authz::Caller>,
) -> ApiResult<Json<CertificateRotationReport>> {
    caller.require_system(Permission::AdministerSystem)?;
    let report = crate::rotation::rotate_server_certificate(&s)
        .await
        .map_err(|e| ApiError::internal(format!("rotating the comms certificate: {e:#}")))?;
    let missed: Vec<&str> = report
        .machines
        .iter()
        .filter(|m| !m.learned)
        .map(|m| m.name.as_str())
        .collect();
    s.audit(
        &caller,
        None,
        "Rotate certificate",
        "Server",
        "comms certificate",
        format!(
            "from {} to {}; {} of {} machine(s) learned it{}",
            report.previous_thumbprint,
            report.thumbprint,
            report.machines.len() - missed.len(),
            report.machines.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!("; not: {}", missed.join(", "))
            }
        ),
    )
    .await;
    Ok(Json(report))
}

/// The server's version, comms thumbprint and polling port.
#[utoipa::path(
    get,
    path = "/api/server",
    tag = "server",
    responses(
        (status = 200, description = "About the server", body = ServerInfo),
    )
)]
async fn server_info(axum::extract::State(s): axum::extract::State<AppState>) -> Json<ServerInfo> {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        thumbprint: s.thumbprint().to_string(),
        comms_port: s.comms_port,
        web_socket_port: s.web_socket.as_ref().map(|(p, _)| *p),
        web_socket_path: s.web_socket.as_ref().map(|(_, path)| path.clone()),
        tool_version: s.tool.as_ref().as_ref().ok().map(|t| t.version.clone()),
        tentacle_version: s.tentacle.as_ref().as_ref().ok().map(|t| t.version.clone()),
    })
}
