//! What every part of the server shares: [`AppState`]. Routes, the portal and
//! background jobs use it; it depends on nothing above it.

use std::path::PathBuf;
use std::sync::Arc;

use octo_comms::ServerComms;
use octo_engine::{Engine, PackageFiles, ToolBuild};
use octo_store::{EndpointKind, MachineFilter, Store};
use octo_tls::{Thumbprint, TrustStore};

/// Thumbprints of polling machines: who may connect to the comms port.
pub async fn polling_thumbprints(store: &dyn Store) -> anyhow::Result<Vec<Thumbprint>> {
    Ok(store
        .list_machines(&MachineFilter::default())
        .await?
        .into_iter()
        .filter(|m| m.kind == EndpointKind::Polling)
        .filter_map(|m| m.thumbprint.parse().ok())
        .collect())
}

/// Shared by API handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub comms: ServerComms,
    pub polling_trust: TrustStore,
    pub thumbprint: Thumbprint,
    pub comms_port: u16,
    /// The TLS port for WebSocket polling (and the API over TLS), when on, and its path.
    pub web_socket: Option<(u16, String)>,
    /// The data directory (package files live under it).
    pub data: PathBuf,
    /// The deployment tool this server pushes, or why there is none.
    pub tool: Arc<Result<ToolBuild, String>>,
    /// Where the built-in feed keeps package files.
    pub packages: PackageFiles,
    /// Runs tasks (health checks, scripts) and tells live log readers of changes.
    pub engine: Arc<Engine>,
}

impl AppState {
    /// Re-reads which polling tentacles may connect (after machines change).
    pub async fn refresh_polling_trust(&self) -> anyhow::Result<()> {
        self.polling_trust
            .replace(polling_thumbprints(self.store.as_ref()).await?);
        Ok(())
    }
}
