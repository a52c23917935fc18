//! `/api/users`: the caller (`me`), users (list, show, create, disable,
//! enable), passwords, and login/logout (user name and password in, a session
//! key out; logout revokes it).
//!
//! Nobody can disable the last enabled System administrator (in every space).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use octo_api_types::{
    ErrorBody, Login, LoginReply, NewUser, Permission, SetPassword, User, WhoAmI,
};
use octo_store::{now_ms, ADMINISTRATORS_TEAM, SYSTEM_ADMINISTRATOR};

use super::guard::{get, post, put, Route};
use super::{ApiError, ApiJson, ApiResult};
use crate::auth::{hash_password, issue_session, verify_password};
use crate::authz::{Access, Caller, RequestSpace};
use crate::state::AppState;

/// The user routes.
pub(super) fn routes() -> Vec<Route> {
    use Permission as P;
    vec![
        post("/api/users/login", Access::Public, login),
        post("/api/users/logout", Access::Authenticated, logout),
        get("/api/users/me", Access::Authenticated, whoami),
        get("/api/users", Access::System(P::UserView), list_users),
        post("/api/users", Access::System(P::UserEdit), create_user),
        get("/api/users/{username}", Access::Authenticated, get_user),
        post(
            "/api/users/{username}/disable",
            Access::System(P::UserEdit),
            disable_user,
        ),
        post(
            "/api/users/{username}/enable",
            Access::System(P::UserEdit),
            enable_user,
        ),
        put(
            "/api/users/{username}/password",
            Access::Authenticated,
            set_password,
        ),
    ]
}

/// The shortest password accepted.
const MIN_PASSWORD: usize = 8;

fn check_password(field: &str, p: &str) -> ApiResult<()> {
    if p.chars().count() < MIN_PASSWORD {
        return Err(ApiError::bad_request(format!(
            "field `{field}` must have at least {MIN_PASSWORD} characters"
        )));
    }
    Ok(())
}

async fn hash(password: &str) -> ApiResult<String> {
    let p = password.to_string();
    Ok(tokio::task::spawn_blocking(move || hash_password(&p))
        .await
        .map_err(|e| anyhow::anyhow!(e))??)
}

async fn user_named(s: &AppState, username: &str) -> ApiResult<(User, Option<String>)> {
    s.store
        .user_by_name(username)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("user '{username}' does not exist")))
}

/// Adds a user. Without a password the user can only use API keys; with
/// `is_admin`, they join the built-in administrators' team.
#[utoipa::path(
    post,
    path = "/api/users",
    tag = "users",
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = User),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 409, description = "The username exists", body = ErrorBody),
    )
)]
pub(crate) async fn create_user(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(u): ApiJson<NewUser>,
) -> ApiResult<impl IntoResponse> {
    let user = add_user(&s, &caller, u).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// As `POST /api/users`, for the portal too: checks the request (an
/// administrator needs `AdministerSystem`) and adds the user.
pub async fn add_user(s: &AppState, caller: &Caller, u: NewUser) -> ApiResult<User> {
    caller.require_system(Permission::UserEdit)?;
    let username = u.username.trim();
    if username.is_empty() {
        return Err(ApiError::bad_request("field `username` must not be empty"));
    }
    if let Some(p) = &u.password {
        check_password("password", p)?;
    }
    if u.is_admin {
        // Making an administrator is changing teams outside any space.
        caller.require_system(Permission::AdministerSystem)?;
    }
    let hash = match &u.password {
        Some(p) => Some(hash(p).await?),
        None => None,
    };
    let display = if u.display_name.trim().is_empty() {
        username.to_string()
    } else {
        u.display_name.trim().to_string()
    };
    let mut user = s
        .store
        .create_user(username, &display, hash.as_deref())
        .await?;
    if u.is_admin {
        let team = administrators_team(s).await?;
        s.store.add_team_member(team, user.id).await?;
        s.permissions_changed();
        user = s.store.user_by_id(user.id).await?.unwrap_or(user);
    }
    let details = if u.is_admin {
        "System administrator"
    } else {
        ""
    };
    s.audit(caller, None, "created", "user", &user.username, details)
        .await;
    Ok(user)
}

/// The built-in administrators' team's id.
pub(crate) async fn administrators_team(s: &AppState) -> ApiResult<i64> {
    s.store
        .list_teams(None)
        .await?
        .into_iter()
        .find(|t| t.built_in && t.space_id.is_none() && t.name == ADMINISTRATORS_TEAM)
        .map(|t| t.id)
        .ok_or_else(|| ApiError::internal("the built-in team of administrators is missing"))
}

/// Every user.
#[utoipa::path(
    get,
    path = "/api/users",
    tag = "users",
    responses((status = 200, description = "The users", body = [User]))
)]
pub(crate) async fn list_users(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<User>>> {
    Ok(Json(all_users(&s, &caller).await?))
}

/// As `GET /api/users`, for the portal too: every user (needs `UserView`).
pub async fn all_users(s: &AppState, caller: &Caller) -> ApiResult<Vec<User>> {
    caller.require_system(Permission::UserView)?;
    Ok(s.store.list_users().await?)
}

/// One user (the caller themselves, or anyone with `UserView`).
#[utoipa::path(
    get,
    path = "/api/users/{username}",
    tag = "users",
    params(("username" = String, Path, description = "The user's login name")),
    responses(
        (status = 200, description = "The user", body = User),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(crate) async fn get_user(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(user_details(&s, &caller, &username).await?))
}

/// As `GET /api/users/{username}`, for the portal too: the caller themselves,
/// or anyone with `UserView`.
pub async fn user_details(s: &AppState, caller: &Caller, username: &str) -> ApiResult<User> {
    if !caller.user.username.eq_ignore_ascii_case(username) {
        caller.require_system(Permission::UserView)?;
    }
    Ok(user_named(s, username).await?.0)
}

/// The caller: who they are, their grants, and their permissions in the
/// request's space.
#[utoipa::path(
    get,
    path = "/api/users/me",
    tag = "users",
    responses((status = 200, description = "The caller", body = WhoAmI))
)]
pub(crate) async fn whoami(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(RequestSpace(space)): Extension<RequestSpace>,
) -> ApiResult<Json<WhoAmI>> {
    Ok(Json(WhoAmI {
        grants: s.store.grants_of_user(caller.user.id).await?,
        permissions: caller.grants.permissions_in(space.id),
        user: caller.user,
    }))
}

