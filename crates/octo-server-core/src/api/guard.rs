//! The one gate in front of every route: the route table says what each route
//! needs ([`Access`]); [`guard`] authenticates the caller, resolves the
//! request's space and checks the access before the handler runs, and
//! [`in_space`] serves `/api/spaces/{space}/...` as the same routes in that space.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use octo_api_types::{Space, API_KEY_HEADER, DEFAULT_SPACE_ID};
use octo_store::now_ms;

use super::ApiError;
use crate::auth::hash_api_key;
use crate::authz::{Access, Caller, Grants, RequestSpace};
use crate::state::AppState;

/// One route: its method and path, what it needs, and its handler.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub(crate) handler: MethodRouter<AppState>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({:?})", self.method, self.path, self.access)
    }
}

macro_rules! method_fn {
    ($name:ident, $method:ident, $axum:ident) => {
        /// A route of this method.
        pub(crate) fn $name<H, T>(path: &'static str, access: Access, handler: H) -> Route
        where
            H: Handler<T, AppState>,
            T: 'static,
        {
            Route {
                method: Method::$method,
                path,
                access,
                handler: axum::routing::$axum(handler),
            }
        }
    };
}

method_fn!(get, GET, get);
method_fn!(post, POST, post);
method_fn!(put, PUT, put);
method_fn!(delete, DELETE, delete);

/// What each route needs, by method and path.
pub(crate) type Table = HashMap<(Method, &'static str), Access>;

/// The space a request named in its path (`/api/spaces/{space}/...`), before it
/// is resolved.
#[derive(Debug, Clone)]
pub struct NamedSpace(pub String);

/// A request that came over the TLS port (from a client without a certificate).
pub use octo_comms::HttpOverTls as OverTls;

/// The caller's address, for the audit log and login throttling.
pub fn source_of(req: &Request) -> String {
    if let Some(c) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        return c.0.ip().to_string();
    }
    match req.extensions().get::<OverTls>() {
        Some(t) => t.remote.ip().to_string(),
        None => "unknown".into(),
    }
}

/// The space a page or request names (its name, any case, `Spaces-N` or its id;
/// None: the default space), or 404 as if it did not exist.
pub async fn resolve_space(
    state: &AppState,
    named: Option<&NamedSpace>,
) -> Result<Space, ApiError> {
    let Some(NamedSpace(name)) = named else {
        return space_by_id(state, DEFAULT_SPACE_ID)
            .await?
            .ok_or_else(|| ApiError::internal("the default space is missing from the database"));
    };
    let by_id = name
        .strip_prefix("Spaces-")
        .and_then(|n| n.parse::<i64>().ok());
    let found = match by_id {
        Some(id) => space_by_id(state, id).await?,
        None => space_by_name(state, name.trim()).await?,
    };
    // A bare number is the space's id (as `Space.id` shows it), unless a
    // space is named so.
    let found = match (found, name.trim().parse::<i64>()) {
        (None, Ok(id)) if by_id.is_none() => space_by_id(state, id).await?,
        (found, _) => found,
    };
    found.ok_or_else(|| space_not_found(name))
}

/// The space with this name, from the cache or the store.
async fn space_by_name(state: &AppState, name: &str) -> Result<Option<Space>, ApiError> {
    if let Some(space) = state.space_cache.get_by_name(name) {
        return Ok(Some(space));
    }
    let found = state.store.space_by_name(name).await?;
    if let Some(space) = &found {
        state.space_cache.put(space);
    }
    Ok(found)
}

/// The space with this id, from the cache or the store.
async fn space_by_id(state: &AppState, id: i64) -> Result<Option<Space>, ApiError> {
    if let Some(space) = state.space_cache.get(id) {
        return Ok(Some(space));
    }
    let found = state.store.space_by_id(id).await?;
    if let Some(space) = &found {
        state.space_cache.put(space);
    }
    Ok(found)
}

pub fn space_not_found(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "space '{name}' does not exist; `GET /api/spaces` lists the spaces you can see"
    ))
}

/// Authenticates a request's API key or session key; 401 (saying nothing
/// more) without a valid one.
pub(crate) async fn authenticate(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    source: String,
) -> Result<Caller, ApiError> {
    let unauthorized = || {
        ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            format!("authentication required: send a valid API key in the {API_KEY_HEADER} header"),
        )
    };
    let key = headers
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(unauthorized)?;
    authenticate_key(state, key, source)
        .await?
        .ok_or_else(unauthorized)
}

