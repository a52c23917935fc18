//! Certificate rotation on the server (proto/.../certificates.proto).
//!
//! Tentacle-led: a tentacle offers its next certificate on a connection the
//! server trusts; every machine presenting that connection's certificate records
//! it as `next_thumbprint` (accepted beside the current one), the server says so,
//! and when a connection presenting the new certificate arrives the machines take
//! it as their own and the old one is forgotten (the polling trust drops it once
//! the old connections have drained). Every step is in the audit log.
//!
//! Server-led ([`rotate_server_certificate`]): a new comms certificate is staged
//! (`DATA/server-next.pem`), every machine the server reaches is asked to trust it
//! beside the current one, then the server presents it. What each machine learned
//! is reported, with the command that fixes the others by hand.

use std::path::Path;
use std::time::Duration;

use octo_api_types::{CertificateRotationReport, MachineRotation};
use octo_proto::v1::TrustServerRequest;
use octo_store::MachineFilter;
use octo_tls::Identity;

use octo_comms::{CommsEvent, Connection};
use octo_proto::v1::AcceptRotationRequest;
use octo_store::{now_ms, EndpointKind, NewAuditEvent};
use octo_tls::Thumbprint;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::AppState;

/// How long old polling connections may drain before their certificate is
/// dropped from the polling trust anyway (a little over the tentacle's own bound).
const RETIRE_AFTER: Duration = Duration::from_secs(330);

/// What the server decides about a tentacle's offer, from the machines that
/// present the offering connection's certificate (protocol logic, no IO).
#[derive(Debug, PartialEq, Eq)]
pub enum OfferDecision {
    /// No machine presents it: the offer is ignored (and not accepted).
    Unknown,
    /// Already recorded for every machine: accept again, audit nothing.
    Known,
    /// Record it for these machines (by name), audit, accept.
    Record(Vec<String>),
}

/// Decides on `next` offered by a tentacle presenting `current`, given the
/// machines that present `current` (their names and next thumbprints).
pub fn decide_offer(
    current: &Thumbprint,
    next: &Thumbprint,
    machines: &[(String, Option<String>)],
) -> OfferDecision {
    if machines.is_empty() || current == next {
        return OfferDecision::Unknown;
    }
    let next = next.to_string();
    let changed: Vec<String> = machines
        .iter()
        .filter(|(_, n)| n.as_deref() != Some(next.as_str()))
        .map(|(name, _)| name.clone())
        .collect();
    if changed.is_empty() {
        OfferDecision::Known
    } else {
        OfferDecision::Record(changed)
    }
}

/// Handles the comms' events until `shutdown`.
pub async fn run(
    state: AppState,
    mut events: tokio::sync::mpsc::UnboundedReceiver<CommsEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.recv() => match e {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            CommsEvent::Offer { conn, next, .. } => {
                let state = state.clone();
                tokio::spawn(async move { offer(&state, &conn, next).await });
            }
            CommsEvent::Connected { conn, .. } => connected(&state, &conn).await,
        }
    }
}

async fn audit(state: &AppState, conn: &Connection, space_id: i64, object: &str, details: String) {
    let event = NewAuditEvent {
        at: now_ms(),
        user_id: None,
        username: "(tentacle)".into(),
        source: format!("comms {}", conn.remote_addr()),
        action: "Rotate certificate".into(),
        kind: "Machine".into(),
        object: object.into(),
        space_id: Some(space_id),
        details,
    };
    if let Err(e) = state.store.append_audit(&event).await {
        tracing::error!("recording an audit event (certificate rotation of {object}): {e}");
    }
}

