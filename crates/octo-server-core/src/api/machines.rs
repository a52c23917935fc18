//! `/api/machines`: list, show, add (listening), register (`tentacle
//! register-with`), delete. One certificate, one machine: a thumbprint already
//! used by another machine is refused. Adding or removing a polling machine
//! updates the polling trust set at once.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use octo_api_types::{ErrorBody, MachineRequest, RegisterReply};
use octo_engine::endpoint_of;
use octo_store::{EndpointKind, Machine, MachineFilter, NewMachine};
use octo_tls::Thumbprint;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiError, ApiJson, ApiResult};
use crate::state::AppState;

/// The machine routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/machines", get(list_machines).post(create_machine))
        .route("/api/machines/register", post(register))
        .route(
            "/api/machines/{name}",
            get(get_machine).delete(delete_machine),
        )
}

/// Filters of `GET /api/machines`; all given ones must match.
#[derive(Debug, Deserialize, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct MachineQuery {
    /// Only machines in this environment.
    environment: Option<String>,
    /// Only machines with this role.
    role: Option<String>,
    /// Only machines connected to this tenant.
    tenant: Option<String>,
}

/// Machines, by name, optionally filtered.
#[utoipa::path(
    get,
    path = "/api/machines",
    tag = "machines",
    security(("api_key" = [])),
    params(MachineQuery),
    responses(
        (status = 200, description = "The machines", body = [Machine]),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub(crate) async fn list_machines(
    State(s): State<AppState>,
    Query(q): Query<MachineQuery>,
) -> ApiResult<impl IntoResponse> {
    let filter = MachineFilter {
        names: vec![],
        environments: q.environment.into_iter().collect(),
        roles: q.role.into_iter().collect(),
        tenants: q.tenant.into_iter().collect(),
    };
    Ok(Json(s.store.list_machines(&filter).await?))
}

/// One machine.
#[utoipa::path(
    get,
    path = "/api/machines/{name}",
    tag = "machines",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 200, description = "The machine", body = Machine),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub(crate) async fn get_machine(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Machine>> {
    s.store.machine(&name).await?.map(Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("machine '{name}' does not exist"),
        )
    })
}

/// Deletes a machine (a polling one is no longer trusted at once).
#[utoipa::path(
    delete,
    path = "/api/machines/{name}",
    tag = "machines",
    security(("api_key" = [])),
    params(("name" = String, Path, description = "The machine's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such machine", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub(crate) async fn delete_machine(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let machine = s.store.machine(&name).await?;
    s.store.delete_machine(&name).await?;
    if let Some(m) = machine {
        if let Ok(ep) = endpoint_of(&m) {
            s.comms.forget(&ep);
        }
    }
    s.refresh_polling_trust().await?;
    Ok(StatusCode::NO_CONTENT)
}

fn validate(r: &MachineRequest) -> ApiResult<NewMachine> {
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

pub(crate) async fn save_machine(s: &AppState, r: &MachineRequest) -> ApiResult<Machine> {
    let new = validate(r)?;
    // One certificate, one machine: a second machine with the same thumbprint is
    // almost always a cloned VM image, and requests would reach the wrong one.
    let clash: Vec<String> = s
        .store
        .machines_by_thumbprint(&new.thumbprint)
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
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "thumbprint {} is already used by machine {} (a cloned VM image?); run `tentacle new-certificate` on the new machine and register it again",
                new.thumbprint,
                clash.join(", ")
            ),
        ));
    }
    let existing = s.store.machine(&new.name).await?;
    let machine = match (existing, r.force) {
        (Some(old), true) => {
            if let Ok(ep) = endpoint_of(&old) {
                s.comms.forget(&ep);
            }
            s.store.replace_machine(&new).await?
        }
        (Some(_), false) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "machine '{}' already exists; pass --force to replace it",
                    new.name
                ),
            ))
        }
        (None, _) => s.store.create_machine(&new).await?,
    };
    s.refresh_polling_trust().await?;
    Ok(machine)
}

/// Adds a machine.
#[utoipa::path(
    post,
    path = "/api/machines",
    tag = "machines",
    security(("api_key" = [])),
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Created (or replaced, with `force`)", body = Machine),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub(crate) async fn create_machine(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(save_machine(&s, &r).await?)))
}

/// Registers a machine (`tentacle register-with`): as adding one, answering with the server's comms thumbprint and polling port.
#[utoipa::path(
    post,
    path = "/api/machines/register",
    tag = "machines",
    security(("api_key" = [])),
    request_body = MachineRequest,
    responses(
        (status = 201, description = "Registered; the answer carries the server's thumbprint to trust", body = RegisterReply),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The name exists (without `force`) or another machine has the thumbprint", body = ErrorBody),
        (status = 422, description = "An environment, tenant or the policy does not exist", body = ErrorBody),
        (status = 401, description = "No valid API key", body = ErrorBody),
    )
)]
pub(crate) async fn register(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<MachineRequest>,
) -> ApiResult<impl IntoResponse> {
    let machine = save_machine(&s, &r).await?;
    tracing::info!(
        "registered machine '{}' ({}, thumbprint {})",
        machine.name,
        machine.uri,
        machine.thumbprint
    );
    Ok((
        StatusCode::CREATED,
        Json(RegisterReply {
            machine,
            server_thumbprint: s.thumbprint.to_string(),
            comms_port: s.comms_port,
        }),
    ))
}
