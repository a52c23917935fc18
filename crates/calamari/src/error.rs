//! The one error type of a deployment, [`DeployError`]: a kind, which decides the exit
//! code, and a message written for a person: the first line says what failed, the next
//! lines where (paths) and what to do about it.

use std::path::Path;

/// What kind of failure, and so which exit code (see [`ErrorKind::exit_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A deploy script failed (non-zero exit or killed by a signal): exit code 1.
    ScriptFailed,
    /// Bad command line: exit code 2 (clap uses 2 for its own usage errors too).
    Usage,
    /// The package was refused: unsafe or too large archive, unknown format, corrupt:
    /// exit code 3.
    Refused,
    /// Anything else: I/O, a bad variables file, substitution: exit code 4.
    Other,
}

impl ErrorKind {
    /// The process exit code for this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::ScriptFailed => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Refused => 3,
            ErrorKind::Other => 4,
        }
    }
}

/// A failed deployment step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DeployError {
    /// Decides the exit code.
    pub kind: ErrorKind,
    /// What failed, where and what to do, one or more lines.
    pub message: String,
}

impl DeployError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        DeployError {
            kind,
            message: message.into(),
        }
    }

    /// A usage error (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }

    /// A refused package (exit code 3).
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Refused, message)
    }

    /// Any other failure (exit code 4).
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Other, message)
    }

    /// An I/O failure: `what` failed on `path` because of `err` (exit code 4).
    pub fn io(what: &str, path: &Path, err: &std::io::Error) -> Self {
        Self::other(format!(
            "{what} failed: {err}\npath: {}\ncheck that the path exists, is writable by this user and that the disk is not full",
            path.display()
        ))
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }
}
