//! What a step may use: [`StepContext`]. A step never sees the engine: it
//! writes its log and progress through [`TaskLog`], reaches its machine through
//! comms, reads the store, watches its cancellation, and waits for a person's
//! decision through the guidance board. The engine records how it ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use octo_api_types::Guidance;
use octo_store::{now_ms, Machine, NewLogLine, Store, TaskState, TaskStep};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, info};

use crate::feed::PackageFiles;
use crate::notify::{lock, Notifiers};
use crate::secrets::{Masker, MasterKey};
use crate::tool::ToolBuild;

/// The log and progress of one task: stores lines and step changes, and wakes
/// the task's live readers.
#[derive(Debug, Clone)]
pub struct TaskLog {
    store: Arc<dyn Store>,
    notifiers: Arc<Notifiers>,
    task_id: Arc<str>,
    /// The task's secret values: masked in every line stored.
    masker: Arc<Masker>,
    /// Encrypts the values learned mid-run for the store.
    master_key: Arc<MasterKey>,
    /// Values learned mid-run not yet recorded in the store.
    learned: Arc<Mutex<Vec<String>>>,
    /// Lines wait until the task's first line is stored (see
    /// [`TaskLog::gated`], [`TaskLog::offering_first_line`]).
    first: Option<Arc<FirstLine>>,
    /// Every write waits until this is cancelled: a step's writes while the
    /// step is being stored as started (see [`TaskLog::after_step_start`]).
    step_start: Option<CancellationToken>,
}

/// A task's first line, for the writers that must come after it.
#[derive(Debug)]
pub(crate) struct FirstLine {
    /// The line and the task's new state, until someone takes them to store
    /// them (none when the line is stored by other means).
    pending: Mutex<Option<(NewLogLine, TaskState)>>,
    /// Cancelled once the line is stored (or its writer gave up).
    stored: CancellationToken,
}

impl FirstLine {
    fn new(pending: Option<(NewLogLine, TaskState)>) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(pending),
            stored: CancellationToken::new(),
        })
    }

    /// The line and the task's state to store, once: whoever takes them
    /// stores them, and the lines that wait go on when the guard drops.
    pub(crate) fn take(&self) -> Option<(NewLogLine, TaskState, DropGuard)> {
        lock(&self.pending)
            .take()
            .map(|(line, state)| (line, state, self.stored.clone().drop_guard()))
    }

    /// Waits until the line is stored.
    pub(crate) async fn stored(&self) {
        self.stored.cancelled().await;
    }
}

