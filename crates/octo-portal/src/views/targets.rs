//! Infrastructure ➜ Deployment targets: the list (filters, paging, health
//! checks and deployment tool upgrades of what it shows), adding a listening
//! tentacle (its thumbprint discovered and confirmed) or a polling one (the
//! exact command, a key made for it, then waiting live until it connects),
//! and a target's page (overview, connectivity, settings, delete). Workers
//! have the same page.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_extra::extract::Form;
use octo_api_types::{
    EndpointKind, Environment, HealthRequest, Machine, MachinePolicy, MachineRequest,
    MachineUpdate, Permission, Tenant,
};
use octo_server_core::api::machines::{
    change_machine, machine_page, remove_machine, save_machine, visible_machine, MachineQuery,
};
use octo_server_core::api::tasks::{start as start_task, ToolUpgrade};
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use octo_store::{MachineFilter, TaskQuery};
use serde::Deserialize;

use super::{api_error, enc, render, see_other, when, Frame, Health};
use crate::gate::{get, post, Page};

pub(crate) fn pages() -> Vec<Page> {
    use Permission as P;
    vec![
        get(
            "/spaces/{space}/targets",
            Access::Space(P::MachineView),
            list,
        ),
        post(
            "/spaces/{space}/targets/check-health",
            Access::Space(P::TaskCreate),
            check_health_all,
        ),
        post(
            "/spaces/{space}/targets/upgrade-tool",
            Access::Space(P::TaskCreate),
            upgrade_all,
        ),
        get(
            "/spaces/{space}/targets/new",
            Access::Space(P::MachineCreate),
            choose,
        ),
        get(
            "/spaces/{space}/targets/new/listening",
            Access::Space(P::MachineCreate),
            listening_form,
        ),
        post(
            "/spaces/{space}/targets/new/listening",
            Access::Space(P::MachineCreate),
            listening_submit,
        ),
        get(
            "/spaces/{space}/targets/new/polling",
            Access::Space(P::MachineCreate),
            polling_page,
        ),
        post(
            "/spaces/{space}/targets/new/polling",
            Access::Space(P::MachineCreate),
            polling_key,
        ),
        get(
            "/spaces/{space}/targets/new/polling/status",
            Access::Space(P::MachineCreate),
            polling_status,
        ),
        get(
            "/spaces/{space}/targets/{name}",
            Access::Space(P::MachineView),
            target,
        ),
        post(
            "/spaces/{space}/targets/{name}/check-health",
            Access::Space(P::TaskCreate),
            check_health_one,
        ),
        post(
            "/spaces/{space}/targets/{name}/upgrade-tool",
            Access::Space(P::TaskCreate),
            upgrade_one,
        ),
        post(
            "/spaces/{space}/targets/{name}/upgrade-tentacle",
            Access::Space(P::MachineEdit),
            upgrade_tentacle_one,
        ),
        post(
            "/spaces/{space}/targets/{name}/settings",
            Access::Space(P::MachineEdit),
            settings,
        ),
        post(
            "/spaces/{space}/targets/{name}/delete",
            Access::Space(P::MachineDelete),
            delete,
        ),
    ]
}

/// Rows per page of the list.
const PAGE: i64 = 50;

