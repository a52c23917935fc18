//! Named reader/writer locks for script isolation.
//!
//! One lock per mutex name. FULL isolation takes it exclusively (a writer), NONE
//! shares it (a reader). Requests are served strictly first come, first served: a
//! request is granted only when it is at the head of the queue and compatible with
//! the current holders, so a writer waiting at the head blocks every reader that
//! arrived after it. A stream of NONE scripts therefore cannot starve a FULL one,
//! and a FULL one waits only for the readers that were there before it.
//!
//! A [`Lease`] is both the place in the queue and, once granted, the hold on the
//! lock; dropping it leaves the queue or releases the lock, whichever applies, and
//! grants the next compatible requests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// Where a request for the lock stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Queued; the tickets currently holding the lock.
    Queued { held_by: Vec<String> },
    /// Held by this lease.
    Granted,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    ticket: String,
    exclusive: bool,
    tx: watch::Sender<Wait>,
}

#[derive(Debug, Default)]
struct Lock {
    writer: Option<(u64, String)>,
    readers: Vec<(u64, String)>,
    queue: VecDeque<Waiter>,
}

impl Lock {
    fn holders(&self) -> Vec<String> {
        match &self.writer {
            Some((_, t)) => vec![t.clone()],
            None => self.readers.iter().map(|(_, t)| t.clone()).collect(),
        }
    }

    fn is_idle(&self) -> bool {
        self.writer.is_none() && self.readers.is_empty() && self.queue.is_empty()
    }

    /// Grants queued requests from the head while they are compatible, then tells
    /// the rest who holds the lock now.
    fn pump(&mut self) {
        while let Some(front) = self.queue.front() {
            let compatible = if front.exclusive {
                self.writer.is_none() && self.readers.is_empty()
            } else {
                self.writer.is_none()
            };
            if !compatible {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            if w.exclusive {
                self.writer = Some((w.id, w.ticket));
            } else {
                self.readers.push((w.id, w.ticket));
            }
            w.tx.send_replace(Wait::Granted);
        }
        let held_by = self.holders();
        for w in &self.queue {
            w.tx.send_if_modified(|s| {
                let next = Wait::Queued {
                    held_by: held_by.clone(),
                };
                if *s == next {
                    false
                } else {
                    *s = next;
                    true
                }
            });
        }
    }

    /// Removes `id` from the queue or the holders.
    fn remove(&mut self, id: u64) {
        if self.writer.as_ref().is_some_and(|(w, _)| *w == id) {
            self.writer = None;
        }
        self.readers.retain(|(r, _)| *r != id);
        self.queue.retain(|w| w.id != id);
    }
}

#[derive(Debug, Default)]
struct Inner {
    locks: HashMap<String, Lock>,
    next_id: u64,
}

/// All isolation locks of one tentacle.
#[derive(Debug, Default)]
pub(crate) struct IsolationLocks {
    inner: Mutex<Inner>,
}

impl IsolationLocks {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a request for the lock `name` on behalf of `ticket`; it may be granted
    /// at once (see [`Lease::state`]).
    pub(crate) fn acquire(self: &Arc<Self>, name: &str, exclusive: bool, ticket: &str) -> Lease {
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        let (tx, rx) = watch::channel(Wait::Queued {
            held_by: Vec::new(),
        });
        let lock = inner.locks.entry(name.to_string()).or_default();
        lock.queue.push_back(Waiter {
            id,
            ticket: ticket.to_string(),
            exclusive,
            tx,
        });
        lock.pump();
        Lease {
            locks: Arc::clone(self),
            name: name.to_string(),
            id,
            rx,
        }
    }

    fn release(&self, name: &str, id: u64) {
        let mut inner = self.lock();
        if let Some(lock) = inner.locks.get_mut(name) {
            lock.remove(id);
            lock.pump();
            if lock.is_idle() {
                inner.locks.remove(name);
            }
        }
    }
}

/// A place in a lock's queue, then the hold on it. Dropping it gives up either.
#[derive(Debug)]
pub(crate) struct Lease {
    locks: Arc<IsolationLocks>,
    name: String,
    id: u64,
    rx: watch::Receiver<Wait>,
}

impl Lease {
    /// Where this request stands now (marks it seen for [`Lease::changed`]).
    pub(crate) fn state(&mut self) -> Wait {
        self.rx.borrow_and_update().clone()
    }

    /// Waits until the standing changes (granted, or different holders).
    pub(crate) async fn changed(&mut self) -> Wait {
        // The sender lives in the queue until the request is granted or removed, and
        // "granted" is the last value ever sent; if the sender is gone, the last value
        // is final.
        let _ = self.rx.changed().await;
        self.rx.borrow_and_update().clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.locks.release(&self.name, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_writer_blocks_later_readers() {
        let locks = Arc::new(IsolationLocks::default());
        let mut r1 = locks.acquire("m", false, "r1");
        assert_eq!(r1.state(), Wait::Granted);
        let mut w = locks.acquire("m", true, "w");
        assert_eq!(
            w.state(),
            Wait::Queued {
                held_by: vec!["r1".into()]
            }
        );
        let mut r2 = locks.acquire("m", false, "r2");
        assert!(matches!(r2.state(), Wait::Queued { .. }));
        drop(r1);
        assert_eq!(w.state(), Wait::Granted);
        assert_eq!(
            r2.state(),
            Wait::Queued {
                held_by: vec!["w".into()]
            }
        );
        drop(w);
        assert_eq!(r2.state(), Wait::Granted);
        drop(r2);
        assert!(locks.lock().locks.is_empty());
    }

    #[test]
    fn leaving_the_queue_unblocks_followers() {
        let locks = Arc::new(IsolationLocks::default());
        let mut r1 = locks.acquire("m", false, "r1");
        assert_eq!(r1.state(), Wait::Granted);
        let w = locks.acquire("m", true, "w");
        let mut r2 = locks.acquire("m", false, "r2");
        assert!(matches!(r2.state(), Wait::Queued { .. }));
        // The writer gives up: the reader behind it joins r1.
        drop(w);
        assert_eq!(r2.state(), Wait::Granted);
        // Other names are independent.
        let mut other = locks.acquire("other", true, "x");
        assert_eq!(other.state(), Wait::Granted);
    }
}
