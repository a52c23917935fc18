//! [`StopSignals`]: SIGTERM and SIGINT, watched by the server and the tentacle
//! from before they say they are ready.
//!
//! Until a process watches a signal, the kernel's default action applies:
//! SIGTERM kills it on the spot. A service manager may stop a service the
//! moment it says it is ready (`READY=1`, or its first log line), so the
//! watch starts before that: a signal that arrives meanwhile is kept, and the
//! process stops gracefully once it waits for one.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM and SIGINT (Ctrl-C), watched from [`StopSignals::watch`] on.
#[derive(Debug)]
pub struct StopSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl StopSignals {
    /// Starts watching both; one that cannot be watched is logged (and then
    /// keeps its default action). Call it inside the runtime.
    pub fn watch() -> Self {
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot watch {name} ({e}): it stops this process without its graceful shutdown");
                None
            }
        };
        Self {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Waits for either (returns at once if one arrived since [`watch`](Self::watch)).
    pub async fn recv(&mut self) {
        async fn one(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let Self { term, int } = self;
        tokio::select! {
            () = one(term) => {}
            () = one(int) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn a_signal_that_arrives_before_the_wait_is_kept() {
        let mut stop = StopSignals::watch();
        // Raised at this process before anything waits: without the watch,
        // SIGTERM would end the test binary.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), stop.recv())
            .await
            .expect("the signal raised before the wait was lost");
    }
}
