//! An identity that can be replaced while connections run: certificate rotation.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;

use crate::{Identity, Thumbprint};

/// The identity a process presents, replaceable at run time. Every config built
/// from it ([`crate::config::server_config_live`], [`crate::config::client_config_live`])
/// presents the identity current at each handshake; established connections keep
/// the one they were made with. Cheap to clone (clones share one identity).
#[derive(Clone)]
pub struct LiveIdentity {
    current: Arc<watch::Sender<Identity>>,
}

impl fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveIdentity")
            .field("thumbprint", &self.thumbprint())
            .finish()
    }
}

impl LiveIdentity {
    /// Starts with `identity`.
    pub fn new(identity: Identity) -> Self {
        Self {
            current: Arc::new(watch::Sender::new(identity)),
        }
    }

    /// The identity presented from now on.
    pub fn current(&self) -> Identity {
        self.current.borrow().clone()
    }

    /// Thumbprint of the current identity.
    pub fn thumbprint(&self) -> Thumbprint {
        self.current.borrow().thumbprint()
    }

    /// Presents `identity` in every handshake from now on. Returns false (and
    /// changes nothing) when it is the current one already.
    pub fn replace(&self, identity: Identity) -> bool {
        self.current.send_if_modified(|cur| {
            if cur.thumbprint() == identity.thumbprint() {
                return false;
            }
            *cur = identity;
            true
        })
    }

    /// Resolves once the current identity is no longer `thumbprint` (at once
    /// when it is not now).
    pub async fn moved_from(&self, thumbprint: Thumbprint) {
        let mut rx = self.current.subscribe();
        // The sender lives as long as `self`: wait_for ends only by the predicate.
        let _ = rx.wait_for(|id| id.thumbprint() != thumbprint).await;
    }

    pub(crate) fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current.borrow().certified_arc()
    }
}

impl From<Identity> for LiveIdentity {
    fn from(identity: Identity) -> Self {
        Self::new(identity)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replace_changes_what_is_presented_and_wakes_waiters() {
        let a = Identity::generate("a").unwrap();
        let b = Identity::generate("b").unwrap();
        let live = LiveIdentity::new(a.clone());
        assert_eq!(live.thumbprint(), a.thumbprint());
        assert_eq!(
            live.certified_key().end_entity_cert().unwrap(),
            a.cert_der()
        );
        let waiter = tokio::spawn({
            let live = live.clone();
            let tp = a.thumbprint();
            async move { live.moved_from(tp).await }
        });
        assert!(!live.replace(a.clone()));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(live.replace(b.clone()));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(live.current().thumbprint(), b.thumbprint());
        assert_eq!(
            live.certified_key().end_entity_cert().unwrap(),
            b.cert_der()
        );
    }
}
