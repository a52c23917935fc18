//! `/api/teams`: teams of the request's space (and those outside any space),
//! their members and their role grants.
//!
//! A team outside any space (`system`) and its grants in every space need
//! `TeamEdit` in every space, unnarrowed: a space manager can run their space's
//! teams, never reach beyond it. Nobody can remove the last enabled System
//! administrator from the administrators' team.

use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::Validate;
use octo_api_types::{ErrorBody, Grant, NewGrant, NewMember, NewTeam, Permission, Space, Team};
use octo_store::SYSTEM_ADMINISTRATOR;

use super::guard::{delete, get, post, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::authz::{built_in_role, Access, Caller, RequestSpace};
use crate::state::AppState;

/// The team routes.
pub(super) fn routes() -> Vec<Route> {
    use Permission as P;
    vec![
        get("/api/teams", Access::Space(P::TeamView), list_teams),
        post("/api/teams", Access::Space(P::TeamEdit), create_team),
        get("/api/teams/{name}", Access::Space(P::TeamView), get_team),
        delete("/api/teams/{name}", Access::Space(P::TeamEdit), delete_team),
        post(
            "/api/teams/{name}/members",
            Access::Space(P::TeamEdit),
            add_member,
        ),
        delete(
            "/api/teams/{name}/members/{username}",
            Access::Space(P::TeamEdit),
            remove_member,
        ),
        post(
            "/api/teams/{name}/grants",
            Access::Space(P::TeamEdit),
            add_grant,
        ),
        delete(
            "/api/teams/{name}/grants/{id}",
            Access::Space(P::TeamEdit),
            remove_grant,
        ),
    ]
}

/// A team of the space (preferred) or outside any space, by name; 404 otherwise.
async fn team_named(s: &AppState, space: &Space, name: &str) -> ApiResult<Team> {
    let teams = s.store.list_teams(Some(space.id)).await?;
    let mut matching = teams
        .into_iter()
        .filter(|t| t.name.eq_ignore_ascii_case(name.trim()));
    let first = matching.next();
    let second = matching.next();
    match (first, second) {
        (Some(a), Some(b)) => Ok(if a.space_id.is_some() { a } else { b }),
        (Some(a), None) => Ok(a),
        _ => Err(ApiError::not_found(format!(
            "team '{name}' does not exist in space '{}'; `GET /api/teams` lists them",
            space.name
        ))),
    }
}

/// Changing a team outside any space needs `TeamEdit` everywhere.
fn require_edit(caller: &Caller, space: &Space, team: &Team) -> ApiResult<()> {
    if team.space_id.is_none() {
        caller.require_system_team_edit()?;
    } else {
        caller.require_throughout(Permission::TeamEdit, space)?;
    }
    Ok(())
}

impl Caller {
    /// `TeamEdit` from an unnarrowed grant in every space.
    fn require_system_team_edit(&self) -> ApiResult<()> {
        if self.grants.has_system(Permission::TeamEdit) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "permission TeamEdit in every space is needed to change a team outside any space; ask an administrator",
            ))
        }
    }
}

/// The space's teams and those outside any space.
#[utoipa::path(
    get,
    path = "/api/teams",
    tag = "teams",
    responses((status = 200, description = "The teams", body = [Team]))
)]
pub(crate) async fn list_teams(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<Vec<Team>>> {
    Ok(Json(space_teams(&s, &caller, &space).await?))
}

/// As `GET /api/teams`, for the portal too: the space's teams and those
/// outside any space.
pub async fn space_teams(s: &AppState, caller: &Caller, space: &Space) -> ApiResult<Vec<Team>> {
    caller.require(Access::Space(Permission::TeamView), space)?;
    Ok(s.store.list_teams(Some(space.id)).await?)
}

/// One team, with its members and grants.
#[utoipa::path(
    get,
    path = "/api/teams/{name}",
    tag = "teams",
    params(("name" = String, Path, description = "The team's name")),
    responses(
        (status = 200, description = "The team", body = Team),
        (status = 404, description = "No such team", body = ErrorBody),
    )
)]
pub(crate) async fn get_team(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
) -> ApiResult<Json<Team>> {
    Ok(Json(team_details(&s, &caller, &space, &name).await?))
}

