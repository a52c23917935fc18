//! `/api/machines`: list, show, add (listening), register (`tentacle
//! register-with`), delete, in the request's space. One certificate, one
//! machine per space: a thumbprint already used by another machine of the
//! space is refused (a cloned image); the same tentacle may be registered in
//! several spaces. Adding or removing a polling machine updates the polling
//! trust set at once.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{
    DiscoverReply, DiscoverRequest, ErrorBody, MachineRequest, MachineUpdate, Permission,
    RegisterReply, Space, WorkerPool,
};
use octo_engine::endpoint_of;
use octo_store::{
    EndpointKind, HealthFilter, Machine, MachineFilter, MachineQuery as StoreMachineQuery,
    NewMachine,
};
use octo_tls::Thumbprint;
use serde::Deserialize;
use utoipa::IntoParams;

use super::guard::{delete, get, post, put, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// The machine routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get(
            "/api/machines",
            Access::Space(Permission::MachineView),
            list_machines,
        ),
        post(
            "/api/machines",
            Access::Space(Permission::MachineCreate),
            create_machine,
        ),
        post(
            "/api/machines/register",
            Access::Space(Permission::MachineCreate),
            register,
        ),
        get(
            "/api/machines/{name}",
            Access::Space(Permission::MachineView),
            get_machine,
        ),
        delete(
            "/api/machines/{name}",
            Access::Space(Permission::MachineDelete),
            delete_machine,
        ),
        put(
            "/api/machines/{name}",
            Access::Space(Permission::MachineEdit),
            update_machine,
        ),
        post(
            "/api/machines/discover",
            Access::Space(Permission::MachineCreate),
            discover,
        ),
        get(
            "/api/worker-pools",
            Access::Space(Permission::MachineView),
            worker_pools,
        ),
    ]
}

/// Changes a machine's settings: environments, roles, tenants, tags, policy,
/// disabled. Needs `MachineEdit` on the machine as it is and as it becomes.
#[utoipa::path(
    put,
    path = "/api/machines/{name}",
    tag = "machines",
    params(("name" = String, Path, description = "The machine's name")),
    request_body = MachineUpdate,
    responses(
        (status = 200, description = "The machine now", body = Machine),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
    )
)]
pub(crate) async fn update_machine(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
    ApiJson(u): ApiJson<MachineUpdate>,
) -> ApiResult<Json<Machine>> {
    Ok(Json(change_machine(&s, &caller, &space, &name, &u).await?))
}

/// Changes a machine's settings (the portal's Settings too).
pub async fn change_machine(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    u: &MachineUpdate,
) -> ApiResult<Machine> {
    u.validate()?;
    let (s, caller, space) = (s, caller, space);
    let m = visible_machine(s, caller, space, name).await?;
    let what = format!("machine '{}'", m.name);
    caller.require_on(
        Permission::MachineEdit,
        space,
        &m.environments,
        &m.tenants,
        &what,
    )?;
    if let Some(envs) = &u.environments {
        if envs.is_empty() && m.worker_pool.is_none() {
            return Err(ApiError::bad_request(
                "field `environments`: a deployment target needs at least one environment",
            ));
        }
        let tenants = u.tenants.as_ref().unwrap_or(&m.tenants);
        caller.require_on(Permission::MachineEdit, space, envs, tenants, &what)?;
    }
    let updated = s.store.update_machine(m.id, u).await?;
    let mut changed = Vec::new();
    if updated.environments != m.environments {
        changed.push(format!("environments {}", updated.environments.join(", ")));
    }
    if updated.roles != m.roles {
        changed.push(format!("roles {}", updated.roles.join(", ")));
    }
    if updated.tenants != m.tenants || updated.tenant_tags != m.tenant_tags {
        changed.push("tenants".to_string());
    }
    if updated.policy != m.policy {
        changed.push(format!("policy {}", updated.policy));
    }
    if updated.disabled != m.disabled {
        changed.push(
            if updated.disabled {
                "disabled"
            } else {
                "enabled"
            }
            .to_string(),
        );
    }
    s.audit(
        caller,
        Some(space),
        "changed",
        "machine",
        &updated.name,
        changed.join("; "),
    )
    .await;
    Ok(updated)
}

