//! The task engine of one server (one per running server).
//!
//! The engine knows, in memory only:
//! - which tasks run here and their cancel tokens (a task runs at most once: a
//!   second `start` of a running task is ignored);
//! - which steps run here, by machine, each with a cancel token of its own (a
//!   child of its task's), so that deleting a machine cancels its steps
//!   ([`Engine::stop_machine`]);
//! - per task with live log readers, a `watch` channel of change counters
//!   ([`Notifiers`]);
//! - the steps waiting for a person's decision ([`GuidanceBoard`]).
//!
//! It runs a task's steps through the step runners of its kind, each with a
//! [`StepContext`], and records how each ended, then the task's outcome.
//! Every spawned future runs on the engine's `TaskTracker` and ends on its
//! shutdown token; a task interrupted by shutdown keeps its stored state and is
//! resumed by the next start ([`Engine::spawn_background`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use octo_api_types::{Guidance, ScriptRequest};
use octo_store::{
    now_ms, ClusterEvent, HealthStatus, Machine, MachineFilter, MachinePolicy, NewLogLine, NewTask,
    Store, Task, TaskState, TaskStep,
};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::context::{GuidanceBoard, StepContext, TaskLog};
use crate::feed::PackageFiles;
use crate::notify::{lock, Changes, Notifiers};
use crate::secrets::{Masker, MasterKey};
use crate::steps::{deploy, health, script, tentacle_upgrade, Afterwards, StepEnd};
use crate::tool::ToolBuild;
mod cluster;

use crate::{
    kind, machine_list, max_parallel_steps_of, DeployArgs, StepLimits, TentacleUpgradeArgs,
};

/// How often the scheduler looks for machines due a health check, unless
/// [`EngineDeps::health_scan_interval`] says otherwise.
pub const DEFAULT_HEALTH_SCAN_INTERVAL: Duration = Duration::from_secs(30);
/// The cluster-wide lease of the health-check scheduler: held by one node,
/// renewed every scan (for two scans), taken over once it runs out.
const HEALTH_LEASE: &str = "scheduled-health-checks";
/// How long a stopping server waits for its tasks to notice.
const STOP_WAIT: Duration = Duration::from_secs(8);
/// How long a step stopped by [`Engine::stop_machine`] and abandoned (its
/// machine could not be told in time) may take to be recorded.
const ABANDON_WAIT: Duration = Duration::from_secs(5);

/// How long a new task's first line waits for its first step to be stored as
/// started (the two are then one store call) before it is stored alone: a step
/// waiting for a slot of the node's, say. As the log's batching delay.
const FIRST_LINE_WAIT: Duration = Duration::from_millis(50);

/// How many cancels had found no task to cancel here before a task was
/// created ([`Engine::creation_mark`], [`Engine::start_created`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreationMark(u64);

/// What a task's creation gave, for its run (see [`Engine::start_created`]).
struct Created {
    steps: Vec<TaskStep>,
    /// Secret values as stored with the task: name, ciphertext.
    secrets: Vec<(String, String)>,
    mark: CreationMark,
    /// No cancel found nothing to cancel here between the creation and the
    /// launch (set by [`Engine::launch`]): none can have been for this task.
    no_cancel_missed: bool,
}

/// A step running here, for cancelling one machine's steps.
#[derive(Debug, Clone)]
struct RunningStep {
    machine_name: String,
    /// The step's own cancel token (a child of its task's).
    cancel: CancellationToken,
    /// Ends the step at once, recorded Canceled, without waiting for its machine.
    abandon: CancellationToken,
    /// Why it was canceled, when not by its task.
    reason: Arc<Mutex<Option<String>>>,
    /// Cancelled once the step's end is recorded.
    done: CancellationToken,
}

/// Takes a step out of the running set and marks it done when dropped.
struct StepRegistration {
    engine: Arc<Engine>,
    key: (String, i64),
    done: CancellationToken,
}

impl Drop for StepRegistration {
    fn drop(&mut self) {
        lock(&self.engine.steps).remove(&self.key);
        self.done.cancel();
    }
}

/// How a step run here went.
enum Ran {
    /// It ended (recorded), with the health it reported; or the server stops.
    Done(Box<StepOutcome>),
    /// It stopped because its polling tentacle moved to another node: place it again.
    Moved,
}

/// How one of a task's steps ended, as far as this node knows.
#[derive(Default)]
struct StepOutcome {
    /// The step as this node recorded it at its end; None when it did not
    /// record it (the server stops, or another node ran the step).
    recorded: Option<TaskStep>,
    /// The health it reported (health checks).
    health: Option<(String, HealthStatus)>,
    /// The task's last step to end, its end not stored yet: stored with the
    /// task's (`recorded` is the step as it will be stored).
    deferred: Option<DeferredEnd>,
}

impl StepOutcome {
    fn recorded(step: TaskStep) -> Self {
        Self {
            recorded: Some(step),
            health: None,
            deferred: None,
        }
    }
}

/// A step's end kept for the task's end, to be stored in one call with it
/// (see [`Store::finish_step_and_task`]). Whoever stops the step's machine
/// waits (the registration) until it is stored.
struct DeferredEnd {
    step: TaskStep,
    lines: Vec<NewLogLine>,
    registration: StepRegistration,
    /// Started once the end is stored (see [`StepEnd::Finished`]'s `release`).
    release: Option<Afterwards>,
}

/// Starts `release` (the tentacle's cleanup, see [`StepEnd::Finished`]) when
/// the step's end was stored; otherwise drops it: the tentacle keeps the
/// script (its retention removes it in time), so that a resumed step finds it
/// there, ended, rather than starting it again.
fn release_when_stored(stored: bool, release: Option<Afterwards>) {
    if let Some(work) = release.filter(|_| stored) {
        tokio::spawn(work);
    }
}

/// Counts a task's steps down as they end, so that the last one can leave its
/// end to be stored with the task's (see [`DeferredEnd`]).
struct StepsLeft(AtomicUsize);

