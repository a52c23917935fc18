//! Connected polling tentacles, and requests waiting for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use octo_tls::Thumbprint;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::server::Connection;
use crate::CommsError;

/// Connected polling tentacles by subscription id. A tentacle may hold several
/// connections; requests are spread over them round-robin, and any number of
/// requests run at once over each.
#[derive(Clone, Default)]
pub struct PollingRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    by_subscription: Mutex<HashMap<String, Vec<Connection>>>,
    /// A subscription's first connection arrived, or its last one closed.
    presence: tokio::sync::broadcast::Sender<Presence>,
    changed: Notify,
    next: AtomicUsize,
    /// Polling connections refused for an untrusted certificate, latest last.
    refused: Mutex<Vec<Refusal>>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            by_subscription: Mutex::default(),
            presence: tokio::sync::broadcast::channel(PRESENCE_BUFFERED).0,
            changed: Notify::default(),
            next: AtomicUsize::default(),
            refused: Mutex::default(),
        }
    }
}

/// Presence changes kept for slow receivers (past it they are told they lagged).
const PRESENCE_BUFFERED: usize = 4096;

/// A polling subscription came (its first connection here) or went (its last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The subscription.
    pub subscription_id: String,
    /// Connected here now.
    pub present: bool,
}

/// Polling connections refused for presenting one untrusted thumbprint.
#[derive(Debug, Clone)]
struct Refusal {
    thumbprint: Thumbprint,
    remote: String,
    count: u64,
    last: Instant,
}

/// Distinct refused thumbprints remembered.
const REFUSALS_KEPT: usize = 32;
/// How long a refusal is worth mentioning.
const REFUSAL_RECENT: Duration = Duration::from_secs(15 * 60);

impl std::fmt::Debug for PollingRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollingRegistry")
            .field("connections", &self.len())
            .finish()
    }
}

/// One connected polling connection, for listings.
#[derive(Debug, Clone)]
pub struct PolledConnection {
    /// Subscription it serves.
    pub subscription_id: String,
    /// Thumbprint the tentacle presented.
    pub thumbprint: Thumbprint,
    /// Where it connected from.
    pub remote_addr: String,
}