/// Contacts a listening tentacle and answers the thumbprint it presents, for
/// a person to confirm before adding it (nothing is trusted by this).
#[utoipa::path(
    post,
    path = "/api/machines/discover",
    tag = "machines",
    request_body = DiscoverRequest,
    responses(
        (status = 200, description = "What the tentacle presented", body = DiscoverReply),
        (status = 400, description = "Not a listening endpoint", body = ErrorBody),
        (status = 502, description = "The tentacle could not be reached (the message says why)", body = ErrorBody),
    )
)]
pub(crate) async fn discover(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<DiscoverRequest>,
) -> ApiResult<Json<DiscoverReply>> {
    match s.comms.discover(&r.uri).await {
        Ok((uri, thumbprint)) => Ok(Json(DiscoverReply {
            uri,
            thumbprint: thumbprint.to_string(),
        })),
        Err(e @ octo_comms::CommsError::InvalidEndpoint { .. }) => {
            Err(ApiError::bad_request(format!("field `uri`: {e}")))
        }
        Err(e) => Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            e.to_string(),
        )),
    }
}

/// The space's worker pools, with how many workers each has.
#[utoipa::path(
    get,
    path = "/api/worker-pools",
    tag = "machines",
    responses((status = 200, description = "The pools, by name", body = [WorkerPool]))
)]
pub(crate) async fn worker_pools(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<Vec<WorkerPool>>> {
    Ok(Json(pools_of(&s, &caller, &space).await?))
}

/// The space's worker pools with how many workers (that the caller may see)
/// each has, by name (the portal's workers page too).
pub async fn pools_of(s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Vec<WorkerPool>> {
    let machines = s
        .store
        .list_machines(&MachineFilter::space(space.id))
        .await?;
    let mut pools: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for m in machines.iter().filter(|m| sees_machine(caller, space, m)) {
        if let Some(pool) = &m.worker_pool {
            *pools.entry(pool.clone()).or_default() += 1;
        }
    }
    Ok(pools
        .into_iter()
        .map(|(name, workers)| WorkerPool { name, workers })
        .collect())
}

/// Filters of `GET /api/machines`; all given ones must match. With `skip` or
/// `take`, one page comes back (by name; at most 1000), and the header
/// `X-Total-Count` says how many match in all.
#[derive(Debug, Clone, Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MachineQuery {
    /// Only machines in this environment.
    pub environment: Option<String>,
    /// Only machines with this role.
    pub role: Option<String>,
    /// Only machines connected to this tenant.
    pub tenant: Option<String>,
    /// Only machines whose name contains this (ignoring case).
    pub name: Option<String>,
    /// Only these healths, comma-separated: healthy, warnings, unhealthy, unavailable, unknown.
    pub health: Option<String>,
    /// Only `listening` or `polling` machines.
    pub style: Option<String>,
    /// Only workers (`true`) or only deployment targets (`false`).
    pub workers: Option<bool>,
    /// Machines to skip (paging).
    #[param(minimum = 0)]
    pub skip: Option<i64>,
    /// At most this many (paging; at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub take: Option<i64>,
}

impl MachineQuery {
    fn paged(&self) -> bool {
        self.skip.is_some()
            || self.take.is_some()
            || self.name.is_some()
            || self.health.is_some()
            || self.style.is_some()
            || self.workers.is_some()
    }
}

/// The largest page.
const MAX_TAKE: i64 = 1000;

/// One page of the space's machines the caller may see, and how many match
/// in all (the portal's list uses this too).
pub async fn machine_page(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    q: &MachineQuery,
) -> ApiResult<(Vec<Machine>, i64)> {
    let health = match q.health.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|h| match h.trim().to_ascii_lowercase().as_str() {
                "healthy" => Ok(HealthFilter::Healthy),
                "warnings" | "healthywithwarnings" => Ok(HealthFilter::HealthyWithWarnings),
                "unhealthy" => Ok(HealthFilter::Unhealthy),
                "unavailable" => Ok(HealthFilter::Unavailable),
                "unknown" => Ok(HealthFilter::Unknown),
                other => Err(ApiError::bad_request(format!(
                    "field `health`: '{other}' is not one of healthy, warnings, unhealthy, unavailable, unknown"
                ))),
            })
            .collect::<ApiResult<Vec<_>>>()?,
    };
    let kind = match q.style.as_deref().map(|s| s.trim().to_ascii_lowercase()) {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) if s == "listening" || s == "tentaclepassive" => Some(EndpointKind::Listening),
        Some(s) if s == "polling" || s == "tentacleactive" => Some(EndpointKind::Polling),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "field `style`: '{other}' is not listening or polling"
            )))
        }
    };
    let take = q.take.unwrap_or(50);
    if !(1..=MAX_TAKE).contains(&take) {
        return Err(ApiError::bad_request(format!(
            "field `take` must be from 1 to {MAX_TAKE}"
        )));
    }
    let skip = q.skip.unwrap_or(0);
    if skip < 0 {
        return Err(ApiError::bad_request("field `skip` must not be negative"));
    }
    let query = StoreMachineQuery {
        filter: MachineFilter {
            space_id: Some(space.id),
            names: vec![],
            environments: q
                .environment
                .iter()
                .filter(|e| !e.is_empty())
                .cloned()
                .collect(),
            roles: q.role.iter().filter(|e| !e.is_empty()).cloned().collect(),
            tenants: q.tenant.iter().filter(|e| !e.is_empty()).cloned().collect(),
        },
        name_contains: q.name.clone().filter(|n| !n.trim().is_empty()),
        health,
        kind,
        workers: q.workers,
        visible_environments: caller
            .grants
            .environments_with(Permission::MachineView, space.id),
        offset: skip,
        limit: take,
    };
    let (page, total) = s.store.machine_page(&query).await?;
    // Tenant narrowing is checked here (environments were, in the query).
    let page = page
        .into_iter()
        .filter(|m| sees_machine(caller, space, m))
        .collect();
    Ok((page, total))
}