impl StepsLeft {
    /// One more step ended; true when it is the last of them (every other
    /// one passed here before).
    fn last_ended(&self) -> bool {
        self.0.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// How the steps of a task ended.
struct StepsRun {
    health: Vec<(String, HealthStatus)>,
    /// Each step this node recorded at its end.
    recorded: Vec<TaskStep>,
    /// Every step handed to the run ended here, recorded.
    all_recorded: bool,
    /// The last step's end, to store with the task's.
    deferred: Option<DeferredEnd>,
}

/// A step registered as running here.
struct Registered {
    running: RunningStep,
    registration: StepRegistration,
}

/// A canceled step's error, saying why when it was canceled for its machine's sake.
fn because(running: &RunningStep, error: Option<String>) -> Option<String> {
    match lock(&running.reason).clone() {
        Some(r) => Some(match error {
            Some(e) if !e.is_empty() => format!("canceled: {r} ({e})"),
            _ => format!("canceled: {r}"),
        }),
        None => error,
    }
}

/// What the engine's steps work with.
#[derive(Debug, Clone)]
pub struct EngineDeps {
    pub store: Arc<dyn Store>,
    pub comms: octo_comms::ServerComms,
    /// The deployment tool this server pushes, or why there is none.
    pub tool: Arc<Result<ToolBuild, String>>,
    /// The tentacle binary this server upgrades tentacles to, or why there is none.
    pub tentacle: Arc<Result<crate::TentacleBuild, String>>,
    /// Where the built-in feed keeps package files.
    pub packages: PackageFiles,
    /// Decrypts the secret values of tasks.
    pub master_key: Arc<MasterKey>,
    /// At most this many tasks run here at once (more wait, Queued); at least 1.
    pub task_cap: usize,
    /// This node's name: the tasks it takes are recorded as its own.
    pub node_name: String,
    /// How many steps run at once, per task and on this node.
    pub limits: StepLimits,
    /// Most bytes of its machine's output one step stores; the rest is
    /// counted and dropped, and the log says how much.
    pub max_log_bytes_per_step: u64,
    /// How often this node looks for machines due a scheduled health check
    /// (while it holds the scheduler's lease, which lasts two of these).
    pub health_scan_interval: Duration,
}

/// What this engine (node) runs, and what it may take on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// The task cap.
    pub cap: usize,
    /// An operator drained the node: tasks not yet started wait.
    pub draining: bool,
    /// Tasks running (past admission).
    pub tasks: usize,
    /// Machine steps running.
    pub steps: usize,
}

/// A task's place under the cap, given back when dropped.
struct Admitted(watch::Sender<Load>);

/// How a task's admission under the cap went.
enum Admission {
    In(Admitted),
    /// The node runs its cap and the task is to go to a node with room.
    Full,
    /// The server stops first (the task stays as it is).
    Stopped,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.send_modify(|l| l.tasks = l.tasks.saturating_sub(1));
    }
}

/// A running step, counted in [`Load::steps`] until dropped.
struct CountedStep(Arc<AtomicUsize>);

impl CountedStep {
    fn new(count: &Arc<AtomicUsize>) -> CountedStep {
        count.fetch_add(1, Ordering::Relaxed);
        CountedStep(count.clone())
    }
}

impl Drop for CountedStep {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine of one server (see the module documentation).
#[derive(Debug)]
pub struct Engine {
    deps: EngineDeps,
    /// Cancelled when the server stops.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// When this engine was created: unfinished tasks created before are a
    /// previous run's, to resume.
    created_at: i64,
    /// Tasks running here, with their cancel tokens.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Cancels that found no task to cancel here (counted with `running`
    /// locked): see [`Engine::creation_mark`].
    missed_cancels: AtomicU64,
    /// Steps running here, by task and machine id.
    steps: Mutex<HashMap<(String, i64), RunningStep>>,
    notifiers: Arc<Notifiers>,
    guidance: Arc<GuidanceBoard>,
    /// The cap, the drain flag and the running tasks (steps are in `step_count`).
    load: watch::Sender<Load>,
    step_count: Arc<AtomicUsize>,
    /// Steps running on this node, every task together (`limits.per_node`).
    node_slots: Arc<Semaphore>,
    /// Work across nodes (a store several nodes share; idle otherwise).
    cluster: cluster::Cluster,
    /// Held while a finished health check decides on automatic tentacle
    /// upgrades, so two checks never both start one for a machine.
    auto_upgrades: tokio::sync::Mutex<()>,
    /// The maskers of the tasks whose lines are written here (see [`Engine::masker_for`]).
    maskers: Mutex<HashMap<String, Weak<Masker>>>,
}

/// What runs one step of a task.
type StepRunner = Arc<
    dyn Fn(StepContext, TaskStep) -> std::pin::Pin<Box<dyn Future<Output = StepEnd> + Send>>
        + Send
        + Sync,
>;

impl Engine {
    /// A new engine; background work starts with [`Engine::spawn_background`].
    pub fn new(deps: EngineDeps) -> Engine {
        let load = Load {
            cap: deps.task_cap.max(1),
            draining: false,
            tasks: 0,
            steps: 0,
        };
        Engine {
            load: watch::Sender::new(load),
            step_count: Arc::default(),
            node_slots: Arc::new(Semaphore::new(deps.limits.per_node.max(1))),
            deps,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            created_at: now_ms(),
            running: Mutex::new(HashMap::new()),
            missed_cancels: AtomicU64::new(0),
            steps: Mutex::new(HashMap::new()),
            notifiers: Arc::new(Notifiers::default()),
            guidance: Arc::new(GuidanceBoard::default()),
            cluster: cluster::Cluster::default(),
            auto_upgrades: tokio::sync::Mutex::new(()),
            maskers: Mutex::default(),
        }
    }

    /// What runs here now, and the cap and drain flag.
    pub fn load(&self) -> Load {
        let mut load = *self.load.borrow();
        load.steps = self.step_count.load(Ordering::Relaxed);
        load
    }

    /// Drains this node (tasks not yet started wait; running ones go on) or
    /// undrains it (waiting tasks start, up to the cap).
    pub fn set_draining(&self, draining: bool) {
        self.load.send_if_modified(|l| {
            let changed = l.draining != draining;
            l.draining = draining;
            changed
        });
    }

    /// Waits for a place under the cap on an undrained node; a resumed task
    /// (one this node ran before it restarted) or a canceled one goes on at
    /// once. With `give_back` (a new task on a cluster) a node at its cap
    /// does not wait: the task goes to a node with room ([`Admission::Full`]).
    async fn admit(
        &self,
        resumed: bool,
        give_back: bool,
        cancel: &CancellationToken,
        log: &TaskLog,
    ) -> Admission {
        let mut changes = self.load.subscribe();
        let mut told = false;
        loop {
            changes.borrow_and_update();
            let mut taken = false;
            let mut full = false;
            let mut why = String::new();
            self.load.send_if_modified(|l| {
                if resumed || cancel.is_cancelled() || (!l.draining && l.tasks < l.cap) {
                    l.tasks += 1;
                    taken = true;
                } else if give_back && !l.draining {
                    full = true;
                } else if l.draining {
                    why =
                        "this node is draining (`octopus node undrain` lets it start tasks again)"
                            .into();
                } else {
                    why = format!(
                        "this node runs its cap of {} tasks; the task starts when one ends",
                        l.cap
                    );
                }
                taken
            });
            if taken {
                return Admission::In(Admitted(self.load.clone()));
            }
            if full {
                return Admission::Full;
            }
            if !told {
                told = true;
                log.server(format!("Waiting: {why}")).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Admission::Stopped,
                _ = cancel.cancelled() => {}
                r = changes.changed() => if r.is_err() { return Admission::Stopped },
            }
        }
    }

    /// Room for more tasks here: the cap less the tasks started here (those
    /// still waiting to be admitted too); none on a draining node.
    fn room(&self) -> usize {
        let load = *self.load.borrow();
        if load.draining {
            return 0;
        }
        load.cap.saturating_sub(lock(&self.running).len())
    }