impl TaskLog {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        notifiers: Arc<Notifiers>,
        task_id: &str,
        masker: Arc<Masker>,
        master_key: Arc<MasterKey>,
    ) -> Self {
        Self {
            store,
            notifiers,
            task_id: task_id.into(),
            masker,
            master_key,
            learned: Arc::default(),
            first: None,
            step_start: None,
        }
    }

    /// This log for writers whose lines must come after a line still being
    /// stored through `self` (a task's "Task started", while its steps
    /// start): their lines wait until the guard is dropped. Their other
    /// writes (a step's state) do not wait.
    pub(crate) fn gated(&self) -> (Self, DropGuard) {
        let first = FirstLine::new(None);
        let guard = first.stored.clone().drop_guard();
        let log = Self {
            first: Some(first),
            ..self.clone()
        };
        (log, guard)
    }

    /// As [`TaskLog::gated`], for a task's steps while its first line
    /// (`text`, with the task's new `state`) is not stored yet: the first step
    /// stored as started through the returned log stores the line and the
    /// state with it, in one call where that saves one
    /// ([`Store::start_task_with_step`]). Whoever else stores it takes it
    /// from the [`FirstLine`] ([`FirstLine::take`]).
    pub(crate) fn offering_first_line(
        &self,
        text: &str,
        state: TaskState,
    ) -> (Self, Arc<FirstLine>) {
        let first = FirstLine::new(Some((self.server_line(text), state)));
        let log = Self {
            first: Some(first.clone()),
            ..self.clone()
        };
        (log, first)
    }

    /// This log for a step's own writers while the step's start is stored
    /// through `self`: every write through the returned log, lines and the
    /// step's state alike, waits until the guard is dropped, so that nothing
    /// the step stores can land before (or be overwritten by) its start.
    pub(crate) fn after_step_start(&self) -> (Self, DropGuard) {
        let token = CancellationToken::new();
        let guard = token.clone().drop_guard();
        let log = Self {
            step_start: Some(token),
            ..self.clone()
        };
        (log, guard)
    }

    /// Waits until the step's start is stored (see [`TaskLog::after_step_start`]).
    async fn step_turn(&self) {
        if let Some(start) = &self.step_start {
            start.cancelled().await;
        }
    }

    /// Wakes the readers of the task's lines and of its state.
    fn lines_and_state_changed(&self) {
        self.notifiers.log_changed(&self.task_id);
        self.notifiers.state_changed(&self.task_id);
    }

    /// Waits until lines may be stored (see [`TaskLog::gated`]).
    async fn line_turn(&self) {
        self.step_turn().await;
        if let Some(first) = self.first.as_ref().filter(|f| !f.stored.is_cancelled()) {
            first.stored().await;
        }
    }

    /// Masks `value` in every line stored from now on (an output variable a
    /// script marked sensitive, say). A new value is recorded in the store,
    /// encrypted, before the next lines are stored, so the task's other
    /// writers (another node's steps, this task resumed elsewhere) mask it too.
    pub fn add_secret(&self, value: &str) {
        if self.masker.add(value) {
            lock(&self.learned).push(value.to_string());
        }
    }

    /// Records the values learned since the last lines were stored and, on a
    /// cluster, tells the other nodes (before the lines that follow are
    /// stored, so that no reader sees a line another node did not mask).
    async fn record_learned(&self) -> octo_store::Result<()> {
        let learned = std::mem::take(&mut *lock(&self.learned));
        if learned.is_empty() {
            return Ok(());
        }
        for value in &learned {
            let cipher = self.master_key.encrypt(value).map_err(|e| {
                octo_store::StoreError::Invalid(format!(
                    "encrypting a value to mask in the log of task {}: {e}",
                    self.task_id
                ))
            })?;
            self.store.add_task_mask(&self.task_id, &cipher).await?;
        }
        if self.store.shared() {
            self.store
                .publish(&octo_store::ClusterEvent::MasksChanged {
                    task_id: self.task_id.to_string(),
                })
                .await?;
        }
        Ok(())
    }

    /// [`TaskLog::record_learned`] before lines are stored; a failure is
    /// logged. The lines are masked here all the same; only other writers of
    /// the task's log may not know the value.
    async fn record_learned_or_say(&self) {
        if let Err(e) = self.record_learned().await {
            error!(
                "recording a value to mask in the log of task {}: {e}",
                self.task_id
            );
        }
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// Stores log lines, secrets masked, and wakes readers.
    pub async fn append(&self, lines: &[NewLogLine]) -> octo_store::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        self.line_turn().await;
        self.record_learned_or_say().await;
        if self.masker.is_empty() {
            self.store.append_log(&self.task_id, lines).await?;
        } else {
            let masked: Vec<NewLogLine> = lines
                .iter()
                .map(|l| NewLogLine {
                    text: self.masker.mask(&l.text),
                    ..l.clone()
                })
                .collect();
            self.store.append_log(&self.task_id, &masked).await?;
        }
        self.notifiers.log_changed(&self.task_id);
        Ok(())
    }

    /// Writes a server line about the task (best effort: a failure is logged).
    pub async fn server(&self, text: impl Into<String>) {
        self.line_turn().await;
        let line = self.server_line(&text.into());
        self.put(line).await;
    }

    /// Stores a line made before (best effort: a failure is logged).
    pub(crate) async fn put(&self, line: NewLogLine) {
        if let Err(e) = self.append(&[line]).await {
            error!("writing to the log of task {}: {e}", self.task_id);
        }
    }

    /// A server line, masked (and shown in the server's own log).
    pub(crate) fn server_line(&self, text: &str) -> NewLogLine {
        let text = self.masker.mask(text);
        info!("{}: {text}", self.task_id);
        NewLogLine {
            machine_id: None,
            sequence: None,
            timestamp: now_ms(),
            stream: "server".into(),
            text,
        }
    }

    /// Writes a server line and the task's new state together (see
    /// [`Store::set_task_state_logged`]), and wakes readers of both. The
    /// caller tells the other nodes of a cluster.
    pub(crate) async fn server_with_state(
        &self,
        text: String,
        state: TaskState,
        error: Option<&str>,
    ) -> octo_store::Result<()> {
        self.line_turn().await;
        let line = self.server_line(&text);
        self.line_with_state(line, state, error).await
    }

    /// As [`TaskLog::server_with_state`], with a line made before (and
    /// without waiting for a first line: it may be that line).
    pub(crate) async fn line_with_state(
        &self,
        line: NewLogLine,
        state: TaskState,
        error: Option<&str>,
    ) -> octo_store::Result<()> {
        self.step_turn().await;
        self.record_learned_or_say().await;
        let stored = self
            .store
            .set_task_state_logged(&self.task_id, state, error, now_ms(), &line)
            .await;
        self.lines_and_state_changed();
        stored
    }

    /// Stores a task's last step's end (its server lines, then the step) and
    /// then a server line and the task's new state (see
    /// [`Store::finish_step_and_task`]), and wakes readers. Says how each
    /// part went. The caller tells the other nodes of a cluster.
    pub(crate) async fn step_and_task_end(
        &self,
        step: &TaskStep,
        lines: &[NewLogLine],
        text: String,
        state: TaskState,
        error: Option<&str>,
    ) -> (octo_store::Result<()>, octo_store::Result<()>) {
        self.line_turn().await;
        self.record_learned_or_say().await;
        let line = self.server_line(&text);
        let stored = self
            .store
            .finish_step_and_task(step, lines, state, error, now_ms(), &line)
            .await;
        self.lines_and_state_changed();
        stored
    }

    /// Stores server lines about a step and then the step as it is now, in
    /// one call where that saves one (see [`Store::update_step_logged`]),
    /// and wakes readers of both (best effort: a failure is logged). True
    /// when stored.
    pub async fn save_step_logged(&self, step: &TaskStep, lines: &[NewLogLine]) -> bool {
        self.line_turn().await;
        self.record_learned_or_say().await;
        let stored = step_stored(step, self.store.update_step_logged(step, lines).await);
        self.lines_and_state_changed();
        stored
    }

    /// Stores a step as it is now and wakes readers (best effort: a failure is logged);
    /// true when stored. The first step stored as started takes the task's
    /// first line with it when it is offered (see [`TaskLog::offering_first_line`]).
    pub async fn save_step(&self, step: &TaskStep) -> bool {
        self.step_turn().await;
        let first = match &self.first {
            Some(f) if step.state == TaskState::Executing => f.take(),
            _ => None,
        };
        if let Some((line, state, _stored)) = first {
            self.record_learned_or_say().await;
            let (started, saved) = self
                .store
                .start_task_with_step(state, now_ms(), &line, step)
                .await;
            if let Err(e) = started {
                error!("setting task {} {state:?}: {e}", self.task_id);
            }
            let stored = step_stored(step, saved);
            self.lines_and_state_changed();
            return stored;
        }
        let stored = step_stored(step, self.store.update_step(step).await);
        self.notifiers.state_changed(&self.task_id);
        stored
    }
}

