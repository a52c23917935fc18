//! Errors in words a person can act on, for every engine: the [`StoreError`]
//! constructors, the pieces of messages (a name as a shell word, a short list of
//! names), and database failures turned into store errors ([`Op`], [`Ctx`]).

use crate::{Result, StoreError};

/// Names listed at most in an error message.
const NAMES_IN_MESSAGE: usize = 10;

/// The operation would break a rule; `message` says which and what to do.
pub fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(message.into())
}

/// No `kind` (e.g. "machine") has that name or key.
pub fn not_found(kind: &'static str, name: impl Into<String>) -> StoreError {
    StoreError::NotFound {
        kind,
        name: name.into(),
    }
}

/// A `kind` with that name already exists.
pub fn conflict(kind: &'static str, name: impl Into<String>) -> StoreError {
    StoreError::Conflict {
        kind,
        name: name.into(),
    }
}

/// A new machine names an environment or tenant (`kind`) that does not exist:
/// says so, with the command that creates it.
pub fn missing_reference(kind: &str, name: &str) -> StoreError {
    invalid(format!(
        "{kind} '{name}' does not exist; create it with `octopus {kind} create {}`",
        shell_word(name)
    ))
}

/// A new machine names a machine policy that does not exist.
pub fn missing_policy(policy: &str) -> StoreError {
    invalid(format!(
        "machine policy '{policy}' does not exist; leave the policy out to use '{}'",
        crate::DEFAULT_POLICY
    ))
}

/// An environment cannot be deleted while `machines` are in it.
pub fn environment_in_use(environment: &str, machines: &[String]) -> StoreError {
    invalid(format!(
        "environment '{environment}' is used by {} machine(s): {}; move or delete them first",
        machines.len(),
        name_list(machines)
    ))
}

/// An environment cannot be deleted while machines are in it (when the database
/// says so, before the store could name them).
pub fn environment_still_used(environment: &str) -> StoreError {
    invalid(format!(
        "environment '{environment}' is in use; move or delete its machines first"
    ))
}

/// `name` as one shell word, for the commands suggested in messages.
pub fn shell_word(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '@' | '+' | ',' | '=')
        });
    if plain {
        name.to_string()
    } else {
        format!("'{}'", name.replace('\'', r"'\''"))
    }
}

/// "a, b, c" or "a, b, and 3 more".
pub fn name_list(names: &[String]) -> String {
    let shown = names
        .iter()
        .take(NAMES_IN_MESSAGE)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_IN_MESSAGE {
        format!("{shown}, and {} more", names.len() - NAMES_IN_MESSAGE)
    } else {
        shown
    }
}

/// A rows-affected count that must not be 0: `missing` when it is (an update or
/// delete that found nothing to change).
pub fn expect_rows(rows_affected: u64, missing: StoreError) -> Result<()> {
    if rows_affected == 0 {
        return Err(missing);
    }
    Ok(())
}

/// An operation, as its database errors name it ("adding a user: ..."), and what
/// a broken constraint means to a person (a Conflict for a UNIQUE one, say).
#[derive(Debug)]
pub struct Op<'a> {
    what: &'a str,
    on_unique: Option<StoreError>,
    on_foreign_key: Option<StoreError>,
}

impl<'a> Op<'a> {
    /// The operation `what`, e.g. "adding a user".
    pub fn new(what: &'a str) -> Self {
        Self {
            what,
            on_unique: None,
            on_foreign_key: None,
        }
    }

    /// A broken UNIQUE (or primary key) constraint is `error`.
    pub fn unique(self, error: StoreError) -> Self {
        Self {
            on_unique: Some(error),
            ..self
        }
    }

    /// A broken foreign key is `error`.
    pub fn foreign_key(self, error: StoreError) -> Self {
        Self {
            on_foreign_key: Some(error),
            ..self
        }
    }

    /// The store error for a failure of this operation.
    pub fn fail(self, e: &sqlx::Error) -> StoreError {
        let (unique, foreign_key) = match e {
            sqlx::Error::Database(d) => (d.is_unique_violation(), d.is_foreign_key_violation()),
            _ => (false, false),
        };
        match (unique, foreign_key, self.on_unique, self.on_foreign_key) {
            (true, _, Some(error), _) | (_, true, _, Some(error)) => error,
            _ => StoreError::Database(format!("{}: {e}", self.what)),
        }
    }

    /// What the operation is.
    pub fn what(&self) -> &str {
        self.what
    }
}

impl<'a> From<&'a str> for Op<'a> {
    fn from(what: &'a str) -> Self {
        Self::new(what)
    }
}

/// Adds the operation to a database error.
pub trait Ctx<T> {
    /// A failure becomes the store error `op` says.
    fn ctx<'a>(self, op: impl Into<Op<'a>>) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, sqlx::Error> {
    fn ctx<'a>(self, op: impl Into<Op<'a>>) -> Result<T> {
        self.map_err(|e| op.into().fail(&e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_in_commands_are_one_shell_word() {
        assert_eq!(shell_word("Production"), "Production");
        assert_eq!(shell_word("Tier/Gold-1.2"), "Tier/Gold-1.2");
        assert_eq!(shell_word("My Env"), "'My Env'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn long_lists_of_names_are_cut() {
        let names: Vec<String> = (1..=12).map(|i| format!("m{i}")).collect();
        assert_eq!(name_list(&names[..2]), "m1, m2");
        assert_eq!(
            name_list(&names),
            "m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, and 2 more"
        );
    }

    #[test]
    fn an_operation_names_itself_in_database_errors() {
        let e = Op::new("adding a user")
            .unique(conflict("user", "admin"))
            .fail(&sqlx::Error::RowNotFound);
        assert!(
            matches!(&e, StoreError::Database(m) if m.starts_with("adding a user: ")),
            "{e:?}"
        );
        assert!(expect_rows(1, not_found("machine", "x")).is_ok());
        assert!(matches!(
            expect_rows(0, not_found("machine", "x")),
            Err(StoreError::NotFound {
                kind: "machine",
                ..
            })
        ));
    }
}
