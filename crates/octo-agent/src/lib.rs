//! The tentacle agent.
//!
//! - [`context`]: paths and names shared by every service of one instance.
//! - [`config`]: an instance's TOML configuration, written atomically.
//! - [`instances`]: the registry of instances on this machine.
//! - [`scripts`]: the script service (processes, logs, isolation, cancellation).
//! - [`files`]: the file service (resumable, hash-verified uploads; downloads).
//! - [`capabilities`]: versions, platform, free space.
//! - [`service_unit`]: the systemd unit for an instance.
//! - [`cli_docs`]: man pages and shell completions of a command line.
//! - [`upgrade`]: replacing the tentacle's own binary (the upgrade service and its guards).

pub mod capabilities;
pub mod cli_docs;
pub mod config;
pub mod context;
pub mod files;
pub mod instances;
pub mod rotation;
pub mod scripts;
pub mod service_unit;
pub mod upgrade;

pub use context::{report_version, version, AgentContext, VERSION};
