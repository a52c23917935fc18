//! The portal's pages, one module per area (after kanidm's `https/views`):
//! each lists its pages ([`crate::gate::Page`]) with what they need, and
//! renders askama templates from `templates/` (every value escaped).
//!
//! [`Frame`] is what every page shows around its content: the signed-in user,
//! the space and the switcher, the navigation the user's permissions allow,
//! and the CSRF token for its forms.

pub mod api_keys;
pub mod audit;
pub mod console;
pub mod dashboard;
pub mod environments;
pub mod login;
pub mod packages;
pub mod roles;
pub mod spaces;
pub mod targets;
pub mod tasks;
pub mod teams;
pub mod users;
pub mod workers;

use askama::Template;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use octo_api_types::{Permission, Space};
use octo_server_core::api::ApiError;
use octo_server_core::authz::{Caller, RequestSpace};
use octo_server_core::AppState;

use crate::gate::{Csrf, Page};

/// Every page of the portal.
pub fn pages() -> Vec<Page> {
    let mut all = Vec::new();
    for area in [
        login::pages(),
        dashboard::pages(),
        targets::pages(),
        workers::pages(),
        environments::pages(),
        tasks::pages(),
        console::pages(),
        packages::pages(),
        spaces::pages(),
        users::pages(),
        teams::pages(),
        roles::pages(),
        api_keys::pages(),
        audit::pages(),
    ] {
        all.extend(area);
    }
    all
}

/// What a path segment or query value keeps as is: letters, digits and the
/// unreserved `-._~` (RFC 3986); everything else is percent-encoded.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment, percent-encoded (for links built from names).
pub fn enc(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// What the navigation shows, from the caller's permissions in the space.
#[derive(Debug, Clone, Default)]
pub struct Nav {
    pub targets: bool,
    pub environments: bool,
    pub tasks: bool,
    pub console: bool,
    pub packages: bool,
    pub teams: bool,
    pub audit: bool,
    pub users: bool,
    pub roles: bool,
    pub spaces: bool,
}

/// Around every page: who, where, what they may open, the form token.
#[derive(Debug, Clone)]
pub struct Frame {
    pub title: String,
    /// Which navigation entry is this page's.
    pub active: &'static str,
    pub display_name: String,
    pub username: String,
    pub space: Space,
    /// The spaces the caller can switch to.
    pub spaces: Vec<Space>,
    /// `/spaces/<space>`, for links.
    pub base: String,
    pub csrf: String,
    pub nav: Nav,
    pub caller: Caller,
}

impl Frame {
    /// This frame with a page title and navigation entry.
    pub fn titled(mut self, title: impl Into<String>, active: &'static str) -> Self {
        self.title = title.into();
        self.active = active;
        self
    }

    /// Whether the caller holds `p` in this space (for some environments at least).
    pub fn may(&self, p: Permission) -> bool {
        self.caller.grants.has_in_space(p, self.space.id)
    }

    /// The link of a space's page, e.g. `href("/targets")`.
    pub fn href(&self, rest: &str) -> String {
        format!("{}{rest}", self.base)
    }
}

impl FromRequestParts<AppState> for Frame {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let missing = || {
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "This page was reached without its session.",
            )
        };
        let caller = parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(missing)?;
        let RequestSpace(space) = parts
            .extensions
            .get::<RequestSpace>()
            .cloned()
            .ok_or_else(missing)?;
        let Csrf(csrf) = parts
            .extensions
            .get::<Csrf>()
            .cloned()
            .ok_or_else(missing)?;
        let spaces = s
            .store
            .list_spaces()
            .await
            .map_err(|e| error_page(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))?
            .into_iter()
            .filter(|sp| sp.is_default || caller.grants.reaches(sp.id))
            .collect();
        let g = &caller.grants;
        let has = |p: Permission| g.has_in_space(p, space.id);
        let nav = Nav {
            targets: has(Permission::MachineView),
            environments: has(Permission::EnvironmentView),
            tasks: has(Permission::TaskView),
            console: has(Permission::TaskCreate),
            packages: has(Permission::FeedView),
            teams: has(Permission::TeamView),
            audit: has(Permission::EventView),
            users: g.has_system(Permission::UserView),
            roles: g.has_system(Permission::UserRoleView),
            spaces: g.has_system(Permission::SpaceCreate),
        };
        Ok(Frame {
            title: String::new(),
            active: "",
            display_name: caller.user.display_name.clone(),
            username: caller.user.username.clone(),
            base: format!("/spaces/{}", enc(&space.name)),
            space,
            spaces,
            csrf,
            nav,
            caller,
        })
    }
}

