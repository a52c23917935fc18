//! Signing in and out, the space switcher, and `/`.
//!
//! The login form carries a token that must match a cookie set with the form
//! (so another site cannot sign a visitor in to an account of its choosing);
//! signing in opens a session like the API's login, kept in an HttpOnly,
//! SameSite=Strict cookie; signing out revokes it.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use axum_extra::extract::cookie::{Cookie, SameSite};
use axum_extra::extract::CookieJar;
use octo_api_types::Login;
use octo_server_core::api::users::do_login;
use octo_server_core::authz::{Access, Caller};
use octo_server_core::AppState;
use serde::Deserialize;

use super::{enc, error_page, render, see_other};
use crate::gate::{get, post, OverTls, Page, Source};
use crate::session;

/// The cookie holding the login form's token.
const LOGIN_COOKIE: &str = "octopus_login";

pub(crate) fn pages() -> Vec<Page> {
    vec![
        get("/login", Access::Public, login_form),
        post("/login", Access::Public, login),
        post("/logout", Access::Authenticated, logout),
        get("/switch", Access::Authenticated, switch),
        get("/", Access::Authenticated, home),
    ]
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    next: String,
    username: String,
    token: String,
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Next {
    #[serde(default)]
    next: Option<String>,
}

/// Only a path of this site: never another site (`//evil`, `https://...`).
fn local(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

fn random_token() -> String {
    let bytes: [u8; 16] = rand_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn rand_bytes() -> [u8; 16] {
    // The API key generator is the server's source of randomness.
    let key = octo_server_core::auth::new_api_key();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn login_cookie(token: &str, secure: bool) -> Cookie<'static> {
    let mut c = Cookie::new(LOGIN_COOKIE, token.to_string());
    c.set_http_only(true);
    c.set_same_site(SameSite::Strict);
    c.set_secure(secure);
    c.set_path("/login");
    c
}

async fn login_form(
    Extension(OverTls(tls)): Extension<OverTls>,
    jar: CookieJar,
    Query(q): Query<Next>,
) -> Response {
    let token = random_token();
    let page = LoginPage {
        next: local(q.next.as_deref()),
        username: String::new(),
        token: token.clone(),
        error: None,
    };
    (jar.add(login_cookie(&token, tls)), render(&page)).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    token: String,
}

async fn login(
    State(s): State<AppState>,
    Extension(OverTls(tls)): Extension<OverTls>,
    Extension(Source(source)): Extension<Source>,
    jar: CookieJar,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "The login form was incomplete: give a user name and a password.",
        );
    };
    let next = local(form.next.as_deref());
    let expected = jar.get(LOGIN_COOKIE).map(|c| c.value().to_string());
    let again = |error: String, status: StatusCode| {
        let token = random_token();
        let page = LoginPage {
            next: next.clone(),
            username: form.username.clone(),
            token: token.clone(),
            error: Some(error),
        };
        (
            status,
            jar.clone().add(login_cookie(&token, tls)),
            render(&page),
        )
            .into_response()
    };
    if expected
        .as_deref()
        .is_none_or(|t| t.is_empty() || t != form.token)
    {
        return again(
            "The login form had expired; sign in again.".into(),
            StatusCode::FORBIDDEN,
        );
    }
    let login = Login {
        username: form.username.trim().to_string(),
        password: form.password.clone(),
    };
    match do_login(&s, &login, &source).await {
        Ok(reply) => {
            let jar = jar
                .remove(login_cookie("", tls))
                .add(session::open(reply.api_key, tls));
            (jar, see_other(&next)).into_response()
        }
        Err((e, retry)) => {
            let mut resp = again(e.message.clone(), e.status());
            if let Some(secs) = retry {
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    resp.headers_mut().insert(header::RETRY_AFTER, v);
                }
            }
            resp
        }
    }
}

/// Signs out: the session key is revoked, the cookie cleared.
async fn logout(
    State(s): State<AppState>,
    Extension(OverTls(tls)): Extension<OverTls>,
    Extension(caller): Extension<Caller>,
    jar: CookieJar,
) -> Response {
    if let Err(e) = s.store.revoke_api_key(caller.key.id).await {
        tracing::warn!("revoking the session of {}: {e}", caller.user.username);
    }
    (jar.add(session::close(tls)), see_other("/login")).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct Switch {
    space: String,
}

async fn switch(Query(q): Query<Switch>) -> Response {
    see_other(&format!("/spaces/{}/", enc(q.space.trim())))
}

async fn home(Extension(space): Extension<octo_server_core::authz::RequestSpace>) -> Response {
    see_other(&format!("/spaces/{}/", enc(&space.0.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(
            local(Some("/spaces/Default/targets?x=1")),
            "/spaces/Default/targets?x=1"
        );
        for evil in [
            "//evil.example/",
            "https://evil.example/",
            "javascript:alert(1)",
            "/\\evil",
        ] {
            assert_eq!(local(Some(evil)), "/", "{evil}");
        }
        assert_eq!(local(None), "/");
    }
}
