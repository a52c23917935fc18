//! Roles: the built-in ones and custom ones with their permissions (with
//! `UserRoleView`), and a form to add a custom role (with `UserRoleEdit`): a
//! name, a description and one checkbox per permission, system and space ones
//! apart. The change is the API's own service function
//! (`octo_server_core::api::roles::add_role`), which refuses an empty selection.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Form;
use octo_api_types::{NewRole, Permission, Role};
use octo_server_core::api::roles::{add_role, all_roles};
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;

use super::users::{field, fields, shown, unreadable};
use super::{api_error, render, see_other, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get("/roles", Access::System(P::UserRoleView), list),
        post("/roles", Access::System(P::UserRoleEdit), create),
    ]
}

struct RoleRow {
    name: String,
    description: String,
    built_in: bool,
    system: Vec<&'static str>,
    space: Vec<&'static str>,
}

impl RoleRow {
    fn of(r: &Role) -> RoleRow {
        let names = |system: bool| {
            Permission::ALL
                .into_iter()
                .filter(|p| p.is_system() == system && r.permissions.contains(p))
                .map(Permission::name)
                .collect()
        };
        RoleRow {
            name: r.name.clone(),
            description: r.description.clone(),
            built_in: r.built_in,
            system: names(true),
            space: names(false),
        }
    }
}

/// A permission's checkbox.
struct Choice {
    name: &'static str,
    checked: bool,
}

#[derive(Template)]
#[template(path = "roles.html")]
struct RolesPage {
    f: Frame,
    roles: Vec<RoleRow>,
    may_create: bool,
    name: String,
    description: String,
    system: Vec<Choice>,
    space: Vec<Choice>,
    error: Option<String>,
}

async fn list_page(
    s: &AppState,
    f: Frame,
    form: Option<&NewRole>,
    error: Option<&ApiError>,
) -> Response {
    let f = f.titled("Roles", "roles");
    let roles = match all_roles(s, &f.caller).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let chosen = |p: &Permission| form.is_some_and(|r| r.permissions.contains(p));
    let choices = |system: bool| {
        Permission::ALL
            .iter()
            .filter(|p| p.is_system() == system)
            .map(|p| Choice {
                name: p.name(),
                checked: chosen(p),
            })
            .collect()
    };
    let page = RolesPage {
        roles: roles.iter().map(RoleRow::of).collect(),
        may_create: f.caller.grants.has_system(Permission::UserRoleEdit),
        name: form.map(|r| r.name.clone()).unwrap_or_default(),
        description: form.map(|r| r.description.clone()).unwrap_or_default(),
        system: choices(true),
        space: choices(false),
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    list_page(&s, f, None, None).await
}

async fn create(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let Form(pairs) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let mut role = NewRole {
        name: field(&pairs, "name").trim().to_string(),
        description: field(&pairs, "description").trim().to_string(),
        permissions: Vec::new(),
    };
    for name in fields(&pairs, "permission") {
        match Permission::parse(&name) {
            Some(p) => role.permissions.push(p),
            None => {
                let e = ApiError::bad_request(format!("'{name}' is not a permission."));
                return list_page(&s, f, Some(&role), Some(&e)).await;
            }
        }
    }
    match add_role(&s, &f.caller, role.clone()).await {
        Ok(_) => see_other("/roles"),
        Err(e) => list_page(&s, f, Some(&role), Some(&e)).await,
    }
}