/// As `POST /api/users/{username}/disable` and `.../enable`, for the portal
/// too: refuses to disable the last enabled System administrator.
pub async fn set_disabled(
    s: &AppState,
    caller: &Caller,
    username: &str,
    disabled: bool,
) -> ApiResult<User> {
    caller.require_system(Permission::UserEdit)?;
    let (user, _) = user_named(s, username).await?;
    if disabled && user.is_admin {
        let admins = s.store.holders_of(SYSTEM_ADMINISTRATOR).await?;
        if admins.iter().all(|a| a.id == user.id) {
            return Err(ApiError::unprocessable(format!(
                "'{}' is the last enabled System administrator: disabling them would leave nobody able to administer the server; make another user an administrator first",
                user.username
            )));
        }
    }
    let user = s.store.set_user_disabled(user.id, disabled).await?;
    let action = if disabled { "disabled" } else { "enabled" };
    s.audit(caller, None, action, "user", &user.username, "")
        .await;
    Ok(user)
}

/// Disables a user: they cannot log in and their keys stop working.
#[utoipa::path(
    post,
    path = "/api/users/{username}/disable",
    tag = "users",
    params(("username" = String, Path, description = "The user's login name")),
    responses(
        (status = 200, description = "Disabled", body = User),
        (status = 404, description = "No such user", body = ErrorBody),
        (status = 422, description = "The last enabled System administrator", body = ErrorBody),
    )
)]
pub(crate) async fn disable_user(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(set_disabled(&s, &caller, &username, true).await?))
}