    /// Cancelled when the server stops.
    pub fn stopping(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `work` on the engine's tracker (so a stopping server waits for it, bounded).
    pub fn spawn<F>(&self, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(work);
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
    pub fn start(self: &Arc<Self>, task: Task) {
        self.launch(task, None);
    }

    /// To take just before creating a task that [`Engine::start_created`]
    /// then starts: it tells whether a cancel could have come for the task
    /// between its creation and its launch (the API stores a cancel, then
    /// finds no token to cancel).
    pub fn creation_mark(&self) -> CreationMark {
        let _running = lock(&self.running);
        CreationMark(self.missed_cancels.load(Ordering::Relaxed))
    }

    /// As [`Engine::start`], for a task just created with `steps` (as the
    /// store answered them) and `secrets` (name, ciphertext, as stored with
    /// it), `mark` taken before its creation: while it is still queued and
    /// nobody asked to cancel it, its steps and secrets are not read again.
    pub fn start_created(
        self: &Arc<Self>,
        task: Task,
        steps: Vec<TaskStep>,
        secrets: Vec<(String, String)>,
        mark: CreationMark,
    ) {
        let created = Created {
            steps,
            secrets,
            mark,
            no_cancel_missed: false,
        };
        self.launch(task, Some(created));
    }

    fn launch(self: &Arc<Self>, task: Task, mut steps: Option<Created>) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let cancel = {
            let mut running = lock(&self.running);
            if running.contains_key(&task.id) {
                return;
            }
            if let Some(created) = steps.as_mut() {
                let missed = self.missed_cancels.load(Ordering::Relaxed);
                created.no_cancel_missed = missed == created.mark.0;
            }
            let token = CancellationToken::new();
            running.insert(task.id.clone(), token.clone());
            token
        };
        let this = self.clone();
        self.tracker.spawn(async move {
            let id = task.id.clone();
            Box::pin(this.run_task(task, steps, cancel)).await;
            lock(&this.running).remove(&id);
            // Room here counts started tasks: tell whoever waits for room.
            this.load.send_modify(|_| {});
        });
    }

    fn is_running(&self, task_id: &str) -> bool {
        lock(&self.running).contains_key(task_id)
    }

    /// Cancels a task running here (the store already says cancel was
    /// requested). A cancel that finds nothing is counted: it may be for a
    /// task just created here, not launched yet (see [`Engine::creation_mark`]).
    pub fn cancel(&self, task_id: &str) {
        {
            let running = lock(&self.running);
            match running.get(task_id) {
                Some(token) => token.cancel(),
                None => {
                    self.missed_cancels.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.cluster.cancel_handed(task_id);
        self.notifiers.state_changed(task_id);
    }

    /// Cancels every step of machine `machine_id` running here (all tasks),
    /// writing "MACHINE: canceling: `reason`" to each task's log and recording
    /// `reason` as the step's error. Waits up to `grace` for the steps to stop
    /// on their machine (a script is cancelled there, as a task cancel does);
    /// steps that have not stopped by then are recorded Canceled at once,
    /// saying the script may still run. Answers how many steps were canceled.
    pub async fn stop_machine(&self, machine_id: i64, reason: &str, grace: Duration) -> usize {
        let steps: Vec<(String, RunningStep)> = lock(&self.steps)
            .iter()
            .filter(|((_, m), _)| *m == machine_id)
            .map(|((t, _), s)| (t.clone(), s.clone()))
            .collect();
        for (task_id, step) in &steps {
            *lock(&step.reason) = Some(reason.to_string());
            self.log_of(task_id)
                .server(format!("{}: canceling: {reason}", step.machine_name))
                .await;
            step.cancel.cancel();
            self.notifiers.state_changed(task_id);
        }
        let all_done = || async {
            for (_, step) in &steps {
                step.done.cancelled().await;
            }
        };
        if tokio::time::timeout(grace, all_done()).await.is_err() {
            for (_, step) in &steps {
                step.abandon.cancel();
            }
            if tokio::time::timeout(ABANDON_WAIT, all_done())
                .await
                .is_err()
            {
                warn!(
                    "steps of machine #{machine_id} were not recorded canceled within {} s",
                    ABANDON_WAIT.as_secs()
                );
            }
        }
        steps.len()
    }

    /// Delivers a decision to a step waiting under guided failure; false when
    /// that step is not waiting for one here.
    pub fn guide(&self, task_id: &str, machine_id: i64, g: Guidance) -> bool {
        self.guidance.deliver(task_id, machine_id, g)
    }

    /// A receiver of `task_id`'s change counters; pair with [`Engine::release`].
    pub fn subscribe(&self, task_id: &str) -> watch::Receiver<Changes> {
        self.notifiers.subscribe(task_id)
    }

    /// Drops the task's notifier once nobody listens (call after dropping the receiver).
    pub fn release(&self, task_id: &str) {
        self.notifiers.release(task_id);
    }

    fn log_of(&self, task_id: &str) -> TaskLog {
        // The task's masker when it runs here (else its secrets are not in
        // these server lines, which never print them).
        let live = lock(&self.maskers).get(task_id).and_then(Weak::upgrade);
        self.log_with(task_id, live.unwrap_or_default())
    }

    fn log_with(&self, task_id: &str, masker: Arc<Masker>) -> TaskLog {
        TaskLog::new(
            self.deps.store.clone(),
            self.notifiers.clone(),
            task_id,
            masker,
            self.deps.master_key.clone(),
        )
    }

    /// The masker of a task's lines written here: its secret values and the
    /// values its steps learned so far (recorded by any node). One per task
    /// on this node, shared by the task's runs here, so a value one learns
    /// is masked by all and [`ClusterEvent::MasksChanged`] reaches them.
    async fn masker_for(
        &self,
        task_id: &str,
        secrets: &Result<BTreeMap<String, String>, String>,
        masks: Option<Vec<String>>,
    ) -> Arc<Masker> {
        let live = lock(&self.maskers).get(task_id).and_then(Weak::upgrade);
        let masker = match live {
            Some(m) => m,
            None => {
                let m = Arc::new(Masker::default());
                let mut maskers = lock(&self.maskers);
                maskers.retain(|_, w| w.strong_count() > 0);
                maskers
                    .entry(task_id.to_string())
                    .or_insert_with(|| Arc::downgrade(&m))
                    .upgrade()
                    .unwrap_or(m)
            }
        };
        if let Ok(values) = secrets {
            for v in values.values() {
                masker.add(v);
            }
        }
        match masks {
            Some(stored) => self.add_masks(task_id, &masker, stored),
            None => self.load_masks(task_id, &masker).await,
        }
        masker
    }

    /// Adds the values the task's steps learned (as the store has them) to `masker`.
    async fn load_masks(&self, task_id: &str, masker: &Masker) {
        let stored = match self.deps.store.task_masks(task_id).await {
            Ok(s) => s,
            Err(e) => return error!("reading the values masked in task {task_id}'s log: {e}"),
        };
        self.add_masks(task_id, masker, stored);
    }

    /// Adds stored masks (ciphertexts) to `masker`.
    fn add_masks(&self, task_id: &str, masker: &Masker, stored: Vec<String>) {
        for cipher in stored {
            match self.deps.master_key.decrypt(&cipher) {
                Ok(v) => {
                    masker.add(&v);
                }
                Err(e) => error!("a value masked in task {task_id}'s log cannot be read: {e}"),
            }
        }
    }

    /// Another node recorded values to mask in a task's log: the task's
    /// writers here mask them from now on.
    pub(crate) async fn masks_changed(&self, task_id: &str) {
        let live = lock(&self.maskers).get(task_id).and_then(Weak::upgrade);
        if let Some(masker) = live {
            self.load_masks(task_id, &masker).await;
        }
    }

    /// The task's secret values, decrypted, by name, and its masks as
    /// stored (None when they could not be read: [`Engine::masker_for`]
    /// then reads them again).
    pub(crate) async fn secrets_of(
        &self,
        task_id: &str,
    ) -> (
        Result<BTreeMap<String, String>, String>,
        Option<Vec<String>>,
    ) {
        match self.deps.store.task_secrets_and_masks(task_id).await {
            Ok(read) => (self.decrypt_secrets(read.secrets), Some(read.masks)),
            Err(e) => (Err(format!("reading the task's secret values: {e}")), None),
        }
    }

    /// Secret values (name, ciphertext), decrypted, by name.
    fn decrypt_secrets(
        &self,
        stored: Vec<(String, String)>,
    ) -> Result<BTreeMap<String, String>, String> {
        stored
            .into_iter()
            .map(|(name, cipher)| {
                self.deps
                    .master_key
                    .decrypt(&cipher)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| format!("secret variable {name}: {e}"))
            })
            .collect()
    }

    /// Records a step's end, after its last lines (`lines`, "MACHINE: ...")
    /// when it has some still to store.
    async fn finish_step(
        &self,
        log: &TaskLog,
        step: TaskStep,
        state: TaskState,
        error: Option<String>,
        lines: Vec<NewLogLine>,
        release: Option<Afterwards>,
    ) -> TaskStep {
        let step = ended_step(step, state, error);
        let stored = if lines.is_empty() {
            log.save_step(&step).await
        } else {
            log.save_step_logged(&step, &lines).await
        };
        release_when_stored(stored, release);
        self.publish(ClusterEvent::StepFinished {
            task_id: step.task_id.clone(),
            machine_id: step.machine_id,
        })
        .await;
        step
    }

    /// Stores a step's end kept for the task's (see [`DeferredEnd`]) alone:
    /// the task does not end now.
    async fn record_deferred(&self, log: &TaskLog, d: DeferredEnd) {
        let stored = log.save_step_logged(&d.step, &d.lines).await;
        release_when_stored(stored, d.release);
        self.publish(ClusterEvent::StepFinished {
            task_id: d.step.task_id.clone(),
            machine_id: d.step.machine_id,
        })
        .await;
        drop(d.registration);
    }

    /// As [`Engine::set_task_state_logged`], after the task's last step's end
    /// (its lines, then the step), in one call where that saves one.
    async fn finish_with_step(
        &self,
        log: &TaskLog,
        d: DeferredEnd,
        state: TaskState,
        error: Option<&str>,
        text: String,
    ) {
        let task_id = log.task_id();
        let (stepped, ended) = log
            .step_and_task_end(&d.step, &d.lines, text, state, error)
            .await;
        match stepped {
            Ok(()) => release_when_stored(true, d.release),
            Err(e) => error!("saving step {} of task {task_id}: {e}", d.step.machine_name),
        }
        if let Err(e) = ended {
            error!("setting task {task_id} {state:?}: {e}");
        }
        drop(d.registration);
        self.publish(ClusterEvent::StepFinished {
            task_id: task_id.to_string(),
            machine_id: d.step.machine_id,
        })
        .await;
        self.publish(ClusterEvent::TaskChanged {
            task_id: task_id.to_string(),
        })
        .await;
    }

    /// As [`Engine::set_task_state`], with a server line written before the
    /// state, in one commit where that saves one.
    async fn set_task_state_logged(
        &self,
        log: &TaskLog,
        state: TaskState,
        error: Option<&str>,
        text: String,
    ) {
        let task_id = log.task_id();
        if let Err(e) = log.server_with_state(text, state, error).await {
            error!("setting task {task_id} {state:?}: {e}");
        }
        self.publish(ClusterEvent::TaskChanged {
            task_id: task_id.to_string(),
        })
        .await;
    }

    async fn set_task_state(&self, task_id: &str, state: TaskState, error: Option<&str>) {
        if let Err(e) = self
            .deps
            .store
            .set_task_state(task_id, state, error, now_ms())
            .await
        {
            error!("setting task {task_id} {state:?}: {e}");
        }
        self.notifiers.state_changed(task_id);
        self.publish(ClusterEvent::TaskChanged {
            task_id: task_id.to_string(),
        })
        .await;
    }

    /// The step runner of a task's kind, or why the task cannot run.
    fn runner_of(task: &Task, secrets: &BTreeMap<String, String>) -> Result<StepRunner, String> {
        let unreadable = |e: serde_json::Error| format!("the task's arguments cannot be read: {e}");
        Ok(match task.kind.as_str() {
            kind::SCRIPT => {
                let args: ScriptRequest =
                    serde_json::from_value(task.arguments.clone()).map_err(unreadable)?;
                let spec = Arc::new(script::ScriptSpec::of_script(&args, secrets));
                Arc::new(move |ctx, step| {
                    let spec = spec.clone();
                    Box::pin(async move { script::run_script_step(&ctx, step, &spec).await })
                })
            }
            kind::DEPLOY => {
                let args: DeployArgs =
                    serde_json::from_value(task.arguments.clone()).map_err(unreadable)?;
                let args = Arc::new((args, secrets.clone()));
                Arc::new(move |ctx, step| {
                    let args = args.clone();
                    Box::pin(
                        async move { deploy::run_deploy_step(&ctx, step, &args.0, &args.1).await },
                    )
                })
            }
            kind::UPGRADE => Arc::new(|ctx, step| {
                Box::pin(async move { deploy::run_upgrade_step(&ctx, step).await })
            }),
            kind::HEALTH => {
                Arc::new(|ctx, step| Box::pin(async move { health::run_step(&ctx, step).await }))
            }
            kind::TENTACLE_UPGRADE => {
                let args: TentacleUpgradeArgs =
                    serde_json::from_value(task.arguments.clone()).map_err(unreadable)?;
                let args = Arc::new(args);
                Arc::new(move |ctx, step| {
                    let args = args.clone();
                    Box::pin(async move { tentacle_upgrade::run_step(&ctx, step, &args).await })
                })
            }
            other => return Err(format!("task kind '{other}' is not known to this server")),
        })
    }

    /// Runs a task to its end (or until the server stops).
    async fn run_task(
        self: &Arc<Self>,
        task: Task,
        created: Option<Created>,
        cancel: CancellationToken,
    ) {
        let store = self.deps.store.clone();
        let id = task.id.clone();
        let (task, secrets, masks, created_steps, node_read) = match created {
            // Alone on its store, a task this engine just created is its own
            // (no other node could take it: the store's record of who runs
            // a task is for a cluster) and queued; its secrets and steps are
            // as created; and unless a cancel found nothing to cancel between
            // its creation and its launch, none was asked for it: no store
            // call before its first step starts. Otherwise it is read as any.
            Some(created)
                if created.no_cancel_missed
                    && !store.shared()
                    && task.state == TaskState::Queued =>
            {
                let secrets = self.decrypt_secrets(created.secrets);
                (task, secrets, Some(Vec::new()), Some(created.steps), None)
            }
            created => {
                // Taken for this node, unless another live node runs it
                // (created there, or taken over there), and read again now
                // that the cancel token is registered: a cancel request that
                // came in between is seen either here or through the token.
                // The task's secrets (fixed when it was created) are read
                // meanwhile, and on a cluster this node's row (whether it is
                // draining, below) as the database has it now.
                let node = async {
                    if store.shared() {
                        Some(store.node(&self.deps.node_name).await)
                    } else {
                        None
                    }
                };
                let ((secrets, masks), claimed, node) = tokio::join!(
                    self.secrets_of(&id),
                    store.claim_task_row(&id, &self.deps.node_name, now_ms()),
                    node
                );
                let task = match claimed {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        return info!("task {id} runs on another node (or no longer exists)")
                    }
                    Err(e) => return error!("taking task {id} for this node: {e}"),
                };
                (task, secrets, masks, created.map(|c| c.steps), node)
            }
        };
        let masker = self.masker_for(&id, &secrets, masks).await;
        let log = self.log_with(&id, masker);
        if task.state.is_final() {
            return;
        }
        // On a cluster, a draining node leaves a new task to the others.
        // The drain flag as the database has it now: a drain through another
        // node applies before this node's next heartbeat (a store only this
        // node uses is drained through it: the engine knows already).
        let mut drain_read = false;
        if store.shared() && task.state == TaskState::Queued {
            if let Some(Ok(Some(node))) = node_read {
                self.set_draining(node.draining);
                drain_read = true;
            }
            if self.load.borrow().draining {
                log.server(format!(
                    "Waiting: node {} is draining; another node takes the task (`octopus node undrain` lets this one take tasks again)",
                    self.deps.node_name
                ))
                .await;
                // Taken above: give it back.
                if let Err(e) = store.release_task(&id, &self.deps.node_name).await {
                    warn!("giving task {id} back: {e}");
                }
                self.publish(ClusterEvent::TaskQueued {
                    task_id: id.clone(),
                })
                .await;
                return;
            }
        }
        if task.cancel_requested {
            cancel.cancel();
        }
        // Steps as created hold while the task is queued and not canceled
        // (only a cancel or a run changes them).
        let fresh = task.state == TaskState::Queued && !task.cancel_requested;
        let steps = match created_steps.filter(|_| fresh) {
            Some(steps) => steps,
            None => match store.task_steps(&id).await {
                Ok(s) => s,
                Err(e) => return error!("loading the steps of task {id}: {e}"),
            },
        };
        let resumed = task.state == TaskState::Executing;
        if !resumed && store.shared() && !drain_read {
            // As above, for a task taken over in another state.
            match store.node(&self.deps.node_name).await {
                Ok(Some(node)) => self.set_draining(node.draining),
                Ok(None) => {}
                Err(e) => warn!("reading node {}: {e}", self.deps.node_name),
            }
        }
        let give_back = store.shared() && !resumed;
        let _admitted = match self.admit(resumed, give_back, &cancel, &log).await {
            Admission::In(a) => a,
            Admission::Stopped => return,
            Admission::Full => return self.give_back_full(&log, &id).await,
        };
        let todo = steps.iter().filter(|s| !s.state.is_final()).count();
        let total = steps.len();
        // The task's first line is stored while its steps start (reading
        // their machines, storing them as started): their lines wait for it.
        // Alone on its store, a new task's "Task started" goes with its first
        // step stored as started (one call for both); stored alone when no
        // step took it within FIRST_LINE_WAIT or when the steps are done.
        let steps_done = CancellationToken::new();
        let started = format!("Task started: {}", task.description);
        let offered = !resumed && !store.shared();
        let (steps_log, gate, offer) = if offered {
            let (l, first) = log.offering_first_line(&started, TaskState::Executing);
            (l, None, Some(first))
        } else {
            let (l, guard) = log.gated();
            (l, Some(guard), None)
        };
        let first_line = async {
            if let Some(first) = offer {
                tokio::select! {
                    () = first.stored() => {}
                    () = tokio::time::sleep(FIRST_LINE_WAIT) => {}
                    () = steps_done.cancelled() => {}
                }
                match first.take() {
                    Some((line, state, _stored)) => {
                        if let Err(e) = log.line_with_state(line, state, None).await {
                            error!("setting task {id} {state:?}: {e}");
                        }
                    }
                    // A step took it: its lines wait for that write, the
                    // task's end too.
                    None => first.stored().await,
                }
            } else if resumed {
                log.server(format!(
                    "Resuming task ({todo} of {total} machines unfinished)"
                ))
                .await;
            } else {
                self.set_task_state_logged(&log, TaskState::Executing, None, started)
                    .await;
            }
            drop(gate);
        };
        let runner = secrets.and_then(|s| Self::runner_of(&task, &s));
        let per_task = max_parallel_steps_of(&task.arguments).unwrap_or(self.deps.limits.per_task);
        // Alone on its store, this engine records every step's end itself:
        // the task's end is then decided from what it recorded, without
        // reading the steps again (on a cluster, another node may have run some).
        let known = (!store.shared()).then(|| steps.clone());
        // There too, the last step's end is stored with the task's, in one
        // call (a health check does more between the two).
        let defer_last = known.is_some() && task.kind != kind::HEALTH;
        let run_steps = async {
            let _done = steps_done.clone().drop_guard();
            match runner {
                Ok(runner) => {
                    self.run_steps(&steps_log, steps, &cancel, runner, per_task, defer_last)
                        .await
                }
                Err(why) => {
                    self.fail_unfinished(&steps_log, &why).await;
                    Some(StepsRun {
                        health: Vec::new(),
                        recorded: Vec::new(),
                        all_recorded: false,
                        deferred: None,
                    })
                }
            }
        };
        let ((), run) = tokio::join!(first_line, run_steps);
        // None: the server is stopping; the task is left as it is, to resume.
        let Some(run) = run else { return };
        if task.kind == kind::HEALTH && !cancel.is_cancelled() {
            self.upgrade_outdated(&log, &task).await;
        }
        let ended = known
            .filter(|_| run.all_recorded)
            .and_then(|steps| as_recorded(steps, run.recorded));
        // Only with the task's end decided from what was recorded here: a
        // read of the steps would find the deferred one unfinished.
        let deferred = match run.deferred {
            Some(d) if ended.is_none() => {
                self.record_deferred(&log, d).await;
                None
            }
            d => d,
        };
        self.finish_task(&log, &task, &cancel, &run.health, ended, deferred)
            .await;
    }

    /// After health check `task`: one tentacle upgrade task for the machines
    /// it found older than the server's tentacle whose machine policy says
    /// Always (see [`crate::auto_upgrade`]); its log says which task started.
    async fn upgrade_outdated(self: &Arc<Self>, log: &TaskLog, task: &Task) {
        let Ok(build) = self.deps.tentacle.as_ref() else {
            return;
        };
        let store = self.deps.store.as_ref();
        let _one_at_a_time = self.auto_upgrades.lock().await;
        let machines = match crate::auto_upgrade::due(store, &task.id, &build.version).await {
            Ok(m) if m.is_empty() => return,
            Ok(m) => m,
            Err(e) => {
                let why = format!("deciding on automatic tentacle upgrades: {e}");
                warn!("task {}: {why}", task.id);
                return log.server(why).await;
            }
        };
        let created =
            crate::auto_upgrade::create(store, task, &machines, &build.version, &build.sha256)
                .await;
        match created {
            Ok(upgrade) => {
                info!(
                    "created task {} ({}), started by the system after health check {}",
                    upgrade.id, upgrade.description, task.id
                );
                log.server(format!(
                    "Started task {} to upgrade the tentacle to {} on {} (their machine policy keeps tentacles up to date)",
                    upgrade.id,
                    build.version,
                    machine_list(&machines)
                ))
                .await;
                self.start(upgrade);
            }
            Err(e) => {
                let why = format!(
                    "starting the automatic tentacle upgrade of {}: {e}",
                    machine_list(&machines)
                );
                error!("task {}: {why}", task.id);
                log.server(why).await;
            }
        }
    }

    /// Runs every unfinished step, at most `per_task` at once (and within the
    /// node's limit, shared by every task), and records how each ended. Returns the health results the steps reported,
    /// or None when the server stopped.
    async fn run_steps(
        self: &Arc<Self>,
        log: &TaskLog,
        steps: Vec<TaskStep>,
        cancel: &CancellationToken,
        run: StepRunner,
        per_task: usize,
        defer_last: bool,
    ) -> Option<StepsRun> {
        let slots = Arc::new(Semaphore::new(per_task.max(1)));
        let mut set = JoinSet::new();
        let todo: Vec<TaskStep> = steps.into_iter().filter(|s| !s.state.is_final()).collect();
        let left = defer_last.then(|| Arc::new(StepsLeft(AtomicUsize::new(todo.len()))));
        for step in todo {
            let (eng, slots, run, log) = (self.clone(), slots.clone(), run.clone(), log.clone());
            let left = left.clone();
            let task_cancel = cancel.clone();
            let mut registered = self.register_step(&step, cancel.child_token());
            set.spawn(async move {
                // A slot of the task's, then one of the node's (always in
                // this order, so tasks cannot hold each other's).
                let task_slot = tokio::select! {
                    slot = slots.acquire_owned() => slot.ok()?,
                    _ = eng.shutdown.cancelled() => return None,
                    _ = registered.running.cancel.cancelled(), if step.state == TaskState::Queued => {
                        let recorded = eng.cancel_queued(&log, &registered.running, step).await;
                        return Some(StepOutcome::recorded(recorded));
                    }
                };
                let mut step = step;
                loop {
                    // On a cluster, the node holding the step's polling tentacle runs it.
                    let (here, machine) = if eng.deps.store.shared() {
                        match eng.place(&log, step, &registered.running).await {
                            cluster::Placement::Here(step, machine) => (step, machine.map(|m| *m)),
                            cluster::Placement::Finished(health) => {
                                return Some(StepOutcome { recorded: None, health, deferred: None });
                            }
                            cluster::Placement::Stopping => return None,
                        }
                    } else {
                        (step, None)
                    };
                    let key = (here.task_id.clone(), here.machine_id, here.clone());
                    match eng.run_here(log.clone(), here, machine, registered, run.clone(), left.as_deref()).await {
                        Ran::Done(outcome) => {
                            drop(task_slot);
                            return Some(*outcome);
                        }
                        // Its tentacle went to another node: place it again,
                        // as stored now.
                        Ran::Moved => {
                            step = match eng.deps.store.task_step(&key.0, key.1).await {
                                Ok(Some(s)) => s,
                                Ok(None) => return None,
                                Err(e) => {
                                    warn!("reading step {} of task {}: {e}", key.2.machine_name, key.0);
                                    key.2
                                }
                            };
                            registered = eng.register_step(&step, task_cancel.child_token());
                        }
                    }
                }
            });
        }
        let mut run = StepsRun {
            health: Vec::new(),
            recorded: Vec::new(),
            all_recorded: true,
            deferred: None,
        };
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Some(outcome)) => {
                    run.health.extend(outcome.health);
                    match outcome.recorded {
                        Some(step) => run.recorded.push(step),
                        None => run.all_recorded = false,
                    }
                    if outcome.deferred.is_some() {
                        run.deferred = outcome.deferred;
                    }
                }
                Ok(None) => run.all_recorded = false,
                Err(e) => {
                    run.all_recorded = false;
                    error!("a step of task {} failed: {e}", log.task_id());
                }
            }
        }
        if self.shutdown.is_cancelled() {
            // The task is left to resume; a step's end is never.
            if let Some(d) = run.deferred.take() {
                self.record_deferred(log, d).await;
            }
            return None;
        }
        Some(run)
    }

