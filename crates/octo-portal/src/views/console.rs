//! The script console: run a script on machines chosen by environment and
//! role, or by name. The form goes to the API's own `tasks::start`, which
//! checks the caller's permission on every machine it selects (refusing the
//! whole task, naming those out of scope), and encrypts the secret variables;
//! a refusal shows the form again with its fields (never the secret values).

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use octo_api_types::{Permission, ScriptRequest, Syntax};
use octo_server_core::api::environments::visible_environments;
use octo_server_core::api::machines::{machine_page, sees_machine, MachineQuery};
use octo_server_core::api::tasks;
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use octo_store::MachineFilter;
use serde::Deserialize;

use super::{api_error, render, see_other, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get(
            "/spaces/{space}/console",
            Access::Space(P::TaskCreate),
            form,
        ),
        post("/spaces/{space}/console", Access::Space(P::TaskCreate), run),
    ]
}

/// At most this many machines are listed to choose from (the name filter
/// narrows them).
const LISTED: i64 = 300;

/// A form's fields as sent, repeated names kept (a multi-select, rows).
#[derive(Debug, Default)]
pub(crate) struct Fields(Vec<(String, String)>);

impl Fields {
    pub(crate) fn from(r: Result<Form<Vec<(String, String)>>, FormRejection>) -> Fields {
        // A urlencoded body always parses into pairs; anything else is empty.
        r.map(|Form(v)| Fields(v)).unwrap_or_default()
    }

    /// The first value of `name` ("" when absent).
    pub(crate) fn one(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Every value of `name`, in the form's order.
    pub(crate) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A checkbox: checked when sent with a value other than "false".
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.0.iter().any(|(k, v)| k == name && v != "false")
    }
}

/// Some text trimmed, None when empty.
pub(crate) fn given(text: &str) -> Option<String> {
    Some(text.trim().to_string()).filter(|t| !t.is_empty())
}

/// `NAME=VALUE` lines (blank lines skipped) as variables.
pub(crate) fn parse_variables(text: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(ApiError::bad_request(format!(
                "variables, line {}: '{}' is not NAME=VALUE",
                i + 1,
                line.trim()
            )));
        };
        let name = name.trim();
        if out.insert(name.to_string(), value.to_string()).is_some() {
            return Err(ApiError::bad_request(format!(
                "variables: '{name}' is given twice"
            )));
        }
    }
    Ok(out)
}

/// The secret variables of the form's rows (`secret_name` and `secret_value`,
/// repeated, in order); rows without a name and a value are skipped.
pub(crate) fn parse_secrets(fields: &Fields) -> Result<BTreeMap<String, String>, ApiError> {
    let names = fields.all("secret_name");
    let values = fields.all("secret_value");
    let mut out = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let name = name.trim();
        let value = values.get(i).cloned().unwrap_or_default();
        match (name.is_empty(), value.is_empty()) {
            (true, true) => continue,
            (true, false) => {
                return Err(ApiError::bad_request(format!(
                    "sensitive variables, row {}: a value without a name",
                    i + 1
                )))
            }
            (false, true) => {
                return Err(ApiError::bad_request(format!(
                    "sensitive variable '{name}' has no value (values are never shown again after a refusal: type them again)"
                )))
            }
            (false, false) => {}
        }
        if out.insert(name.to_string(), value).is_some() {
            return Err(ApiError::bad_request(format!(
                "sensitive variables: '{name}' is given twice"
            )));
        }
    }
    Ok(out)
}

/// The secret rows to show: the names given (never the values), and room for more.
pub(crate) fn secret_rows(fields: &Fields) -> Vec<String> {
    let mut names: Vec<String> = fields
        .all("secret_name")
        .into_iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let blank = 3usize.saturating_sub(names.len()).max(1);
    names.extend(std::iter::repeat_n(String::new(), blank));
    names
}

/// Every role of the machines the caller may see, sorted (for a datalist).
pub(crate) async fn known_roles(s: &AppState, f: &Frame) -> Result<Vec<String>, ApiError> {
    let machines = s
        .store
        .list_machines(&MachineFilter::space(f.space.id))
        .await?;
    let mut roles: Vec<String> = machines
        .iter()
        .filter(|m| sees_machine(&f.caller, &f.space, m))
        .flat_map(|m| m.roles.iter().cloned())
        .collect();
    roles.sort_by_key(|r| r.to_lowercase());
    roles.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    Ok(roles)
}

/// One machine to choose.
struct MachineOption {
    name: String,
    /// "Test, Production" or "pool NAME".
    place: String,
    selected: bool,
}

/// The form's fields (kept after a refusal, secret values excepted).
#[derive(Debug, Clone, Default)]
struct Entered {
    /// "filter" (environment and role) or "machines".
    target: String,
    environment: String,
    role: String,
    machines: Vec<String>,
    syntax: String,
    script: String,
    variables: String,
    secret_names: Vec<String>,
}