/// The caller a key (API key or session key) belongs to, with their grants;
/// None when the key is not valid (unknown, revoked, expired, user disabled).
/// The portal authenticates its session cookie with this too.
pub async fn authenticate_key(
    state: &AppState,
    key: &str,
    source: String,
) -> Result<Option<Caller>, ApiError> {
    let idle_ms = i64::try_from(state.session_idle.as_millis()).unwrap_or(i64::MAX);
    let Some((key, user)) = state
        .store
        .authenticate_api_key(&hash_api_key(key.trim()), now_ms(), idle_ms)
        .await?
    else {
        return Ok(None);
    };
    let grants = match state.grant_cache.get(user.id) {
        Some(g) => g,
        None => {
            let grants = state.store.grants_of_user(user.id).await?;
            let custom = state.store.list_roles().await?;
            let resolved = Arc::new(Grants::resolve(&grants, &custom));
            state.grant_cache.put(user.id, resolved.clone());
            resolved
        }
    };
    Ok(Some(Caller {
        user,
        key,
        grants,
        source,
    }))
}

/// The gate (see the module documentation).
pub(crate) async fn guard(
    State((state, table)): State<(AppState, Arc<Table>)>,
    mut req: Request,
    next: Next,
) -> Response {
    match check(&state, &table, &mut req).await {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn check(state: &AppState, table: &Table, req: &mut Request) -> Result<(), ApiError> {
    let Some(path) = req.extensions().get::<MatchedPath>().map(|p| p.as_str()) else {
        return Err(ApiError::internal("a route was reached without its path"));
    };
    // HEAD is served as GET.
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    let Some(access) = table.get(&(method, path)).copied() else {
        // A method the route does not serve (TRACE, PATCH, OPTIONS...): axum
        // lets it reach the route's layers, so it is refused here, with what is
        // allowed. A route without any rule would be a bug: refused all the same.
        let allowed = allowed_methods(table, path);
        if allowed.is_empty() {
            tracing::error!("{} {path} has no access rule; refused", req.method());
        }
        return Err(ApiError::method_not_allowed(req.method(), path, &allowed));
    };
    let named = req.extensions().get::<NamedSpace>().cloned();
    let space = resolve_space(state, named.as_ref()).await?;
    if access != Access::Public {
        let source = source_of(req);
        let caller = authenticate(state, req.headers(), source).await?;
        // A space the caller has nothing in is, to them, not there (the
        // default space, which every server has, excepted).
        if named.is_some() && !space.is_default && !caller.grants.reaches(space.id) {
            return Err(space_not_found(&space.name));
        }
        caller.require(access, &space)?;
        req.extensions_mut().insert(caller);
    }
    req.extensions_mut().insert(RequestSpace(space));
    Ok(())
}

/// The methods the route table has for `path`, as an `Allow` header lists them.
fn allowed_methods(table: &Table, path: &str) -> String {
    let mut methods: Vec<&str> = table
        .keys()
        .filter(|(_, p)| *p == path)
        .map(|(m, _)| m.as_str())
        .collect();
    if methods.contains(&"GET") {
        methods.push("HEAD");
    }
    methods.sort_unstable();
    methods.join(",")
}

/// Serves `/api/spaces/{space}/REST` as `/api/REST` in that space: rewrites
/// the request before it is routed (so its path parameters are the route's
/// own), noting the space for the guard. Other requests pass unchanged.
pub(crate) fn in_space(mut req: Request) -> Request {
    let path = req.uri().path();
    let Some(after) = path.strip_prefix("/api/spaces/") else {
        return req;
    };
    let Some((raw_space, rest)) = after.split_once('/') else {
        return req;
    };
    let Some(space) = percent_decode(raw_space).filter(|s| !s.is_empty()) else {
        return req;
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let Ok(uri) = format!("/api/{rest}{query}").parse::<Uri>() else {
        return req;
    };
    *req.uri_mut() = uri;
    req.extensions_mut().insert(NamedSpace(space));
    req
}

/// `%XX`-decodes a path segment; None when the result is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn space_segments_are_decoded() {
        assert_eq!(percent_decode("Ops%20Team").as_deref(), Some("Ops Team"));
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%zz").as_deref(), Some("bad%zz"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%FF"), None);
        assert_eq!(percent_decode("end%4").as_deref(), Some("end%4"));
    }
}