/// The list's filters, as the query string carries them.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Filters {
    #[serde(default)]
    name: String,
    #[serde(default)]
    environment: String,
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
    fn query(&self, skip: i64, take: i64) -> MachineQuery {
        let opt = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        MachineQuery {
            environment: opt(&self.environment),
            role: opt(&self.role),
            name: opt(&self.name),
            health: opt(&self.health),
            style: opt(&self.style),
            workers: Some(false),
            skip: Some(skip),
            take: Some(take),
            ..MachineQuery::default()
        }
    }

    /// The query string of these filters (without the page).
    fn qs(&self) -> String {
        let pairs = [
            ("name", &self.name),
            ("environment", &self.environment),
            ("role", &self.role),
            ("health", &self.health),
            ("style", &self.style),
        ];
        pairs
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

/// One row of the list.
pub(crate) struct Row {
    pub name: String,
    pub href: String,
    pub health: Health,
    pub reason: String,
    pub environments: Vec<String>,
    pub roles: Vec<String>,
    pub tenants: Vec<String>,
    pub style: &'static str,
    pub tentacle: String,
    pub tool: String,
    pub checked: String,
    pub disabled: bool,
}

impl Row {
    pub(crate) fn of(f: &Frame, m: &Machine) -> Row {
        Row {
            name: m.name.clone(),
            href: f.href(&format!("/targets/{}", enc(&m.name))),
            health: Health::of(m),
            reason: m.status_reason.clone(),
            environments: m.environments.clone(),
            roles: m.roles.clone(),
            tenants: m.tenants.clone(),
            style: style_of(m.kind),
            tentacle: m.tentacle_version.clone().unwrap_or_default(),
            tool: m.tool_version.clone().unwrap_or_default(),
            checked: when(m.last_health_at),
            disabled: m.disabled,
        }
    }
}

fn style_of(k: EndpointKind) -> &'static str {
    match k {
        EndpointKind::Listening => "Listening",
        EndpointKind::Polling => "Polling",
    }
}

#[derive(Template)]
#[template(path = "targets.html")]
struct ListPage {
    f: Frame,
    rows: Vec<Row>,
    filters: Filters,
    environments: Vec<String>,
    healths: [Health; 5],
    total: i64,
    first: i64,
    last: i64,
    prev: Option<String>,
    next: Option<String>,
    may_add: bool,
    may_task: bool,
    message: Option<String>,
}

async fn list(State(s): State<AppState>, f: Frame, Query(filters): Query<Filters>) -> Response {
    let f = f.titled("Deployment targets", "targets");
    list_page(&s, f, filters, None).await
}

async fn list_page(s: &AppState, f: Frame, filters: Filters, message: Option<String>) -> Response {
    let page = filters.page.unwrap_or(1).max(1);
    let skip = (page - 1) * PAGE;
    let (machines, total) =
        match machine_page(s, &f.caller, &f.space, &filters.query(skip, PAGE)).await {
            Ok(r) => r,
            Err(e) => return api_error(&e),
        };
    let environments = match s.store.list_environments(f.space.id).await {
        Ok(e) => e.into_iter().map(|e| e.name).collect(),
        Err(e) => return api_error(&e.into()),
    };
    let qs = filters.qs();
    let link = |p: i64| {
        let sep = if qs.is_empty() { "" } else { "&" };
        f.href(&format!("/targets?{qs}{sep}page={p}"))
    };
    let rows = machines.iter().map(|m| Row::of(&f, m)).collect::<Vec<_>>();
    let first = if total == 0 { 0 } else { skip + 1 };
    let last = skip + i64::try_from(rows.len()).unwrap_or(0);
    render(&ListPage {
        prev: (page > 1).then(|| link(page - 1)),
        next: (last < total).then(|| link(page + 1)),
        may_add: f.may(Permission::MachineCreate),
        may_task: f.may(Permission::TaskCreate),
        f,
        rows,
        filters,
        environments,
        healths: Health::ALL,
        total,
        first,
        last,
        message,
    })
}

/// The names of every target the filters show (all pages).
async fn names_shown(s: &AppState, f: &Frame, filters: &Filters) -> Result<Vec<String>, Response> {
    let mut names = Vec::new();
    let mut skip = 0;
    loop {
        let (page, total) = machine_page(s, &f.caller, &f.space, &filters.query(skip, 1000))
            .await
            .map_err(|e| api_error(&e))?;
        let n = i64::try_from(page.len()).unwrap_or(0);
        names.extend(page.into_iter().filter(|m| !m.disabled).map(|m| m.name));
        skip += 1000;
        if n == 0 || skip >= total {
            return Ok(names);
        }
    }
}