/// Renders a template, or an error page saying what failed.
pub fn render<T: Template>(t: &T) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!("rendering a page: {e}");
            error_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("This page could not be shown: {e}"),
            )
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    reason: &'a str,
    message: &'a str,
}

/// A page saying what went wrong (signed in or not: no navigation).
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let page = ErrorPage {
        status: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("Error"),
        message,
    };
    let html = page
        .render()
        .unwrap_or_else(|_| "An error occurred, and so did showing it.".to_string());
    (status, Html(html)).into_response()
}

/// An API error as a page.
pub fn api_error(e: &ApiError) -> Response {
    error_page(e.status(), &e.message)
}

/// Where a form goes after it did its work (303: the browser then GETs it).
pub fn see_other(location: &str) -> Response {
    axum::response::Redirect::to(location).into_response()
}

/// A machine's health as the portal shows it: a class, an icon and the word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub class: &'static str,
    pub icon: &'static str,
    pub word: &'static str,
}

impl Health {
    pub const ALL: [Health; 5] = [
        Health {
            class: "healthy",
            icon: "\u{2714}",
            word: "Healthy",
        },
        Health {
            class: "warnings",
            icon: "\u{26a0}",
            word: "Healthy with warnings",
        },
        Health {
            class: "unhealthy",
            icon: "\u{2716}",
            word: "Unhealthy",
        },
        Health {
            class: "unavailable",
            icon: "\u{2298}",
            word: "Unavailable",
        },
        Health {
            class: "unknown",
            icon: "?",
            word: "Unknown",
        },
    ];

    /// The machine's health.
    pub fn of(m: &octo_api_types::Machine) -> Health {
        use octo_api_types::HealthStatus as H;
        match m.status {
            H::Healthy if m.status_reason.is_empty() => Self::ALL[0],
            H::Healthy => Self::ALL[1],
            H::Unhealthy => Self::ALL[2],
            H::Unavailable => Self::ALL[3],
            H::Unknown => Self::ALL[4],
        }
    }

    /// The health named by a filter's value (its class).
    pub fn named(class: &str) -> Option<Health> {
        Self::ALL.into_iter().find(|h| h.class == class)
    }
}

/// A time (Unix ms) for people: "2026-12-04 21:30:05 UTC", or "never".
pub fn when(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02} UTC")
}

/// A duration between two times (Unix ms) for people: "1.2 s", "3 min 4 s".
pub fn took(start: Option<i64>, end: Option<i64>) -> String {
    let (Some(a), Some(b)) = (start, end) else {
        return String::new();
    };
    let ms = (b - a).max(0);
    if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_dates() {
        assert_eq!(when(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(Some(1_796_423_405_000)), "2026-12-04 22:30:05 UTC");
        assert_eq!(when(None), "never");
        assert_eq!(took(Some(1_000), Some(2_250)), "1.2 s");
        assert_eq!(took(Some(0), Some(185_000)), "3 min 5 s");
    }

    #[test]
    fn names_in_links_are_encoded_but_readable() {
        assert_eq!(enc("ServerTasks-12"), "ServerTasks-12");
        assert_eq!(enc("web_1.example~x"), "web_1.example~x");
        assert_eq!(enc("a b/c?d#e&f"), "a%20b%2Fc%3Fd%23e%26f");
        assert_eq!(enc("<img src=x>"), "%3Cimg%20src%3Dx%3E");
    }
}
