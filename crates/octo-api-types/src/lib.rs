//! The REST API's types: what the server answers and accepts, shared by the
//! server (which generates its OpenAPI document from them), the store (which
//! persists the records) and the `octopus` command-line client (which only ever
//! talks HTTP). No logic beyond small helpers on the types, and the input rules
//! every request body is checked against ([`validate`]).
//!
//! - [`model`]: the records (users, API keys, environments, machines, tasks,
//!   packages, log lines).
//! - [`messages`]: request and reply bodies, and the API key header.
//! - [`security`]: spaces, permissions, roles, teams, grants, the audit log.
//! - [`validate`]: names, lengths, folder names, URIs, reserved variable
//!   names: the rules, and [`Validate`] for every request body.

pub mod messages;
pub mod model;
pub mod security;
pub mod validate;

pub use messages::*;
pub use model::*;
pub use security::*;
pub use validate::{Invalid, Validate};
