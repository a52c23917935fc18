//! `/api/api-keys`: a caller's own keys; a holder of `ApiKeyEdit` sees and
//! revokes everyone's. Nobody can revoke the last key of the last enabled
//! System administrator.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{ApiKey, CreatedApiKey, ErrorBody, NewApiKey, Permission};
use octo_store::SYSTEM_ADMINISTRATOR;
use serde::Deserialize;
use utoipa::IntoParams;

use super::guard::{delete, get, post, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::auth::issue_api_key;
use crate::authz::{Access, Caller};
use crate::state::AppState;

/// The API key routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get("/api/api-keys", Access::Authenticated, list_api_keys),
        post("/api/api-keys", Access::Authenticated, create_api_key),
        delete("/api/api-keys/{id}", Access::Authenticated, revoke_api_key),
    ]
}

/// Query of `GET /api/api-keys`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct KeyQuery {
    /// Everyone's keys (needs `ApiKeyEdit`, whose holders see everyone's anyway).
    #[serde(default)]
    all: bool,
}

/// The caller's API keys (a holder of `ApiKeyEdit`: everyone's).
#[utoipa::path(
    get,
    path = "/api/api-keys",
    tag = "api-keys",
    params(KeyQuery),
    responses(
        (status = 200, description = "The keys (never the keys themselves)", body = [ApiKey]),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 403, description = "`all` without ApiKeyEdit", body = ErrorBody),
    )
)]
pub(crate) async fn list_api_keys(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<KeyQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let Query(q) = q?;
    Ok(Json(keys_of(&s, &caller, q.all).await?))
}

/// As `GET /api/api-keys`, for the portal too: the caller's keys (a holder of
/// `ApiKeyEdit`: everyone's); `all` without `ApiKeyEdit` is refused.
pub async fn keys_of(s: &AppState, caller: &Caller, all: bool) -> ApiResult<Vec<ApiKey>> {
    let everyone = caller.grants.has_system(Permission::ApiKeyEdit);
    if all && !everyone {
        caller.require_system(Permission::ApiKeyEdit)?;
    }
    let scope = if everyone { None } else { Some(caller.user.id) };
    Ok(s.store.list_api_keys(scope).await?)
}

/// Creates an API key for the caller.
#[utoipa::path(
    post,
    path = "/api/api-keys",
    tag = "api-keys",
    request_body = NewApiKey,
    responses(
        (status = 201, description = "Created; the only time the key is shown", body = CreatedApiKey),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn create_api_key(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(r): ApiJson<NewApiKey>,
) -> ApiResult<impl IntoResponse> {
    let created = new_api_key(&s, &caller, r).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// As `POST /api/api-keys`, for the portal too: a key for the caller (the
/// answer is the only time the key itself is ever shown).
pub async fn new_api_key(s: &AppState, caller: &Caller, r: NewApiKey) -> ApiResult<CreatedApiKey> {
    r.validate()?;
    let (key, stored) = issue_api_key(s.store.as_ref(), caller.user.id, &r.purpose).await?;
    s.audit(
        caller,
        None,
        "created",
        "api key",
        &format!("#{} {}", stored.id, stored.prefix),
        r.purpose.clone(),
    )
    .await;
    // The only time the key is ever shown.
    Ok(CreatedApiKey {
        api_key: key,
        key: stored,
    })
}

/// Revokes an API key: one's own, or anyone's with `ApiKeyEdit`.
#[utoipa::path(
    delete,
    path = "/api/api-keys/{id}",
    tag = "api-keys",
    params(("id" = i64, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 422, description = "The last key of the last System administrator", body = ErrorBody),
    )
)]
pub(crate) async fn revoke_api_key(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> ApiResult<impl IntoResponse> {
    revoke_key(&s, &caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// As `DELETE /api/api-keys/{id}`, for the portal too: one's own key, or
/// anyone's with `ApiKeyEdit` (others' keys are not there for the caller);
/// refused for the last key of the last System administrator.
pub async fn revoke_key(s: &AppState, caller: &Caller, id: i64) -> ApiResult<ApiKey> {
    let not_found = || ApiError::not_found(format!("API key #{id} does not exist"));
    let key = s.store.api_key(id).await?.ok_or_else(not_found)?;
    // Other people's keys are not even there for the caller.
    if key.user_id != caller.user.id && !caller.grants.has_system(Permission::ApiKeyEdit) {
        return Err(not_found());
    }
    refuse_last_admin_key(s, &key).await?;
    s.store.revoke_api_key(id).await?;
    s.audit(
        caller,
        None,
        "revoked",
        "api key",
        &format!("#{id} {}", key.prefix),
        key.purpose.clone(),
    )
    .await;
    Ok(ApiKey {
        revoked: true,
        ..key
    })
}

/// Refuses to revoke the last working key of the last administrator, who has
/// no password: that would lock everyone out (a password may still allow a
/// login; say so). Revoking a key and logging out with one both check this.
pub(crate) async fn refuse_last_admin_key(s: &AppState, key: &ApiKey) -> ApiResult<()> {
    if key.revoked || key.session {
        return Ok(());
    }
    let admins = s.store.holders_of(SYSTEM_ADMINISTRATOR).await?;
    let [only] = admins.as_slice() else {
        return Ok(());
    };
    if only.id != key.user_id {
        return Ok(());
    }
    let (_, password) = s.store.user_by_name(&only.username).await?.unzip();
    let has_password = password.flatten().is_some();
    let live = s
        .store
        .list_api_keys(Some(only.id))
        .await?
        .into_iter()
        .filter(|k| !k.revoked && !k.session)
        .count();
    if !has_password && live <= 1 {
        return Err(ApiError::unprocessable(format!(
            "API key #{} is the last key of '{}', the last System administrator, who has no password: revoking it would leave nobody able to administer the server; create another key first (`octopus api-key create`), or recover with `octopus server reset-admin`",
            key.id, only.username
        )));
    }
    Ok(())
}
