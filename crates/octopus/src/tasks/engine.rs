//! The task engine of one server, owned by its `AppState` (one per running
//! server; handlers reach it as `state.engine`).
//!
//! The engine knows, in memory only:
//! - which tasks run here and their cancel tokens (a task runs at most once: a
//!   second `start` of a running task is ignored);
//! - per task with live log readers, a `watch` channel of change counters that
//!   log appends and state changes bump. Readers wait on it and read the rows from
//!   the store, so a reader that falls behind loses nothing.
//!
//! Every spawned future runs on the engine's `TaskTracker` and ends on its
//! shutdown token; a task interrupted by shutdown keeps its stored state and is
//! resumed by the next start ([`spawn_background`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use octo_store::{
    HealthStatus, MachineFilter, MachinePolicy, NewLogLine, Store, Task, TaskState, TaskStep,
};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{
    deploy, health, script, DeployArgs, ScriptRequest, KIND_DEPLOY, KIND_HEALTH, KIND_SCRIPT,
    KIND_UPGRADE, MAX_PARALLEL_STEPS,
};
use crate::server::{now_ms, AppState};

/// How often the scheduler looks for machines due a health check.
const HEALTH_SCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How long a stopping server waits for its tasks to notice.
const STOP_WAIT: Duration = Duration::from_secs(8);

/// Change counters of one task, bumped by the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Log lines were stored.
    pub log: u64,
    /// The task or one of its steps changed (state, cancel requested, ...).
    pub state: u64,
}

/// What the engine works with (a subset of `AppState`, which owns the engine).
#[derive(Debug, Clone)]
pub(crate) struct Deps {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) comms: octo_comms::ServerComms,
    /// The data directory (package files).
    pub(crate) data: std::path::PathBuf,
    /// The deployment tool this server pushes, or why there is none.
    pub(crate) tool: Arc<Result<crate::tool::ToolBuild, String>>,
}

/// The engine of one server (see the module documentation).
#[derive(Debug)]
pub struct Engine {
    pub(crate) state: Deps,
    /// Cancelled when the server stops.
    pub(crate) shutdown: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// When this engine was created: unfinished tasks created before are a
    /// previous run's, to resume.
    created_at: i64,
    /// Tasks running here, with their cancel tokens.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Per task with live readers.
    notifiers: Mutex<HashMap<String, watch::Sender<Changes>>>,
    /// Steps waiting for a person's decision (guided failure), by task and machine.
    guidance: Mutex<HashMap<(String, i64), tokio::sync::oneshot::Sender<deploy::Guidance>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a single map operation: a panic cannot leave the
    // map inconsistent, so recover from poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// A new engine; background work starts with [`spawn_background`].
    pub fn new(
        store: Arc<dyn Store>,
        comms: octo_comms::ServerComms,
        data: std::path::PathBuf,
        tool: Arc<Result<crate::tool::ToolBuild, String>>,
    ) -> Engine {
        Engine {
            state: Deps {
                store,
                comms,
                data,
                tool,
            },
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            created_at: now_ms(),
            running: Mutex::new(HashMap::new()),
            notifiers: Mutex::new(HashMap::new()),
            guidance: Mutex::new(HashMap::new()),
        }
    }

    /// The engine of the server `state` belongs to.
    pub(crate) fn of(state: &AppState) -> Arc<Engine> {
        state.engine.clone()
    }

