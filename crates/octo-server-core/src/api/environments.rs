//! `/api/environments`: list, create, change (rename, move), delete, in the
//! request's space. Each handler is a thin wrapper of a service function
//! (`visible_environments`, `add_environment`, `change_environment`,
//! `remove_environment`) that the portal calls too.

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{
    Environment, EnvironmentUpdate, ErrorBody, NewEnvironment, Permission, Space,
};

use super::guard::{delete, get, post, put, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// The environment routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get(
            "/api/environments",
            Access::Space(Permission::EnvironmentView),
            list_environments,
        ),
        post(
            "/api/environments",
            Access::Space(Permission::EnvironmentCreate),
            create_environment,
        ),
        delete(
            "/api/environments/{name}",
            Access::Space(Permission::EnvironmentDelete),
            delete_environment,
        ),
        put(
            "/api/environments/{name}",
            Access::Space(Permission::EnvironmentEdit),
            update_environment,
        ),
    ]
}

/// Renames, redescribes or moves an environment (`position` 0: first).
#[utoipa::path(
    put,
    path = "/api/environments/{name}",
    tag = "environments",
    params(("name" = String, Path, description = "The environment's name")),
    request_body = EnvironmentUpdate,
    responses(
        (status = 200, description = "The environment now", body = Environment),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such environment", body = ErrorBody),
        (status = 409, description = "Another environment has the new name", body = ErrorBody),
    )
)]
pub(crate) async fn update_environment(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
    ApiJson(u): ApiJson<EnvironmentUpdate>,
) -> ApiResult<Json<Environment>> {
    Ok(Json(
        change_environment(&s, &caller, &space, &name, &u).await?,
    ))
}

/// An environment of the space the caller may see, or 404 as if it did not exist.
async fn visible_environment(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<Environment> {
    s.store
        .environment(space.id, name)
        .await?
        .filter(|e| {
            caller.sees(
                Permission::EnvironmentView,
                space,
                std::slice::from_ref(&e.name),
                &[],
            )
        })
        .ok_or_else(|| ApiError::not_found(format!("environment '{name}' does not exist")))
}

/// As `PUT /api/environments/{name}`, for the portal too: renames,
/// redescribes or moves an environment (`position` 0: first), checking the
/// caller's `EnvironmentEdit` on it.
pub async fn change_environment(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    u: &EnvironmentUpdate,
) -> ApiResult<Environment> {
    u.validate()?;
    let env = visible_environment(s, caller, space, name).await?;
    let what = format!("environment '{}'", env.name);
    caller.require_on(
        Permission::EnvironmentEdit,
        space,
        std::slice::from_ref(&env.name),
        &[],
        &what,
    )?;
    let new_name = match u.name.as_deref().map(str::trim) {
        Some("") => return Err(ApiError::bad_request("field `name` must not be empty")),
        Some(n) => n.to_string(),
        None => env.name.clone(),
    };
    let description = u.description.clone().unwrap_or(env.description.clone());
    let mut changed = Vec::new();
    let updated = if new_name != env.name || description != env.description {
        if new_name != env.name {
            changed.push(format!("renamed to {new_name}"));
        }
        if description != env.description {
            changed.push("description".to_string());
        }
        s.store
            .update_environment(space.id, &env.name, &new_name, &description)
            .await?
    } else {
        env.clone()
    };
    if let Some(position) = u.position {
        s.store
            .move_environment(space.id, &updated.name, position)
            .await?;
        changed.push(format!("moved to position {position}"));
    }
    s.permissions_changed();
    s.audit(
        caller,
        Some(space),
        "changed",
        "environment",
        &env.name,
        changed.join("; "),
    )
    .await;
    Ok(updated)
}

/// The space's environments the caller may see, by name.
#[utoipa::path(
    get,
    path = "/api/environments",
    tag = "environments",
    responses(
        (status = 200, description = "The environments", body = [Environment]),
    )
)]
pub(crate) async fn list_environments(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<Vec<Environment>>> {
    Ok(Json(visible_environments(&s, &caller, &space).await?))
}

/// As `GET /api/environments`, for the portal too: the space's environments
/// the caller may see, in the space's order.
pub async fn visible_environments(
    s: &AppState,
    caller: &Caller,
    space: &Space,
) -> ApiResult<Vec<Environment>> {
    let all = s.store.list_environments(space.id).await?;
    Ok(all
        .into_iter()
        .filter(|e| {
            caller.sees(
                Permission::EnvironmentView,
                space,
                std::slice::from_ref(&e.name),
                &[],
            )
        })
        .collect())
}

/// Adds an environment to the space.
#[utoipa::path(
    post,
    path = "/api/environments",
    tag = "environments",
    request_body = NewEnvironment,
    responses(
        (status = 201, description = "Created", body = Environment),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "An environment of that name exists in the space", body = ErrorBody),
    )
)]
pub(crate) async fn create_environment(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    ApiJson(e): ApiJson<NewEnvironment>,
) -> ApiResult<impl IntoResponse> {
    let env = add_environment(&s, &caller, &space, &e).await?;
    Ok((StatusCode::CREATED, Json(env)))
}

/// As `POST /api/environments`, for the portal too: adds an environment to
/// the space (needs `EnvironmentCreate` for all of the space).
pub async fn add_environment(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    e: &NewEnvironment,
) -> ApiResult<Environment> {
    e.validate()?;
    let name = e.name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    // A new environment is outside every environment-narrowed grant.
    caller.require_throughout(Permission::EnvironmentCreate, space)?;
    let env = s
        .store
        .create_environment(space.id, name, &e.description)
        .await?;
    s.audit(caller, Some(space), "created", "environment", &env.name, "")
        .await;
    Ok(env)
}

/// Deletes an environment (refused while machines are in it or a grant is
/// narrowed to it).
#[utoipa::path(
    delete,
    path = "/api/environments/{name}",
    tag = "environments",
    params(("name" = String, Path, description = "The environment's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such environment", body = ErrorBody),
        (status = 422, description = "Machines are in it, or a grant is narrowed to it", body = ErrorBody),
    )
)]
pub(crate) async fn delete_environment(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    remove_environment(&s, &caller, &space, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// As `DELETE /api/environments/{name}`, for the portal too: deletes an
/// environment (needs `EnvironmentDelete` on it; refused, naming them, while
/// machines are in it or a grant is narrowed to it).
pub async fn remove_environment(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<()> {
    let env = visible_environment(s, caller, space, name).await?;
    let what = format!("environment '{}'", env.name);
    caller.require_on(
        Permission::EnvironmentDelete,
        space,
        std::slice::from_ref(&env.name),
        &[],
        &what,
    )?;
    s.store.delete_environment(space.id, &env.name).await?;
    s.audit(caller, Some(space), "deleted", "environment", &env.name, "")
        .await;
    Ok(())
}
