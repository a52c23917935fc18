//! A space's workers: its worker pools (counted as `GET /api/worker-pools`
//! counts them) and the workers, with the targets list's filters and paging
//! (the API's own `machine_page`, limited to workers). A worker's page is the
//! target page, which serves workers too.

use askama::Template;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use octo_api_types::{EndpointKind, Machine, Permission};
use octo_server_core::api::machines::{machine_page, pools_of, MachineQuery};
use octo_server_core::api::ApiError;
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::console::given;
use super::{api_error, enc, render, when, Frame, Health};
use crate::gate::{get, Page};

pub(crate) fn pages() -> Vec<Page> {
    vec![get(
        "/spaces/{space}/workers",
        Access::Space(Permission::MachineView),
        list,
    )]
}

/// Workers per page (as the targets list).
const PAGE: i64 = 50;

/// The list's filters and paging, as the targets list has them (`page` from 1).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Filters {
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    health: String,
    #[serde(default)]
    style: String,
    #[serde(default)]
    page: Option<i64>,
}

impl Filters {
    fn query(&self, skip: i64) -> MachineQuery {
        MachineQuery {
            name: given(&self.name),
            role: given(&self.role),
            health: given(&self.health),
            style: given(&self.style),
            workers: Some(true),
            skip: Some(skip),
            take: Some(PAGE),
            ..MachineQuery::default()
        }
    }

    /// The query string of these filters (without the page).
    fn qs(&self) -> String {
        [
            ("name", &self.name),
            ("role", &self.role),
            ("health", &self.health),
            ("style", &self.style),
        ]
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v.trim())))
        .collect::<Vec<_>>()
        .join("&")
    }

    fn any(&self) -> bool {
        !self.qs().is_empty()
    }
}

struct PoolRow {
    name: String,
    workers: u32,
}

struct WorkerRow {
    name: String,
    href: String,
    pool: String,
    health: Health,
    reason: String,
    style: &'static str,
    tentacle_version: String,
    tool_version: String,
    checked: String,
    disabled: bool,
}

impl WorkerRow {
    fn of(f: &Frame, m: &Machine) -> WorkerRow {
        WorkerRow {
            name: m.name.clone(),
            href: f.href(&format!("/targets/{}", enc(&m.name))),
            pool: m.worker_pool.clone().unwrap_or_default(),
            health: Health::of(m),
            reason: m.status_reason.clone(),
            style: match m.kind {
                EndpointKind::Listening => "Listening",
                EndpointKind::Polling => "Polling",
            },
            tentacle_version: m.tentacle_version.clone().unwrap_or_default(),
            tool_version: m.tool_version.clone().unwrap_or_default(),
            checked: when(m.last_health_at),
            disabled: m.disabled,
        }
    }
}

#[derive(Template)]
#[template(path = "workers.html")]
struct WorkersPage {
    f: Frame,
    pools: Vec<PoolRow>,
    workers: Vec<WorkerRow>,
    filters: Filters,
    healths: [Health; 5],
    total: i64,
    first: i64,
    last: i64,
    prev: Option<String>,
    next: Option<String>,
    error: Option<String>,
}

async fn list(
    State(s): State<AppState>,
    f: Frame,
    q: Result<Query<Filters>, QueryRejection>,
) -> Response {
    let f = f.titled("Workers", "workers");
    let (filters, mut error) = match q {
        Ok(Query(q)) => (q, None),
        Err(e) => (Filters::default(), Some(ApiError::from(e))),
    };
    let pools = match pools(&s, &f).await {
        Ok(p) => p,
        Err(e) => return api_error(&e),
    };
    let page = filters.page.unwrap_or(1).max(1);
    let skip = (page - 1).saturating_mul(PAGE);
    let (machines, total) = if error.is_some() {
        (Vec::new(), 0)
    } else {
        match machine_page(&s, &f.caller, &f.space, &filters.query(skip)).await {
            Ok(page) => page,
            Err(e) => {
                error = Some(e);
                (Vec::new(), 0)
            }
        }
    };
    let workers: Vec<WorkerRow> = machines.iter().map(|m| WorkerRow::of(&f, m)).collect();
    let qs = filters.qs();
    let link = |p: i64| {
        let sep = if qs.is_empty() { "" } else { "&" };
        f.href(&format!("/workers?{qs}{sep}page={p}"))
    };
    let first = if workers.is_empty() { 0 } else { skip + 1 };
    let last = skip + i64::try_from(workers.len()).unwrap_or(0);
    let status = error.as_ref().map(|e| e.status()).unwrap_or(StatusCode::OK);
    let page = WorkersPage {
        prev: (page > 1).then(|| link(page - 1)),
        next: (last < total).then(|| link(page + 1)),
        f,
        pools,
        workers,
        filters,
        healths: Health::ALL,
        total,
        first,
        last,
        error: error.map(|e| e.message),
    };
    (status, render(&page)).into_response()
}

/// The space's worker pools with how many workers (that the caller may see)
/// each has, by name, as `GET /api/worker-pools` counts them.
async fn pools(s: &AppState, f: &Frame) -> Result<Vec<PoolRow>, ApiError> {
    Ok(pools_of(s, &f.caller, &f.space)
        .await?
        .into_iter()
        .map(|p| PoolRow {
            name: p.name,
            workers: p.workers,
        })
        .collect())
}
