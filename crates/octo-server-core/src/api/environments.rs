//! `/api/environments`: list, create, delete.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use octo_api_types::{Environment, ErrorBody, NewEnvironment};

use super::{ApiError, ApiJson, ApiResult};
use crate::state::AppState;

/// The environment routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/environments",
            get(list_environments).post(create_environment),
        )
        .route("/api/environments/{name}", delete(delete_environment))
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
pub(crate) async fn list_environments(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
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
pub(crate) async fn create_environment(
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
pub(crate) async fn delete_environment(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    s.store.delete_environment(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
