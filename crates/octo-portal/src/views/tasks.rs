//! Tasks: the list (newest first, filters, states that change live) and a
//! task's page (each machine's step; the log line by line as it is stored,
//! folded per machine, numbered and linkable; raw download; Cancel; Retry /
//! Ignore / Fail when guided failure waits).

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum_extra::extract::Form;
use octo_api_types::{
    Guidance, GuidanceRequest, Permission, Task, TaskLogLine, TaskState, TaskView,
};
use octo_server_core::api::sse::open_stream;
use octo_server_core::api::tasks::{cancel, guide, load_view, task_page, ListQuery};
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use serde::Deserialize;

use super::{api_error, enc, render, see_other, took, when, Frame};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get("/spaces/{space}/tasks", Access::Space(P::TaskView), list),
        get(
            "/spaces/{space}/tasks/rows",
            Access::Space(P::TaskView),
            rows,
        ),
        get(
            "/spaces/{space}/tasks/{id}",
            Access::Space(P::TaskView),
            task,
        ),
        get(
            "/spaces/{space}/tasks/{id}/events",
            Access::Space(P::TaskView),
            events,
        ),
        get(
            "/spaces/{space}/tasks/{id}/raw",
            Access::Space(P::TaskView),
            raw,
        ),
        post(
            "/spaces/{space}/tasks/{id}/cancel",
            Access::Space(P::TaskCancel),
            cancel_task,
        ),
        post(
            "/spaces/{space}/tasks/{id}/guidance",
            Access::Space(P::InterruptionSubmit),
            guidance,
        ),
    ]
}

/// Rows per page of the list.
const PAGE: i64 = 50;

/// Lines a task's page shows at first; the live stream brings the rest.
const FIRST_LINES: i64 = 5000;

/// The list's filters, as the query string carries them.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Filters {
    #[serde(default)]
    state: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    machine: String,
    #[serde(default)]
    environment: String,
    #[serde(default)]
    page: Option<i64>,
}

impl Filters {
    fn query(&self, skip: i64) -> ListQuery {
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        ListQuery {
            limit: Some(PAGE),
            skip: Some(skip),
            state: opt(&self.state),
            kind: opt(&self.kind),
            machine: opt(&self.machine),
            environment: opt(&self.environment),
        }
    }

    /// The query string of these filters (without the page).
    fn qs(&self) -> String {
        [
            ("state", &self.state),
            ("kind", &self.kind),
            ("machine", &self.machine),
            ("environment", &self.environment),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect::<Vec<_>>()
        .join("&")
    }

    fn any(&self) -> bool {
        !self.qs().is_empty()
    }
}

/// The states and kinds the filters offer.
const STATES: [&str; 5] = ["Queued", "Executing", "Success", "Failed", "Canceled"];
const KINDS: [&str; 4] = ["Script", "Health", "Deploy", "Upgrade"];

/// A state's word as the page shows it (and its CSS class, lower-cased).
fn state_word(s: TaskState) -> &'static str {
    match s {
        TaskState::Queued => "Queued",
        TaskState::Executing => "Executing",
        TaskState::Success => "Success",
        TaskState::Failed => "Failed",
        TaskState::Canceled => "Canceled",
    }
}

/// One row of the list.
struct Row {
    id: String,
    href: String,
    kind: String,
    description: String,
    state: &'static str,
    error: String,
    created: String,
    took: String,
}

impl Row {
    fn of(f: &Frame, t: &Task) -> Row {
        let end = t
            .completed_at
            .or_else(|| t.started_at.map(|_| octo_store::now_ms()));
        Row {
            id: t.id.clone(),
            href: f.href(&format!("/tasks/{}", enc(&t.id))),
            kind: t.kind.clone(),
            description: t.description.clone(),
            state: state_word(t.state),
            error: t.error.clone().unwrap_or_default(),
            created: when(Some(t.created_at)),
            took: took(t.started_at, end),
        }
    }
}

/// The table's body, also served alone for the list's live refresh.
#[derive(Template)]
#[template(path = "task_rows.html")]
struct RowsFragment {
    rows: Vec<Row>,
}

