//! Spaces: those the caller can see, a form to add one (`SpaceCreate`) and a
//! delete button per space (`SpaceDelete`; the API refuses while a space
//! holds machines, and the page shows why). The changes are the API's own
//! service functions (`octo_server_core::api::spaces`).

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Form;
use octo_api_types::{NewSpace, Permission};
use octo_server_core::api::spaces::{add_space, remove_space, visible_spaces};
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::users::{shown, unreadable};
use super::{api_error, enc, render, see_other, when, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get("/spaces", Access::Authenticated, list),
        post("/spaces", Access::System(P::SpaceCreate), create),
        post(
            "/spaces/{space}/delete",
            Access::System(P::SpaceDelete),
            delete,
        ),
    ]
}

struct SpaceRow {
    name: String,
    description: String,
    is_default: bool,
    created: String,
    href: String,
    delete: String,
}

/// What the create form had, to show it again after a refusal.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewSpaceForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Template)]
#[template(path = "spaces.html")]
struct SpacesPage {
    f: Frame,
    spaces: Vec<SpaceRow>,
    may_create: bool,
    may_delete: bool,
    form: NewSpaceForm,
    error: Option<String>,
}

async fn list_page(
    s: &AppState,
    f: Frame,
    form: NewSpaceForm,
    error: Option<&ApiError>,
) -> Response {
    let f = f.titled("Spaces", "spaces");
    let spaces = match visible_spaces(s, &f.caller).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let g = &f.caller.grants;
    let page = SpacesPage {
        spaces: spaces
            .into_iter()
            .map(|sp| SpaceRow {
                href: format!("/spaces/{}/", enc(&sp.name)),
                delete: format!("/spaces/{}/delete", enc(&sp.name)),
                created: when(Some(sp.created_at)),
                name: sp.name,
                description: sp.description,
                is_default: sp.is_default,
            })
            .collect(),
        may_create: g.has_system(Permission::SpaceCreate),
        may_delete: g.has_system(Permission::SpaceDelete),
        form,
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    list_page(&s, f, NewSpaceForm::default(), None).await
}

async fn create(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<NewSpaceForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let new = NewSpace {
        name: form.name.trim().to_string(),
        description: form.description.trim().to_string(),
    };
    match add_space(&s, &f.caller, new).await {
        Ok(_) => see_other("/spaces"),
        Err(e) => list_page(&s, f, form, Some(&e)).await,
    }
}

async fn delete(State(s): State<AppState>, f: Frame, Path(space): Path<String>) -> Response {
    match remove_space(&s, &f.caller, &space).await {
        Ok(_) => see_other("/spaces"),
        Err(e) => list_page(&s, f, NewSpaceForm::default(), Some(&e)).await,
    }
}