impl PollingRegistry {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<Connection>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every mutation is a single push/retain), so recover from poisoning.
        self.inner
            .by_subscription
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a connection whose session handshake named `subscription_id`, and
    /// removes it again when it closes.
    pub fn register(&self, subscription_id: String, conn: Connection) {
        info!(
            subscription = %subscription_id,
            thumbprint = %conn.peer_thumbprint(),
            "polling tentacle connected from {}",
            conn.remote_addr()
        );
        let first = {
            let mut map = self.map();
            let list = map.entry(subscription_id.clone()).or_default();
            list.push(conn.clone());
            list.len() == 1
        };
        if first {
            let _ = self.inner.presence.send(Presence {
                subscription_id: subscription_id.clone(),
                present: true,
            });
        }
        self.inner.changed.notify_waiters();
        let this = self.clone();
        tokio::spawn(async move {
            conn.closed().await;
            let mut map = this.map();
            let mut last = false;
            if let Some(list) = map.get_mut(&subscription_id) {
                list.retain(|c| c.id() != conn.id());
                if list.is_empty() {
                    map.remove(&subscription_id);
                    last = true;
                }
            }
            drop(map);
            if last {
                let _ = this.inner.presence.send(Presence {
                    subscription_id: subscription_id.clone(),
                    present: false,
                });
            }
            info!(subscription = %subscription_id, "polling tentacle disconnected ({})", conn.remote_addr());
            this.inner.changed.notify_waiters();
        });
    }

    /// Notes that a polling connection from `remote` was refused because the
    /// certificate it presented (`thumbprint`) is not trusted: a request that
    /// then waits in vain for a tentacle says so ([`Self::wait_for`]).
    pub fn record_refusal(&self, thumbprint: Thumbprint, remote: String) {
        let mut refused = self.inner.refused.lock().unwrap_or_else(|p| p.into_inner());
        let count = match refused.iter().position(|r| r.thumbprint == thumbprint) {
            Some(i) => refused.remove(i).count,
            None => 0,
        };
        refused.push(Refusal {
            thumbprint,
            remote,
            count: count.saturating_add(1),
            last: Instant::now(),
        });
        if refused.len() > REFUSALS_KEPT {
            refused.remove(0);
        }
        drop(refused);
        self.inner.changed.notify_waiters();
    }

    /// The thumbprints refused recently, latest first.
    pub fn refused_thumbprints(&self) -> Vec<Thumbprint> {
        self.recent_refusals()
            .iter()
            .map(|r| r.thumbprint)
            .collect()
    }

    /// The recent refusals, latest first.
    fn recent_refusals(&self) -> Vec<Refusal> {
        let refused = self.inner.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused
            .iter()
            .rev()
            .filter(|r| r.last.elapsed() <= REFUSAL_RECENT)
            .cloned()
            .collect()
    }

    /// A live connection of `subscription_id` presenting one of `accepted`, if
    /// any (never one the tentacle asked to go away).
    pub fn find(&self, subscription_id: &str, accepted: &[Thumbprint]) -> Option<Connection> {
        let map = self.map();
        let live: Vec<&Connection> = map
            .get(subscription_id)?
            .iter()
            .filter(|c| c.is_usable() && accepted.contains(&c.peer_thumbprint()))
            .collect();
        if live.is_empty() {
            return None;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % live.len();
        Some(live[i].clone())
    }

    /// Waits up to `timeout` for `subscription_id` to connect presenting one
    /// of `accepted` (the first is the endpoint's own); returns at once when it
    /// is connected already.
    pub async fn wait_for(
        &self,
        subscription_id: &str,
        accepted: &[Thumbprint],
        timeout: Duration,
    ) -> Result<Connection, CommsError> {
        let thumbprint = accepted
            .first()
            .ok_or_else(|| CommsError::InvalidEndpoint {
                endpoint: format!("poll://{subscription_id}/"),
                reason: "no thumbprint to accept".into(),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.find(subscription_id, accepted) {
                return Ok(c);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let detail = self.mismatch_detail(subscription_id, accepted);
                    if !detail.is_empty() {
                        warn!("polling tentacle poll://{subscription_id}/{detail}");
                    }
                    return Err(CommsError::PollingTimeout {
                        subscription_id: subscription_id.to_string(),
                        thumbprint: *thumbprint,
                        waited: timeout,
                        detail,
                    });
                }
            }
        }
    }

    fn mismatch_detail(&self, subscription_id: &str, accepted: &[Thumbprint]) -> String {
        let map = self.map();
        let Some(other) = map
            .get(subscription_id)
            .and_then(|l| l.iter().find(|c| !accepted.contains(&c.peer_thumbprint())))
        else {
            drop(map);
            return accepted
                .first()
                .map(|t| self.refusal_detail(t))
                .unwrap_or_default();
        };
        format!(
            " (a connection for this subscription presents thumbprint {} instead: the tentacle's certificate changed or two machines share a subscription; re-register it)",
            other.peer_thumbprint()
        )
    }

    /// What the recent refusals say about a tentacle that did not connect: the
    /// server refused a certificate, which is likely this tentacle's new one.
    fn refusal_detail(&self, thumbprint: &Thumbprint) -> String {
        let refused = self.recent_refusals();
        let Some(latest) = refused.first() else {
            return String::new();
        };
        let others = match refused.len() {
            1 => String::new(),
            n => format!(" (and {} other untrusted certificate(s))", n - 1),
        };
        format!(
            "; meanwhile this server refused a polling tentacle's certificate: it presented thumbprint {} (from {}, {} time(s), last {} s ago){others}, not the expected {thumbprint}. If that is this tentacle, its certificate changed: register it again (`tentacle register-with ... --force`) or trust the new thumbprint",
            latest.thumbprint,
            latest.remote,
            latest.count,
            latest.last.elapsed().as_secs()
        )
    }

    /// Waits until `pred` holds for the registry (checked now and after every
    /// connect or disconnect), or `timeout` passes; returns whether it holds.
    pub async fn wait_until(
        &self,
        pred: impl Fn(&PollingRegistry) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(self) {
                return true;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => return pred(self),
            }
        }
    }

    /// Live connections presenting `thumbprint`, of any subscription.
    pub fn presenting(&self, thumbprint: &Thumbprint) -> Vec<Connection> {
        self.map()
            .values()
            .flatten()
            .filter(|c| !c.is_closed() && c.peer_thumbprint() == *thumbprint)
            .cloned()
            .collect()
    }

    /// Every live connection.
    pub fn connections(&self) -> Vec<PolledConnection> {
        let map = self.map();
        let mut out: Vec<PolledConnection> = map
            .iter()
            .flat_map(|(sub, list)| {
                list.iter()
                    .filter(|c| !c.is_closed())
                    .map(move |c| PolledConnection {
                        subscription_id: sub.clone(),
                        thumbprint: c.peer_thumbprint(),
                        remote_addr: c.remote_addr().to_string(),
                    })
            })
            .collect();
        out.sort_by(|a, b| a.subscription_id.cmp(&b.subscription_id));
        out
    }

    /// Subscriptions coming and going from now on ([`Presence`]); a receiver
    /// that falls more than a few thousand behind is told it lagged, and
    /// should read [`Self::subscriptions`] again.
    pub fn presence(&self) -> tokio::sync::broadcast::Receiver<Presence> {
        self.inner.presence.subscribe()
    }

    /// The subscriptions connected now.
    pub fn subscriptions(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    /// Whether `subscription_id` has a live connection here.
    pub fn is_connected(&self, subscription_id: &str) -> bool {
        self.map()
            .get(subscription_id)
            .is_some_and(|l| l.iter().any(|c| !c.is_closed()))
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.map().values().map(Vec::len).sum()
    }

    /// True when no polling tentacle is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
