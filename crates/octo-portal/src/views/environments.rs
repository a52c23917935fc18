//! A space's environments, in the space's order: how many deployment targets
//! each has and how healthy they are; adding, renaming, moving and deleting
//! them with the API's own service functions
//! (`octo_server_core::api::environments`), so the same rules and refusals
//! apply (a delete is refused, naming them, while machines are in it).

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Form;
use octo_api_types::{EnvironmentUpdate, NewEnvironment, Permission};
use octo_server_core::api::environments::{
    add_environment, change_environment, remove_environment, visible_environments,
};
use octo_server_core::api::machines::sees_machine;
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use octo_store::MachineFilter;
use serde::Deserialize;

use super::{api_error, enc, render, see_other, Frame, Health};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get(
            "/spaces/{space}/environments",
            Access::Space(P::EnvironmentView),
            list,
        ),
        post(
            "/spaces/{space}/environments",
            Access::Space(P::EnvironmentCreate),
            add,
        ),
        post(
            "/spaces/{space}/environments/{name}/rename",
            Access::Space(P::EnvironmentEdit),
            rename,
        ),
        post(
            "/spaces/{space}/environments/{name}/move",
            Access::Space(P::EnvironmentEdit),
            move_to,
        ),
        post(
            "/spaces/{space}/environments/{name}/delete",
            Access::Space(P::EnvironmentDelete),
            delete,
        ),
    ]
}

/// One environment's line.
struct EnvRow {
    name: String,
    description: String,
    /// Its targets list.
    href: String,
    /// Where its forms post (`.../environments/NAME`).
    action: String,
    targets: usize,
    counts: Vec<(Health, usize)>,
    first: bool,
    last: bool,
    may_edit: bool,
    may_delete: bool,
}

#[derive(Template)]
#[template(path = "environments.html")]
struct EnvironmentsPage {
    f: Frame,
    rows: Vec<EnvRow>,
    may_create: bool,
    error: Option<String>,
    /// The add form's fields, kept after a refusal.
    new_name: String,
    new_description: String,
}

/// What went wrong, and the add form's fields to show again.
#[derive(Default)]
struct Outcome {
    error: Option<ApiError>,
    new_name: String,
    new_description: String,
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    show(&s, f, Outcome::default()).await
}

/// The page, with what went wrong (its status) when something did.
async fn show(s: &AppState, f: Frame, outcome: Outcome) -> Response {
    let f = f.titled("Environments", "environments");
    let space = f.space.clone();
    let caller = f.caller.clone();
    let envs = match visible_environments(s, &caller, &space).await {
        Ok(e) => e,
        Err(e) => return api_error(&e),
    };
    // Counted as the targets list counts: the machines the caller may see.
    let machines: Vec<_> = match s.store.list_machines(&MachineFilter::space(space.id)).await {
        Ok(m) => m
            .into_iter()
            .filter(|m| sees_machine(&caller, &space, m))
            .collect(),
        Err(e) => return api_error(&e.into()),
    };
    let n = envs.len();
    let rows = envs
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let mine: Vec<_> = machines
                .iter()
                .filter(|m| {
                    m.environments
                        .iter()
                        .any(|x| x.eq_ignore_ascii_case(&e.name))
                })
                .collect();
            let counts = Health::ALL
                .into_iter()
                .map(|h| (h, mine.iter().filter(|m| Health::of(m) == h).count()))
                .filter(|(_, n)| *n > 0)
                .collect();
            let names = std::slice::from_ref(&e.name);
            let what = format!("environment '{}'", e.name);
            EnvRow {
                href: f.href(&format!("/targets?environment={}", enc(&e.name))),
                action: f.href(&format!("/environments/{}", enc(&e.name))),
                targets: mine.len(),
                counts,
                first: i == 0,
                last: i + 1 == n,
                may_edit: caller
                    .require_on(Permission::EnvironmentEdit, &space, names, &[], &what)
                    .is_ok(),
                may_delete: caller
                    .require_on(Permission::EnvironmentDelete, &space, names, &[], &what)
                    .is_ok(),
                name: e.name,
                description: e.description,
            }
        })
        .collect();
    let status = outcome
        .error
        .as_ref()
        .map(|e| e.status())
        .unwrap_or(StatusCode::OK);
    let page = EnvironmentsPage {
        may_create: caller
            .require_throughout(Permission::EnvironmentCreate, &space)
            .is_ok(),
        f,
        rows,
        error: outcome.error.map(|e| e.message),
        new_name: outcome.new_name,
        new_description: outcome.new_description,
    };
    (status, render(&page)).into_response()
}

