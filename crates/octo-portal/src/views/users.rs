//! Users: the list (with `UserView`) and a form to add one (with `UserEdit`;
//! an administrator needs `AdministerSystem`), and a user's page (themselves,
//! or anyone with `UserView`): disable and enable (`UserEdit`; the last
//! enabled administrator is refused), set the password (one's own with the
//! current one, another's with `UserEdit`). Every change is the API's own
//! service function (`octo_server_core::api::users`).
//!
//! The helpers at the end are shared by the administration pages (spaces,
//! teams, roles, API keys).

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Form;
use octo_api_types::{NewUser, Permission, SetPassword, User};
use octo_server_core::api::users::{
    add_user, all_users, change_password, set_disabled, user_details,
};
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::{api_error, enc, error_page, render, see_other, when, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get("/users", Access::System(P::UserView), list),
        post("/users", Access::System(P::UserEdit), create),
        get("/users/{username}", Access::Authenticated, show),
        post(
            "/users/{username}/disable",
            Access::System(P::UserEdit),
            disable,
        ),
        post(
            "/users/{username}/enable",
            Access::System(P::UserEdit),
            enable,
        ),
        post(
            "/users/{username}/password",
            Access::Authenticated,
            password,
        ),
    ]
}

/// One user, as the pages show them.
struct UserRow {
    username: String,
    display_name: String,
    href: String,
    is_admin: bool,
    disabled: bool,
    created: String,
}

impl UserRow {
    fn of(u: &User) -> UserRow {
        UserRow {
            username: u.username.clone(),
            display_name: u.display_name.clone(),
            href: format!("/users/{}", enc(&u.username)),
            is_admin: u.is_admin,
            disabled: u.disabled,
            created: when(Some(u.created_at)),
        }
    }
}

/// What the create form had, to show it again after a refusal.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewUserForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
    #[serde(default)]
    is_admin: Option<String>,
}

#[derive(Template)]
#[template(path = "users.html")]
struct UsersPage {
    f: Frame,
    users: Vec<UserRow>,
    may_create: bool,
    may_make_admin: bool,
    error: Option<String>,
    form: NewUserForm,
}

async fn list_page(
    s: &AppState,
    f: Frame,
    form: NewUserForm,
    error: Option<&ApiError>,
) -> Response {
    let f = f.titled("Users", "users");
    let users = match all_users(s, &f.caller).await {
        Ok(u) => u,
        Err(e) => return api_error(&e),
    };
    let g = &f.caller.grants;
    let page = UsersPage {
        users: users.iter().map(UserRow::of).collect(),
        may_create: g.has_system(Permission::UserEdit),
        may_make_admin: g.has_system(Permission::AdministerSystem),
        error: error.map(|e| e.message.clone()),
        form,
        f,
    };
    shown(render(&page), error)
}

async fn list(State(s): State<AppState>, f: Frame) -> Response {
    list_page(&s, f, NewUserForm::default(), None).await
}