#[derive(Template)]
#[template(path = "console.html")]
struct ConsolePage {
    f: Frame,
    entered: Entered,
    environments: Vec<String>,
    roles: Vec<String>,
    machines: Vec<MachineOption>,
    /// The name filter of the machine list.
    filter: String,
    /// How many machines match the filter (more than are listed, perhaps).
    matching: i64,
    syntaxes: [&'static str; 3],
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ConsoleQuery {
    /// Names of the machines to list contain this.
    #[serde(default)]
    filter: String,
    /// Machines to preselect (e.g. from a target's page).
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    environment: Option<String>,
}

async fn form(
    State(s): State<AppState>,
    f: Frame,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> Response {
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let entered = Entered {
        target: if q.machine.is_some() {
            "machines".into()
        } else {
            "filter".into()
        },
        environment: q.environment.unwrap_or_default(),
        machines: q.machine.into_iter().collect(),
        syntax: "bash".into(),
        secret_names: vec![String::new(); 3],
        ..Entered::default()
    };
    show(&s, f, entered, q.filter, None).await
}

/// The console with `entered` in its fields and what went wrong, if anything.
async fn show(
    s: &AppState,
    f: Frame,
    entered: Entered,
    filter: String,
    error: Option<ApiError>,
) -> Response {
    let f = f.titled("Script console", "console");
    let environments = match visible_environments(s, &f.caller, &f.space).await {
        Ok(e) => e.into_iter().map(|e| e.name).collect(),
        Err(e) => return api_error(&e),
    };
    let roles = match known_roles(s, &f).await {
        Ok(r) => r,
        Err(e) => return api_error(&e),
    };
    let query = MachineQuery {
        name: given(&filter),
        skip: Some(0),
        take: Some(LISTED),
        ..MachineQuery::default()
    };
    let (listed, matching) = match machine_page(s, &f.caller, &f.space, &query).await {
        Ok(p) => p,
        Err(e) => return api_error(&e),
    };
    let chosen = |name: &str| entered.machines.iter().any(|m| m == name);
    let mut machines: Vec<MachineOption> = listed
        .iter()
        .map(|m| MachineOption {
            name: m.name.clone(),
            place: match &m.worker_pool {
                Some(pool) => format!("worker pool {pool}"),
                None => m.environments.join(", "),
            },
            selected: chosen(&m.name),
        })
        .collect();
    // Chosen machines stay chosen, listed or not.
    for name in &entered.machines {
        if !machines.iter().any(|m| &m.name == name) {
            machines.insert(
                0,
                MachineOption {
                    name: name.clone(),
                    place: String::new(),
                    selected: true,
                },
            );
        }
    }
    let status = error.as_ref().map(|e| e.status()).unwrap_or(StatusCode::OK);
    let page = ConsolePage {
        f,
        entered,
        environments,
        roles,
        machines,
        filter,
        matching,
        syntaxes: ["bash", "sh", "python3"],
        error: error.map(|e| e.message),
    };
    (status, render(&page)).into_response()
}

/// The script request the form describes.
fn request(fields: &Fields, entered: &Entered) -> Result<ScriptRequest, ApiError> {
    let syntax = match entered.syntax.as_str() {
        "bash" | "" => Syntax::Bash,
        "sh" => Syntax::Sh,
        "python3" => Syntax::Python3,
        other => {
            return Err(ApiError::bad_request(format!(
                "syntax '{other}' is not bash, sh or python3"
            )))
        }
    };
    let by_name = entered.target == "machines";
    if by_name && entered.machines.is_empty() {
        return Err(ApiError::bad_request(
            "choose at least one machine (or run on the machines of an environment or role)",
        ));
    }
    Ok(ScriptRequest {
        max_parallel_steps: None,
        script: entered.script.clone(),
        syntax,
        isolation: Default::default(),
        machines: if by_name {
            entered.machines.clone()
        } else {
            Vec::new()
        },
        environment: if by_name {
            None
        } else {
            given(&entered.environment)
        },
        role: if by_name { None } else { given(&entered.role) },
        tenant: None,
        variables: parse_variables(&entered.variables)?,
        sensitive_variables: parse_secrets(fields)?,
    })
}

async fn run(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let fields = Fields::from(form);
    let entered = Entered {
        target: fields.one("target"),
        environment: fields.one("environment"),
        role: fields.one("role"),
        machines: fields
            .all("machines")
            .into_iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        syntax: fields.one("syntax"),
        script: fields.one("script").replace("\r\n", "\n"),
        variables: fields.one("variables"),
        secret_names: secret_rows(&fields),
    };
    let filter = fields.one("filter");
    let result = match request(&fields, &entered) {
        Ok(req) => tasks::start(&s, &f.caller, &f.space, req).await,
        Err(e) => Err(e),
    };
    match result {
        // Task ids ("ServerTasks-7") are safe in a path as they are.
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", view.task.id))),
        Err(e) => show(&s, f, entered, filter, Some(e)).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_name_value_lines() {
        let v = parse_variables("A=1\r\n\n B = x=y \nEMPTY=").unwrap();
        assert_eq!(v["A"], "1");
        assert_eq!(v["B"], " x=y ");
        assert_eq!(v["EMPTY"], "");
        assert!(parse_variables("NOPE").is_err());
        assert!(parse_variables("A=1\nA=2").is_err());
    }

    #[test]
    fn secret_rows_pair_names_and_values() {
        let f = Fields(vec![
            ("secret_name".into(), "TOKEN".into()),
            ("secret_value".into(), "s3cret".into()),
            ("secret_name".into(), "".into()),
            ("secret_value".into(), "".into()),
        ]);
        let s = parse_secrets(&f).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s["TOKEN"], "s3cret");
        assert_eq!(
            secret_rows(&f),
            vec!["TOKEN".to_string(), String::new(), String::new()]
        );
        let missing = Fields(vec![
            ("secret_name".into(), "TOKEN".into()),
            ("secret_value".into(), "".into()),
        ]);
        assert!(parse_secrets(&missing).is_err());
    }
}
