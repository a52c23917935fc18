//! The set of peer thumbprints trusted right now.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::Thumbprint;

/// Builds the sentence that tells a person how to trust a thumbprint on this side,
/// e.g. "run `tentacle configure --instance Tentacle --trust ABC...`".
pub type TrustHint = Arc<dyn Fn(&Thumbprint) -> String + Send + Sync>;

/// Thumbprints trusted right now, shared by every listener, dialler and live
/// connection of one process. Cheap to clone (all clones share one set).
///
/// Changes take effect at once: new handshakes consult the current set, and live
/// connections wait on [`TrustStore::revoked`] so that removing a thumbprint drops
/// every connection that peer holds.
#[derive(Clone)]
pub struct TrustStore {
    set: Arc<watch::Sender<Arc<BTreeSet<Thumbprint>>>>,
    hint: TrustHint,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("trusted", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl TrustStore {
    /// A store trusting `initial`, with `hint` telling people how to add trust.
    pub fn new(initial: impl IntoIterator<Item = Thumbprint>, hint: TrustHint) -> Self {
        let set: BTreeSet<Thumbprint> = initial.into_iter().collect();
        Self {
            set: Arc::new(watch::Sender::new(Arc::new(set))),
            hint,
        }
    }

    /// A store trusting exactly one thumbprint (e.g. the one an endpoint names).
    pub fn pinned(thumbprint: Thumbprint, hint: TrustHint) -> Self {
        Self::new([thumbprint], hint)
    }

    /// Is `t` trusted now?
    pub fn is_trusted(&self, t: &Thumbprint) -> bool {
        self.set.borrow().contains(t)
    }

    /// Every trusted thumbprint, sorted.
    pub fn snapshot(&self) -> Vec<Thumbprint> {
        self.set.borrow().iter().copied().collect()
    }

    /// Trusts `t`. Returns false when it already was.
    pub fn trust(&self, t: Thumbprint) -> bool {
        self.set.send_if_modified(|set| {
            if set.contains(&t) {
                return false;
            }
            Arc::make_mut(set).insert(t);
            true
        })
    }

    /// Stops trusting `t`; live connections of that peer are dropped. Returns false
    /// when it was not trusted.
    pub fn remove(&self, t: &Thumbprint) -> bool {
        self.set.send_if_modified(|set| {
            if !set.contains(t) {
                return false;
            }
            Arc::make_mut(set).remove(t);
            true
        })
    }

    /// Replaces the whole set; connections of peers no longer in it are dropped.
    pub fn replace(&self, thumbprints: impl IntoIterator<Item = Thumbprint>) {
        let new: BTreeSet<Thumbprint> = thumbprints.into_iter().collect();
        self.set.send_if_modified(|set| {
            if **set == new {
                return false;
            }
            *set = Arc::new(new);
            true
        });
    }

    /// How a person trusts `t` on this side.
    pub fn hint(&self, t: &Thumbprint) -> String {
        (self.hint)(t)
    }

    /// Resolves once `t` is not trusted (at once if it is not trusted now).
    pub async fn revoked(&self, t: Thumbprint) {
        let mut rx = self.set.subscribe();
        // The sender lives as long as `self`, so wait_for only ends by the predicate.
        let _ = rx.wait_for(|set| !set.contains(&t)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(n: u8) -> Thumbprint {
        Thumbprint::of_der(&[n])
    }

    fn store(items: &[Thumbprint]) -> TrustStore {
        TrustStore::new(items.iter().copied(), Arc::new(|t| format!("trust {t}")))
    }

    #[test]
    fn add_remove_replace() {
        let s = store(&[tp(1)]);
        assert!(s.is_trusted(&tp(1)));
        assert!(!s.is_trusted(&tp(2)));
        assert!(s.trust(tp(2)));
        assert!(!s.trust(tp(2)));
        assert!(s.remove(&tp(1)));
        assert!(!s.remove(&tp(1)));
        s.replace([tp(3)]);
        assert_eq!(s.snapshot(), vec![tp(3)]);
        assert_eq!(s.hint(&tp(3)), format!("trust {}", tp(3)));
    }

    #[tokio::test]
    async fn revoked_resolves_on_removal_only() {
        let s = store(&[tp(1), tp(2)]);
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.revoked(tp(1)).await }
        });
        s.remove(&tp(2));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.remove(&tp(1));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("revocation noticed")
            .expect("task ok");
        // Not trusted at all: resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), s.revoked(tp(9)))
            .await
            .expect("immediate");
    }
}
