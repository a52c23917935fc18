//! What every part of the server shares: [`AppState`]. Routes, the portal and
//! background jobs use it; it depends on nothing above it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use octo_api_types::Space;
use octo_comms::ServerComms;
use octo_engine::secrets::MasterKey;
use octo_engine::{Engine, PackageFiles, ToolBuild};
use octo_store::{now_ms, NewAuditEvent, Store};
use octo_tls::{Thumbprint, TrustStore};

use crate::auth::LoginThrottle;
use crate::authz::{Caller, GrantCache, SpaceCache};

/// Thumbprints of polling machines: who may connect to the comms port.
pub async fn polling_thumbprints(store: &dyn Store) -> anyhow::Result<Vec<Thumbprint>> {
    Ok(store
        .polling_thumbprints()
        .await?
        .into_iter()
        .filter_map(|t| t.parse().ok())
        .collect())
}

/// Shared by API handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub comms: ServerComms,
    pub polling_trust: TrustStore,
    pub comms_port: u16,
    /// The TLS port for WebSocket polling (and the API over TLS), when on, and its path.
    pub web_socket: Option<(u16, String)>,
    /// The data directory (package files live under it).
    pub data: PathBuf,
    /// The deployment tool this server pushes, or why there is none.
    pub tool: Arc<Result<ToolBuild, String>>,
    /// The tentacle binary tentacles are upgraded to, or why there is none.
    pub tentacle: Arc<Result<octo_engine::TentacleBuild, String>>,
    /// Where the built-in feed keeps package files.
    pub packages: PackageFiles,
    /// Runs tasks (health checks, scripts) and tells live log readers of changes.
    pub engine: Arc<Engine>,
    /// Encrypts secret values at rest.
    pub master_key: Arc<MasterKey>,
    /// A login's session key expires after this long without use.
    pub session_idle: Duration,
    /// Callers' resolved grants, reused briefly.
    pub grant_cache: Arc<GrantCache>,
    /// Spaces read by id, reused briefly.
    pub space_cache: Arc<SpaceCache>,
    /// Failed logins, by user and by address.
    pub logins: Arc<LoginThrottle>,
    /// This server's name among the nodes sharing its database.
    pub node_name: String,
}

impl AppState {
    /// The comms certificate's thumbprint (which tentacles must trust), as
    /// presented in new handshakes.
    pub fn thumbprint(&self) -> Thumbprint {
        self.comms.thumbprint()
    }

    /// Records a change in the audit log (best effort: a failure is logged).
    /// `object` names what changed; `details` must never hold a secret.
    pub async fn audit(
        &self,
        caller: &Caller,
        space: Option<&Space>,
        action: &str,
        kind: &str,
        object: &str,
        details: impl Into<String>,
    ) {
        let event = NewAuditEvent {
            object: object.into(),
            details: details.into(),
            ..audit_event(caller, space, action, kind, now_ms())
        };
        if let Err(e) = self.store.append_audit(&event).await {
            tracing::error!("recording an audit event ({action} {kind} {object}): {e}");
        }
    }

    /// Teams, members, grants or roles changed: callers' permissions are
    /// resolved again.
    pub fn permissions_changed(&self) {
        self.grant_cache.clear();
    }

    /// Re-reads which polling tentacles may connect (after machines change),
    /// and has the other nodes of a cluster do the same.
    pub async fn refresh_polling_trust(&self) -> anyhow::Result<()> {
        self.reload_polling_trust().await?;
        self.engine
            .publish(octo_store::ClusterEvent::TrustChanged)
            .await;
        Ok(())
    }

    /// Re-reads which polling tentacles may connect, on this node only.
    pub async fn reload_polling_trust(&self) -> anyhow::Result<()> {
        self.polling_trust
            .replace(polling_thumbprints(self.store.as_ref()).await?);
        Ok(())
    }
}

/// The audit event of `caller` doing `action` to a thing of `kind` at `at`,
/// its object and details still empty: for what is recorded with the change
/// itself, in its commit.
pub fn audit_event(
    caller: &Caller,
    space: Option<&Space>,
    action: &str,
    kind: &str,
    at: i64,
) -> NewAuditEvent {
    NewAuditEvent {
        at,
        user_id: Some(caller.user.id),
        username: caller.user.username.clone(),
        source: caller.source.clone(),
        action: action.into(),
        kind: kind.into(),
        object: String::new(),
        space_id: space.map(|s| s.id),
        details: String::new(),
    }
}
