//! The audit log of a space (with `EventView`): who changed what, when, from
//! where, newest first; filtered by user and time (a date and time, or the
//! last hour, day or week), a page at a time. Holders of `EventView` in every
//! space also see the changes outside any space (users, roles, spaces, keys):
//! the API's rule, in its own service function
//! (`octo_server_core::api::audit::audit_events`).

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Response;
use octo_api_types::Permission;
use octo_server_core::api::audit::{audit_events, AuditSelection};
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::users::shown;
use super::{enc, render, when, Frame};
use crate::gate::{get, Page};

pub(crate) fn pages() -> Vec<Page> {
    vec![get(
        "/spaces/{space}/audit",
        Access::Space(Permission::EventView),
        list,
    )]
}

/// Events per page unless the page says otherwise, and the most.
const DEFAULT_TAKE: i64 = 50;
const MAX_TAKE: i64 = 500;

/// The filters and the page, as the query has them (text, so that a wrong
/// value is shown as a message rather than refused outright).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    user: Option<String>,
    /// `YYYY-MM-DDTHH:MM` (a `datetime-local` input), UTC.
    #[serde(default)]
    since: Option<String>,
    /// "hour", "day" or "week": the last one.
    #[serde(default)]
    within: Option<String>,
    #[serde(default)]
    skip: Option<String>,
    #[serde(default)]
    take: Option<String>,
}

/// The relative choices: value, words, milliseconds.
const WITHIN: [(&str, &str, i64); 3] = [
    ("hour", "The last hour", 3_600_000),
    ("day", "The last day", 86_400_000),
    ("week", "The last week", 7 * 86_400_000),
];

struct Choice {
    value: &'static str,
    label: &'static str,
    selected: bool,
}

struct EventRow {
    at: String,
    username: String,
    source: String,
    action: String,
    kind: String,
    object: String,
    space: String,
    details: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    f: Frame,
    events: Vec<EventRow>,
    user: String,
    since: String,
    within: Vec<Choice>,
    takes: Vec<(i64, bool)>,
    newer: Option<String>,
    older: Option<String>,
    /// Which events these are ("21 to 40").
    range: String,
    with_system: bool,
    error: Option<String>,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A `datetime-local` value (`2026-12-04T21:30`, seconds optional), as UTC,
/// in Unix milliseconds.
fn parse_local(text: &str) -> Option<i64> {
    let (date, time) = text.trim().split_once(['T', ' '])?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let h = t.next()?.parse::<i64>().ok()?;
    let mi = t.next()?.parse::<i64>().ok()?;
    let sec = match t.next() {
        Some(s) => s.split('.').next()?.parse::<i64>().ok()?,
        None => 0,
    };
    let valid = (1..=12).contains(&mo)
        && (1..=31).contains(&day)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0..60).contains(&sec);
    valid.then(|| (days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec) * 1000)
}

/// The query's selection, or what is wrong with it.
fn selection(q: &AuditQuery, now: i64) -> Result<AuditSelection, ApiError> {
    let number = |v: &Option<String>, name: &str, default: i64| -> Result<i64, ApiError> {
        match v.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(default),
            Some(t) => t
                .parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("'{t}' is not a number ({name})."))),
        }
    };
    let skip = number(&q.skip, "skip", 0)?.max(0);
    let take = number(&q.take, "take", DEFAULT_TAKE)?.clamp(1, MAX_TAKE);
    let mut since = None;
    if let Some(text) = q.since.as_deref().filter(|t| !t.trim().is_empty()) {
        since = Some(parse_local(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "'{text}' is not a date and time (YYYY-MM-DD HH:MM, UTC)."
            ))
        })?);
    }
    if let Some(w) = q.within.as_deref().filter(|t| !t.is_empty()) {
        let (_, _, ms) = WITHIN
            .iter()
            .find(|(v, _, _)| *v == w)
            .ok_or_else(|| ApiError::bad_request("Choose the last hour, day or week."))?;
        since = Some(since.unwrap_or(i64::MIN).max(now - ms));
    }
    Ok(AuditSelection {
        user: q
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string),
        since,
        skip,
        // One more than shown: whether there is an older page.
        limit: take + 1,
    })
}