/// Check health of every target, or of what the filters show.
async fn check_health_all(
    State(s): State<AppState>,
    f: Frame,
    Form(filters): Form<Filters>,
) -> Response {
    let f = f.titled("Deployment targets", "targets");
    let machines = if filters.any() {
        match names_shown(&s, &f, &filters).await {
            Ok(n) if n.is_empty() => {
                return list_page(
                    &s,
                    f,
                    filters,
                    Some("No target matches these filters.".into()),
                )
                .await
            }
            Ok(n) => n,
            Err(r) => return r,
        }
    } else {
        Vec::new()
    };
    let req = HealthRequest {
        max_parallel_steps: None,
        machines,
        environment: None,
    };
    match start_task(&s, &f.caller, &f.space, req).await {
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", enc(&view.task.id)))),
        Err(e) => list_page(&s, f, filters, Some(e.message)).await,
    }
}

/// Upgrade the deployment tool on every target.
async fn upgrade_all(State(s): State<AppState>, f: Frame) -> Response {
    let f = f.titled("Deployment targets", "targets");
    match start_task(
        &s,
        &f.caller,
        &f.space,
        ToolUpgrade(HealthRequest::default()),
    )
    .await
    {
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", enc(&view.task.id)))),
        Err(e) => list_page(&s, f, Filters::default(), Some(e.message)).await,
    }
}

#[derive(Template)]
#[template(path = "target_new.html")]
struct ChoosePage {
    f: Frame,
}

async fn choose(f: Frame) -> Response {
    render(&ChoosePage {
        f: f.titled("Add a deployment target", "targets"),
    })
}

/// Which operating system the commands are for.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Os {
    #[serde(default)]
    os: String,
}

impl Os {
    fn windows(&self) -> bool {
        self.os.eq_ignore_ascii_case("windows")
    }
}

/// What the forms offer: environments, tenants, policies, known roles.
struct Choices {
    environments: Vec<Environment>,
    tenants: Vec<Tenant>,
    policies: Vec<MachinePolicy>,
    roles: Vec<String>,
}

async fn choices(s: &AppState, f: &Frame) -> Result<Choices, Response> {
    let err = |e: octo_store::StoreError| api_error(&e.into());
    let environments = s
        .store
        .list_environments(f.space.id)
        .await
        .map_err(err)?
        .into_iter()
        .filter(|e| {
            f.caller.grants.covers(
                Permission::MachineCreate,
                f.space.id,
                std::slice::from_ref(&e.name),
                &[],
                octo_server_core::authz::Cover::All,
            )
        })
        .collect();
    let tenants = s.store.list_tenants(f.space.id).await.map_err(err)?;
    let policies = s.store.list_policies(f.space.id).await.map_err(err)?;
    let mut roles: Vec<String> = s
        .store
        .list_machines(&MachineFilter::space(f.space.id))
        .await
        .map_err(err)?
        .into_iter()
        .flat_map(|m| m.roles)
        .collect();
    roles.sort_by_key(|r| r.to_lowercase());
    roles.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    Ok(Choices {
        environments,
        tenants,
        policies,
        roles,
    })
}

/// The server's address as this browser reaches it (for the commands).
fn server_url(headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("SERVER:8080");
    format!("http://{host}")
}

/// `value` as one POSIX shell word.
fn sh(value: &str) -> String {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@=+,".contains(c))
    {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', "'\\''"))
    }
}

#[derive(Template)]
#[template(path = "target_listening.html")]
struct ListeningPage {
    f: Frame,
    windows: bool,
    thumbprint: String,
    commands: String,
    form: ListeningForm,
    discovered: Option<String>,
    choices: Choices,
    error: Option<String>,
}

/// The listening form's fields.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ListeningForm {
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    step: String,
    #[serde(default)]
    thumbprint: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    roles: String,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    tenant_tags: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    os: String,
}

