//! Teams of a space and those outside any space (with `TeamView`): the list,
//! a form to add one (with `TeamEdit`; outside any space needs `TeamEdit` in
//! every space), and a team's page: members (add, remove), grants (a role in
//! the space or, for a team outside any space, in every space, narrowed to
//! environments and tenants; revoke) and deleting the team. Every change is
//! the API's own service function (`octo_server_core::api::teams`), which
//! also refuses what would leave nobody a System administrator; the page
//! shows its message.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Form;
use octo_api_types::{Grant, NewGrant, NewMember, NewTeam, Permission, Team};
use octo_server_core::api::roles::all_roles;
use octo_server_core::api::teams::{
    add_team, add_team_member, grant_role, remove_team, remove_team_member, revoke_grant,
    space_teams, team_details,
};
use octo_server_core::api::users::all_users;
use octo_server_core::api::ApiError;
use octo_server_core::authz::{built_in_roles, Access};
use octo_server_core::AppState;
use serde::Deserialize;

use super::users::{field, fields, shown, unreadable};
use super::{api_error, enc, render, see_other, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    let edit = Access::Space(P::TeamEdit);
    vec![
        get("/spaces/{space}/teams", Access::Space(P::TeamView), list),
        post("/spaces/{space}/teams", edit, create),
        get(
            "/spaces/{space}/teams/{name}",
            Access::Space(P::TeamView),
            show,
        ),
        post("/spaces/{space}/teams/{name}/delete", edit, delete),
        post("/spaces/{space}/teams/{name}/members", edit, add_member),
        post(
            "/spaces/{space}/teams/{name}/members/{username}/remove",
            edit,
            remove_member,
        ),
        post("/spaces/{space}/teams/{name}/grants", edit, add_grant),
        post(
            "/spaces/{space}/teams/{name}/grants/{id}/revoke",
            edit,
            revoke,
        ),
    ]
}

/// "Environment viewer in Default (environments Test; tenants Acme)".
fn grant_text(g: &Grant) -> String {
    let mut text = format!(
        "{} in {}",
        g.role,
        g.space.as_deref().unwrap_or("every space")
    );
    let mut narrowed = Vec::new();
    if !g.environments.is_empty() {
        narrowed.push(format!("environments {}", g.environments.join(", ")));
    }
    if !g.tenants.is_empty() {
        narrowed.push(format!("tenants {}", g.tenants.join(", ")));
    }
    if !narrowed.is_empty() {
        text.push_str(&format!(" ({})", narrowed.join("; ")));
    }
    text
}

/// Whether the caller may change this team (the API's rule, to show the
/// controls; the service functions check it again).
fn may_edit(f: &Frame, team: &Team) -> bool {
    let g = &f.caller.grants;
    match team.space_id {
        None => g.has_system(Permission::TeamEdit),
        Some(_) => g.has_throughout(Permission::TeamEdit, f.space.id),
    }
}

struct TeamRow {
    name: String,
    href: String,
    description: String,
    /// The space's name, or "all spaces".
    place: String,
    members: usize,
    grants: Vec<String>,
}

/// What the create form had, to show it again after a refusal.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewTeamForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    system: Option<String>,
}

#[derive(Template)]
#[template(path = "teams.html")]
struct TeamsPage {
    f: Frame,
    teams: Vec<TeamRow>,
    may_create: bool,
    may_create_system: bool,
    form: NewTeamForm,
    error: Option<String>,
}