    /// Stops everything (bounded).
    async fn stop(self: &Arc<Self>) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                "{} task engine jobs did not stop within {} s",
                self.tracker.len(),
                STOP_WAIT.as_secs()
            );
        }
    }

    /// Runs `task` in the background, unless it runs already or the server stops.
    pub(crate) fn start(self: &Arc<Self>, task: Task) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let cancel = {
            let mut running = lock(&self.running);
            if running.contains_key(&task.id) {
                return;
            }
            let token = CancellationToken::new();
            running.insert(task.id.clone(), token.clone());
            token
        };
        let this = self.clone();
        self.tracker.spawn(async move {
            let id = task.id.clone();
            Box::pin(this.run_task(task, cancel)).await;
            lock(&this.running).remove(&id);
        });
    }

    fn is_running(&self, task_id: &str) -> bool {
        lock(&self.running).contains_key(task_id)
    }

    /// Cancels a task running here (the store already says cancel was requested).
    pub(crate) fn cancel(&self, task_id: &str) {
        if let Some(token) = lock(&self.running).get(task_id) {
            token.cancel();
        }
        self.changed(task_id, |c| c.state += 1);
    }

    /// Registers a step as waiting for guidance; the receiver gets the decision.
    pub(crate) fn await_guidance(
        &self,
        task_id: &str,
        machine_id: i64,
    ) -> tokio::sync::oneshot::Receiver<deploy::Guidance> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.guidance).insert((task_id.to_string(), machine_id), tx);
        rx
    }

    /// No longer waiting (decided, canceled or stopping).
    pub(crate) fn forget_guidance(&self, task_id: &str, machine_id: i64) {
        lock(&self.guidance).remove(&(task_id.to_string(), machine_id));
    }

    /// Delivers a decision; false when that step is not waiting for one here.
    pub(crate) fn guide(&self, task_id: &str, machine_id: i64, g: deploy::Guidance) -> bool {
        let waiting = lock(&self.guidance).remove(&(task_id.to_string(), machine_id));
        waiting.is_some_and(|tx| tx.send(g).is_ok())
    }

    /// A receiver of `task_id`'s change counters; pair with [`Engine::release`].
    pub(crate) fn subscribe(&self, task_id: &str) -> watch::Receiver<Changes> {
        lock(&self.notifiers)
            .entry(task_id.to_string())
            .or_insert_with(|| watch::channel(Changes::default()).0)
            .subscribe()
    }

    /// Drops the task's notifier once nobody listens (call after dropping the receiver).
    pub(crate) fn release(&self, task_id: &str) {
        let mut map = lock(&self.notifiers);
        if map.get(task_id).is_some_and(|tx| tx.receiver_count() == 0) {
            map.remove(task_id);
        }
    }

    fn changed(&self, task_id: &str, f: impl FnOnce(&mut Changes)) {
        if let Some(tx) = lock(&self.notifiers).get(task_id) {
            tx.send_modify(f);
        }
    }

    pub(crate) fn log_changed(&self, task_id: &str) {
        self.changed(task_id, |c| c.log += 1);
    }

    pub(crate) fn state_changed(&self, task_id: &str) {
        self.changed(task_id, |c| c.state += 1);
    }

    /// Stores log lines and wakes readers.
    pub(crate) async fn append(
        &self,
        task_id: &str,
        lines: &[NewLogLine],
    ) -> octo_store::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.state.store.append_log(task_id, lines).await?;
        self.log_changed(task_id);
        Ok(())
    }

    /// Writes a server line about the task (best effort: a failure is logged).
    pub(crate) async fn server_log(&self, task_id: &str, text: impl Into<String>) {
        let text = text.into();
        info!("{task_id}: {text}");
        let line = NewLogLine {
            machine_id: None,
            sequence: None,
            timestamp: now_ms(),
            stream: "server".into(),
            text,
        };
        if let Err(e) = self.append(task_id, &[line]).await {
            error!("writing to the log of task {task_id}: {e}");
        }
    }

    /// Stores a step and wakes readers (best effort: a failure is logged).
    pub(crate) async fn save_step(&self, step: &TaskStep) {
        if let Err(e) = self.state.store.update_step(step).await {
            error!(
                "saving step {} of task {}: {e}",
                step.machine_name, step.task_id
            );
        }
        self.state_changed(&step.task_id);
    }

    /// Marks a step final.
    pub(crate) async fn finish_step(
        &self,
        step: &mut TaskStep,
        state: TaskState,
        error: Option<String>,
    ) {
        step.state = state;
        step.error = error;
        step.completed_at = Some(now_ms());
        if step.started_at.is_none() {
            step.started_at = step.completed_at;
        }
        self.save_step(step).await;
    }

    async fn set_task_state(&self, task_id: &str, state: TaskState, error: Option<&str>) {
        if let Err(e) = self
            .state
            .store
            .set_task_state(task_id, state, error, now_ms())
            .await
        {
            error!("setting task {task_id} {state:?}: {e}");
        }
        self.state_changed(task_id);
    }

    /// Runs a task to its end (or until the server stops).
    async fn run_task(self: &Arc<Self>, task: Task, cancel: CancellationToken) {
        let store = self.state.store.clone();
        let id = task.id.clone();
        // Read again now that the cancel token is registered: a cancel request
        // that came in between is seen either here or through the token.
        let task = match store.task(&id).await {
            Ok(Some(t)) => t,
            Ok(None) => return warn!("task {id} disappeared before it ran"),
            Err(e) => return error!("loading task {id}: {e}"),
        };
        if task.state.is_final() {
            return;
        }
        if task.cancel_requested {
            cancel.cancel();
        }
        let steps = match store.task_steps(&id).await {
            Ok(s) => s,
            Err(e) => return error!("loading the steps of task {id}: {e}"),
        };
        let resumed = task.state == TaskState::Executing;
        if !resumed {
            self.set_task_state(&id, TaskState::Executing, None).await;
        }
        let todo = steps.iter().filter(|s| !s.state.is_final()).count();
        if resumed {
            self.server_log(
                &id,
                format!(
                    "Resuming task ({todo} of {} machines unfinished)",
                    steps.len()
                ),
            )
            .await;
        } else {
            self.server_log(&id, format!("Task started: {}", task.description))
                .await;
        }

        let outcome = match task.kind.as_str() {
            KIND_SCRIPT => match serde_json::from_value::<ScriptRequest>(task.arguments.clone()) {
                Ok(args) => {
                    let spec = Arc::new(script::ScriptSpec::from(&args));
                    self.run_steps(&id, steps, &cancel, move |eng, step, cancel| {
                        let spec = spec.clone();
                        Box::pin(async move {
                            let resumed = step.state == TaskState::Executing;
                            script::run_step(&eng, step, &spec, &cancel, resumed).await;
                            None
                        })
                    })
                    .await
                }
                Err(e) => {
                    let why = format!("the task's arguments cannot be read: {e}");
                    self.fail_unfinished(&id, &why).await;
                    Some(Vec::new())
                }
            },
            KIND_DEPLOY => match serde_json::from_value::<DeployArgs>(task.arguments.clone()) {
                Ok(args) => {
                    let args = Arc::new(args);
                    self.run_steps(&id, steps, &cancel, move |eng, step, cancel| {
                        let args = args.clone();
                        Box::pin(async move {
                            deploy::run_deploy_step(&eng, step, &args, &cancel).await;
                            None
                        })
                    })
                    .await
                }
                Err(e) => {
                    let why = format!("the task's arguments cannot be read: {e}");
                    self.fail_unfinished(&id, &why).await;
                    Some(Vec::new())
                }
            },
            KIND_UPGRADE => {
                self.run_steps(&id, steps, &cancel, |eng, step, cancel| {
                    Box::pin(async move {
                        deploy::run_upgrade_step(&eng, step, &cancel).await;
                        None
                    })
                })
                .await
            }
            KIND_HEALTH => {
                self.run_steps(&id, steps, &cancel, |eng, step, cancel| {
                    Box::pin(async move { health::run_step(&eng, step, &cancel).await })
                })
                .await
            }
            other => {
                let why = format!("task kind '{other}' is not known to this server");
                self.fail_unfinished(&id, &why).await;
                Some(Vec::new())
            }
        };
        let Some(health) = outcome else {
            // The server is stopping: leave the task as it is, to resume.
            return;
        };
        self.finish_task(&task, &cancel, &health).await;
    }

    /// Runs every unfinished step, at most [`MAX_PARALLEL_STEPS`] at once. Returns
    /// the health results the steps reported, or None when the server stopped.
    async fn run_steps<F>(
        self: &Arc<Self>,
        task_id: &str,
        steps: Vec<TaskStep>,
        cancel: &CancellationToken,
        run: F,
    ) -> Option<Vec<(String, HealthStatus)>>
    where
        F: Fn(
            Arc<Engine>,
            TaskStep,
            CancellationToken,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Option<(String, HealthStatus)>> + Send>,
        >,
    {
        let slots = Arc::new(Semaphore::new(MAX_PARALLEL_STEPS));
        let mut set = JoinSet::new();
        for step in steps.into_iter().filter(|s| !s.state.is_final()) {
            let (eng, slots, cancel) = (self.clone(), slots.clone(), cancel.clone());
            let work = run(self.clone(), step.clone(), cancel.clone());
            set.spawn(async move {
                let mut step = step;
                let _slot = tokio::select! {
                    slot = slots.acquire_owned() => slot.ok(),
                    _ = eng.shutdown.cancelled() => return None,
                    // A queued step never starts once cancel was requested; a
                    // step already executing (resumed) must be cancelled on the
                    // tentacle, which its runner does.
                    _ = cancel.cancelled(), if step.state == TaskState::Queued => {
                        eng.finish_step(&mut step, TaskState::Canceled, Some("canceled before it started".into())).await;
                        return None;
                    }
                };
                work.await
            });
        }
        let mut health = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Some(h)) => health.push(h),
                Ok(None) => {}
                Err(e) => error!("a step of task {task_id} failed: {e}"),
            }
        }
        if self.shutdown.is_cancelled() {
            return None;
        }
        Some(health)
    }

    /// Marks every unfinished step of a task Failed with `why`.
    async fn fail_unfinished(&self, task_id: &str, why: &str) {
        let steps = match self.state.store.task_steps(task_id).await {
            Ok(s) => s,
            Err(e) => return error!("loading the steps of task {task_id}: {e}"),
        };
        for mut step in steps.into_iter().filter(|s| !s.state.is_final()) {
            self.finish_step(&mut step, TaskState::Failed, Some(why.to_string()))
                .await;
        }
    }

    /// Decides and records the task's final state from its steps.
    async fn finish_task(
        &self,
        task: &Task,
        cancel: &CancellationToken,
        health: &[(String, HealthStatus)],
    ) {
        let id = &task.id;
        let steps = match self.state.store.task_steps(id).await {
            Ok(s) => s,
            Err(e) => return error!("loading the steps of task {id}: {e}"),
        };
        let total = steps.len();
        let failed: Vec<&TaskStep> = steps
            .iter()
            .filter(|s| s.state != TaskState::Success)
            .collect();
        let cancel_requested = cancel.is_cancelled()
            || matches!(self.state.store.task(id).await, Ok(Some(t)) if t.cancel_requested);
        let (state, error) = if cancel_requested {
            (TaskState::Canceled, Some("canceled on request".to_string()))
        } else if failed.is_empty() {
            (TaskState::Success, None)
        } else if task.kind == KIND_HEALTH {
            (
                TaskState::Failed,
                Some(health_summary(total, health, &failed)),
            )
        } else {
            let names: Vec<&str> = failed.iter().map(|s| s.machine_name.as_str()).collect();
            (
                TaskState::Failed,
                Some(format!(
                    "{} of {total} machines failed: {}; {} succeeded",
                    failed.len(),
                    names.join(", "),
                    total - failed.len()
                )),
            )
        };
        let summary = match (&state, &error) {
            (TaskState::Success, _) => format!(
                "Task finished: Success ({total} machine{})",
                if total == 1 { "" } else { "s" }
            ),
            (s, Some(e)) => format!("Task finished: {s:?}: {e}"),
            (s, None) => format!("Task finished: {s:?}"),
        };
        self.server_log(id, summary).await;
        self.set_task_state(id, state, error.as_deref()).await;
    }
}