/// As `GET /api/teams/{name}`, for the portal too: a team of the space (or
/// outside any space) with its members and grants.
pub async fn team_details(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<Team> {
    caller.require(Access::Space(Permission::TeamView), space)?;
    team_named(s, space, name).await
}

/// Adds a team to the space (or, with `system`, outside any space).
#[utoipa::path(
    post,
    path = "/api/teams",
    tag = "teams",
    request_body = NewTeam,
    responses(
        (status = 201, description = "Created", body = Team),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "A team of that name exists there", body = ErrorBody),
    )
)]
pub(crate) async fn create_team(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    ApiJson(r): ApiJson<NewTeam>,
) -> ApiResult<impl IntoResponse> {
    let team = add_team(&s, &caller, &space, r).await?;
    Ok((StatusCode::CREATED, Json(team)))
}

/// As `POST /api/teams`, for the portal too: a team in the space (`TeamEdit`
/// throughout it) or, with `system`, outside any space (`TeamEdit` in every space).
pub async fn add_team(s: &AppState, caller: &Caller, space: &Space, r: NewTeam) -> ApiResult<Team> {
    r.validate()?;
    let name = r.name.trim();
    if name.is_empty() {
        return Err(ApiError::bad_request("field `name` must not be empty"));
    }
    let team_space = if r.system {
        caller.require_system_team_edit()?;
        None
    } else {
        caller.require_throughout(Permission::TeamEdit, space)?;
        Some(space.id)
    };
    let team = s
        .store
        .create_team(team_space, name, &r.description)
        .await?;
    s.audit(
        caller,
        team_space.map(|_| space),
        "created",
        "team",
        &team.name,
        "",
    )
    .await;
    Ok(team)
}

/// Deletes a team (not a built-in one).
#[utoipa::path(
    delete,
    path = "/api/teams/{name}",
    tag = "teams",
    params(("name" = String, Path, description = "The team's name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such team", body = ErrorBody),
        (status = 422, description = "A built-in team", body = ErrorBody),
    )
)]
pub(crate) async fn delete_team(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    remove_team(&s, &caller, &space, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// As `DELETE /api/teams/{name}`, for the portal too: refused for a built-in
/// team, and for one whose members are the only System administrators.
pub async fn remove_team(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
) -> ApiResult<Team> {
    let team = team_named(s, space, name).await?;
    require_edit(caller, space, &team)?;
    // Deleting a team takes its grants: refused, as taking the grant is, when
    // its members are the only System administrators (without this, deleting
    // the last administrator's own team locked everyone out; found by
    // tests/accounts.rs).
    if gives_administrator(&team) && !team.members.is_empty() {
        let admins = s.store.holders_of(SYSTEM_ADMINISTRATOR).await?;
        let outside = admins.iter().any(|a| {
            !team
                .members
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&a.username))
        });
        if !outside {
            return Err(ApiError::unprocessable(format!(
                "team '{}' makes its members the only System administrators: deleting it would leave nobody able to administer the server; make another user an administrator first",
                team.name
            )));
        }
    }
    s.store.delete_team(team.id).await?;
    s.permissions_changed();
    let in_space = team.space_id.map(|_| space);
    s.audit(caller, in_space, "deleted", "team", &team.name, "")
        .await;
    Ok(team)
}

/// Adds a user to a team.
#[utoipa::path(
    post,
    path = "/api/teams/{name}/members",
    tag = "teams",
    params(("name" = String, Path, description = "The team's name")),
    request_body = NewMember,
    responses(
        (status = 200, description = "The team now", body = Team),
        (status = 404, description = "No such team or user", body = ErrorBody),
    )
)]
pub(crate) async fn add_member(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
    ApiJson(r): ApiJson<NewMember>,
) -> ApiResult<Json<Team>> {
    Ok(Json(add_team_member(&s, &caller, &space, &name, r).await?))
}

