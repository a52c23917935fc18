//! `/api/audit`: who changed what, when, from where, newest first: the
//! events of the request's space, and those outside any space (users, roles,
//! spaces, keys) for holders of `EventView` in every space.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::Json;
use octo_api_types::{AuditEvent, ErrorBody, Permission, Space};
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
    let selection = AuditSelection {
        user: q.user,
        since: q.since,
        skip: 0,
        limit: q.limit.unwrap_or(DEFAULT_LIMIT),
    };
    Ok(Json(audit_events(&s, &caller, &space, &selection).await?))
}

/// The events shown when no limit is given.
pub const DEFAULT_LIMIT: i64 = 100;
/// The most events shown at once.
pub const MAX_LIMIT: i64 = 1000;
/// The most events skipped (paging further back: filter by time instead).
pub const MAX_SKIP: i64 = 100_000;

/// Which events [`audit_events`] gives.
#[derive(Debug, Clone, Default)]
pub struct AuditSelection {
    /// Only this user's changes (blank: everyone's).
    pub user: Option<String>,
    /// Only changes at or after this time (Unix milliseconds).
    pub since: Option<i64>,
    /// Skip this many of the newest (paging).
    pub skip: i64,
    /// At most this many (1 to [`MAX_LIMIT`]).
    pub limit: i64,
}

/// As `GET /api/audit`, for the portal too: the space's events, newest first,
/// and those outside any space for holders of `EventView` in every space.
pub async fn audit_events(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    q: &AuditSelection,
) -> ApiResult<Vec<AuditEvent>> {
    caller.require(Access::Space(Permission::EventView), space)?;
    if !(1..=MAX_LIMIT).contains(&q.limit) {
        return Err(ApiError::bad_request(format!(
            "`limit` must be from 1 to {MAX_LIMIT}"
        )));
    }
    if !(0..=MAX_SKIP).contains(&q.skip) {
        return Err(ApiError::bad_request(format!(
            "`skip` must be from 0 to {MAX_SKIP}"
        )));
    }
    let filter = AuditFilter {
        space_id: Some(space.id),
        include_system: caller.grants.has_system(Permission::EventView),
        username: q.user.clone().filter(|u| !u.trim().is_empty()),
        since: q.since,
        // The store has no offset: the skipped ones are read and dropped.
        limit: q.skip + q.limit,
    };
    let mut events = s.store.list_audit(&filter).await?;
    let skip = usize::try_from(q.skip).unwrap_or(0).min(events.len());
    events.drain(..skip);
    Ok(events)
}
