//! Server tasks: health checks and script runs (being written).

use axum::Router;

use crate::server::AppState;

/// The task endpoints, merged into the authenticated API.
pub fn routes() -> Router<AppState> {
    Router::new()
}