/// As `POST /api/teams/{name}/members`, for the portal too: adds a user to a
/// team; the team as it is now.
pub async fn add_team_member(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    r: NewMember,
) -> ApiResult<Team> {
    r.validate()?;
    let team = team_named(s, space, name).await?;
    require_edit(caller, space, &team)?;
    let (user, _) = s
        .store
        .user_by_name(r.username.trim())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user '{}' does not exist", r.username)))?;
    s.store.add_team_member(team.id, user.id).await?;
    s.permissions_changed();
    let in_space = team.space_id.map(|_| space);
    s.audit(
        caller,
        in_space,
        "changed",
        "team",
        &team.name,
        format!("added member {}", user.username),
    )
    .await;
    Ok(s.store.team(team.id).await?.unwrap_or(team))
}

/// Removes a user from a team.
#[utoipa::path(
    delete,
    path = "/api/teams/{name}/members/{username}",
    tag = "teams",
    params(
        ("name" = String, Path, description = "The team's name"),
        ("username" = String, Path, description = "The member's login name"),
    ),
    responses(
        (status = 200, description = "The team now", body = Team),
        (status = 404, description = "No such team, or the user is not in it", body = ErrorBody),
        (status = 422, description = "The last enabled System administrator", body = ErrorBody),
    )
)]
pub(crate) async fn remove_member(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path((name, username)): Path<(String, String)>,
) -> ApiResult<Json<Team>> {
    Ok(Json(
        remove_team_member(&s, &caller, &space, &name, &username).await?,
    ))
}

/// As `DELETE /api/teams/{name}/members/{username}`, for the portal too:
/// refused for the last enabled System administrator; the team as it is now.
pub async fn remove_team_member(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    username: &str,
) -> ApiResult<Team> {
    let team = team_named(s, space, name).await?;
    require_edit(caller, space, &team)?;
    let (user, _) = s
        .store
        .user_by_name(username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user '{username}' does not exist")))?;
    if gives_administrator(&team) {
        let admins = s.store.holders_of(SYSTEM_ADMINISTRATOR).await?;
        if admins.iter().all(|a| a.id == user.id) && admins.iter().any(|a| a.id == user.id) {
            return Err(ApiError::unprocessable(format!(
                "'{}' is the last enabled System administrator: removing them from '{}' would leave nobody able to administer the server; make another user an administrator first",
                user.username, team.name
            )));
        }
    }
    s.store.remove_team_member(team.id, user.id).await?;
    s.permissions_changed();
    let in_space = team.space_id.map(|_| space);
    s.audit(
        caller,
        in_space,
        "changed",
        "team",
        &team.name,
        format!("removed member {}", user.username),
    )
    .await;
    Ok(s.store.team(team.id).await?.unwrap_or(team))
}

/// Whether the team's grants make its members System administrators everywhere.
fn gives_administrator(team: &Team) -> bool {
    team.grants.iter().any(|g| {
        g.role.eq_ignore_ascii_case(SYSTEM_ADMINISTRATOR)
            && g.space_id.is_none()
            && g.environments.is_empty()
            && g.tenants.is_empty()
    })
}

/// Gives a team a role in the request's space (or, with `all_spaces`, in every
/// space: teams outside any space only), optionally narrowed to environments
/// and tenants.
#[utoipa::path(
    post,
    path = "/api/teams/{name}/grants",
    tag = "teams",
    params(("name" = String, Path, description = "The team's name")),
    request_body = NewGrant,
    responses(
        (status = 201, description = "Granted", body = Grant),
        (status = 400, description = "Unknown role, or every space for a team in one space", body = ErrorBody),
        (status = 404, description = "No such team", body = ErrorBody),
        (status = 422, description = "An environment or tenant does not exist in the space", body = ErrorBody),
    )
)]
pub(crate) async fn add_grant(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path(name): Path<String>,
    ApiJson(r): ApiJson<NewGrant>,
) -> ApiResult<impl IntoResponse> {
    let grant = grant_role(&s, &caller, &space, &name, r).await?;
    Ok((StatusCode::CREATED, Json(grant)))
}