/// Whether `step` was stored, by what storing it gave; a failure is logged.
fn step_stored(step: &TaskStep, r: octo_store::Result<()>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            error!(
                "saving step {} of task {}: {e}",
                step.machine_name, step.task_id
            );
            false
        }
    }
}

/// Steps waiting for a person's decision (guided failure), by task and machine.
#[derive(Debug, Default)]
pub struct GuidanceBoard {
    waiting: Mutex<HashMap<(String, i64), oneshot::Sender<Guidance>>>,
}

impl GuidanceBoard {
    /// Registers a step as waiting; the receiver gets the decision.
    fn wait(&self, task_id: &str, machine_id: i64) -> oneshot::Receiver<Guidance> {
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert((task_id.to_string(), machine_id), tx);
        rx
    }

    /// No longer waiting (decided, canceled or stopping).
    fn forget(&self, task_id: &str, machine_id: i64) {
        lock(&self.waiting).remove(&(task_id.to_string(), machine_id));
    }

    /// Delivers a decision; false when that step is not waiting for one here.
    pub fn deliver(&self, task_id: &str, machine_id: i64, g: Guidance) -> bool {
        let waiting = lock(&self.waiting).remove(&(task_id.to_string(), machine_id));
        waiting.is_some_and(|tx| tx.send(g).is_ok())
    }
}

