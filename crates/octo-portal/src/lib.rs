//! The web portal: what people use the server through, in a browser.
//!
//! Server-rendered HTML from askama templates (checked when the crate is
//! compiled, every value escaped), a stylesheet and one small script served by
//! the server itself; nothing is fetched from elsewhere. Layout, after kanidm's
//! `https/views`:
//!
//! - [`gate`]: every page is registered with the [`Access`] it needs; the gate
//!   authenticates the session cookie with the API's own function, resolves
//!   the space in the path, checks the access with the API's rules, and checks
//!   the CSRF token of every form that changes something. A page without an
//!   entry is refused.
//! - [`session`]: the session cookie (HttpOnly, SameSite=Strict, Secure over
//!   TLS) holds a session key like the API's; the CSRF token is derived from it.
//! - [`views`]: one module per area, each listing its pages.
//! - [`assets`]: the stylesheet and the script, with the security headers every
//!   response carries (a Content-Security-Policy without `unsafe-inline`).
//!
//! [`Access`]: octo_server_core::authz::Access

pub mod assets;
pub mod gate;
pub mod session;
pub mod views;

use axum::Router;
use octo_server_core::AppState;

/// The portal's routes, for `octo_server_core::start_with`.
pub fn router(state: AppState) -> Option<Router> {
    Some(gate::router(state))
}
