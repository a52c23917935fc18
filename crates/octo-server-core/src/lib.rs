//! The Octopus server as a library (the `octopus` binary, the portal and the
//! tests use it). Layers, each using only those below it:
//!
//! - [`startup`]: `start`/`run`: data directory, comms identity, store,
//!   first-start bootstrap, the API and the polling listener.
//! - [`api`]: the REST API under `/api`, one module per area.
//! - [`auth`]: API keys, session keys, passwords, the slowing of failed logins.
//! - [`authz`]: who may do what, where: roles, grants, the checks every route
//!   goes through.
//! - [`state`]: [`AppState`], what every part shares (store, comms, engine, ...).
//! - [`feed`]: the package feed's rules (IDs, versions, file names, formats).
//! - [`config`]: [`RunArgs`], the server's options.
//!
//! Below these: the task engine (`octo_engine`), the store (`octo_store`) and
//! the comms layer (`octo_comms`).

// The server prints what a person starting it must see (the first API key).
#![allow(clippy::print_stdout)]

pub mod api;
pub mod auth;
pub mod authz;
pub mod config;
pub mod feed;
pub mod rotation;
pub mod startup;
pub mod state;

pub use config::RunArgs;
/// Listening sockets a service manager passed (`LISTEN_FDS`); see `octo_comms::passed`.
pub use octo_comms::PassedSockets;
pub use startup::{
    reset_admin, run, run_on, run_with, show_thumbprint, start, start_on, start_with, RunningServer,
};
pub use state::AppState;