async fn offer(state: &AppState, conn: &Connection, next: Thumbprint) {
    let current = conn.peer_thumbprint();
    let before = match state
        .store
        .machines_by_thumbprint(None, &current.to_string())
        .await
    {
        Ok(m) => m,
        Err(e) => return warn!("certificate rotation offer from {current}: {e}"),
    };
    let names: Vec<(String, Option<String>)> = before
        .iter()
        .map(|m| (m.name.clone(), m.next_thumbprint.clone()))
        .collect();
    match decide_offer(&current, &next, &names) {
        OfferDecision::Unknown => {
            return warn!(
                "a tentacle presenting {current} offered certificate {next}, but no machine has thumbprint {current}: not accepted"
            )
        }
        OfferDecision::Known => {}
        OfferDecision::Record(changed) => {
            let now = match state
                .store
                .offer_machine_thumbprint(&current.to_string(), &next.to_string())
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    for m in &before {
                        audit(
                            state,
                            conn,
                            m.space_id,
                            &m.name,
                            format!("refused the tentacle's next certificate {next}: {e}"),
                        )
                        .await;
                    }
                    return warn!("certificate rotation offer from {current}: {e}");
                }
            };
            if now.iter().any(|m| m.kind == EndpointKind::Polling) {
                if let Err(e) = state.refresh_polling_trust().await {
                    warn!("updating the polling trust: {e:#}");
                }
            }
            for m in now.iter().filter(|m| changed.contains(&m.name)) {
                info!(machine = %m.name, "tentacle offered certificate {next} (now {current}); accepting both until it switches");
                audit(
                    state,
                    conn,
                    m.space_id,
                    &m.name,
                    format!("the tentacle will present {next} instead of {current}; both accepted until it does"),
                )
                .await;
            }
        }
    }
    let reply = conn
        .certificates()
        .accept_rotation(AcceptRotationRequest {
            next_thumbprint: next.to_string(),
            server_thumbprints: vec![state.thumbprint().to_string()],
        })
        .await;
    match reply {
        Ok(r) => {
            let waiting = r.into_inner().waiting_for;
            if !waiting.is_empty() {
                info!(
                    "tentacle {current} waits for {} more server(s) before presenting {next}",
                    waiting.len()
                );
            }
        }
        Err(status) => warn!(
            "telling tentacle {current} that {next} is accepted failed: {}; it is offered again on its next connection",
            status.message()
        ),
    }
}

/// A connection presenting a machine's next certificate: the rotation is done.
async fn connected(state: &AppState, conn: &Connection) {
    let tp = conn.peer_thumbprint();
    let promoted = match state
        .store
        .promote_machine_thumbprint(&tp.to_string())
        .await
    {
        Ok(p) => p,
        Err(e) => return warn!("completing the certificate rotation to {tp}: {e}"),
    };
    if promoted.is_empty() {
        return;
    }
    let mut retire = Vec::new();
    for m in &promoted {
        info!(machine = %m.name, "tentacle now presents {tp}; forgot {}", m.thumbprint);
        audit(
            state,
            conn,
            m.space_id,
            &m.name,
            format!(
                "the tentacle presents {tp} now; its old certificate {} is no longer accepted",
                m.thumbprint
            ),
        )
        .await;
        if m.kind == EndpointKind::Polling {
            if let Ok(old) = m.thumbprint.parse::<Thumbprint>() {
                retire.push(old);
            }
        }
    }
    if retire.is_empty() {
        return;
    }
    // Old polling connections finish their calls (the tentacle sent GOAWAY);
    // then the polling trust, read again from the store, no longer has them.
    let state = state.clone();
    tokio::spawn(async move {
        let registry = state.comms.polling().clone();
        let drained = registry
            .wait_until(
                |r| retire.iter().all(|old| r.presenting(old).is_empty()),
                RETIRE_AFTER,
            )
            .await;
        if !drained {
            warn!("connections with a replaced certificate were still open after {RETIRE_AFTER:?}; dropping them");
        }
        if let Err(e) = state.refresh_polling_trust().await {
            warn!("updating the polling trust: {e:#}");
        }
    });
}

/// The staged comms certificate (certificate and key, 0600) while a server-led
/// rotation runs.
pub fn staged_path(data: &Path) -> std::path::PathBuf {
    data.join("server-next.pem")
}

