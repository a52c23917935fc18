//! `/api/spaces`: the spaces a caller can see; create and delete (refused
//! while a space holds machines, saying how many).

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{ErrorBody, NewSpace, Permission, Space};

use super::guard::{delete, get, post, space_not_found, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::authz::{Access, Caller};
use crate::state::AppState;

/// The space routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get("/api/spaces", Access::Authenticated, list_spaces),
        post(
            "/api/spaces",
            Access::System(Permission::SpaceCreate),
            create_space,
        ),
        get("/api/spaces/{space}", Access::Authenticated, get_space),
        delete(
            "/api/spaces/{space}",
            Access::System(Permission::SpaceDelete),
            delete_space,
        ),
    ]
}

/// A space by name, `Spaces-N` or id that the caller can see, or 404.
async fn visible_space(s: &AppState, caller: &Caller, key: &str) -> ApiResult<Space> {
    let named = super::guard::NamedSpace(key.to_string());
    let found = match super::guard::resolve_space(s, Some(&named)).await {
        Ok(space) => Some(space),
        Err(e) if e.status() == axum::http::StatusCode::NOT_FOUND => None,
        Err(e) => return Err(e),
    };
    found
        .filter(|sp| sp.is_default || caller.grants.reaches(sp.id))
        .ok_or_else(|| space_not_found(key))
}

/// The spaces the caller has a role in (every space with `SpaceView`), and
/// the Default space, which every signed-in caller sees.
#[utoipa::path(
    get,
    path = "/api/spaces",
    tag = "spaces",
    responses((status = 200, description = "The spaces", body = [Space]))
)]
pub(crate) async fn list_spaces(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<Space>>> {
    Ok(Json(visible_spaces(&s, &caller).await?))
}

/// As `GET /api/spaces`, for the portal too: the spaces the caller has a role
/// in (every space with `SpaceView`) and the Default space.
pub async fn visible_spaces(s: &AppState, caller: &Caller) -> ApiResult<Vec<Space>> {
    let spaces = s.store.list_spaces().await?;
    Ok(spaces
        .into_iter()
        .filter(|sp| sp.is_default || caller.grants.reaches(sp.id))
        .collect())
}

/// One space, by name or `Spaces-N`.
#[utoipa::path(
    get,
    path = "/api/spaces/{space}",
    tag = "spaces",
    params(("space" = String, Path, description = "The space's name or `Spaces-N`")),
    responses(
        (status = 200, description = "The space", body = Space),
        (status = 404, description = "No such space (or none the caller can see)", body = ErrorBody),
    )
)]
pub(crate) async fn get_space(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(space): Path<String>,
) -> ApiResult<Json<Space>> {
    Ok(Json(visible_space(&s, &caller, &space).await?))
}

/// Adds a space (with its own default machine policy).
#[utoipa::path(
    post,
    path = "/api/spaces",
    tag = "spaces",
    request_body = NewSpace,
    responses(
        (status = 201, description = "Created", body = Space),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "A space of that name exists", body = ErrorBody),
    )
)]
pub(crate) async fn create_space(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(r): ApiJson<NewSpace>,
) -> ApiResult<impl IntoResponse> {
    let space = add_space(&s, &caller, r).await?;
    Ok((StatusCode::CREATED, Json(space)))
}

/// As `POST /api/spaces`, for the portal too: checks the name and adds the space.
pub async fn add_space(s: &AppState, caller: &Caller, r: NewSpace) -> ApiResult<Space> {
    r.validate()?;
    caller.require_system(Permission::SpaceCreate)?;
    let name = r.name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    if name.starts_with("Spaces-") || name == "." || name == ".." || name.contains('/') {
        return Err(ApiError::bad_request(
            "field `name`: a space's name cannot start with `Spaces-`, contain '/', or be '.' or '..' (they name spaces in paths)",
        ));
    }
    let space = s.store.create_space(name, &r.description).await?;
    s.audit(caller, None, "created", "space", &space.name, "")
        .await;
    Ok(space)
}

/// Deletes a space and everything in it (refused while it holds machines).
#[utoipa::path(
    delete,
    path = "/api/spaces/{space}",
    tag = "spaces",
    params(("space" = String, Path, description = "The space's name or `Spaces-N`")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such space", body = ErrorBody),
        (status = 422, description = "It holds machines (the message says how many), or it is the default space", body = ErrorBody),
    )
)]
pub(crate) async fn delete_space(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(space): Path<String>,
) -> ApiResult<impl IntoResponse> {
    remove_space(&s, &caller, &space).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// As `DELETE /api/spaces/{space}`, for the portal too: deletes the space (by
/// name or `Spaces-N`) and everything in it; refused while it holds machines.
pub async fn remove_space(s: &AppState, caller: &Caller, space: &str) -> ApiResult<Space> {
    caller.require_system(Permission::SpaceDelete)?;
    let found = visible_space(s, caller, space).await?;
    let gone = s.store.delete_space(found.id).await?;
    s.space_cache.forget(gone.id);
    s.permissions_changed();
    s.audit(caller, None, "deleted", "space", &gone.name, "")
        .await;
    Ok(gone)
}
