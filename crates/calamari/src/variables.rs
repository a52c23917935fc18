//! Deployment variables: the server's JSON file plus the standard variables calamari
//! adds, and how they become a script's environment.
//!
//! What this module keeps true: the variables file is a JSON object whose values are all
//! strings, or it is refused with a message naming the file; names are looked up exactly
//! (scripts see exact names) and, for substitution, case-insensitively as a fallback, as
//! Octopus variable names are case-insensitive.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::DeployError;

/// `Octopus.Environment.Name`: the environment deployed to.
pub const ENVIRONMENT_NAME: &str = "Octopus.Environment.Name";
/// `Octopus.Action.Package.PackageId`.
pub const PACKAGE_ID: &str = "Octopus.Action.Package.PackageId";
/// `Octopus.Action.Package.PackageVersion`.
pub const PACKAGE_VERSION: &str = "Octopus.Action.Package.PackageVersion";
/// `Octopus.Action.Package.InstallationDirectoryPath`: the final extracted folder.
pub const INSTALLATION_DIRECTORY_PATH: &str = "Octopus.Action.Package.InstallationDirectoryPath";
/// `Octopus.Tentacle.CurrentDeployment.PackageFilePath`: the package file deployed.
pub const PACKAGE_FILE_PATH: &str = "Octopus.Tentacle.CurrentDeployment.PackageFilePath";
/// `Octopus.Action.SubstituteInFiles.TargetFiles`: glob patterns of the files to
/// substitute, newline- or `;`-separated.
pub const SUBSTITUTE_TARGET_FILES: &str = "Octopus.Action.SubstituteInFiles.TargetFiles";
/// Output variables set by a script's `setVariable` message are visible to later scripts
/// under this prefix followed by the variable's name.
pub const OUTPUT_PREFIX: &str = "Octopus.Action.Output.";

/// The environment variable in which the server passes secret variables (a
/// JSON object like the variables file): they are never written to a file.
/// Scripts get the variables themselves, not this.
pub const SENSITIVE_VARIABLES_ENV: &str = "OCTOPUS_SENSITIVE_VARIABLES";

/// A set of variables, name to value, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Variables {
    values: BTreeMap<String, String>,
}

impl Variables {
    /// No variables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a variables file: a JSON object of string name to string value.
    pub fn load(path: &Path) -> Result<Self, DeployError> {
        let text = std::fs::read(path)
            .map_err(|e| DeployError::io("reading the variables file", path, &e))?;
        Self::parse(&text).map_err(|why| {
            DeployError::other(format!(
                "the variables file {} is not valid: {why}\nit must be a JSON object of string names to string values, e.g. {{\"Name\": \"value\"}}",
                path.display()
            ))
        })
    }

    /// Parses the JSON text of a variables file; the error says what is wrong.
    pub fn parse(json: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("not JSON ({e})"))?;
        let serde_json::Value::Object(map) = value else {
            return Err(format!("the top level is {}, not an object", kind(&value)));
        };
        let mut values = BTreeMap::new();
        for (name, value) in map {
            match value {
                serde_json::Value::String(s) => {
                    values.insert(name, s);
                }
                other => {
                    return Err(format!(
                        "the value of {name:?} is {}, not a string",
                        kind(&other)
                    ))
                }
            }
        }
        Ok(Variables { values })
    }

    /// Adds (or replaces with) every variable of `other`.
    pub fn extend(&mut self, other: Variables) {
        self.values.extend(other.values);
    }

    /// Sets (or replaces) a variable.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.values.insert(name.into(), value.into());
    }

    /// The value of `name`, exactly.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// The value of `name`: an exact match, else the first (in name order) whose name
    /// matches ignoring ASCII case.
    pub fn lookup(&self, name: &str) -> Option<&str> {
        self.get(name).or_else(|| {
            self.values
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        })
    }

    /// All variables in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// How many variables.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The environment a script gets on top of the inherited one: every variable under
    /// its sanitized name ([`sanitize_env_name`]) and under its exact name (an exact
    /// name wins over another variable's sanitized one). Names that cannot be
    /// environment names (empty, containing `=` or NUL) and values containing NUL are
    /// left out; they are answered in the second list so the caller can warn.
    pub fn environment(&self) -> (Vec<(String, String)>, Vec<String>) {
        let mut env = BTreeMap::new();
        let mut skipped = Vec::new();
        for (name, value) in self.iter() {
            if value.contains('\0') {
                skipped.push(name.to_owned());
                continue;
            }
            let sanitized = sanitize_env_name(name);
            if !sanitized.is_empty() {
                env.entry(sanitized).or_insert_with(|| value.to_owned());
            }
        }
        for (name, value) in self.iter() {
            if value.contains('\0') {
                continue;
            }
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                skipped.push(name.to_owned());
                continue;
            }
            env.insert(name.to_owned(), value.to_owned());
        }
        skipped.sort();
        skipped.dedup();
        (env.into_iter().collect(), skipped)
    }
}

/// A variable name as a portable environment variable name: every character not in
/// `[A-Za-z0-9_]` becomes `_` (`Octopus.Environment.Name` → `Octopus_Environment_Name`).
pub fn sanitize_env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_only_string_objects() {
        let v = Variables::parse(br#"{"A": "1", "B.c": "two"}"#).unwrap();
        assert_eq!(v.get("A"), Some("1"));
        assert_eq!(v.lookup("b.C"), Some("two"));
        assert!(Variables::parse(b"[]").unwrap_err().contains("an array"));
        assert!(Variables::parse(br#"{"A": 1}"#)
            .unwrap_err()
            .contains("\"A\" is a number"));
        assert!(Variables::parse(b"{").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn environment_has_exact_and_sanitized_names() {
        let mut v = Variables::new();
        v.set("Octopus.Environment.Name", "Production");
        v.set("My Var-1", "x");
        v.set("Bad=Name", "y");
        v.set("Nul", "a\0b");
        let (env, skipped) = v.environment();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Octopus.Environment.Name"), Some("Production"));
        assert_eq!(get("Octopus_Environment_Name"), Some("Production"));
        assert_eq!(get("My Var-1"), Some("x"));
        assert_eq!(get("My_Var_1"), Some("x"));
        assert_eq!(get("Bad_Name"), Some("y"));
        assert_eq!(get("Bad=Name"), None);
        assert_eq!(skipped, vec!["Bad=Name".to_owned(), "Nul".to_owned()]);
    }
}
