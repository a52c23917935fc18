//! The limits a server node serving a fleet needs, checked when `server run`
//! starts (not by `quickstart` or `demo`, which serve two tentacles): every
//! polling tentacle, every connection to a listening tentacle and every API
//! client holds a file descriptor open, and a fleet connecting at once needs
//! room in the kernel's accept queue.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Below this many open files a node warns at start: a fleet of a few
/// thousand polling tentacles, their reconnect storm and the API's clients.
pub(crate) const FLEET_OPEN_FILES: u64 = 8192;

/// Raises the soft limit on open files to the hard limit (a shell's or a
/// service manager's soft limit is often 1,024, which would cap the fleet at
/// about a thousand tentacles, with "Too many open files" at accept) and says
/// what it is; warns when even the hard limit is small. Nothing here stops the
/// server: a limit it cannot read or raise is reported and the start goes on.
pub(crate) fn raise_open_files() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            return tracing::warn!("cannot read this process's limit on open files: {e}");
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(
                    "cannot raise this process's limit on open files from {soft} to {hard}: {e}"
                );
                soft
            }
        }
    } else {
        soft
    };
    if limit < FLEET_OPEN_FILES {
        tracing::warn!(
            "this server may have at most {limit} files open, and each polling tentacle, listening tentacle connection and API client holds one: past that, connections are refused with \"Too many open files\"; raise the hard limit (LimitNOFILE= in the service's unit, as octopus.service does, or `ulimit -Hn` before starting it) to {FLEET_OPEN_FILES} or more"
        );
    } else {
        tracing::info!("open files: at most {limit}");
    }
}

/// Warns when the kernel's accept queue (`net.core.somaxconn`, which caps what
/// `octo_comms::net::listen` asks for) cannot hold a fleet connecting at once.
pub(crate) fn check_accept_queue() {
    if let Some(queue) = octo_comms::net::accept_queue_limit() {
        if queue < octo_comms::net::SMALL_ACCEPT_QUEUE {
            tracing::warn!(
                "this host queues at most {queue} connections the server has not accepted yet (net.core.somaxconn): when more polling tentacles than that connect at once (after a restart, or a network coming back), the kernel drops the others' connection attempts and they retry 1 to 15 s later; raise it with `sysctl -w net.core.somaxconn=4096` and keep it in /etc/sysctl.d/"
            );
        }
    }
}
