//! `calamari`: the deployment tool the server pushes to tentacles and runs through the
//! script service, our equivalent of Octopus's Calamari.
//!
//! `calamari deploy-package` extracts a package into
//! `APPLICATIONS/<environment>/<package id>/<version>/` ([`extract`]), adds the standard
//! variables ([`variables`]), substitutes `#{Name}` in the configured files
//! ([`substitute`]), runs the `PreDeploy`, `Deploy` and `PostDeploy` scripts ([`scripts`]),
//! records the deployment in the journal ([`journal`]) and removes old versions
//! ([`retention`]). [`deploy`] drives those steps in order; `src/main.rs` is only the
//! command line.
//!
//! Scripts and the server talk through service messages on stdout
//! ([`service_message`]), a line protocol the server parses with the same module.
//!
//! Everything calamari prints is a whole line, flushed at once ([`console`]): stdout and
//! stderr go live to the server's task log.

pub mod console;
pub mod deploy;
pub mod error;
pub mod extract;
pub mod journal;
pub mod retention;
pub mod scripts;
pub mod service_message;
pub mod substitute;
pub mod time;
pub mod variables;

pub use deploy::{deploy, DeployOptions, DeployOutcome};
pub use error::{DeployError, ErrorKind};
pub use extract::Limits;

/// The version of this tool, as `calamari version` prints it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