/// After a change: back to the list, or the list with the refusal.
async fn done(s: &AppState, f: Frame, result: Result<(), ApiError>, outcome: Outcome) -> Response {
    match result {
        Ok(()) => see_other(&f.href("/environments")),
        Err(e) => {
            show(
                s,
                f,
                Outcome {
                    error: Some(e),
                    ..outcome
                },
            )
            .await
        }
    }
}

fn malformed(r: &FormRejection) -> ApiError {
    ApiError::bad_request(format!("the form was incomplete: {}", r.body_text()))
}

#[derive(Debug, Deserialize)]
struct AddForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
}

async fn add(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<AddForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(form) => form,
        Err(r) => return done(&s, f, Err(malformed(&r)), Outcome::default()).await,
    };
    let new = NewEnvironment {
        name: form.name.trim().to_string(),
        description: form.description.trim().to_string(),
    };
    let result = add_environment(&s, &f.caller, &f.space, &new)
        .await
        .map(|_| ());
    let kept = Outcome {
        error: None,
        new_name: form.name,
        new_description: form.description,
    };
    done(&s, f, result, kept).await
}

#[derive(Debug, Deserialize)]
struct RenameForm {
    #[serde(default)]
    name: String,
}

async fn rename(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    form: Result<Form<RenameForm>, FormRejection>,
) -> Response {
    let result = match form {
        Ok(Form(form)) => {
            let u = EnvironmentUpdate {
                name: Some(form.name),
                ..EnvironmentUpdate::default()
            };
            change_environment(&s, &f.caller, &f.space, &name, &u)
                .await
                .map(|_| ())
        }
        Err(r) => Err(malformed(&r)),
    };
    done(&s, f, result, Outcome::default()).await
}

#[derive(Debug, Deserialize)]
struct MoveForm {
    /// "up" or "down".
    #[serde(default)]
    direction: String,
}

/// Moves an environment one place up or down among those the caller sees:
/// to the position (in the space's whole order) of the neighbour it passes.
async fn move_to(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    form: Result<Form<MoveForm>, FormRejection>,
) -> Response {
    let result = match form {
        Ok(Form(form)) => move_one(&s, &f, &name, &form.direction).await,
        Err(r) => Err(malformed(&r)),
    };
    done(&s, f, result, Outcome::default()).await
}

async fn move_one(s: &AppState, f: &Frame, name: &str, direction: &str) -> Result<(), ApiError> {
    let up = match direction {
        "up" => true,
        "down" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "field `direction`: '{other}' is not up or down"
            )))
        }
    };
    let all = s.store.list_environments(f.space.id).await?;
    let seen = visible_environments(s, &f.caller, &f.space).await?;
    let at = |n: &str| all.iter().position(|e| e.name.eq_ignore_ascii_case(n));
    let Some(i) = seen.iter().position(|e| e.name.eq_ignore_ascii_case(name)) else {
        return Err(ApiError::not_found(format!(
            "environment '{name}' does not exist"
        )));
    };
    let neighbour = if up {
        i.checked_sub(1).and_then(|j| seen.get(j))
    } else {
        seen.get(i + 1)
    };
    // Already first or last: nothing to do.
    let Some(position) = neighbour.and_then(|n| at(&n.name)) else {
        return Ok(());
    };
    let u = EnvironmentUpdate {
        position: Some(u32::try_from(position).unwrap_or(u32::MAX)),
        ..EnvironmentUpdate::default()
    };
    change_environment(s, &f.caller, &f.space, name, &u)
        .await
        .map(|_| ())
}

async fn delete(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let result = remove_environment(&s, &f.caller, &f.space, &name).await;
    done(&s, f, result, Outcome::default()).await
}
