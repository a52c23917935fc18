//! The Octopus server: its API and process, as a library (the `octopus` binary
//! and tests use it).
//!
//! - [`server`]: `start`/`run`: data directory, comms identity, store, first-start
//!   bootstrap, the API and the polling listener.
//! - [`api`]: the REST API under `/api`.
//! - [`tasks`]: server tasks (health checks, scripts): the engine and its API.

// The server prints what a person starting it must see (the first API key).
#![allow(clippy::print_stdout)]

pub mod api;
pub mod packages;
pub mod server;
pub mod tasks;
pub mod tool;
