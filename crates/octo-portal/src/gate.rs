//! The portal's gate: every page is registered with the [`Access`] it needs;
//! [`gate`] authenticates the session cookie (with the API's own
//! `authenticate_key`), resolves the space of the page's path, checks the
//! access with the API's rules and, on every request that changes something,
//! the CSRF token. A signed-out visitor is sent to the login page and back.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::MethodRouter;
use axum::Router;
use axum_extra::extract::CookieJar;
use octo_api_types::Space;
use octo_server_core::api::guard::{authenticate_key, resolve_space, source_of, NamedSpace};
use octo_server_core::authz::{Access, Caller, RequestSpace};
use octo_server_core::AppState;

use crate::session::{csrf_ok, csrf_token, COOKIE, CSRF_FIELD, CSRF_HEADER};
use crate::views;

/// One page: method, path, what it needs, handler.
pub struct Page {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub(crate) handler: MethodRouter<AppState>,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({:?})", self.method, self.path, self.access)
    }
}

/// A GET page.
pub(crate) fn get<H, T>(path: &'static str, access: Access, handler: H) -> Page
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Page {
        method: Method::GET,
        path,
        access,
        handler: axum::routing::get(handler),
    }
}

/// A POST (a form, or a script's request).
pub(crate) fn post<H, T>(path: &'static str, access: Access, handler: H) -> Page
where
    H: Handler<T, AppState>,
    T: 'static,
{
    Page {
        method: Method::POST,
        path,
        access,
        handler: axum::routing::post(handler),
    }
}

type Table = HashMap<(Method, &'static str), Access>;

/// The CSRF token of the request's session, for forms.
#[derive(Debug, Clone)]
pub struct Csrf(pub String);

/// The caller's address (for login throttling and the audit log).
#[derive(Debug, Clone)]
pub struct Source(pub String);

/// The request came over TLS (cookies then are `Secure`).
#[derive(Debug, Clone, Copy)]
pub struct OverTls(pub bool);

/// The portal's pages (what they need), for tests and documentation.
pub fn page_table() -> Vec<(Method, &'static str, Access)> {
    views::pages()
        .into_iter()
        .map(|p| (p.method, p.path, p.access))
        .collect()
}

/// The portal: every page behind the gate, the assets beside it, the security
/// headers on everything.
pub fn router(state: AppState) -> Router {
    let mut pages = Router::new();
    let mut table = Table::new();
    for p in views::pages() {
        table.insert((p.method.clone(), p.path), p.access);
        pages = pages.route(p.path, p.handler);
    }
    pages
        .route_layer(axum::middleware::from_fn_with_state(
            (state.clone(), Arc::new(table)),
            gate,
        ))
        .route("/static/portal.css", axum::routing::get(crate::assets::css))
        .route("/static/portal.js", axum::routing::get(crate::assets::js))
        .layer(axum::middleware::from_fn(crate::assets::headers))
        .with_state(state)
}

/// The space named by a portal path (`/spaces/{space}/...`), undecoded.
fn named_space(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/spaces/")?;
    let raw = rest.split('/').next()?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!decoded.is_empty()).then_some(decoded)
}

/// The gate (see the module documentation).
async fn gate(
    State((state, table)): State<(AppState, Arc<Table>)>,
    req: Request,
    next: Next,
) -> Response {
    match check(&state, &table, req).await {
        Ok(req) => next.run(req).await,
        Err(resp) => resp,
    }
}

async fn check(state: &AppState, table: &Table, mut req: Request) -> Result<Request, Response> {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str())
        .unwrap_or_default();
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    let Some(access) = table.get(&(method.clone(), path)).copied() else {
        tracing::error!("portal page {method} {path} has no access rule; refused");
        return Err(views::error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "This page has no access rule, so it is refused.",
        ));
    };
    let over_tls = req
        .extensions()
        .get::<octo_server_core::api::guard::OverTls>()
        .is_some();
    req.extensions_mut().insert(OverTls(over_tls));
    let source = source_of(&req);
    req.extensions_mut().insert(Source(source.clone()));
    let named = named_space(req.uri().path());
    let space: Space = resolve_space(state, named.clone().map(NamedSpace).as_ref())
        .await
        .map_err(|e| views::error_page(e.status(), &e.message))?;
    req.extensions_mut().insert(RequestSpace(space.clone()));
    if access == Access::Public {
        return Ok(req);
    }
    let jar = CookieJar::from_headers(req.headers());
    let key = jar.get(COOKIE).map(|c| c.value().to_string());
    let caller: Option<Caller> = match &key {
        Some(k) if !k.is_empty() => authenticate_key(state, k, source)
            .await
            .map_err(|e| views::error_page(e.status(), &e.message))?,
        _ => None,
    };
    let (Some(caller), Some(key)) = (caller, key) else {
        return Err(to_login(&req));
    };
    if named.is_some() && !space.is_default && !caller.grants.reaches(space.id) {
        return Err(views::error_page(
            StatusCode::NOT_FOUND,
            &format!("Space '{}' does not exist.", space.name),
        ));
    }
    if let Err(e) = caller.require(access, &space) {
        return Err(views::error_page(e.status(), &e.message));
    }
    let req = if method == Method::GET {
        req
    } else {
        check_csrf(req, &key).await?
    };
    let mut req = req;
    req.extensions_mut().insert(Csrf(csrf_token(&key)));
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// Signed out: to the login page, and back here afterwards.
fn to_login(req: &Request) -> Response {
    let here = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let next = percent_encoding::utf8_percent_encode(&here, percent_encoding::NON_ALPHANUMERIC);
    Redirect::to(&format!("/login?next={next}")).into_response()
}

