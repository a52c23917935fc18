//! `/api/nodes`: the server nodes sharing this database, as their heartbeats
//! leave them; draining and undraining one; and `ping`, which a load balancer
//! asks to learn whether this node takes work.

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use octo_api_types::{ErrorBody, Node, Permission};

use super::guard::{get, post, Route};
use super::{ApiError, ApiResult};
use crate::authz::{Access, Caller};
use crate::state::AppState;

/// The node routes.
pub(super) fn routes() -> Vec<Route> {
    vec![
        get(
            "/api/nodes",
            Access::System(Permission::AdministerSystem),
            list_nodes,
        ),
        get("/api/nodes/ping", Access::Public, ping),
        post(
            "/api/nodes/{name}/drain",
            Access::System(Permission::AdministerSystem),
            drain_node,
        ),
        post(
            "/api/nodes/{name}/undrain",
            Access::System(Permission::AdministerSystem),
            undrain_node,
        ),
    ]
}

/// Every node that ever ran on this database, by name.
#[utoipa::path(
    get,
    path = "/api/nodes",
    tag = "nodes",
    responses((status = 200, description = "The nodes", body = [Node]))
)]
pub(crate) async fn list_nodes(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<Node>>> {
    caller.require_system(Permission::AdministerSystem)?;
    Ok(Json(s.store.list_nodes().await?))
}

/// For load balancers: 200 when this node takes work, 418 when it is draining
/// (as the original's), 503 when it cannot read its own state.
#[utoipa::path(
    get,
    path = "/api/nodes/ping",
    tag = "nodes",
    responses(
        (status = 200, description = "This node runs and takes work", body = Node),
        (status = 418, description = "This node is draining: send it no new work", body = Node),
        (status = 503, description = "This node cannot read the database", body = ErrorBody),
    )
)]
pub(crate) async fn ping(State(s): State<AppState>) -> Response {
    match s.store.node(&s.node_name).await {
        Ok(Some(node)) => {
            let status = if node.draining {
                StatusCode::IM_A_TEAPOT
            } else {
                StatusCode::OK
            };
            (status, Json(node)).into_response()
        }
        Ok(None) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node '{}' has no heartbeat in the database yet",
                s.node_name
            ),
        )
        .into_response(),
        Err(e) => {
            tracing::warn!("ping: reading node {}: {e}", s.node_name);
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "this node cannot read the database",
            )
            .into_response()
        }
    }
}

/// Drains a node: the tasks it runs go on, it starts no new ones, and its
/// `ping` answers 418. Applied by the node at its next heartbeat (within
/// seconds), at once when the request reaches that node.
#[utoipa::path(
    post,
    path = "/api/nodes/{name}/drain",
    tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses(
        (status = 200, description = "The node, now draining", body = Node),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub(crate) async fn drain_node(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_draining(&s, &caller, &name, true).await.map(Json)
}

/// Undrains a node: it takes tasks again.
#[utoipa::path(
    post,
    path = "/api/nodes/{name}/undrain",
    tag = "nodes",
    params(("name" = String, Path, description = "The node's name")),
    responses(
        (status = 200, description = "The node, taking work again", body = Node),
        (status = 404, description = "No such node", body = ErrorBody),
    )
)]
pub(crate) async fn undrain_node(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Json<Node>> {
    set_draining(&s, &caller, &name, false).await.map(Json)
}

async fn set_draining(
    s: &AppState,
    caller: &Caller,
    name: &str,
    draining: bool,
) -> ApiResult<Node> {
    caller.require_system(Permission::AdministerSystem)?;
    let name = name.trim();
    let node = s
        .store
        .set_node_draining(name, draining)
        .await
        .map_err(|e| match e {
            octo_store::StoreError::NotFound { .. } => ApiError::not_found(format!(
                "no node is named '{name}'; `octopus node list` shows the nodes"
            )),
            e => e.into(),
        })?;
    if node.name.eq_ignore_ascii_case(&s.node_name) {
        s.engine.set_draining(draining);
    }
    let action = if draining { "drained" } else { "undrained" };
    s.audit(caller, None, action, "node", &node.name, "").await;
    Ok(node)
}