/// Everything one machine's step may use (cheap to clone).
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The machine's name, for messages.
    pub machine_name: String,
    /// The task's log and progress.
    pub log: TaskLog,
    pub store: Arc<dyn Store>,
    pub comms: octo_comms::ServerComms,
    /// Cancelled when a person cancels the task.
    pub cancel: CancellationToken,
    /// Cancelled when the server stops: the step returns at once, leaving its
    /// stored state to resume from.
    pub shutdown: CancellationToken,
    /// The deployment tool this server pushes, or why there is none.
    pub tool: Arc<Result<ToolBuild, String>>,
    /// The tentacle binary this server upgrades tentacles to, or why there is none.
    pub tentacle: Arc<Result<crate::TentacleBuild, String>>,
    /// Where package files are.
    pub packages: PackageFiles,
    /// Most bytes of its machine's output a step stores (the rest is counted
    /// and dropped).
    pub max_log_bytes: u64,
    pub(crate) guidance: Arc<GuidanceBoard>,
    /// The machine's row as the step's placement read it just before (on a
    /// cluster), for the step's first read of it (see
    /// [`StepContext::machine_row`]).
    pub(crate) placed: Arc<Mutex<Option<Machine>>>,
}

impl StepContext {
    /// This context for the step's own writes while its start is stored
    /// through `self`: they wait until the guard drops (see
    /// [`TaskLog::after_step_start`]).
    pub(crate) fn after_step_start(&self) -> (Self, DropGuard) {
        let (log, guard) = self.log.after_step_start();
        (
            Self {
                log,
                ..self.clone()
            },
            guard,
        )
    }

    /// Machine `id`'s row (no lists): the one the step's placement read just
    /// before, the first time; the store's otherwise. One read of the row
    /// for a step's start, not two.
    pub async fn machine_row(&self, id: i64) -> octo_store::Result<Option<Machine>> {
        let placed = lock(&self.placed).take().filter(|m| m.id == id);
        match placed {
            Some(m) => Ok(Some(m)),
            None => self.store.machine_row(id).await,
        }
    }

    /// Writes "MACHINE: text" to the task's log.
    pub async fn say(&self, text: impl std::fmt::Display) {
        self.log
            .server(format!("{}: {text}", self.machine_name))
            .await;
    }

    /// Stores the step's progress (state, resume point).
    pub async fn save(&self, step: &TaskStep) {
        self.log.save_step(step).await;
    }

    /// Waits for a person's decision about this step, or None when the task is
    /// canceled or the server stops. The step is saved and `announce` written
    /// once the wait is registered, so whoever reads them can decide at once.
    pub async fn wait_for_guidance(&self, step: &TaskStep, announce: String) -> Option<Guidance> {
        let rx = self.guidance.wait(&step.task_id, step.machine_id);
        self.save(step).await;
        self.say(announce).await;
        let decision = tokio::select! {
            d = rx => d.ok(),
            _ = self.cancel.cancelled() => None,
            _ = self.shutdown.cancelled() => None,
        };
        self.guidance.forget(&step.task_id, step.machine_id);
        decision
    }