/// Largest form the gate reads to find its token.
const MAX_FORM: usize = 1 << 20;

/// The CSRF token, from the header (scripts, uploads) or the form's field.
async fn check_csrf(req: Request, key: &str) -> Result<Request, Response> {
    // A browser that says the request comes from another site: refused even
    // with a token (defence in depth; the token alone already stops forms of
    // other sites, and some browsers send no such header).
    let cross_site = req
        .headers()
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("cross-site"));
    if cross_site {
        return Err(views::error_page(
            StatusCode::FORBIDDEN,
            "This request was sent from another site, so it is refused. Use the portal's own pages.",
        ));
    }
    let refused = || {
        views::error_page(
            StatusCode::FORBIDDEN,
            "This form's security token is missing or wrong (a form sent from another site, or a page left open since you signed in again). Go back, reload the page and try again.",
        )
    };
    if let Some(token) = req.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
        return if csrf_ok(key, token) {
            Ok(req)
        } else {
            Err(refused())
        };
    }
    let is_form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return Err(refused());
    }
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_FORM)
        .await
        .map_err(|_| views::error_page(StatusCode::PAYLOAD_TOO_LARGE, "This form is too large."))?;
    let token = form_urlencoded_value(&bytes, CSRF_FIELD);
    if !token.is_some_and(|t| csrf_ok(key, &t)) {
        return Err(refused());
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The first value of `field` in a urlencoded form.
fn form_urlencoded_value(body: &[u8], field: &str) -> Option<String> {
    serde_urlencoded_pairs(body)
        .into_iter()
        .find(|(k, _)| k == field)
        .map(|(_, v)| v)
}

fn serde_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &[u8]| {
        let plus: Vec<u8> = s
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&plus)
            .decode_utf8_lossy()
            .into_owned()
    };
    body.split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => (decode(&p[..i]), decode(&p[i + 1..])),
            None => (decode(p), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_come_from_the_path() {
        assert_eq!(
            named_space("/spaces/Ops%20Team/targets").as_deref(),
            Some("Ops Team")
        );
        assert_eq!(named_space("/spaces/Default/").as_deref(), Some("Default"));
        assert_eq!(named_space("/login"), None);
        assert_eq!(named_space("/spaces//x"), None);
    }

    #[test]
    fn form_fields_are_decoded() {
        let body = b"name=a+b%26c&csrf=abc123&x";
        assert_eq!(
            form_urlencoded_value(body, "csrf").as_deref(),
            Some("abc123")
        );
        assert_eq!(
            form_urlencoded_value(body, "name").as_deref(),
            Some("a b&c")
        );
        assert_eq!(form_urlencoded_value(body, "x").as_deref(), Some(""));
        assert_eq!(form_urlencoded_value(body, "y"), None);
    }
}
