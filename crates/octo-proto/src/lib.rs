//! The tentacle RPC contract.
//!
//! The schema lives in `proto/octopus/tentacle/v1/*.proto` at the repository root so
//! that third parties can generate their own clients. This crate only compiles it.
//! A tentacle always runs the gRPC *servers* defined here and the Octopus server
//! always the *clients*, whichever side dialled the connection.
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]

pub mod v1 {
    tonic::include_proto!("octopus.tentacle.v1");
}

/// Encoded `FileDescriptorSet` of the whole contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tentacle_descriptor.bin"));

/// Contract version this build speaks (see `HelloRequest.protocol_version`).
/// 2 added `ScriptService.RunScript` (StartScript and StreamLogs in one call).
pub const PROTOCOL_VERSION: u32 = 2;

/// The first contract version with `ScriptService.RunScript`.
pub const RUN_SCRIPT_SINCE: u32 = 2;

/// Reserved negative script exit codes (documented in `script.proto`).
pub mod exit_codes {
    /// The script could not be started.
    pub const COULD_NOT_START: i32 = -1;
    /// The script was cancelled.
    pub const CANCELLED: i32 = -2;
    /// The isolation mutex could not be acquired in time.
    pub const MUTEX_TIMEOUT: i32 = -3;
    /// The ticket is unknown to this tentacle.
    pub const UNKNOWN_TICKET: i32 = -4;
    /// The tentacle restarted while the script ran.
    pub const TENTACLE_RESTARTED: i32 = -5;
    /// Fatal error in the tentacle while supervising the script.
    pub const FATAL: i32 = -6;
}

/// Fully qualified gRPC service names, as reported in capabilities.
pub mod service_names {
    pub const SESSION: &str = "octopus.tentacle.v1.Session";
    pub const CAPABILITIES: &str = "octopus.tentacle.v1.Capabilities";
    pub const SCRIPT: &str = "octopus.tentacle.v1.ScriptService";
    pub const FILE: &str = "octopus.tentacle.v1.FileService";
    pub const UPGRADE: &str = "octopus.tentacle.v1.UpgradeService";
    pub const CERTIFICATES: &str = "octopus.tentacle.v1.Certificates";
}