/// "2 of 3 machines unavailable: a, b; 1 unhealthy: c".
fn health_summary(total: usize, health: &[(String, HealthStatus)], failed: &[&TaskStep]) -> String {
    let of = |status: HealthStatus| -> Vec<&str> {
        health
            .iter()
            .filter(|(_, s)| *s == status)
            .map(|(n, _)| n.as_str())
            .collect()
    };
    let (unavailable, unhealthy) = (of(HealthStatus::Unavailable), of(HealthStatus::Unhealthy));
    let mut parts = Vec::new();
    if !unavailable.is_empty() {
        parts.push(format!(
            "{} of {total} machines unavailable: {}",
            unavailable.len(),
            unavailable.join(", ")
        ));
    }
    if !unhealthy.is_empty() {
        parts.push(format!(
            "{} of {total} machines unhealthy: {}",
            unhealthy.len(),
            unhealthy.join(", ")
        ));
    }
    let others: Vec<&str> = failed
        .iter()
        .map(|s| s.machine_name.as_str())
        .filter(|n| !unavailable.contains(n) && !unhealthy.contains(n))
        .collect();
    if !others.is_empty() {
        parts.push(format!(
            "{} of {total} machines not checked: {}",
            others.len(),
            others.join(", ")
        ));
    }
    parts.join("; ")
}