/// At start: finishes or abandons a server-led rotation a crash interrupted.
/// The switch writes the key file, then the certificate file, then removes the
/// staged file; a crash between the two writes leaves a key that does not match
/// the certificate, which the staged file repairs.
pub fn recover(data: &Path) -> anyhow::Result<()> {
    let staged = staged_path(data);
    if !staged.exists() {
        return Ok(());
    }
    let (cert, key) = crate::startup::cert_paths(data);
    let next = Identity::load(&staged, &staged)?;
    match Identity::load(&cert, &key) {
        Ok(current) if current.thumbprint() == next.thumbprint() => {
            info!(
                "the certificate rotation to {} had finished",
                next.thumbprint()
            );
        }
        Ok(current) => warn!(
            "abandoning a certificate rotation to {} that never switched; the server keeps {}",
            next.thumbprint(),
            current.thumbprint()
        ),
        Err(octo_tls::IdentityError::KeyMismatch { .. }) => {
            next.save(&cert, &key)?;
            warn!(
                "finished a certificate rotation to {} that a stop interrupted",
                next.thumbprint()
            );
        }
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_file(&staged)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", staged.display()))?;
    Ok(())
}

/// How long one tentacle may take to answer `TrustServer` (or be dialled).
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// `octopus server rotate-certificate`: see the module's docs.
pub async fn rotate_server_certificate(
    state: &AppState,
) -> anyhow::Result<CertificateRotationReport> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = ONE_AT_A_TIME.lock().await;
    let previous = state.comms.identity();
    let next = Identity::generate("Octopus Server")?;
    let staged = staged_path(&state.data);
    next.save(&staged, &staged)?;

    let machines = state.store.list_machines(&MachineFilter::default()).await?;
    let spaces: std::collections::HashMap<i64, String> = state
        .store
        .list_spaces()
        .await?
        .into_iter()
        .map(|s| (s.id, s.name))
        .collect();
    let asks = machines.iter().map(|m| {
        let state = state.clone();
        let (old, new) = (previous.thumbprint(), next.thumbprint());
        async move {
            let result = async {
                if m.disabled {
                    return Err("the machine is disabled".to_string());
                }
                let endpoint = octo_engine::endpoint_of(m).map_err(|e| e.to_string())?;
                let conn = match &endpoint {
                    octo_comms::Endpoint::Polling {
                        subscription_id, ..
                    } => state
                        .comms
                        .polling()
                        .find(subscription_id, &endpoint.accepted())
                        .ok_or_else(|| "the polling tentacle is not connected".to_string())?,
                    octo_comms::Endpoint::Listening { .. } => {
                        tokio::time::timeout(ASK_TIMEOUT, state.comms.connect(&endpoint))
                            .await
                            .map_err(|_| format!("not reached within {ASK_TIMEOUT:?}"))?
                            .map_err(|e| e.to_string())?
                    }
                };
                let mut client = conn.certificates();
                let call = client.trust_server(TrustServerRequest {
                    current_thumbprint: old.to_string(),
                    next_thumbprint: new.to_string(),
                });
                match tokio::time::timeout(ASK_TIMEOUT, call).await {
                    Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
                    Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                        Err("the tentacle is too old to learn a new server certificate".to_string())
                    }
                    Ok(Err(status)) => Err(status.message().to_string()),
                    Ok(Ok(_)) => Ok(()),
                }
            }
            .await;
            (m, result)
        }
    });
    let results = futures_util::future::join_all(asks).await;

    // Switch: key, then certificate (see `recover`), then forget the staged file.
    let (cert, key) = crate::startup::cert_paths(&state.data);
    next.save(&key, &key)?;
    next.save(&cert, &key)?;
    std::fs::remove_file(&staged)
        .map_err(|e| anyhow::anyhow!("removing {}: {e}", staged.display()))?;
    state.comms.switch_identity(next.clone());
    info!(
        "now presenting comms certificate {} (was {})",
        next.thumbprint(),
        previous.thumbprint()
    );

    let new = next.thumbprint();
    let report = CertificateRotationReport {
        previous_thumbprint: previous.thumbprint().to_string(),
        thumbprint: new.to_string(),
        machines: results
            .into_iter()
            .map(|(m, r)| {
                let kind = match m.kind {
                    EndpointKind::Listening => "Listening",
                    EndpointKind::Polling => "Polling",
                };
                let (learned, reason, fix) = match r {
                    Ok(()) => (true, String::new(), String::new()),
                    Err(reason) => (
                        false,
                        reason,
                        match m.kind {
                            EndpointKind::Listening => format!("tentacle configure --trust {new}"),
                            EndpointKind::Polling => format!(
                                "tentacle configure --trust {new}; tentacle poll-server --server-comms-address HOST:{} --server-thumbprint {new}",
                                state.comms_port
                            ),
                        },
                    ),
                };
                MachineRotation {
                    space: spaces.get(&m.space_id).cloned().unwrap_or_default(),
                    name: m.name.clone(),
                    kind: kind.into(),
                    learned,
                    reason,
                    fix,
                }
            })
            .collect(),
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(n: u8) -> Thumbprint {
        Thumbprint::of_der(&[n])
    }

    #[test]
    fn offers_are_recorded_once_for_known_machines_only() {
        let (cur, next) = (tp(1), tp(2));
        assert_eq!(decide_offer(&cur, &next, &[]), OfferDecision::Unknown);
        assert_eq!(
            decide_offer(&cur, &cur, &[("a".into(), None)]),
            OfferDecision::Unknown
        );
        let machines = [
            ("a".to_string(), None),
            ("b".to_string(), Some(next.to_string())),
            ("c".to_string(), Some(tp(3).to_string())),
        ];
        assert_eq!(
            decide_offer(&cur, &next, &machines),
            OfferDecision::Record(vec!["a".into(), "c".into()])
        );
        assert_eq!(
            decide_offer(&cur, &next, &[("b".into(), Some(next.to_string()))]),
            OfferDecision::Known
        );
    }
}
