//! `/api/roles`: the built-in roles and custom ones (named sets of permissions).

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{ErrorBody, NewRole, Permission, Role};

use super::guard::{get, post, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::authz::{built_in_role, built_in_roles, Access, Caller};
use crate::state::AppState;

/// The role routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get(
            "/api/roles",
            Access::System(Permission::UserRoleView),
            list_roles,
        ),
        post(
            "/api/roles",
            Access::System(Permission::UserRoleEdit),
            create_role,
        ),
        get(
            "/api/roles/{name}",
            Access::System(Permission::UserRoleView),
            get_role,
        ),
    ]
}

/// Built-in roles first, then custom ones.
#[utoipa::path(
    get,
    path = "/api/roles",
    tag = "roles",
    responses((status = 200, description = "The roles", body = [Role]))
)]
pub(crate) async fn list_roles(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<Role>>> {
    Ok(Json(all_roles(&s, &caller).await?))
}

/// As `GET /api/roles`, for the portal too: built-in roles first, then custom
/// ones (needs `UserRoleView`).
pub async fn all_roles(s: &AppState, caller: &Caller) -> ApiResult<Vec<Role>> {
    caller.require_system(Permission::UserRoleView)?;
    let mut roles = built_in_roles();
    roles.extend(s.store.list_roles().await?);
    Ok(roles)
}

/// One role and its permissions.
#[utoipa::path(
    get,
    path = "/api/roles/{name}",
    tag = "roles",
    params(("name" = String, Path, description = "The role's name")),
    responses(
        (status = 200, description = "The role", body = Role),
        (status = 404, description = "No such role", body = ErrorBody),
    )
)]
pub(crate) async fn get_role(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<Role>> {
    let roles = all_roles(&s, &caller).await?;
    roles
        .into_iter()
        .find(|r| r.name.eq_ignore_ascii_case(name.trim()))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("role '{name}' does not exist")))
}

/// Adds a custom role.
#[utoipa::path(
    post,
    path = "/api/roles",
    tag = "roles",
    request_body = NewRole,
    responses(
        (status = 201, description = "Created", body = Role),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "A role of that name exists", body = ErrorBody),
    )
)]
pub(crate) async fn create_role(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(r): ApiJson<NewRole>,
) -> ApiResult<impl IntoResponse> {
    let role = add_role(&s, &caller, r).await?;
    Ok((StatusCode::CREATED, Json(role)))
}

/// As `POST /api/roles`, for the portal too: a custom role (a new name, at
/// least one permission).
pub async fn add_role(s: &AppState, caller: &Caller, r: NewRole) -> ApiResult<Role> {
    r.validate()?;
    caller.require_system(Permission::UserRoleEdit)?;
    let name = r.name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    if built_in_role(name).is_some() {
        return Err(ApiError::conflict(format!(
            "role '{name}' is built in; choose another name"
        )));
    }
    if r.permissions.is_empty() {
        return Err(ApiError::bad_request(
            "field `permissions` must name at least one permission",
        ));
    }
    let mut permissions = r.permissions.clone();
    permissions.sort();
    permissions.dedup();
    let role = s
        .store
        .create_role(&Role {
            name: name.into(),
            description: r.description.clone(),
            built_in: false,
            permissions,
        })
        .await?;
    s.permissions_changed();
    let names: Vec<&str> = role.permissions.iter().map(|p| p.name()).collect();
    s.audit(
        caller,
        None,
        "created",
        "role",
        &role.name,
        names.join(", "),
    )
    .await;
    Ok(role)
}