/// Starts the engine's background work for a started server: resuming the
/// unfinished tasks of a previous run, and scheduled health checks. Everything
/// stops when `shutdown` is cancelled (the join set's entry waits for that, bounded).
pub fn spawn_background(state: &AppState, shutdown: CancellationToken, tasks: &mut JoinSet<()>) {
    let engine = Engine::of(state);
    tasks.spawn({
        let engine = engine.clone();
        async move {
            shutdown.cancelled().await;
            engine.stop().await;
        }
    });
    engine.tracker.spawn({
        let engine = engine.clone();
        async move { engine.resume().await }
    });
    engine.tracker.spawn({
        let engine = engine.clone();
        async move { engine.schedule_health_checks().await }
    });
}

impl Engine {
    /// Resumes the unfinished script, deployment and upgrade tasks of a previous run; fails its health
    /// checks (their results would be stale).
    async fn resume(self: &Arc<Self>) {
        let tasks = match self.state.store.unfinished_tasks().await {
            Ok(t) => t,
            Err(e) => return error!("listing unfinished tasks to resume: {e}"),
        };
        // Oldest first; only those of a previous run (the API may start new ones
        // meanwhile, and those run already).
        for task in tasks.into_iter().rev() {
            if self.shutdown.is_cancelled() {
                return;
            }
            if task.created_at >= self.created_at || self.is_running(&task.id) {
                continue;
            }
            match task.kind.as_str() {
                KIND_SCRIPT | KIND_DEPLOY | KIND_UPGRADE => {
                    info!("resuming task {} ({})", task.id, task.description);
                    self.start(task);
                }
                _ => {
                    let why = "server restarted";
                    self.server_log(&task.id, format!("Task failed: {why}"))
                        .await;
                    self.fail_unfinished(&task.id, why).await;
                    self.set_task_state(&task.id, TaskState::Failed, Some(why))
                        .await;
                }
            }
        }
    }