/// As `POST /api/teams/{name}/grants`, for the portal too: gives the team a
/// role in the space (or every space), narrowed to environments and tenants.
pub async fn grant_role(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    r: NewGrant,
) -> ApiResult<Grant> {
    r.validate()?;
    let team = team_named(s, space, name).await?;
    require_edit(caller, space, &team)?;
    let role = r.role.trim();
    let known = built_in_role(role).map(|b| b.name.to_string()).or(s
        .store
        .list_roles()
        .await?
        .into_iter()
        .find(|c| c.name.eq_ignore_ascii_case(role))
        .map(|c| c.name));
    let Some(role) = known else {
        return Err(ApiError::bad_request(format!(
            "field `role`: '{role}' is not a role; `GET /api/roles` lists them"
        )));
    };
    let grant_space = if r.all_spaces {
        if team.space_id.is_some() {
            return Err(ApiError::bad_request(
                "field `all_spaces`: only a team outside any space (`system`) may hold a role in every space",
            ));
        }
        None
    } else {
        Some(space.id)
    };
    let grant = s
        .store
        .add_grant(team.id, &role, grant_space, &r.environments, &r.tenants)
        .await?;
    s.permissions_changed();
    let in_space = team.space_id.map(|_| space);
    s.audit(
        caller,
        in_space,
        "changed",
        "team",
        &team.name,
        format!(
            "granted {} (#{}) {}",
            grant.role,
            grant.id,
            scope_text(&grant)
        ),
    )
    .await;
    Ok(grant)
}

/// "in Default, environments Test" / "in every space".
fn scope_text(g: &Grant) -> String {
    let mut text = match &g.space {
        Some(sp) => format!("in {sp}"),
        None => "in every space".to_string(),
    };
    if !g.environments.is_empty() {
        text.push_str(&format!(", environments {}", g.environments.join(", ")));
    }
    if !g.tenants.is_empty() {
        text.push_str(&format!(", tenants {}", g.tenants.join(", ")));
    }
    text
}

/// Takes a grant from a team.
#[utoipa::path(
    delete,
    path = "/api/teams/{name}/grants/{id}",
    tag = "teams",
    params(
        ("name" = String, Path, description = "The team's name"),
        ("id" = i64, Path, description = "The grant's id"),
    ),
    responses(
        (status = 200, description = "The team now", body = Team),
        (status = 404, description = "No such team or grant", body = ErrorBody),
        (status = 422, description = "It makes the last System administrator one", body = ErrorBody),
    )
)]
pub(crate) async fn remove_grant(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
    Path((name, id)): Path<(String, i64)>,
) -> ApiResult<Json<Team>> {
    Ok(Json(revoke_grant(&s, &caller, &space, &name, id).await?))
}

/// As `DELETE /api/teams/{name}/grants/{id}`, for the portal too: refused when
/// it makes the last System administrators one; the team as it is now.
pub async fn revoke_grant(
    s: &AppState,
    caller: &Caller,
    space: &Space,
    name: &str,
    id: i64,
) -> ApiResult<Team> {
    let team = team_named(s, space, name).await?;
    require_edit(caller, space, &team)?;
    let grant = team
        .grants
        .iter()
        .find(|g| g.id == id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("team '{}' has no grant #{id}", team.name)))?;
    let remaining = Team {
        grants: team.grants.iter().filter(|g| g.id != id).cloned().collect(),
        ..team.clone()
    };
    if gives_administrator(&team) && !gives_administrator(&remaining) && !team.members.is_empty() {
        let admins = s.store.holders_of(SYSTEM_ADMINISTRATOR).await?;
        let outside: Vec<_> = admins
            .iter()
            .filter(|a| {
                !team
                    .members
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(&a.username))
            })
            .collect();
        if outside.is_empty() {
            return Err(ApiError::unprocessable(format!(
                "grant #{id} makes the members of '{}' the only System administrators: taking it would leave nobody able to administer the server",
                team.name
            )));
        }
    }
    s.store.remove_grant(team.id, id).await?;
    s.permissions_changed();
    let in_space = team.space_id.map(|_| space);
    s.audit(
        caller,
        in_space,
        "changed",
        "team",
        &team.name,
        format!("revoked {} (#{id}) {}", grant.role, scope_text(&grant)),
    )
    .await;
    Ok(s.store.team(team.id).await?.unwrap_or(remaining))
}