impl ListeningForm {
    fn has_environment(&self, name: &str) -> bool {
        self.environments.iter().any(|e| e == name)
    }

    fn has_tenant(&self, name: &str) -> bool {
        self.tenants.iter().any(|t| t == name)
    }

    fn uri(&self) -> String {
        let port = if self.port.trim().is_empty() {
            "10933"
        } else {
            self.port.trim()
        };
        format!("https://{}:{port}/", self.host.trim())
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The commands that install a listening tentacle trusting this server.
fn listening_commands(thumbprint: &str) -> String {
    format!(
        "tentacle create-instance --instance Tentacle\n\
         tentacle new-certificate --instance Tentacle --if-blank\n\
         tentacle configure --instance Tentacle --port 10933 --listen --trust {thumbprint}\n\
         sudo tentacle service --instance Tentacle --install --start\n\
         tentacle show-thumbprint --instance Tentacle"
    )
}

async fn listening_form(State(s): State<AppState>, f: Frame, Query(os): Query<Os>) -> Response {
    let f = f.titled("Add a listening tentacle", "targets");
    let choices = match choices(&s, &f).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let thumbprint = s.thumbprint().to_string();
    render(&ListeningPage {
        windows: os.windows(),
        commands: listening_commands(&thumbprint),
        thumbprint,
        form: ListeningForm {
            port: "10933".into(),
            os: os.os,
            ..ListeningForm::default()
        },
        discovered: None,
        choices,
        error: None,
        f,
    })
}

async fn listening_submit(
    State(s): State<AppState>,
    f: Frame,
    Form(form): Form<ListeningForm>,
) -> Response {
    let f = f.titled("Add a listening tentacle", "targets");
    let choices = match choices(&s, &f).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let thumbprint = s.thumbprint().to_string();
    let windows = form.os.eq_ignore_ascii_case("windows");
    let again = |form: ListeningForm,
                 discovered: Option<String>,
                 error: Option<String>,
                 status: StatusCode| {
        let page = ListeningPage {
            windows,
            commands: listening_commands(&thumbprint),
            thumbprint: thumbprint.clone(),
            form,
            discovered,
            choices,
            error,
            f: f.clone(),
        };
        (status, render(&page)).into_response()
    };
    if form.host.trim().is_empty() {
        return again(
            form,
            None,
            Some("Give the tentacle's host name or IP address.".into()),
            StatusCode::BAD_REQUEST,
        );
    }
    if form.step != "save" {
        // Discover: what does the tentacle present?
        return match s.comms.discover(&form.uri()).await {
            Ok((uri, tp)) => {
                let mut form = form;
                form.thumbprint = tp.to_string();
                if form.name.trim().is_empty() {
                    form.name = form.host.trim().to_string();
                }
                let _ = uri;
                again(form, Some(tp.to_string()), None, StatusCode::OK)
            }
            Err(e) => again(
                form,
                None,
                Some(format!("Could not reach the tentacle: {e}")),
                StatusCode::BAD_GATEWAY,
            ),
        };
    }
    let req = MachineRequest {
        name: form.name.trim().to_string(),
        comms_style: "TentaclePassive".into(),
        uri: form.uri(),
        thumbprint: form.thumbprint.trim().to_string(),
        environments: form.environments.clone(),
        roles: split_list(&form.roles),
        tenants: form.tenants.clone(),
        tenant_tags: split_list(&form.tenant_tags),
        policy: (!form.policy.trim().is_empty()).then(|| form.policy.trim().to_string()),
        worker_pool: None,
        force: false,
    };
    match save_machine(&s, &f.caller, &f.space, &req).await {
        Ok(m) => see_other(&f.href(&format!("/targets/{}?added=1", enc(&m.name)))),
        Err(e) => {
            let status = e.status();
            let tp = form.thumbprint.clone();
            again(form, Some(tp), Some(e.message), status)
        }
    }
}

#[derive(Template)]
#[template(path = "target_polling.html")]
struct PollingPage {
    f: Frame,
    windows: bool,
    command: String,
    since: i64,
    key_made: bool,
    error: Option<String>,
}

/// The command that registers a polling tentacle with this server.
fn polling_command(s: &AppState, f: &Frame, headers: &HeaderMap, key: &str) -> String {
    let server = server_url(headers);
    let host = server
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map_or("SERVER", |(h, _)| h)
        .to_string();
    format!(
        "tentacle create-instance --instance Tentacle\n\
         tentacle new-certificate --instance Tentacle --if-blank\n\
         tentacle configure --instance Tentacle --no-listen\n\
         tentacle register-with --instance Tentacle --server {server} --api-key {key} \\\n    \
         --space {space} --comms-style TentacleActive --server-comms-address {host}:{port} \\\n    \
         --server-thumbprint {tp} --environment ENVIRONMENT --role ROLE\n\
         sudo tentacle service --instance Tentacle --install --start",
        server = sh(&server),
        space = sh(&f.space.name),
        port = s.comms_port,
        tp = s.thumbprint(),
    )
}

async fn polling_page(
    State(s): State<AppState>,
    f: Frame,
    headers: HeaderMap,
    Query(os): Query<Os>,
) -> Response {
    let f = f.titled("Add a polling tentacle", "targets");
    render(&PollingPage {
        command: polling_command(&s, &f, &headers, "API-KEY"),
        windows: os.windows(),
        since: octo_store::now_ms(),
        key_made: false,
        error: None,
        f,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct KeyForm {
    #[serde(default)]
    os: String,
}

/// Makes an API key for the registration (the caller's own, named for it).
async fn polling_key(
    State(s): State<AppState>,
    f: Frame,
    headers: HeaderMap,
    Form(form): Form<KeyForm>,
) -> Response {
    let f = f.titled("Add a polling tentacle", "targets");
    let windows = form.os.eq_ignore_ascii_case("windows");
    let purpose = format!("registering a polling tentacle in {}", f.space.name);
    match octo_server_core::auth::issue_api_key(s.store.as_ref(), f.caller.user.id, &purpose).await
    {
        Ok((key, stored)) => {
            s.audit(
                &f.caller,
                None,
                "created",
                "api key",
                &format!("#{} {}", stored.id, stored.prefix),
                purpose,
            )
            .await;
            render(&PollingPage {
                command: polling_command(&s, &f, &headers, &key),
                windows,
                since: octo_store::now_ms(),
                key_made: true,
                error: None,
                f,
            })
        }
        Err(e) => api_error(&e.into()),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Since {
    since: i64,
}

/// Whether a polling tentacle registered since the page opened, and whether it
/// is connected (the page polls this).
async fn polling_status(State(s): State<AppState>, f: Frame, Query(q): Query<Since>) -> Response {
    let machines = match s
        .store
        .list_machines(&MachineFilter::space(f.space.id))
        .await
    {
        Ok(m) => m,
        Err(e) => return api_error(&e.into()),
    };
    let newest = machines
        .into_iter()
        .filter(|m| m.kind == EndpointKind::Polling && m.created_at >= q.since)
        .filter(|m| octo_server_core::api::machines::sees_machine(&f.caller, &f.space, m))
        .max_by_key(|m| m.created_at);
    let body = match newest {
        None => serde_json::json!({
            "ready": false,
            "message": "Waiting for a tentacle to register with this server…",
        }),
        Some(m) => {
            let connected = polling_connected(&s, &m);
            serde_json::json!({
                "ready": connected,
                "name": m.name,
                "href": f.href(&format!("/targets/{}", enc(&m.name))),
                "message": if connected {
                    format!("{} registered and connected.", m.name)
                } else {
                    format!("{} registered; waiting for it to connect…", m.name)
                },
            })
        }
    };
    Json(body).into_response()
}

fn polling_connected(s: &AppState, m: &Machine) -> bool {
    // Its certificate, or the one it is rotating to.
    let accepted: Vec<octo_tls::Thumbprint> = std::iter::once(m.thumbprint.as_str())
        .chain(m.next_thumbprint.as_deref())
        .filter_map(|t| t.parse().ok())
        .collect();
    let id = m.uri.trim_start_matches("poll://").trim_end_matches('/');
    s.comms.polling().find(id, &accepted).is_some()
}

/// One log line of the last health check.
struct LogLine {
    text: String,
}

#[derive(Template)]
#[template(path = "target.html")]
struct TargetPage {
    f: Frame,
    m: Machine,
    health: Health,
    style: &'static str,
    checked: String,
    tool_outdated: bool,
    server_tool: String,
    /// The server's tentacle version when this machine's is older, else "".
    tentacle_upgrade: String,
    free_disk: String,
    last_check: Option<(String, String, Vec<LogLine>)>,
    choices: Choices,
    roles_text: String,
    tags_text: String,
    may_task: bool,
    may_edit: bool,
    may_delete: bool,
    added: bool,
    message: Option<String>,
}

impl TargetPage {
    fn has_environment(&self, name: &str) -> bool {
        self.m.environments.iter().any(|e| e == name)
    }

    fn has_tenant(&self, name: &str) -> bool {
        self.m.tenants.iter().any(|t| t == name)
    }
}

/// Bytes for people: "12.3 GiB free".
fn free_disk(bytes: Option<i64>) -> String {
    let Some(b) = bytes else {
        return "not known yet".into();
    };
    let gib = b as f64 / f64::from(1u32 << 30);
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{} MiB", b >> 20)
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Added {
    #[serde(default)]
    added: Option<String>,
}

async fn target(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    Query(added): Query<Added>,
) -> Response {
    target_page(&s, f, &name, added.added.is_some(), None).await
}

async fn target_page(
    s: &AppState,
    f: Frame,
    name: &str,
    added: bool,
    message: Option<String>,
) -> Response {
    let m = match visible_machine(s, &f.caller, &f.space, name).await {
        Ok(m) => m,
        Err(e) => return api_error(&e),
    };
    let f = f.titled(
        m.name.clone(),
        if m.worker_pool.is_some() {
            "workers"
        } else {
            "targets"
        },
    );
    let server_tool = s
        .tool
        .as_ref()
        .as_ref()
        .map(|t| t.version.clone())
        .unwrap_or_default();
    let tool_outdated = !server_tool.is_empty()
        && !matches!(
            octo_engine::tool::compare(m.tool_version.as_deref().unwrap_or(""), &server_tool),
            octo_engine::tool::ToolStatus::Current
        );
    let tentacle_upgrade = match s.tentacle.as_ref() {
        Ok(t)
            if octo_engine::tentacle_build::is_older(
                m.tentacle_version.as_deref().unwrap_or(""),
                &t.version,
            ) =>
        {
            t.version.clone()
        }
        _ => String::new(),
    };
    let last_check = last_health_check(s, &f, &m).await;
    let choices = match choices(s, &f).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let edit = |p: Permission| {
        f.caller
            .require_on(p, &f.space, &m.environments, &m.tenants, "this target")
            .is_ok()
    };
    render(&TargetPage {
        health: Health::of(&m),
        style: style_of(m.kind),
        checked: when(m.last_health_at),
        tool_outdated,
        server_tool,
        tentacle_upgrade,
        free_disk: free_disk(m.free_bytes),
        last_check,
        choices,
        roles_text: m.roles.join(", "),
        tags_text: m.tenant_tags.join(", "),
        may_task: edit(Permission::TaskCreate),
        may_edit: edit(Permission::MachineEdit),
        may_delete: edit(Permission::MachineDelete),
        added,
        message,
        m,
        f,
    })
}

/// The machine's last health check: its task, when, and its lines about it.
async fn last_health_check(
    s: &AppState,
    f: &Frame,
    m: &Machine,
) -> Option<(String, String, Vec<LogLine>)> {
    if !f.may(Permission::TaskView) {
        return None;
    }
    let q = TaskQuery {
        space_id: Some(f.space.id),
        kind: Some("Health".into()),
        machine: Some(m.name.clone()),
        visible_environments: f
            .caller
            .grants
            .environments_with(Permission::TaskView, f.space.id),
        limit: 1,
        ..TaskQuery::default()
    };
    let (tasks, _) = s.store.task_page(&q).await.ok()?;
    let task = tasks.into_iter().next()?;
    let lines = s
        .store
        .step_log(&task.id, m.id)
        .await
        .ok()
        .unwrap_or_default();
    let server_lines = s
        .store
        .task_log(&task.id, 0, 1000)
        .await
        .ok()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.machine_id.is_none() && l.text.starts_with(&format!("{}: ", m.name)));
    let mut all: Vec<LogLine> = server_lines
        .chain(lines)
        .map(|l| LogLine { text: l.text })
        .collect();
    all.truncate(200);
    Some((
        f.href(&format!("/tasks/{}", enc(&task.id))),
        when(task.completed_at.or(task.started_at)),
        all,
    ))
}

async fn check_health_one(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let req = HealthRequest {
        max_parallel_steps: None,
        machines: vec![name.clone()],
        environment: None,
    };
    match start_task(&s, &f.caller, &f.space, req).await {
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", enc(&view.task.id)))),
        Err(e) => target_page(&s, f, &name, false, Some(e.message)).await,
    }
}

async fn upgrade_one(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let req = HealthRequest {
        max_parallel_steps: None,
        machines: vec![name.clone()],
        environment: None,
    };
    match start_task(&s, &f.caller, &f.space, ToolUpgrade(req)).await {
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", enc(&view.task.id)))),
        Err(e) => target_page(&s, f, &name, false, Some(e.message)).await,
    }
}

async fn upgrade_tentacle_one(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    let req = octo_api_types::TentacleUpgradeRequest {
        machines: vec![name.clone()],
        ..Default::default()
    };
    match start_task(&s, &f.caller, &f.space, req).await {
        Ok(view) => see_other(&f.href(&format!("/tasks/{}", enc(&view.task.id)))),
        Err(e) => target_page(&s, f, &name, false, Some(e.message)).await,
    }
}

/// The settings form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct SettingsForm {
    #[serde(default)]
    environments: Vec<String>,
    #[serde(default)]
    roles: String,
    #[serde(default)]
    tenants: Vec<String>,
    #[serde(default)]
    tenant_tags: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    disabled: Option<String>,
}

async fn settings(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
    Form(form): Form<SettingsForm>,
) -> Response {
    let u = MachineUpdate {
        environments: Some(form.environments.clone()),
        roles: Some(split_list(&form.roles)),
        tenants: Some(form.tenants.clone()),
        tenant_tags: Some(split_list(&form.tenant_tags)),
        policy: (!form.policy.trim().is_empty()).then(|| form.policy.trim().to_string()),
        disabled: Some(form.disabled.is_some()),
    };
    match change_machine(&s, &f.caller, &f.space, &name, &u).await {
        Ok(m) => see_other(&f.href(&format!("/targets/{}", enc(&m.name)))),
        Err(e) => target_page(&s, f, &name, false, Some(e.message)).await,
    }
}

async fn delete(
    State(s): State<AppState>,
    f: Frame,
    Path((_, name)): Path<(String, String)>,
) -> Response {
    match remove_machine(&s, &f.caller, &f.space, &name).await {
        Ok(()) => see_other(&f.href("/targets")),
        Err(e) => target_page(&s, f, &name, false, Some(e.message)).await,
    }
}