    /// Every [`HEALTH_SCAN_INTERVAL`], runs a health task for the machines due one
    /// by their policy's interval (never two scheduled checks at once).
    async fn schedule_health_checks(self: &Arc<Self>) {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + HEALTH_SCAN_INTERVAL,
            HEALTH_SCAN_INTERVAL,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<String> = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if last.as_deref().is_some_and(|id| self.is_running(id)) {
                continue;
            }
            match self.scheduled_health_task().await {
                Ok(Some(task)) => {
                    last = Some(task.id.clone());
                    self.start(task);
                }
                Ok(None) => {}
                Err(e) => warn!("scheduled health check: {e}"),
            }
        }
    }

    async fn scheduled_health_task(&self) -> octo_store::Result<Option<Task>> {
        let store = &self.state.store;
        let now = now_ms();
        let mut policies: HashMap<String, Option<MachinePolicy>> = HashMap::new();
        let mut due = Vec::new();
        for m in store.list_machines(&MachineFilter::default()).await? {
            if !policies.contains_key(&m.policy) {
                policies.insert(m.policy.clone(), store.policy(&m.policy).await?);
            }
            let interval_s = policies
                .get(&m.policy)
                .and_then(|p| p.as_ref())
                .map_or(3600, |p| p.health_check_interval_s.max(1));
            let is_due = m
                .last_health_at
                .is_none_or(|t| now.saturating_sub(t) >= interval_s.saturating_mul(1000));
            if is_due {
                due.push(m);
            }
        }
        if due.is_empty() {
            return Ok(None);
        }
        let ids: Vec<i64> = due.iter().map(|m| m.id).collect();
        let names: Vec<String> = due.iter().map(|m| m.name.clone()).collect();
        let description = format!("Scheduled health check of {}", super::machine_list(&due));
        let arguments = serde_json::json!({ "machines": names, "scheduled": true });
        let task = store
            .create_task(KIND_HEALTH, &description, &arguments, &ids, now)
            .await?;
        info!("created task {} ({description})", task.id);
        Ok(Some(task))
    }
}