    /// Registers a step as running here (for [`Engine::stop_machine`]), with
    /// its cancel token.
    fn register_step(self: &Arc<Self>, step: &TaskStep, cancel: CancellationToken) -> Registered {
        let running = RunningStep {
            machine_name: step.machine_name.clone(),
            cancel,
            abandon: CancellationToken::new(),
            reason: Arc::default(),
            done: CancellationToken::new(),
        };
        let key = (step.task_id.clone(), step.machine_id);
        lock(&self.steps).insert(key.clone(), running.clone());
        let registration = StepRegistration {
            engine: self.clone(),
            key,
            done: running.done.clone(),
        };
        Registered {
            running,
            registration,
        }
    }

    /// Records a step that never started Canceled.
    async fn cancel_queued(
        &self,
        log: &TaskLog,
        running: &RunningStep,
        step: TaskStep,
    ) -> TaskStep {
        let why = because(running, Some("canceled before it started".into()));
        self.finish_step(log, step, TaskState::Canceled, why, Vec::new(), None)
            .await
    }

    /// Runs one step on this node, within the node's limit, and records how
    /// it ended; the health it reported, if any.
    async fn run_here(
        self: &Arc<Self>,
        log: TaskLog,
        step: TaskStep,
        machine: Option<Machine>,
        registered: Registered,
        run: StepRunner,
        left: Option<&StepsLeft>,
    ) -> Ran {
        let Registered {
            running,
            registration,
        } = registered;
        // Stops the step (as a server's shutdown does: it is resumed later
        // from what is stored) when its tentacle moves to another node.
        let stop = self.shutdown.child_token();
        let subscription = match &machine {
            Some(m) => cluster::polling_subscription(m),
            None => self.moving_subscription(&step).await,
        };
        let ctx = StepContext {
            machine_name: step.machine_name.clone(),
            log: log.clone(),
            store: self.deps.store.clone(),
            comms: self.deps.comms.clone(),
            cancel: running.cancel.clone(),
            shutdown: stop.clone(),
            tool: self.deps.tool.clone(),
            tentacle: self.deps.tentacle.clone(),
            packages: self.deps.packages.clone(),
            max_log_bytes: self.deps.max_log_bytes_per_step,
            guidance: self.guidance.clone(),
            placed: Arc::new(Mutex::new(machine)),
        };
        let free = self
            .node_slots
            .clone()
            .try_acquire_owned()
            .ok()
            .filter(|_| !(step.state == TaskState::Queued && ctx.cancel.is_cancelled()));
        let _slot = match free {
            Some(slot) => slot,
            None => {
                // A wait for a slot: the machine's row read before may be
                // out of date by its end (a thumbprint replaced meanwhile
                // must hold at once); the step reads it again.
                lock(&ctx.placed).take();
                tokio::select! {
                    slot = self.node_slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return Ran::Done(Box::default()),
                    },
                    _ = ctx.shutdown.cancelled() => return Ran::Done(Box::default()),
                    // A queued step never starts once cancel was requested; a
                    // step already executing (resumed) must be cancelled on the
                    // tentacle, which its runner does.
                    _ = ctx.cancel.cancelled(), if step.state == TaskState::Queued => {
                        let recorded = self.cancel_queued(&log, &running, step).await;
                        return Ran::Done(Box::new(StepOutcome::recorded(recorded)));
                    }
                }
            }
        };
        let _counted = CountedStep::new(&self.step_count);
        let name = step.machine_name.clone();
        let (task_id, machine_id) = (step.task_id.clone(), step.machine_id);
        let running_step = run(ctx, step.clone());
        tokio::pin!(running_step);
        let mut moved = false;
        let end = loop {
            tokio::select! {
                end = &mut running_step => break end,
                node = self.moved_elsewhere(subscription.as_deref().unwrap_or_default()), if subscription.is_some() && !moved => {
                    moved = true;
                    log.server(format!("{name}: its polling tentacle is now connected to node {node}; the step goes on there")).await;
                    stop.cancel();
                }
                // Stopped for its machine's sake and not done in time: the
                // step ends now (the runner is dropped), as stored so far.
                _ = running.abandon.cancelled() => {
                    let stored = self.deps.store.task_step(&task_id, machine_id).await.ok()
                        .flatten()
                        .unwrap_or(step);
                    let why = format!("the cancel could not be delivered in time; the script may still be running on {name}");
                    log.server(format!("{name}: {why}")).await;
                    break StepEnd::finished(stored, TaskState::Canceled, Some(why));
                }
            }
        };
        match end {
            StepEnd::Finished {
                step,
                state,
                error,
                health,
                afterwards,
                release,
                lines,
            } => {
                let error = if state == TaskState::Canceled {
                    because(&running, error)
                } else {
                    error
                };
                // The task's last step, with nothing to do after its end:
                // its end is stored with the task's.
                let last = left.is_some_and(StepsLeft::last_ended);
                if last && afterwards.is_none() && !self.shutdown.is_cancelled() {
                    let step = ended_step(step, state, error);
                    return Ran::Done(Box::new(StepOutcome {
                        recorded: Some(step.clone()),
                        health: health.map(|h| (name, h)),
                        deferred: Some(DeferredEnd {
                            step,
                            lines,
                            registration,
                            release,
                        }),
                    }));
                }
                let recorded = self
                    .finish_step(&log, step, state, error, lines, release)
                    .await;
                // Recorded: whoever stops this machine may go on.
                drop(registration);
                if let Some(work) = afterwards {
                    work.await;
                }
                Ran::Done(Box::new(StepOutcome {
                    recorded: Some(recorded),
                    health: health.map(|h| (name, h)),
                    deferred: None,
                }))
            }
            StepEnd::Interrupted if moved && !self.shutdown.is_cancelled() => Ran::Moved,
            StepEnd::Interrupted => Ran::Done(Box::default()),
        }
    }

    /// Marks every unfinished step of a task Failed with `why`.
    async fn fail_unfinished(&self, log: &TaskLog, why: &str) {
        let task_id = log.task_id();
        let steps = match self.deps.store.task_steps(task_id).await {
            Ok(s) => s,
            Err(e) => return error!("loading the steps of task {task_id}: {e}"),
        };
        for step in steps.into_iter().filter(|s| !s.state.is_final()) {
            self.finish_step(
                log,
                step,
                TaskState::Failed,
                Some(why.to_string()),
                Vec::new(),
                None,
            )
            .await;
        }
    }

    /// Decides and records the task's final state from its steps.
    async fn finish_task(
        &self,
        log: &TaskLog,
        task: &Task,
        cancel: &CancellationToken,
        health: &[(String, HealthStatus)],
        ended: Option<Vec<TaskStep>>,
        deferred: Option<DeferredEnd>,
    ) {
        let id = &task.id;
        let shared = self.deps.store.shared();
        // On a cluster, whether someone asked for a cancel is read too:
        // another node's request may still be on its way (alone on its
        // store, the engine hears of every request: the API cancels the
        // token after storing it, and one stored before the task ran was
        // seen when it started). With the steps, in one read.
        let (steps, cancel_stored) = match ended {
            Some(steps) if shared => {
                let asked =
                    matches!(self.deps.store.task(id).await, Ok(Some(t)) if t.cancel_requested);
                (steps, asked)
            }
            Some(steps) => (steps, false),
            None if shared => match self.deps.store.task_with_log(id, i64::MAX, 0).await {
                Ok(Some(t)) => (t.steps, t.task.cancel_requested),
                Ok(None) => return error!("loading the steps of task {id}: it is gone"),
                Err(e) => return error!("loading the steps of task {id}: {e}"),
            },
            None => match self.deps.store.task_steps(id).await {
                Ok(s) => (s, false),
                Err(e) => return error!("loading the steps of task {id}: {e}"),
            },
        };
        let total = steps.len();
        let failed: Vec<&TaskStep> = steps
            .iter()
            .filter(|s| s.state != TaskState::Success)
            .collect();
        let cancel_requested = cancel.is_cancelled() || cancel_stored;
        let (state, error) = if cancel_requested {
            (TaskState::Canceled, Some("canceled on request".to_string()))
        } else if failed.is_empty() {
            (TaskState::Success, None)
        } else if task.kind == kind::HEALTH {
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
        match deferred {
            Some(d) => {
                self.finish_with_step(log, d, state, error.as_deref(), summary)
                    .await;
            }
            None => {
                self.set_task_state_logged(log, state, error.as_deref(), summary)
                    .await;
            }
        }
    }

    /// Starts the engine's background work for a started server: resuming the
    /// unfinished tasks of a previous run, and scheduled health checks. Everything
    /// stops when `shutdown` is cancelled (the join set's entry waits for that, bounded).
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        tasks: &mut JoinSet<()>,
    ) {
        tasks.spawn({
            let engine = self.clone();
            async move {
                shutdown.cancelled().await;
                engine.stop().await;
            }
        });
        self.tracker.spawn({
            let engine = self.clone();
            async move { engine.resume().await }
        });
        self.tracker.spawn({
            let engine = self.clone();
            async move { engine.schedule_health_checks().await }
        });
        self.tracker.spawn(self.clone().run_cluster());
    }

    /// Resumes the unfinished script, deployment and upgrade tasks of a previous run; fails its health
    /// checks (their results would be stale).
    async fn resume(self: &Arc<Self>) {
        let tasks = match self.deps.store.unfinished_tasks().await {
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
            // Only this node's tasks, those of none, or those of an offline node.
            match self
                .deps
                .store
                .claim_task(&task.id, &self.deps.node_name, now_ms())
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    error!("taking task {} for this node: {e}", task.id);
                    continue;
                }
            }
            match task.kind.as_str() {
                kind::SCRIPT | kind::DEPLOY | kind::UPGRADE | kind::TENTACLE_UPGRADE => {
                    info!("resuming task {} ({})", task.id, task.description);
                    self.start(task);
                }
                _ => {
                    let why = "server restarted";
                    let log = self.log_of(&task.id);
                    log.server(format!("Task failed: {why}")).await;
                    self.fail_unfinished(&log, why).await;
                    self.set_task_state(&task.id, TaskState::Failed, Some(why))
                        .await;
                }
            }
        }
    }

    /// Every [`EngineDeps::health_scan_interval`], runs a health task for the
    /// machines due one by their policy's interval (never two scheduled checks
    /// of a machine at once, across the cluster).
    async fn schedule_health_checks(self: &Arc<Self>) {
        let every = self
            .deps
            .health_scan_interval
            .max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.load.borrow().draining {
                continue;
            }
            // One node of a cluster schedules (a lease, not an election: a node
            // that stops renewing it loses it once it runs out). Renewed every
            // scan, also while this node's last checks still run: a check that
            // outlasts the lease must not let another node take it and check
            // the same machines again (their last check time is written only
            // when a check ends).
            let ttl = i64::try_from(every.as_millis().saturating_mul(2)).unwrap_or(i64::MAX);
            match self
                .deps
                .store
                .lease(HEALTH_LEASE, &self.deps.node_name, now_ms(), ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!("scheduled health check: taking the scheduler's lease: {e}");
                    continue;
                }
            }
            if last.iter().any(|id| self.is_running(id)) {
                continue;
            }
            match self.scheduled_health_tasks().await {
                Ok(tasks) => {
                    last = tasks.iter().map(|t| t.id.clone()).collect();
                    for task in tasks {
                        self.start(task);
                    }
                }
                Err(e) => warn!("scheduled health check: {e}"),
            }
        }
    }

    /// The machines in a scheduled health check that has not ended, whichever
    /// node runs it (the store is the cluster's truth: a node that held the
    /// scheduler's lease before this one may still be checking them).
    async fn machines_in_scheduled_checks(&self) -> octo_store::Result<HashSet<i64>> {
        let store = &self.deps.store;
        let mut busy = HashSet::new();
        for task in store.unfinished_tasks().await? {
            let scheduled = task.arguments.get("scheduled") == Some(&serde_json::Value::Bool(true));
            if task.kind == kind::HEALTH && scheduled {
                for step in store.task_steps(&task.id).await? {
                    busy.insert(step.machine_id);
                }
            }
        }
        Ok(busy)
    }

    /// One health task per space with machines due a check by their policy.
    async fn scheduled_health_tasks(&self) -> octo_store::Result<Vec<Task>> {
        let store = &self.deps.store;
        let now = now_ms();
        let mut policies: HashMap<(i64, String), Option<MachinePolicy>> = HashMap::new();
        let mut due: BTreeMap<i64, Vec<Machine>> = BTreeMap::new();
        let busy = self.machines_in_scheduled_checks().await?;
        for m in store.list_machines(&MachineFilter::default()).await? {
            if m.disabled || busy.contains(&m.id) {
                continue;
            }
            let key = (m.space_id, m.policy.clone());
            if !policies.contains_key(&key) {
                let policy = store.policy(m.space_id, &m.policy).await?;
                policies.insert(key.clone(), policy);
            }
            let interval_s = policies
                .get(&key)
                .and_then(|p| p.as_ref())
                .map_or(3600, |p| p.health_check_interval_s.max(1));
            let is_due = m
                .last_health_at
                .is_none_or(|t| now.saturating_sub(t) >= interval_s.saturating_mul(1000));
            if is_due {
                due.entry(m.space_id).or_default().push(m);
            }
        }
        let mut tasks = Vec::with_capacity(due.len());
        for (space_id, machines) in due {
            let names: Vec<String> = machines.iter().map(|m| m.name.clone()).collect();
            let description = format!("Scheduled health check of {}", machine_list(&machines));
            let task = store
                .create_task(
                    &NewTask {
                        space_id,
                        kind: kind::HEALTH.into(),
                        description: description.clone(),
                        arguments: serde_json::json!({ "machines": names, "scheduled": true }),
                        machine_ids: machines.iter().map(|m| m.id).collect(),
                        environments: environments_of(&machines),
                        secrets: Vec::new(),
                        audit: None,
                    },
                    now,
                )
                .await?;
            info!("created task {} ({description})", task.id);
            tasks.push(task);
        }
        Ok(tasks)
    }
}