    /// The server's deployment tool, or why there is none.
    pub fn tool(&self) -> Result<Arc<ToolBuild>, String> {
        match self.tool.as_ref() {
            Ok(t) => Ok(Arc::new(t.clone())),
            Err(why) => Err(format!("this server has no deployment tool to push: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use octo_store_tests::fixtures::new_task;
    use std::time::Duration;

    /// Lines through a gated log wait for the guard; the step's state does
    /// not. The line stored meanwhile through the log itself comes first.
    #[tokio::test]
    async fn a_gated_logs_lines_wait_for_the_first_line() {
        let store: Arc<dyn Store> = Arc::new(
            octo_store_sqlite::SqliteStore::open_in_memory()
                .await
                .unwrap(),
        );
        let (task, steps) = store
            .create_task_with_steps(&new_task("Script", "t", &serde_json::json!({}), &[]), 1)
            .await
            .unwrap();
        assert!(steps.is_empty());
        let (key, _) = MasterKey::generate().unwrap();
        let log = TaskLog::new(
            store.clone(),
            Arc::default(),
            &task.id,
            Arc::default(),
            Arc::new(key),
        );
        let (gated, guard) = log.gated();
        let mut waiting = Box::pin(gated.server("a step's line"));
        assert!(futures_util::poll!(&mut waiting).is_pending());
        log.server("Task started").await;
        assert!(futures_util::poll!(&mut waiting).is_pending());
        drop(guard);
        waiting.await;
        gated.server("after").await;
        let texts = texts_of(store.as_ref(), &task.id).await;
        assert_eq!(texts, ["Task started", "a step's line", "after"]);
    }

    /// The texts of a task's first lines.
    async fn texts_of(store: &dyn Store, task_id: &str) -> Vec<String> {
        store
            .task_log(task_id, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    /// A store with task "t" of one step (machine web01), the step as
    /// started (not stored so), and the task's log.
    async fn one_step_task() -> (Arc<dyn Store>, octo_store::Task, TaskStep, TaskLog) {
        let store: Arc<dyn Store> = Arc::new(
            octo_store_sqlite::SqliteStore::open_in_memory()
                .await
                .unwrap(),
        );
        let m = store
            .create_machine(&octo_store_tests::fixtures::new_machine("web01", &[], &[]))
            .await
            .unwrap();
        let (task, mut steps) = store
            .create_task_with_steps(&new_task("Script", "t", &serde_json::json!({}), &[m.id]), 1)
            .await
            .unwrap();
        let (key, _) = MasterKey::generate().unwrap();
        let log = TaskLog::new(
            store.clone(),
            Arc::default(),
            &task.id,
            Arc::default(),
            Arc::new(key),
        );
        let mut step = steps.remove(0);
        step.state = TaskState::Executing;
        step.started_at = Some(now_ms());
        (store, task, step, log)
    }

    /// An offered first line goes with the first step stored as started: the
    /// task is Executing with the step, the step's lines wait until then, and
    /// the line is stored once, first.
    #[tokio::test]
    async fn the_first_step_started_takes_the_tasks_first_line() {
        let (store, task, step, log) = one_step_task().await;
        let (steps_log, first) = log.offering_first_line("Task started", TaskState::Executing);
        let mut waiting = Box::pin(steps_log.server("a step's line"));
        assert!(futures_util::poll!(&mut waiting).is_pending());
        steps_log.save_step(&step).await;
        assert!(first.take().is_none(), "taken once");
        let stored = store.task(&task.id).await.unwrap().unwrap();
        assert_eq!(stored.state, TaskState::Executing);
        assert!(stored.started_at.is_some());
        let stored_step = store
            .task_step(&task.id, step.machine_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored_step.state, TaskState::Executing);
        waiting.await;
        // A second step's start is a step's write alone.
        steps_log.save_step(&step).await;
        let texts = texts_of(store.as_ref(), &task.id).await;
        assert_eq!(texts, ["Task started", "a step's line"]);
    }

    /// A step's writes through the log for its own writers wait until its
    /// start (stored through the log itself) is: its lines and its later
    /// state land after the start, never under it.
    #[tokio::test]
    async fn a_steps_writes_wait_for_its_start() {
        let (store, task, step, log) = one_step_task().await;
        let started = step;
        let progress = TaskStep {
            next_sequence: 7,
            ..started.clone()
        };
        let (step_log, start_stored) = log.after_step_start();
        let mut line = Box::pin(step_log.server("web01: a line"));
        let mut later = Box::pin(step_log.save_step(&progress));
        assert!(futures_util::poll!(&mut line).is_pending());
        assert!(futures_util::poll!(&mut later).is_pending());
        // The start, stored meanwhile: the step's writes are still waiting.
        // (A write of the step's that went first would hold the store's
        // write turn, unpolled: the start would never be stored.)
        let start = tokio::time::timeout(Duration::from_secs(5), log.save_step(&started)).await;
        assert!(
            start.is_ok_and(|stored| stored),
            "the step's start was not stored: one of the step's writes went before it"
        );
        assert!(futures_util::poll!(&mut line).is_pending());
        assert!(futures_util::poll!(&mut later).is_pending());
        drop(start_stored);
        line.await;
        assert!(later.await);
        let stored = store
            .task_step(&task.id, started.machine_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.state, TaskState::Executing);
        assert_eq!(stored.next_sequence, 7, "the step's own write came last");
        let texts = texts_of(store.as_ref(), &task.id).await;
        assert_eq!(texts, ["web01: a line"]);
    }
}
