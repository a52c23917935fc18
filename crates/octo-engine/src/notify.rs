//! Per-task change counters, in memory: log appends and state changes bump
//! them; live readers wait on them and read the rows from the store, so a
//! reader that falls behind loses nothing.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

/// Change counters of one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Log lines were stored.
    pub log: u64,
    /// The task or one of its steps changed (state, cancel requested, ...).
    pub state: u64,
}

/// The notifiers of the tasks that have live readers.
#[derive(Debug, Default)]
pub struct Notifiers {
    map: Mutex<HashMap<String, watch::Sender<Changes>>>,
    /// On a cluster: the tasks whose log grew here, for the other nodes' readers.
    forward: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map operation: a panic cannot leave the
    // map inconsistent, so recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notifiers {
    /// A receiver of `task_id`'s change counters; pair with [`Notifiers::release`].
    pub fn subscribe(&self, task_id: &str) -> watch::Receiver<Changes> {
        lock(&self.map)
            .entry(task_id.to_string())
            .or_insert_with(|| watch::channel(Changes::default()).0)
            .subscribe()
    }

    /// Drops the task's notifier once nobody listens (call after dropping the receiver).
    pub fn release(&self, task_id: &str) {
        let mut map = lock(&self.map);
        if map.get(task_id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(task_id);
        }
    }

    fn changed(&self, task_id: &str, f: impl FnOnce(&mut Changes)) {
        if let Some(tx) = lock(&self.map).get(task_id) {
            tx.send_modify(f);
        }
    }

    /// Log lines of the task were stored (here: the other nodes of a cluster are told).
    pub fn log_changed(&self, task_id: &str) {
        self.changed(task_id, |c| c.log += 1);
        if let Some(tx) = self.forward.get() {
            let _ = tx.send(task_id.to_string());
        }
    }

    /// Another node stored log lines of the task.
    pub fn remote_log_changed(&self, task_id: &str) {
        self.changed(task_id, |c| c.log += 1);
    }

    /// From now on, the ids of tasks whose log grew here go to `tx`.
    pub(crate) fn forward_to(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.forward.set(tx);
    }

    /// The task or one of its steps changed.
    pub fn state_changed(&self, task_id: &str) {
        self.changed(task_id, |c| c.state += 1);
    }
}