/// The environments of machines, each once, by name.
pub fn environments_of(machines: &[Machine]) -> Vec<String> {
    let mut envs: Vec<String> = Vec::new();
    for m in machines {
        for e in &m.environments {
            if !envs.iter().any(|x| x.eq_ignore_ascii_case(e)) {
                envs.push(e.clone());
            }
        }
    }
    envs.sort_by_key(|e| e.to_lowercase());
    envs
}

/// "2 of 3 machines unavailable: a, b; 1 unhealthy: c".
/// A task's steps (in their stored order) with each unfinished one replaced
/// by the step as recorded at its end; None when one of them was not recorded.
/// `step` as it ends: its state and error, when it ended (and started, if it
/// never did).
fn ended_step(mut step: TaskStep, state: TaskState, error: Option<String>) -> TaskStep {
    step.state = state;
    step.error = error;
    step.completed_at = Some(now_ms());
    if step.started_at.is_none() {
        step.started_at = step.completed_at;
    }
    step
}

fn as_recorded(steps: Vec<TaskStep>, recorded: Vec<TaskStep>) -> Option<Vec<TaskStep>> {
    let mut recorded: HashMap<i64, TaskStep> =
        recorded.into_iter().map(|s| (s.machine_id, s)).collect();
    steps
        .into_iter()
        .map(|s| {
            if s.state.is_final() {
                Some(s)
            } else {
                recorded.remove(&s.machine_id)
            }
        })
        .collect()
}

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
