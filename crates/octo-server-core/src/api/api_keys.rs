//! `/api/api-keys`: a caller's own keys (an administrator's: everyone's).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use octo_api_types::{ApiKey, CreatedApiKey, ErrorBody, NewApiKey};

use super::{ApiJson, ApiResult};
use crate::auth::{issue_api_key, Caller};
use crate::state::AppState;

/// The API key routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/api-keys", get(list_api_keys).post(create_api_key))
        .route("/api/api-keys/{id}", delete(revoke_api_key))
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
pub(crate) async fn list_api_keys(
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
pub(crate) async fn create_api_key(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(r): ApiJson<NewApiKey>,
) -> ApiResult<impl IntoResponse> {
    let (key, stored) = issue_api_key(s.store.as_ref(), caller.0.id, &r.purpose).await?;
    // The only time the key is ever shown.
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            api_key: key,
            key: stored,
        }),
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
pub(crate) async fn revoke_api_key(
    State(s): State<AppState>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    s.store.revoke_api_key(id).await?;
    Ok(StatusCode::NO_CONTENT)
}
