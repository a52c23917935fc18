//! `/api/users`: create users (administrators), log in (user name and
//! password in, a session key out).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use octo_api_types::{ErrorBody, Login, LoginReply, NewUser, User};
use octo_store::now_ms;

use super::{ApiError, ApiJson, ApiResult};
use crate::auth::{hash_password, issue_api_key, verify_password, Caller};
use crate::state::AppState;

/// The user routes that need a caller.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/api/users", post(create_user))
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
pub(crate) async fn create_user(
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
pub(crate) async fn login(
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
    let purpose = format!("session of {} (login at {})", user.username, now_ms());
    let (key, stored) = issue_api_key(s.store.as_ref(), user.id, &purpose).await?;
    Ok(Json(LoginReply {
        api_key: key,
        key: stored,
        user,
    }))
}