/// Enables a disabled user again.
#[utoipa::path(
    post,
    path = "/api/users/{username}/enable",
    tag = "users",
    params(("username" = String, Path, description = "The user's login name")),
    responses(
        (status = 200, description = "Enabled", body = User),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(crate) async fn enable_user(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(username): Path<String>,
) -> ApiResult<Json<User>> {
    Ok(Json(set_disabled(&s, &caller, &username, false).await?))
}

/// Sets a password: one's own (giving the current one, when there is one),
/// or another's with `UserEdit`.
#[utoipa::path(
    put,
    path = "/api/users/{username}/password",
    tag = "users",
    params(("username" = String, Path, description = "The user's login name")),
    request_body = SetPassword,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "Too short, or the current password is missing or wrong", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    )
)]
pub(crate) async fn set_password(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(username): Path<String>,
    ApiJson(r): ApiJson<SetPassword>,
) -> ApiResult<impl IntoResponse> {
    change_password(&s, &caller, &username, r).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// As `PUT /api/users/{username}/password`, for the portal too: one's own
/// (with the current one, when there is one), or another's with `UserEdit`.
pub async fn change_password(
    s: &AppState,
    caller: &Caller,
    username: &str,
    r: SetPassword,
) -> ApiResult<()> {
    check_password("password", &r.password)?;
    let own = caller.user.username.eq_ignore_ascii_case(username);
    if !own {
        caller.require_system(Permission::UserEdit)?;
    }
    let (user, current) = user_named(s, username).await?;
    if own {
        if let Some(current) = current {
            let given = r.current_password.clone().ok_or_else(|| {
                ApiError::bad_request(
                    "field `current_password` is needed to change your own password",
                )
            })?;
            let ok = tokio::task::spawn_blocking(move || verify_password(&given, &current))
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            if !ok {
                return Err(ApiError::bad_request(
                    "field `current_password` is not your current password",
                ));
            }
        }
    }
    let hash = hash(&r.password).await?;
    s.store.set_password_hash(user.id, &hash).await?;
    s.audit(caller, None, "changed", "password", &user.username, "")
        .await;
    Ok(())
}

/// Username and password in, a session key out. The session key is an API key
/// (stored hashed, revocable) that expires after a time without use. Repeated
/// failures slow further attempts, per user and per address (429).
#[utoipa::path(
    post,
    path = "/api/users/login",
    tag = "users",
    request_body = Login,
    responses(
        (status = 200, description = "Logged in", body = LoginReply),
        (status = 400, description = "Malformed request (the message names the field)", body = ErrorBody),
        (status = 401, description = "Wrong username or password", body = ErrorBody),
        (status = 429, description = "Too many failed attempts: wait (Retry-After) and try again", body = ErrorBody),
    )
)]
pub(crate) async fn login(
    State(s): State<AppState>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    tls: Option<Extension<super::guard::OverTls>>,
    ApiJson(l): ApiJson<Login>,
) -> axum::response::Response {
    let source = match (connect, tls) {
        (Some(Extension(ConnectInfo(a))), _) => a.ip().to_string(),
        (None, Some(Extension(t))) => t.remote.ip().to_string(),
        _ => "unknown".into(),
    };
    match do_login(&s, &l, &source).await {
        Ok(reply) => Json(reply).into_response(),
        Err((e, retry)) => {
            let mut resp = e.into_response();
            if let Some(secs) = retry {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut().insert("retry-after", v);
                }
            }
            resp
        }
    }
}

/// Checks a user name and password (slowing repeated failures) and opens a
/// session; the error comes with the seconds to wait when attempts are slowed.
/// The portal's login uses this too.
pub async fn do_login(
    s: &AppState,
    l: &Login,
    source: &str,
) -> Result<LoginReply, (ApiError, Option<u64>)> {
    let plain = |e: ApiError| (e, None);
    let attempt = match s.logins.begin(&l.username, source) {
        Ok(a) => a,
        Err((wait, why)) => {
            let secs = wait.as_secs().max(1);
            return Err((
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("too many failed logins {why}; try again in {secs} s"),
                ),
                Some(secs),
            ));
        }
    };
    let refused = || ApiError::new(StatusCode::UNAUTHORIZED, "wrong username or password");
    let found = s
        .store
        .user_by_name(&l.username)
        .await
        .map_err(|e| plain(e.into()))?;
    let (user, hash) = match found {
        Some((user, Some(hash))) if !user.disabled => (user, hash),
        _ => {
            attempt.failed();
            tracing::warn!("failed login for '{}' from {source}", l.username);
            return Err(plain(refused()));
        }
    };
    let password = l.password.clone();
    let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
        .await
        .map_err(|e| plain(anyhow::anyhow!(e).into()))?;
    if !ok {
        attempt.failed();
        tracing::warn!("failed login for '{}' from {source}", l.username);
        return Err(plain(refused()));
    }
    attempt.succeeded();
    let purpose = format!("session of {} (login at {})", user.username, now_ms());
    let (key, stored) = issue_session(s.store.as_ref(), user.id, &purpose)
        .await
        .map_err(|e| plain(e.into()))?;
    Ok(LoginReply {
        api_key: key,
        key: stored,
        user,
    })
}

/// Ends the session the request was made with (its key is revoked).
#[utoipa::path(
    post,
    path = "/api/users/logout",
    tag = "users",
    responses((status = 204, description = "Logged out; the key no longer works"))
)]
pub(crate) async fn logout(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<impl IntoResponse> {
    // Logging out with an API key (not a session) revokes it: the last
    // administrator's last key must stay, as `DELETE /api/api-keys/{id}` keeps
    // it (this path let it be revoked; found by tests/accounts.rs).
    super::api_keys::refuse_last_admin_key(&s, &caller.key).await?;
    s.store.revoke_api_key(caller.key.id).await?;
    Ok(StatusCode::NO_CONTENT)
}
