//! What every engine does with its input before it writes: validation, normal
//! forms, and the rules that do not depend on the database (a finished task
//! stays finished, a step's resume point).

use std::collections::{BTreeMap, HashMap};

use octo_api_types::validate;

use crate::error::invalid;
use crate::{NewLogLine, NewMachine, Result, StoreError, TaskState};

/// A name must have something in it, and follow the API's rules for names
/// ([`octo_api_types::validate`]: no control characters, not too long; an
/// environment's is also a folder name on the tentacles).
pub fn require_name(kind: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(invalid(format!("a {kind} name cannot be empty")));
    }
    let checked = if kind == "environment" {
        validate::environment_name("name", name.trim())
    } else {
        validate::optional_name("name", name.trim())
    };
    checked.map_err(|e| invalid(format!("a {kind} name {}", e.rule)))
}

/// A new machine needs a name, a URI and a thumbprint, and none of its lists
/// may hold an empty item.
pub fn check_new_machine(m: &NewMachine) -> Result<()> {
    require_name("machine", &m.name)?;
    if m.uri.trim().is_empty() {
        return Err(invalid(format!("machine '{}' has no URI", m.name)));
    }
    if m.thumbprint.trim().is_empty() {
        return Err(invalid(format!("machine '{}' has no thumbprint", m.name)));
    }
    for (what, items) in [
        ("environment", &m.environments),
        ("role", &m.roles),
        ("tenant", &m.tenants),
        ("tenant tag", &m.tenant_tags),
    ] {
        if items.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(format!(
                "machine '{}': a {what} cannot be empty",
                m.name
            )));
        }
        for item in items.iter() {
            require_name(what, item)?;
        }
    }
    Ok(())
}

/// A new tenant needs a name, and none of its tags may be empty.
pub fn check_new_tenant(name: &str, tags: &[String]) -> Result<()> {
    require_name("tenant", name)?;
    if tags.iter().any(|t| t.trim().is_empty()) {
        return Err(invalid(format!("tenant '{name}': a tag cannot be empty")));
    }
    for tag in tags {
        require_name("tenant tag", tag)?;
    }
    Ok(())
}

/// Thumbprints are stored in upper case, as `octo_tls::Thumbprint` prints them.
pub fn normal_thumbprint(t: &str) -> String {
    t.trim().to_ascii_uppercase()
}

/// The id of the task numbered `seq`: `ServerTasks-<seq>`.
pub fn task_id(seq: i64) -> String {
    format!("{TASK_ID_PREFIX}{seq}")
}

/// What a task's id is before its number (the store makes ids in SQL too).
pub const TASK_ID_PREFIX: &str = "ServerTasks-";

/// A task's arguments as the JSON text they are stored as.
pub fn arguments_text(arguments: &serde_json::Value) -> Result<String> {
    serde_json::to_string(arguments).map_err(|e| invalid(format!("the task's arguments: {e}")))
}

/// A step's output variables as the JSON text they are stored as.
pub fn output_variables_text(variables: &BTreeMap<String, String>) -> String {
    serde_json::to_string(variables).unwrap_or_else(|_| "{}".into())
}

/// Whether task `id` may go from `current` to `next`: `Ok(true)` to write it,
/// `Ok(false)` when there is nothing to do (it is already in that final state),
/// Invalid once a task has finished: final states never change again.
pub fn task_transition(id: &str, current: TaskState, next: TaskState) -> Result<bool> {
    use crate::text::TextEnum;
    if !current.is_final() {
        return Ok(true);
    }
    if current == next {
        return Ok(false);
    }
    Err(invalid(format!(
        "task {id} has already finished ({}); it cannot become {}",
        current.text(),
        next.text()
    )))
}

/// The resume point (`next_sequence`) each machine's step moves to when `lines`
/// are stored: one past the highest tentacle sequence among its lines.
pub fn next_sequences(lines: &[NewLogLine]) -> HashMap<i64, i64> {
    let mut next: HashMap<i64, i64> = HashMap::new();
    for line in lines {
        if let (Some(machine_id), Some(sequence)) = (line.machine_id, line.sequence) {
            let n = next.entry(machine_id).or_insert(i64::MIN);
            *n = (*n).max(sequence.saturating_add(1));
        }
    }
    next
}

/// The machine ids of a new task, each once, in the order given.
pub fn distinct_ids(ids: &[i64]) -> Vec<i64> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}

/// A new task names a machine that does not exist (any more).
pub fn missing_machine(machine_id: i64) -> StoreError {
    invalid(format!("machine #{machine_id} does not exist (deleted?)"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn line(machine_id: Option<i64>, sequence: Option<i64>) -> NewLogLine {
        NewLogLine {
            machine_id,
            sequence,
            timestamp: 0,
            stream: "stdout".into(),
            text: String::new(),
        }
    }

    #[test]
    fn the_resume_point_is_past_the_highest_sequence_per_machine() {
        let lines = [
            line(Some(1), Some(4)),
            line(Some(1), Some(2)),
            line(Some(2), Some(0)),
            line(None, None),
            line(Some(3), None),
            line(Some(4), Some(i64::MAX)),
        ];
        let next = next_sequences(&lines);
        assert_eq!(next.len(), 3);
        assert_eq!((next[&1], next[&2], next[&4]), (5, 1, i64::MAX));
    }

    #[test]
    fn final_task_states_never_change() {
        use TaskState::*;
        assert!(task_transition("T", Queued, Executing).unwrap());
        assert!(task_transition("T", Executing, Failed).unwrap());
        assert!(!task_transition("T", Failed, Failed).unwrap());
        let err = task_transition("T", Success, Executing).unwrap_err();
        assert_eq!(
            err.to_string(),
            "task T has already finished (Success); it cannot become Executing"
        );
    }

    #[test]
    fn inputs_are_checked_and_normalised() {
        assert!(require_name("user", " ").is_err());
        assert!(check_new_tenant("Acme", &["".into()]).is_err());
        assert!(check_new_tenant("Acme", &["a\u{1b}b".into()]).is_err());
        let e = require_name("machine", "m\0").unwrap_err().to_string();
        assert!(
            e.contains("a machine name contains the control character U+0000"),
            "{e}"
        );
        assert!(require_name("role", &"r".repeat(201)).is_err());
        assert!(require_name("environment", "a/b").is_err());
        assert!(require_name("role", "a/b").is_ok());
        assert_eq!(normal_thumbprint(" ab12 "), "AB12");
        assert_eq!(task_id(7), "ServerTasks-7");
        assert_eq!(distinct_ids(&[3, 1, 3, 2, 1]), [3, 1, 2]);
    }
}