/// Whether the caller may see the machine.
pub fn sees_machine(caller: &Caller, space: &Space, m: &Machine) -> bool {
    m.space_id == space.id
        && caller.sees(Permission::MachineView, space, &m.environments, &m.tenants)
}

/// A machine of the space the caller may see, or 404 as if it did not exist.
pub async fn visible_machine(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<Machine> {
    s.store
        .machine(space.id, name)
        .await?
        .filter(|m| sees_machine(caller, space, m))
        .ok_or_else(|| ApiError::not_found(format!("machine '{name}' does not exist")))
}

/// The space's machines the caller may see, by name, optionally filtered.
#[utoipa::path(
    get,
    path = "/api/machines",
    tag = "machines",
    params(MachineQuery),
    responses(
        (status = 200, description = "The machines (with paging, header X-Total-Count: how many match in all)", body = [Machine]),
        (status = 400, description = "Malformed query (the message names the field)", body = ErrorBody),
    )
)]
pub(crate) async fn list_machines(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    q: Result<Query<MachineQuery>, QueryRejection>,
) -> ApiResult<axum::response::Response> {
    let Query(q) = q?;
    if q.paged() {
        let (page, total) = machine_page(&s, &caller, &space, &q).await?;
        let mut resp = Json(page).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&total.to_string()) {
            resp.headers_mut().insert("x-total-count", v);
        }
        return Ok(resp);
    }
    let filter = MachineFilter {
        space_id: Some(space.id),
        names: vec![],
        environments: q.environment.into_iter().collect(),
        roles: q.role.into_iter().collect(),
        tenants: q.tenant.into_iter().collect(),
    };
    let machines: Vec<Machine> = s
        .store
        .list_machines(&filter)
        .await?
        .into_iter()
        .filter(|m| sees_machine(&caller, &space, m))
        .collect();
    Ok(Json(machines).into_response())
}