/// The link to another page of the same filters.
fn link(f: &Frame, q: &AuditQuery, skip: i64, take: i64) -> String {
    let mut parts = Vec::new();
    for (name, value) in [
        ("user", &q.user),
        ("since", &q.since),
        ("within", &q.within),
    ] {
        if let Some(v) = value.as_deref().filter(|v| !v.trim().is_empty()) {
            parts.push(format!("{name}={}", enc(v.trim())));
        }
    }
    parts.push(format!("take={take}"));
    parts.push(format!("skip={skip}"));
    f.href(&format!("/audit?{}", parts.join("&")))
}

async fn list(State(s): State<AppState>, f: Frame, Query(q): Query<AuditQuery>) -> Response {
    let f = f.titled("Audit log", "audit");
    let picked = selection(&q, octo_store::now_ms());
    let (skip, take) = picked
        .as_ref()
        .map(|p| (p.skip, p.limit - 1))
        .unwrap_or((0, DEFAULT_TAKE));
    let result = match picked {
        Ok(sel) => audit_events(&s, &f.caller, &f.space, &sel).await,
        Err(e) => Err(e),
    };
    let (mut events, error) = match result {
        Ok(v) => (v, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let more = events.len() as i64 > take;
    events.truncate(usize::try_from(take).unwrap_or(0));
    let range = if events.is_empty() {
        String::new()
    } else {
        format!("{} to {}", skip + 1, skip + events.len() as i64)
    };
    let within = q.within.as_deref().unwrap_or_default();
    let page = AuditPage {
        events: events
            .into_iter()
            .map(|e| EventRow {
                at: when(Some(e.at)),
                username: e.username,
                source: e.source,
                action: e.action,
                kind: e.kind,
                object: e.object,
                space: e.space.unwrap_or_else(|| "outside any space".into()),
                details: e.details,
            })
            .collect(),
        user: q.user.clone().unwrap_or_default(),
        since: q.since.clone().unwrap_or_default(),
        within: WITHIN
            .iter()
            .map(|(value, label, _)| Choice {
                value,
                label,
                selected: *value == within,
            })
            .collect(),
        takes: {
            let mut sizes = vec![25, 50, 100, 200, MAX_TAKE];
            if !sizes.contains(&take) {
                sizes.push(take);
                sizes.sort_unstable();
            }
            sizes.into_iter().map(|n| (n, n == take)).collect()
        },
        newer: (skip > 0).then(|| link(&f, &q, (skip - take).max(0), take)),
        older: more.then(|| link(&f, &q, skip + take, take)),
        range,
        with_system: f.caller.grants.has_system(Permission::EventView),
        error: error.as_ref().map(|e| e.message.clone()),
        f,
    };
    shown(render(&page), error.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_times_are_utc() {
        assert_eq!(parse_local("1970-01-01T00:00"), Some(0));
        assert_eq!(parse_local("2026-12-04T22:30:05"), Some(1_796_423_405_000));
        assert_eq!(parse_local("2026-12-04 22:30"), Some(1_796_423_400_000));
        assert_eq!(parse_local("2026-13-04T22:30"), None);
        assert_eq!(parse_local("yesterday"), None);
        assert_eq!(
            when(parse_local("2000-02-29T12:00")),
            "2000-02-29 12:00:00 UTC"
        );
    }

    #[test]
    fn the_query_picks_the_events() {
        let q = AuditQuery {
            user: Some(" alice ".into()),
            within: Some("hour".into()),
            skip: Some("20".into()),
            take: Some("10".into()),
            ..Default::default()
        };
        let sel = selection(&q, 10_000_000).unwrap_or_default();
        assert_eq!(sel.user.as_deref(), Some("alice"));
        assert_eq!(sel.since, Some(10_000_000 - 3_600_000));
        assert_eq!((sel.skip, sel.limit), (20, 11));
        let bad = AuditQuery {
            within: Some("year".into()),
            ..Default::default()
        };
        assert!(selection(&bad, 0).is_err());
        let bad = AuditQuery {
            skip: Some("x".into()),
            ..Default::default()
        };
        assert!(selection(&bad, 0).is_err());
    }
}
