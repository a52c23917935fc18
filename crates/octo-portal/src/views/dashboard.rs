//! The first page of a space: how many targets are healthy per environment,
//! and which tasks run or failed lately.

use askama::Template;
use axum::extract::State;
use axum::response::Response;
use octo_api_types::{Permission, Task};
use octo_server_core::authz::Access;
use octo_server_core::AppState;
use octo_store::MachineFilter;

use super::{api_error, enc, render, when, Frame, Health};
use crate::gate::{get, Page};

pub(crate) fn pages() -> Vec<Page> {
    vec![get("/spaces/{space}/", Access::Authenticated, dashboard)]
}

/// One environment's line: its name and counts per health.
struct EnvRow {
    name: String,
    href: String,
    counts: Vec<(Health, usize)>,
    total: usize,
}

struct TaskRow {
    id: String,
    href: String,
    description: String,
    state: String,
    when: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct DashboardPage {
    f: Frame,
    environments: Vec<EnvRow>,
    running: Vec<TaskRow>,
    failed: Vec<TaskRow>,
    see_targets: bool,
    see_tasks: bool,
}

async fn dashboard(State(s): State<AppState>, f: Frame) -> Response {
    let f = f.titled("Dashboard", "dashboard");
    let space = f.space.clone();
    let see_targets = f.may(Permission::MachineView);
    let see_tasks = f.may(Permission::TaskView);
    let mut environments = Vec::new();
    if see_targets {
        let envs = match s.store.list_environments(space.id).await {
            Ok(e) => e,
            Err(e) => return api_error(&e.into()),
        };
        let machines = match s.store.list_machines(&MachineFilter::space(space.id)).await {
            Ok(m) => m,
            Err(e) => return api_error(&e.into()),
        };
        for e in envs {
            let names = std::slice::from_ref(&e.name);
            if !f
                .caller
                .sees(Permission::EnvironmentView, &space, names, &[])
                && !f.caller.sees(Permission::MachineView, &space, names, &[])
            {
                continue;
            }
            let mine: Vec<_> = machines
                .iter()
                .filter(|m| {
                    m.environments
                        .iter()
                        .any(|x| x.eq_ignore_ascii_case(&e.name))
                })
                .filter(|m| {
                    f.caller
                        .sees(Permission::MachineView, &space, &m.environments, &m.tenants)
                })
                .collect();
            let counts = Health::ALL
                .into_iter()
                .map(|h| (h, mine.iter().filter(|m| Health::of(m) == h).count()))
                .filter(|(_, n)| *n > 0)
                .collect();
            environments.push(EnvRow {
                href: f.href(&format!("/targets?environment={}", enc(&e.name))),
                name: e.name,
                counts,
                total: mine.len(),
            });
        }
    }
    let (mut running, mut failed) = (Vec::new(), Vec::new());
    if see_tasks {
        let tasks = match s.store.list_tasks(Some(space.id), 200).await {
            Ok(t) => t,
            Err(e) => return api_error(&e.into()),
        };
        let row = |t: &Task| TaskRow {
            id: t.id.clone(),
            href: f.href(&format!("/tasks/{}", enc(&t.id))),
            description: t.description.clone(),
            state: format!("{:?}", t.state),
            when: when(t.completed_at.or(t.started_at).or(Some(t.created_at))),
        };
        for t in tasks.iter().filter(|t| {
            f.caller
                .sees(Permission::TaskView, &space, &t.environments, &[])
        }) {
            if !t.state.is_final() && running.len() < 10 {
                running.push(row(t));
            } else if t.state == octo_api_types::TaskState::Failed && failed.len() < 10 {
                failed.push(row(t));
            }
        }
    }
    render(&DashboardPage {
        f,
        environments,
        running,
        failed,
        see_targets,
        see_tasks,
    })
}