#[derive(Template)]
#[template(path = "tasks.html")]
struct ListPage {
    f: Frame,
    rows: Vec<Row>,
    filters: Filters,
    states: [&'static str; 5],
    kinds: [&'static str; 4],
    environments: Vec<String>,
    refresh: String,
    total: i64,
    first: i64,
    last: i64,
    prev: Option<String>,
    next: Option<String>,
}

/// One page of tasks: rows, total, the number of the first row.
async fn page_of(
    s: &AppState,
    f: &Frame,
    filters: &Filters,
) -> Result<(Vec<Row>, i64, i64), Response> {
    let page = filters.page.unwrap_or(1).max(1);
    let skip = (page - 1) * PAGE;
    let (tasks, total) = task_page(s, &f.caller, &f.space, &filters.query(skip))
        .await
        .map_err(|e| api_error(&e))?;
    Ok((tasks.iter().map(|t| Row::of(f, t)).collect(), total, skip))
}

async fn list(State(s): State<AppState>, f: Frame, Query(filters): Query<Filters>) -> Response {
    let f = f.titled("Tasks", "tasks");
    let (rows, total, skip) = match page_of(&s, &f, &filters).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let environments = match s.store.list_environments(f.space.id).await {
        Ok(e) => e.into_iter().map(|e| e.name).collect(),
        Err(e) => return api_error(&e.into()),
    };
    let page = filters.page.unwrap_or(1).max(1);
    let qs = filters.qs();
    let link = |p: i64| {
        let sep = if qs.is_empty() { "" } else { "&" };
        f.href(&format!("/tasks?{qs}{sep}page={p}"))
    };
    let last = skip + i64::try_from(rows.len()).unwrap_or(0);
    let refresh = {
        let sep = if qs.is_empty() { "" } else { "&" };
        f.href(&format!("/tasks/rows?{qs}{sep}page={page}"))
    };
    render(&ListPage {
        first: if total == 0 { 0 } else { skip + 1 },
        prev: (page > 1).then(|| link(page - 1)),
        next: (last < total).then(|| link(page + 1)),
        last,
        total,
        rows,
        filters,
        states: STATES,
        kinds: KINDS,
        environments,
        refresh,
        f,
    })
}

/// The list's rows alone (the list page refreshes them every few seconds).
async fn rows(State(s): State<AppState>, f: Frame, Query(filters): Query<Filters>) -> Response {
    match page_of(&s, &f, &filters).await {
        Ok((rows, _, _)) => render(&RowsFragment { rows }),
        Err(r) => r,
    }
}

/// One machine's step, as the table shows it.
struct StepRow {
    machine_id: i64,
    name: String,
    href: String,
    state: &'static str,
    exit: String,
    error: String,
    started: String,
    took: String,
    waiting: bool,
}

/// One stored log line, numbered in the order of the task.
struct Line {
    id: i64,
    n: usize,
    stream: String,
    time: String,
    iso: String,
    who: String,
    text: String,
}

/// The log of one machine (or of the server), folded separately.
struct Section {
    /// `server` or the machine's id.
    key: String,
    title: String,
    lines: Vec<Line>,
    open: bool,
}

#[derive(Template)]
#[template(path = "task.html")]
struct TaskPage {
    f: Frame,
    t: Task,
    state: &'static str,
    created: String,
    took: String,
    arguments: String,
    steps: Vec<StepRow>,
    sections: Vec<Section>,
    total_lines: usize,
    more: bool,
    events: String,
    raw: String,
    may_cancel: bool,
    may_guide: bool,
    message: Option<String>,
}

async fn task(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    task_page_of(&s, f, &id, None).await
}

/// `HH:MM:SS` of a time (Unix ms, UTC) and its ISO form.
fn clock(ms: i64) -> (String, String) {
    let full = when(Some(ms));
    let time = full.get(11..19).unwrap_or_default().to_string();
    let iso = format!("{}T{}Z", full.get(0..10).unwrap_or_default(), time);
    (time, iso)
}

fn sections_of(view: &TaskView, lines: Vec<TaskLogLine>) -> Vec<Section> {
    let mut sections = vec![Section {
        key: "server".into(),
        title: "Server".into(),
        lines: Vec::new(),
        open: true,
    }];
    for st in &view.steps {
        sections.push(Section {
            key: st.machine_id.to_string(),
            title: st.machine_name.clone(),
            lines: Vec::new(),
            // A long task's succeeded steps start folded; failures stay open.
            open: view.steps.len() <= 10 || st.state != TaskState::Success,
        });
    }
    for (i, l) in lines.into_iter().enumerate() {
        let key = l
            .machine_id
            .map_or_else(|| "server".to_string(), |m| m.to_string());
        let idx = sections.iter().position(|s| s.key == key).unwrap_or(0);
        let (time, iso) = clock(l.timestamp);
        let who = if idx == 0 {
            "server".to_string()
        } else {
            sections[idx].title.clone()
        };
        sections[idx].lines.push(Line {
            id: l.id,
            n: i + 1,
            stream: l.stream,
            time,
            iso,
            who,
            text: l.text,
        });
    }
    sections
}

async fn task_page_of(s: &AppState, f: Frame, id: &str, message: Option<String>) -> Response {
    let view = match load_view(s.store.as_ref(), &f.caller, &f.space, id).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let f = f.titled(
        format!("{} {}", view.task.id, view.task.description),
        "tasks",
    );
    let lines = match s.store.task_log(id, 0, FIRST_LINES).await {
        Ok(l) => l,
        Err(e) => return api_error(&e.into()),
    };
    let more = i64::try_from(lines.len()).unwrap_or(0) >= FIRST_LINES;
    let after = lines.last().map_or(0, |l| l.id);
    let total_lines = lines.len();
    let now = octo_store::now_ms();
    let steps = view
        .steps
        .iter()
        .map(|st| StepRow {
            machine_id: st.machine_id,
            name: st.machine_name.clone(),
            href: f.href(&format!("/targets/{}", enc(&st.machine_name))),
            state: state_word(st.state),
            exit: st.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            error: st.error.clone().unwrap_or_default(),
            started: st.started_at.map(|t| clock(t).0).unwrap_or_default(),
            took: took(
                st.started_at,
                st.completed_at.or(st.started_at.map(|_| now)),
            ),
            waiting: st.state == TaskState::Executing
                && st
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("waiting for guidance")),
        })
        .collect();
    let env = &view.task.environments;
    let may = |p: Permission| {
        f.caller
            .require_on(p, &f.space, env, &[], "this task")
            .is_ok()
    };
    let final_state = view.task.state.is_final();
    let t = &view.task;
    let page = TaskPage {
        state: state_word(t.state),
        created: when(Some(t.created_at)),
        took: took(t.started_at, t.completed_at.or(t.started_at.map(|_| now))),
        arguments: serde_json::to_string_pretty(&t.arguments).unwrap_or_default(),
        steps,
        sections: sections_of(&view, lines),
        total_lines,
        more,
        events: f.href(&format!("/tasks/{}/events?after={after}", enc(id))),
        raw: f.href(&format!("/tasks/{}/raw", enc(id))),
        may_cancel: !final_state && may(Permission::TaskCancel),
        may_guide: !final_state && t.kind == "Deploy" && may(Permission::InterruptionSubmit),
        message,
        t: view.task.clone(),
        f,
    };
    render(&page)
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct After {
    #[serde(default)]
    after: Option<i64>,
}

/// The task's events (server-sent), as the API streams them.
async fn events(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id)): Path<(String, String)>,
    Query(q): Query<After>,
    headers: axum::http::HeaderMap,
) -> Response {
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    let after = last_event_id.or(q.after).unwrap_or(0);
    match open_stream(&s, f.caller, f.space, id, after).await {
        Ok(sse) => sse.into_response(),
        Err(e) => api_error(&e),
    }
}

