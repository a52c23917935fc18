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

/// Exit code of a successful run.
pub const EXIT_SUCCESS: u8 = 0;
/// Exit code when a deploy script failed.
pub const EXIT_SCRIPT_FAILED: u8 = 1;
/// Exit code of a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the package was refused.
pub const EXIT_REFUSED: u8 = 3;
/// Exit code of any other error.
pub const EXIT_OTHER: u8 = 4;

impl ErrorKind {
    /// The process exit code for this kind of failure.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::ScriptFailed => EXIT_SCRIPT_FAILED,
            ErrorKind::Usage => EXIT_USAGE,
            ErrorKind::Refused => EXIT_REFUSED,
            ErrorKind::Other => EXIT_OTHER,
        }
    }

    /// The kind of failure a calamari exit code stands for (`None` for 0 and for codes
    /// calamari does not use, e.g. when it was killed).
    pub fn from_exit_code(code: i32) -> Option<Self> {
        [
            ErrorKind::ScriptFailed,
            ErrorKind::Usage,
            ErrorKind::Refused,
            ErrorKind::Other,
        ]
        .into_iter()
        .find(|k| i32::from(k.exit_code()) == code)
    }

    /// A short description for a task log: "a deploy script failed", ...
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::ScriptFailed => "a deploy script failed",
            ErrorKind::Usage => "calamari was called with bad arguments",
            ErrorKind::Refused => "the package was refused",
            ErrorKind::Other => "the deployment failed",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_round_trip() {
        for kind in [
            ErrorKind::ScriptFailed,
            ErrorKind::Usage,
            ErrorKind::Refused,
            ErrorKind::Other,
        ] {
            assert_eq!(
                ErrorKind::from_exit_code(i32::from(kind.exit_code())),
                Some(kind)
            );
        }
        assert_eq!(ErrorKind::from_exit_code(0), None);
        assert_eq!(ErrorKind::from_exit_code(137), None);
    }
}
