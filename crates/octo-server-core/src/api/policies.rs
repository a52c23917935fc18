//! `/api/tenants` and `/api/machine-policies`: what machines may be given
//! (the portal's forms offer them).

use axum::extract::{Extension, State};
use axum::Json;
use octo_api_types::{MachinePolicy, Permission, Tenant};

use super::guard::{get, Route};
use super::ApiResult;
use crate::authz::{Access, RequestSpace};
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