async fn list_page(
    s: &AppState,
    f: Frame,
    form: NewTeamForm,
    error: Option<&ApiError>,
) -> Response {
    let f = f.titled("Teams", "teams");
    let teams = match space_teams(s, &f.caller, &f.space).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let g = &f.caller.grants;
    let may_create_system = g.has_system(Permission::TeamEdit);
    let page = TeamsPage {
        teams: teams
            .iter()
            .map(|t| TeamRow {
                name: t.name.clone(),
                href: f.href(&format!("/teams/{}", enc(&t.name))),
                description: t.description.clone(),
                place: t.space.clone().unwrap_or_else(|| "all spaces".into()),
                members: t.members.len(),
                grants: t.grants.iter().map(grant_text).collect(),
            })
            .collect(),
        may_create: may_create_system || g.has_throughout(Permission::TeamEdit, f.space.id),
        may_create_system,
        form,
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    list_page(&s, f, NewTeamForm::default(), None).await
}

async fn create(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<NewTeamForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let new = NewTeam {
        name: form.name.trim().to_string(),
        description: form.description.trim().to_string(),
        system: form.system.is_some(),
    };
    match add_team(&s, &f.caller, &f.space, new).await {
        Ok(t) => see_other(&f.href(&format!("/teams/{}", enc(&t.name)))),
        Err(e) => list_page(&s, f, form, Some(&e)).await,
    }
}

struct MemberRow {
    username: String,
    remove: String,
}

struct GrantRow {
    text: String,
    revoke: String,
}

/// An option of a select.
struct Choice {
    value: String,
    label: String,
}

#[derive(Template)]
#[template(path = "team.html")]
struct TeamPage {
    f: Frame,
    name: String,
    description: String,
    place: String,
    built_in: bool,
    outside: bool,
    /// The team's page: the forms post below it.
    base: String,
    members: Vec<MemberRow>,
    grants: Vec<GrantRow>,
    may_edit: bool,
    /// Users to add (None: the caller cannot list users; a text field then).
    candidates: Option<Vec<String>>,
    roles: Vec<Choice>,
    environments: Vec<String>,
    tenants: Vec<String>,
    error: Option<String>,
}

async fn team_page(s: &AppState, f: Frame, name: &str, error: Option<&ApiError>) -> Response {
    let team = match team_details(s, &f.caller, &f.space, name).await {
        Ok(t) => t,
        Err(e) => return api_error(&e),
    };
    let f = f.titled(format!("Team {}", team.name), "teams");
    let base = f.href(&format!("/teams/{}", enc(&team.name)));
    let editable = may_edit(&f, &team);
    let g = &f.caller.grants;
    let (mut candidates, mut roles, mut environments, mut tenants) =
        (None, Vec::new(), Vec::new(), Vec::new());
    if editable {
        if g.has_system(Permission::UserView) {
            let users = match all_users(s, &f.caller).await {
                Ok(u) => u,
                Err(e) => return api_error(&e),
            };
            candidates = Some(
                users
                    .into_iter()
                    .filter(|u| {
                        !team
                            .members
                            .iter()
                            .any(|m| m.eq_ignore_ascii_case(&u.username))
                    })
                    .map(|u| u.username)
                    .collect(),
            );
        }
        // Custom roles are listed to those who may see roles; the built-in
        // ones are the server's and known to all.
        let all = if g.has_system(Permission::UserRoleView) {
            match all_roles(s, &f.caller).await {
                Ok(r) => r,
                Err(e) => return api_error(&e),
            }
        } else {
            built_in_roles()
        };
        roles = all
            .into_iter()
            .map(|r| Choice {
                label: if r.built_in {
                    r.name.clone()
                } else {
                    format!("{} (custom)", r.name)
                },
                value: r.name,
            })
            .collect();
        // The environments and tenants the caller sees (as the API lists them).
        match s.store.list_environments(f.space.id).await {
            Ok(envs) => {
                environments = envs
                    .into_iter()
                    .filter(|e| {
                        f.caller.sees(
                            Permission::EnvironmentView,
                            &f.space,
                            std::slice::from_ref(&e.name),
                            &[],
                        )
                    })
                    .map(|e| e.name)
                    .collect();
            }
            Err(e) => return api_error(&e.into()),
        }
        if f.may(Permission::TenantView) {
            match s.store.list_tenants(f.space.id).await {
                Ok(ts) => tenants = ts.into_iter().map(|t| t.name).collect(),
                Err(e) => return api_error(&e.into()),
            }
        }
    }
    let page = TeamPage {
        members: team
            .members
            .iter()
            .map(|m| MemberRow {
                remove: format!("{base}/members/{}/remove", enc(m)),
                username: m.clone(),
            })
            .collect(),
        grants: team
            .grants
            .iter()
            .map(|g| GrantRow {
                text: grant_text(g),
                revoke: format!("{base}/grants/{}/revoke", g.id),
            })
            .collect(),
        name: team.name,
        description: team.description,
        place: team.space.unwrap_or_else(|| "outside any space".into()),
        built_in: team.built_in,
        outside: team.space_id.is_none(),
        base,
        may_edit: editable,
        candidates,
        roles,
        environments,
        tenants,
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn show(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    team_page(&s, f, &name, None).await
}

/// After a change: the team's page, or the refusal on it.
async fn done(s: &AppState, f: Frame, name: &str, result: Result<Team, ApiError>) -> Response {
    match result {
        Ok(t) => see_other(&f.href(&format!("/teams/{}", enc(&t.name)))),
        Err(e) => team_page(s, f, name, Some(&e)).await,
    }
}

async fn delete(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    match remove_team(&s, &f.caller, &f.space, &name).await {
        Ok(_) => see_other(&f.href("/teams")),
        Err(e) => team_page(&s, f, &name, Some(&e)).await,
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct MemberForm {
    #[serde(default)]
    username: String,
}

async fn add_member(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    form: Result<Form<MemberForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let member = NewMember {
        username: form.username.trim().to_string(),
    };
    let result = if member.username.is_empty() {
        Err(ApiError::bad_request("Choose the user to add."))
    } else {
        add_team_member(&s, &f.caller, &f.space, &name, member).await
    };
    done(&s, f, &name, result).await
}

async fn remove_member(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name, username)): Path<(String, String, String)>,
) -> Response {
    let result = remove_team_member(&s, &f.caller, &f.space, &name, &username).await;
    done(&s, f, &name, result).await
}

async fn add_grant(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    let Form(pairs) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    let grant = NewGrant {
        role: field(&pairs, "role").trim().to_string(),
        environments: fields(&pairs, "environment"),
        tenants: fields(&pairs, "tenant"),
        all_spaces: !field(&pairs, "all_spaces").is_empty(),
    };
    let result = match grant_role(&s, &f.caller, &f.space, &name, grant).await {
        Ok(_) => team_details(&s, &f.caller, &f.space, &name).await,
        Err(e) => Err(e),
    };
    done(&s, f, &name, result).await
}

async fn revoke(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name, id)): Path<(String, String, String)>,
) -> Response {
    let result = match id.parse::<i64>() {
        Ok(id) => revoke_grant(&s, &f.caller, &f.space, &name, id).await,
        Err(_) => Err(ApiError::not_found(format!("there is no grant #{id}"))),
    };
    done(&s, f, &name, result).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_read_as_words() {
        let g = Grant {
            id: 3,
            role: "Project deployer".into(),
            space_id: Some(1),
            space: Some("Default".into()),
            environments: vec!["Test".into(), "Staging".into()],
            tenants: vec!["Acme".into()],
        };
        assert_eq!(
            grant_text(&g),
            "Project deployer in Default (environments Test, Staging; tenants Acme)"
        );
        let everywhere = Grant {
            space_id: None,
            space: None,
            environments: vec![],
            tenants: vec![],
            ..g
        };
        assert_eq!(grant_text(&everywhere), "Project deployer in every space");
    }
}
