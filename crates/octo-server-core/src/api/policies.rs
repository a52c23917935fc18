//! `/api/tenants` and `/api/machine-policies`: what machines may be given
//! (the portal's forms offer them); machine policies are added and changed
//! here too (`add_policy`, `change_policy`, which the portal calls as well).

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::{
    ErrorBody, MachinePolicy, NewPolicy, Permission, PolicySettings, Space, Tenant, Validate,
};

use super::guard::{get, post, put, Route};
use super::{ApiJson, ApiResult};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// The routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get(
            "/api/tenants",
            Access::Space(Permission::TenantView),
            list_tenants,
        ),
        get(
            "/api/machine-policies",
            Access::Space(Permission::MachinePolicyView),
            list_policies,
        ),
        post(
            "/api/machine-policies",
            Access::Space(Permission::MachinePolicyEdit),
            create_policy,
        ),
        put(
            "/api/machine-policies/{name}",
            Access::Space(Permission::MachinePolicyEdit),
            update_policy,
        ),
    ]
}

/// The space's tenants and their tags.
#[utoipa::path(
    get,
    path = "/api/tenants",
    tag = "machines",
    responses((status = 200, description = "The tenants, by name", body = [Tenant]))
)]
pub(crate) async fn list_tenants(
    State(s): State<AppState>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<Vec<Tenant>>> {
    Ok(Json(s.store.list_tenants(space.id).await?))
}

/// The space's machine policies.
#[utoipa::path(
    get,
    path = "/api/machine-policies",
    tag = "machines",
    responses((status = 200, description = "The policies, by name", body = [MachinePolicy]))
)]
pub(crate) async fn list_policies(
    State(s): State<AppState>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<Vec<MachinePolicy>>> {
    Ok(Json(s.store.list_policies(space.id).await?))
}

/// Adds a machine policy to the space (settings left out: 3600 s between
/// health checks, 60 s timeout, 120 s polling wait, tentacle updates Manual).
#[utoipa::path(
    post,
    path = "/api/machine-policies",
    tag = "machines",
    request_body = NewPolicy,
    responses(
        (status = 201, description = "Created", body = MachinePolicy),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "A policy of that name exists in the space", body = ErrorBody),
    )
)]
pub(crate) async fn create_policy(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    ApiJson(p): ApiJson<NewPolicy>,
) -> ApiResult<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(add_policy(&s, &caller, &space, &p).await?),
    ))
}

/// Changes a machine policy's settings (those given; the rest stay).
/// `tentacle_update: Always` makes health checks upgrade older tentacles.
#[utoipa::path(
    put,
    path = "/api/machine-policies/{name}",
    tag = "machines",
    params(("name" = String, Path, description = "The policy's name")),
    request_body = PolicySettings,
    responses(
        (status = 200, description = "The policy now", body = MachinePolicy),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such policy", body = ErrorBody),
    )
)]
pub(crate) async fn update_policy(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
    ApiJson(u): ApiJson<PolicySettings>,
) -> ApiResult<Json<MachinePolicy>> {
    Ok(Json(change_policy(&s, &caller, &space, &name, &u).await?))
}

/// As `POST /api/machine-policies`, for the portal too.
pub async fn add_policy(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    p: &NewPolicy,
) -> ApiResult<MachinePolicy> {
    p.validate()?;
    caller.require(Access::Space(Permission::MachinePolicyEdit), space)?;
    let name = p.name.trim();
    let policy = s.store.create_policy(space.id, name, &p.settings()).await?;
    s.audit(
        caller,
        Some(space),
        "created",
        "machine policy",
        &policy.name,
        describe(&policy),
    )
    .await;
    Ok(policy)
}

/// As `PUT /api/machine-policies/{name}`, for the portal too.
pub async fn change_policy(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    u: &PolicySettings,
) -> ApiResult<MachinePolicy> {
    u.validate()?;
    caller.require(Access::Space(Permission::MachinePolicyEdit), space)?;
    let policy = s.store.update_policy(space.id, name, u).await?;
    s.audit(
        caller,
        Some(space),
        "changed",
        "machine policy",
        &policy.name,
        describe(&policy),
    )
    .await;
    Ok(policy)
}

/// "health checks every 3600 s, timeout 60 s, polling wait 120 s, tentacle updates Always".
fn describe(p: &MachinePolicy) -> String {
    format!(
        "health checks every {} s, timeout {} s, polling wait {} s, tentacle updates {}",
        p.health_check_interval_s,
        p.health_check_timeout_s,
        p.polling_wait_s,
        p.tentacle_update.name()
    )
}
