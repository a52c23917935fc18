//! `/api/audit`: who changed what, when, from where, newest first: the
//! events of the request's space, and those outside any space (users, roles,
//! spaces, keys) for holders of `EventView` in every space.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::Json;
use octo_api_types::{AuditEvent, ErrorBody, Permission};
use octo_store::AuditFilter;
use serde::Deserialize;
use utoipa::IntoParams;

use super::guard::{get, Route};
use super::{ApiError, ApiResult};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// The audit routes.
pub(super) fn routes() -> Vec<Route> {
    vec![get(
        "/api/audit",
        Access::Space(Permission::EventView),
        list_audit,
    )]
}

/// Filters of `GET /api/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Only this user's changes.
    user: Option<String>,
    /// Only changes at or after this time (Unix milliseconds).
    since: Option<i64>,
    /// At most this many (default 100, at most 1000).
    #[param(minimum = 1)]
    limit: Option<i64>,
}

/// Changes, newest first.
#[utoipa::path(
    get,
    path = "/api/audit",
    tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "The events", body = [AuditEvent]),
        (status = 400, description = "Malformed query (the message names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn list_audit(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AuditEvent>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("`limit` must be from 1 to 1000"));
    }
    let filter = AuditFilter {
        space_id: Some(space.id),
        include_system: caller.grants.has_system(Permission::EventView),
        username: q.user.filter(|u| !u.trim().is_empty()),
        since: q.since,
        limit,
    };
    Ok(Json(s.store.list_audit(&filter).await?))
}