/// The whole log as text: time, who, stream, line.
async fn raw(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    let view = match load_view(s.store.as_ref(), &f.caller, &f.space, &id).await {
        Ok(v) => v,
        Err(e) => return api_error(&e),
    };
    let names: std::collections::HashMap<i64, String> = view
        .steps
        .iter()
        .map(|st| (st.machine_id, st.machine_name.clone()))
        .collect();
    let mut out = String::new();
    let mut after = 0;
    loop {
        let lines = match s.store.task_log(&id, after, 10_000).await {
            Ok(l) => l,
            Err(e) => return api_error(&e.into()),
        };
        let Some(last) = lines.last() else { break };
        after = last.id;
        for l in &lines {
            let who = l
                .machine_id
                .map_or("server", |m| names.get(&m).map_or("?", String::as_str));
            let (_, iso) = clock(l.timestamp);
            out.push_str(&format!("{iso} {who} {} {}\n", l.stream, l.text));
        }
    }
    let file = format!(
        "attachment; filename=\"{}.log\"",
        id.replace(['"', '\\', '\r', '\n'], "_")
    );
    (
        [
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
            (header::CONTENT_DISPOSITION, file),
        ],
        out,
    )
        .into_response()
}

async fn cancel_task(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id)): Path<(String, String)>,
) -> Response {
    match cancel(&s, &f.caller, &f.space, &id).await {
        Ok(_) => see_other(&f.href(&format!("/tasks/{}", enc(&id)))),
        Err(e)
            if e.status().is_client_error()
                && e.status().as_u16() != 404
                && e.status().as_u16() != 403 =>
        {
            task_page_of(&s, f, &id, Some(e.message)).await
        }
        Err(e) => api_error(&e),
    }
}

/// The guidance form: which machine, and what to do.
#[derive(Debug, Deserialize)]
pub(crate) struct GuidanceForm {
    machine: String,
    action: String,
}

async fn guidance(
    State(s): State<AppState>,
    f: Frame,
    Path((_, id)): Path<(String, String)>,
    Form(form): Form<GuidanceForm>,
) -> Response {
    let action = match form.action.as_str() {
        "retry" => Guidance::Retry,
        "ignore" => Guidance::Ignore,
        "fail" => Guidance::Fail,
        other => {
            return super::error_page(
                axum::http::StatusCode::BAD_REQUEST,
                &format!("field `action`: '{other}' is not one of retry, ignore, fail"),
            )
        }
    };
    let req = GuidanceRequest {
        machine: form.machine,
        action,
    };
    match guide(&s, &f.caller, &f.space, &id, &req).await {
        Ok(_) => see_other(&f.href(&format!("/tasks/{}", enc(&id)))),
        Err(e) if e.status().as_u16() == 409 => task_page_of(&s, f, &id, Some(e.message)).await,
        Err(e) => api_error(&e),
    }
}
