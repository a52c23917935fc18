//! The enums as the text the databases store: each variant's name
//! ("Listening", "Healthy", "Queued", ...), as the schemas' CHECK constraints
//! list them.

use crate::{EndpointKind, HealthStatus, Result, StoreError, TaskState, TentacleUpdate};

/// An enum stored as the name of its variant.
pub trait TextEnum: Sized {
    /// The stored text.
    fn text(self) -> &'static str;
    /// The value of stored text; a database error for text this version does
    /// not know.
    fn from_text(text: &str) -> Result<Self>;
}

/// `TextEnum` for an enum, from its variants (a missing one fails to compile).
macro_rules! text_enum {
    ($ty:ident, $what:literal, [$($variant:ident),+ $(,)?]) => {
        impl TextEnum for $ty {
            fn text(self) -> &'static str {
                match self {
                    $($ty::$variant => stringify!($variant),)+
                }
            }

            fn from_text(text: &str) -> Result<Self> {
                match text {
                    $(stringify!($variant) => Ok($ty::$variant),)+
                    other => Err(StoreError::Database(format!(
                        concat!("unknown ", $what, " '{}' in the database"),
                        other
                    ))),
                }
            }
        }
    };
}

text_enum!(EndpointKind, "endpoint kind", [Listening, Polling]);
text_enum!(
    HealthStatus,
    "health status",
    [Unknown, Healthy, Unhealthy, Unavailable]
);
text_enum!(
    TaskState,
    "task state",
    [Queued, Executing, Success, Failed, Canceled]
);

text_enum!(
    TentacleUpdate,
    "tentacle update behaviour",
    [Manual, Always]
);

/// The states that are not final, as an SQL list: `state IN` this.
pub const UNFINISHED_STATES: &str = "('Queued', 'Executing')";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn round_trips<T: TextEnum + Copy + PartialEq + std::fmt::Debug>(all: &[T]) {
        for &v in all {
            assert_eq!(T::from_text(v.text()).unwrap(), v);
        }
    }

    #[test]
    fn every_variant_is_stored_as_its_name() {
        use EndpointKind::*;
        use HealthStatus::*;
        use TaskState::*;
        round_trips(&[Listening, Polling]);
        round_trips(&[Unknown, Healthy, Unhealthy, Unavailable]);
        round_trips(&[Queued, Executing, Success, Failed, Canceled]);
        assert_eq!(Unavailable.text(), "Unavailable");
        assert_eq!(Canceled.text(), "Canceled");
        let unfinished: Vec<String> = [Queued, Executing, Success, Failed, Canceled]
            .into_iter()
            .filter(|s| !s.is_final())
            .map(|s| format!("'{}'", s.text()))
            .collect();
        assert_eq!(UNFINISHED_STATES, format!("({})", unfinished.join(", ")));
    }

    #[test]
    fn unknown_text_is_a_database_error() {
        let err = TaskState::from_text("Paused").unwrap_err();
        assert_eq!(
            err.to_string(),
            "database error: unknown task state 'Paused' in the database"
        );
        assert!(EndpointKind::from_text("listening").is_err());
        assert!(HealthStatus::from_text("").is_err());
    }
}