/// One machine.
#[utoipa::path(
    get,
    path = "/api/machines/{name}",
    tag = "machines",
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "The machine", body = Machine),
        (status = 404, description = "No such machine", body = ErrorBody),
    )
)]
pub(crate) async fn get_machine(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
) -> ApiResult<Json<Machine>> {
    Ok(Json(visible_machine(&s, &caller, &space, &name).await?))
}

/// Deletes a machine (a polling one is no longer trusted at once).
#[utoipa::path(
    delete,
    path = "/api/machines/{name}",
    tag = "machines",
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such machine", body = ErrorBody),
    )
)]
pub(crate) async fn delete_machine(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    remove_machine(&s, &caller, &space, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a machine (the portal's Delete too).
pub async fn remove_machine(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<()> {
    let (s, caller, space) = (s, caller, space);
    let m = visible_machine(s, caller, space, name).await?;
    let what = format!("machine '{}'", m.name);
    caller.require_on(
        Permission::MachineDelete,
        space,
        &m.environments,
        &m.tenants,
        &what,
    )?;
    s.store.delete_machine(space.id, &m.name).await?;
    // Its running steps are canceled while the machine can still be reached
    // (a polling one is trusted until the trust is refreshed below), so the
    // scripts are stopped on it; bounded, then recorded canceled anyway.
    let reason = format!("machine {} was deleted by {}", m.name, caller.user.username);
    let canceled = s
        .engine
        .stop_machine_everywhere(m.id, &reason, DELETE_CANCEL_GRACE)
        .await;
    if let Ok(ep) = endpoint_of(&m) {
        s.comms.forget(&ep);
    }
    s.refresh_polling_trust().await?;
    let steps = match canceled {
        0 => String::new(),
        1 => "; its running step was canceled".into(),
        n => format!("; its {n} running steps were canceled"),
    };
    s.audit(
        caller,
        Some(space),
        "deleted",
        "machine",
        &m.name,
        format!("{} {}{steps}", m.uri, m.thumbprint),
    )
    .await;
    Ok(())
}

/// How long deleting a machine waits for its running scripts to be canceled
/// on it before recording them canceled anyway.
const DELETE_CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn validate(space: &Space, r: &MachineRequest) -> ApiResult<NewMachine> {
    if r.name.trim().is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    let thumbprint: Thumbprint =
        r.thumbprint
            .parse()
            .map_err(|e: octo_tls::ThumbprintParseError| {
                ApiError::bad_request(format!("field `thumbprint`: {e}"))
            })?;
    let (kind, uri) = match r.comms_style.as_str() {
        "TentaclePassive" | "Listening" => {
            let ep = octo_comms::Endpoint::listening(&r.uri, thumbprint).map_err(|e| ApiError::bad_request(format!("field `uri`: {e}")))?;
            (EndpointKind::Listening, ep.to_string())
        }
        "TentacleActive" | "Polling" => {
            let ep = octo_comms::Endpoint::polling(&r.uri, thumbprint).map_err(|e| ApiError::bad_request(format!("field `uri`: {e}")))?;
            (EndpointKind::Polling, ep.to_string())
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "field `comms_style`: '{other}' is not TentaclePassive (listening) or TentacleActive (polling)"
            )))
        }
    };
    if r.worker_pool.is_none() && r.environments.is_empty() {
        return Err(ApiError::bad_request(
            "field `environments`: a deployment target needs at least one environment",
        ));
    }
    Ok(NewMachine {
        space_id: space.id,
        name: r.name.trim().to_string(),
        kind,
        uri,
        thumbprint: thumbprint.to_string(),
        environments: r.environments.clone(),
        roles: r.roles.clone(),
        tenants: r.tenants.clone(),
        tenant_tags: r.tenant_tags.clone(),
        policy: r.policy.clone(),
        worker_pool: r.worker_pool.clone(),
    })
}

pub async fn save_machine(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    r: &MachineRequest,
) -> ApiResult<Machine> {
    r.validate()?;
    let new = validate(space, r)?;
    let what = format!("machine '{}'", new.name);
    caller.require_on(
        Permission::MachineCreate,
        space,
        &new.environments,
        &new.tenants,
        &what,
    )?;
    // One certificate, one machine (in a space): a second machine with the same
    // thumbprint is almost always a cloned VM image, and requests would reach
    // the wrong one.
    let clash: Vec<String> = s
        .store
        .machines_by_thumbprint(Some(space.id), &new.thumbprint)
        .await?
        .into_iter()
        .filter(|m| !m.name.eq_ignore_ascii_case(&new.name))
        .map(|m| m.name)
        .collect();
    if !clash.is_empty() {
        tracing::warn!(
            "refused machine '{}': thumbprint {} is already used by {}",
            new.name,
            new.thumbprint,
            clash.join(", ")
        );
        return Err(ApiError::conflict(format!(
            "thumbprint {} is already used by machine {} (a cloned VM image?); run `tentacle new-certificate` on the new machine and register it again",
            new.thumbprint,
            clash.join(", ")
        )));
    }
    let existing = s.store.machine(space.id, &new.name).await?;
    let (machine, action) = match (existing, r.force) {
        (Some(old), true) => {
            // Replacing a machine takes over its name, its tasks and (polling)
            // its trust: it needs the right to change that machine as it is.
            let what = format!("machine '{}' (to replace it)", old.name);
            if !sees_machine(caller, space, &old) {
                return Err(ApiError::conflict(format!(
                    "machine '{}' already exists, and you may not see or replace it",
                    new.name
                )));
            }
            caller.require_on(
                Permission::MachineEdit,
                space,
                &old.environments,
                &old.tenants,
                &what,
            )?;
            if let Ok(ep) = endpoint_of(&old) {
                s.comms.forget(&ep);
            }
            (s.store.replace_machine(&new).await?, "replaced")
        }
        (Some(_), false) => {
            return Err(ApiError::conflict(format!(
                "machine '{}' already exists; pass --force to replace it",
                new.name
            )))
        }
        (None, _) => (s.store.create_machine(&new).await?, "created"),
    };
    // A new polling machine adds its thumbprint to the trusted set; a
    // replacement may drop one, so the set is read again.
    match (action, machine.kind, machine.thumbprint.parse()) {
        ("created", EndpointKind::Polling, Ok(tp)) => {
            s.polling_trust.trust(tp);
            // The other nodes of a cluster read theirs again.
            s.engine
                .publish(octo_store::ClusterEvent::TrustChanged)
                .await;
        }
        ("created", EndpointKind::Listening, _) => {}
        _ => s.refresh_polling_trust().await?,
    }
    s.audit(
        caller,
        Some(space),
        action,
        "machine",
        &machine.name,
        format!(
            "{} {} thumbprint {}",
            machine.kind.name(),
            machine.uri,
            machine.thumbprint
        ),
    )
    .await;
    Ok(machine)
}

/// Adds a machine.
#[utoipa::path(
    post,
    path = "/api/machines",
    tag = "machines",
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Created (or replaced, with `force`)", body = Machine),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
    )
)]
pub(crate) async fn create_machine(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    let machine = save_machine(&s, &caller, &space, &r).await?;
    Ok((StatusCode::CREATED, Json(machine)))
}

/// Registers a machine (`tentacle register-with`): as adding one, answering with the server's comms thumbprint and polling port.
#[utoipa::path(
    post,
    path = "/api/machines/register",
    tag = "machines",
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Registered; the answer carries the server's thumbprint to trust", body = RegisterReply),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
    )
)]
pub(crate) async fn register(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    let machine = save_machine(&s, &caller, &space, &r).await?;
    tracing::info!(
        "registered machine '{}' in space '{}' ({}, thumbprint {})",
        machine.name,
        space.name,
        machine.uri,
        machine.thumbprint
    );
    Ok((
        StatusCode::CREATED,
        Json(RegisterReply {
            machine,
            server_thumbprint: s.thumbprint().to_string(),
            comms_port: s.comms_port,
        }),
    ))
}