async fn create(
    State(s): State<AppState>,
    f: Frame,
    form: Result<Form<NewUserForm>, FormRejection>,
) -> Response {
    let Form(mut form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    if form.password != form.confirm {
        form.password.clear();
        form.confirm.clear();
        let e = ApiError::bad_request("The two passwords differ; type the same one twice.");
        return list_page(&s, f, form, Some(&e)).await;
    }
    let new = NewUser {
        username: form.username.trim().to_string(),
        password: (!form.password.is_empty()).then(|| form.password.clone()),
        display_name: form.display_name.trim().to_string(),
        is_admin: form.is_admin.is_some(),
    };
    match add_user(&s, &f.caller, new).await {
        Ok(u) => see_other(&format!("/users/{}?done=created", enc(&u.username))),
        Err(e) => {
            form.password.clear();
            form.confirm.clear();
            list_page(&s, f, form, Some(&e)).await
        }
    }
}

#[derive(Template)]
#[template(path = "user.html")]
struct UserPage {
    f: Frame,
    user: UserRow,
    /// The form actions: `/users/<name>`.
    base: String,
    own: bool,
    may_edit: bool,
    see_users: bool,
    notice: Option<&'static str>,
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Done {
    #[serde(default)]
    done: Option<String>,
}

/// What a finished change says (never text from the request).
fn notice(done: Option<&str>) -> Option<&'static str> {
    match done? {
        "created" => Some("The user was created."),
        "disabled" => {
            Some("The user is disabled: they cannot sign in and their API keys stop working.")
        }
        "enabled" => Some("The user is enabled again."),
        "password" => Some("The password was changed."),
        _ => None,
    }
}

async fn user_page(
    s: &AppState,
    f: Frame,
    username: &str,
    notice: Option<&'static str>,
    error: Option<&ApiError>,
) -> Response {
    let user = match user_details(s, &f.caller, username).await {
        Ok(u) => u,
        Err(e) => return api_error(&e),
    };
    let f = f.titled(format!("User {}", user.username), "users");
    let g = &f.caller.grants;
    let page = UserPage {
        own: f.caller.user.id == user.id,
        may_edit: g.has_system(Permission::UserEdit),
        see_users: g.has_system(Permission::UserView),
        base: format!("/users/{}", enc(&user.username)),
        user: UserRow::of(&user),
        notice,
        error: error.map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error)
}

async fn show(
    State(s): State<AppState>,
    f: Frame,
    Path(username): Path<String>,
    Query(q): Query<Done>,
) -> Response {
    user_page(&s, f, &username, notice(q.done.as_deref()), None).await
}

async fn toggle(s: &AppState, f: Frame, username: &str, disabled: bool) -> Response {
    match set_disabled(s, &f.caller, username, disabled).await {
        Ok(u) => {
            let done = if disabled { "disabled" } else { "enabled" };
            see_other(&format!("/users/{}?done={done}", enc(&u.username)))
        }
        Err(e) => user_page(s, f, username, None, Some(&e)).await,
    }
}

async fn disable(State(s): State<AppState>, f: Frame, Path(username): Path<String>) -> Response {
    toggle(&s, f, &username, true).await
}

async fn enable(State(s): State<AppState>, f: Frame, Path(username): Path<String>) -> Response {
    toggle(&s, f, &username, false).await
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PasswordForm {
    #[serde(default)]
    current_password: Option<String>,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

async fn password(
    State(s): State<AppState>,
    f: Frame,
    Path(username): Path<String>,
    form: Result<Form<PasswordForm>, FormRejection>,
) -> Response {
    let Form(form) = match form {
        Ok(v) => v,
        Err(r) => return unreadable(&r),
    };
    if form.password != form.confirm {
        let e = ApiError::bad_request("The two new passwords differ; type the same one twice.");
        return user_page(&s, f, &username, None, Some(&e)).await;
    }
    let r = SetPassword {
        password: form.password,
        current_password: form.current_password.filter(|c| !c.is_empty()),
    };
    match change_password(&s, &f.caller, &username, r).await {
        Ok(()) => see_other(&format!("/users/{}?done=password", enc(&username))),
        Err(e) => user_page(&s, f, &username, None, Some(&e)).await,
    }
}

// Shared by the administration pages.

/// A page shown again after a refusal answers with the refusal's status.
pub(super) fn shown(mut resp: Response, error: Option<&ApiError>) -> Response {
    if let Some(e) = error {
        if resp.status() == StatusCode::OK {
            *resp.status_mut() = e.status();
        }
    }
    resp
}

/// A form that could not be read (not a form, or a field of the wrong kind).
pub(super) fn unreadable(r: &FormRejection) -> Response {
    error_page(
        StatusCode::BAD_REQUEST,
        &format!("This form could not be read: {}", r.body_text()),
    )
}

/// The first value of a form's field (empty when absent).
pub(super) fn field(pairs: &[(String, String)], name: &str) -> String {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

/// Every non-empty value of a form's field (checkboxes, multiple selects).
pub(super) fn fields(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, v)| k == name && !v.trim().is_empty())
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_are_fixed_texts() {
        assert!(notice(Some("password")).is_some());
        assert_eq!(notice(Some("<script>")), None);
        assert_eq!(notice(None), None);
    }

    #[test]
    fn repeated_fields_are_all_read() {
        let pairs = vec![
            ("name".to_string(), " a ".to_string()),
            ("p".to_string(), "X".to_string()),
            ("p".to_string(), "".to_string()),
            ("p".to_string(), "Y".to_string()),
        ];
        assert_eq!(field(&pairs, "name"), " a ");
        assert_eq!(field(&pairs, "none"), "");
        assert_eq!(fields(&pairs, "p"), vec!["X", "Y"]);
    }
}
