//! Work across the nodes of a cluster: several servers on one database that
//! they share (PostgreSQL). Idle on a store no other node shares.
//!
//! - **Polling steps go where the tentacle is.** Each node records in the
//!   store which polling subscriptions are connected to it (`polling_presence`).
//!   A task's node runs a step itself when the step's machine listens or its
//!   polling tentacle is connected here; when the tentacle is connected to
//!   another live node, it hands the step to that node (`task_steps.node`,
//!   then [`ClusterEvent::StepAssigned`]) and waits for the step's end
//!   ([`ClusterEvent::StepFinished`], checked against the store). So a polling
//!   tentacle needs to reach one node, whichever a load balancer picked.
//! - **Nothing is lost with a node.** Every [`SCAN_INTERVAL`] a node takes over
//!   the unfinished tasks of nodes gone offline (no heartbeat for
//!   `NODE_OFFLINE_AFTER_MS`) and of none, resuming each step from its stored
//!   log sequence as a restarted server does; a task's node whose helper node
//!   went offline places the step again. A node also runs the steps handed to
//!   it that it missed an event for.
//! - **Readers anywhere.** Log growth and state changes are published, so a
//!   reader following a task through any node is woken as lines are stored;
//!   cancel requests and guided-failure decisions reach the node running the step.
//!
//! Events are hints: the store holds the truth, and a node that may have
//! missed events ([`ClusterEvent::Resync`]) scans again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use octo_store::{
    now_ms, ClusterEvent, EndpointKind, HealthStatus, Machine, StepRef, TaskState, TaskStep,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{lock, Engine, Ran, RunningStep};
use crate::context::TaskLog;
use crate::kind;

/// How often a node looks for work it missed and for tasks of offline nodes.
const SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// A task no node took after this long is taken by any node scanning.
const ADOPT_UNCLAIMED_AFTER_MS: i64 = 10_000;
/// How long a step whose polling tentacle is connected nowhere waits for it
/// to connect to some node before its own node waits for it (as a single
/// server does, for the machine policy's polling wait).
const PLACE_WAIT: Duration = Duration::from_secs(30);
/// How old the list of live nodes may be.
const LIVE_NODES_FRESH: Duration = Duration::from_secs(2);
/// How long a machine's steps on this node have to stop on their machine
/// when another node deleted it (as that node gives its own).
const MACHINE_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a node that passed a guided-failure decision on waits for the
/// node where the step waits to confirm it.
const GUIDANCE_CONFIRM_WAIT: Duration = Duration::from_secs(5);
/// Events kept for steps waiting on other nodes.
const EVENTS_KEPT: usize = 4096;

/// What a node knows about the cluster (empty on an unshared store).
#[derive(Debug)]
pub(super) struct Cluster {
    /// Steps run here for another node's task, by task: a cancel token of
    /// the task's and the machines.
    handed: Mutex<HashMap<String, (CancellationToken, HashSet<i64>)>>,
    /// The events the store's listener delivers, for steps waiting on them.
    events: broadcast::Sender<ClusterEvent>,
    /// The live nodes (lowercase names), and when that was read.
    live: Mutex<(Option<Instant>, HashSet<String>)>,
    /// New tasks may wait for a node with room (this node gave one back,
    /// or had no room for one queued): when room appears here, look.
    queued: AtomicBool,
    /// The events to publish, sent in batches by [`send_events`] (started
    /// with the first).
    outbox: std::sync::OnceLock<mpsc::UnboundedSender<ClusterEvent>>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            handed: Mutex::default(),
            events: broadcast::channel(EVENTS_KEPT).0,
            live: Mutex::default(),
            queued: AtomicBool::new(false),
            outbox: std::sync::OnceLock::new(),
        }
    }
}

/// Most events in one statement.
const EVENTS_A_BATCH: usize = 256;

/// Publishes the events of `outbox` as they come: all those that came while
/// the last batch was sent go in the next one (each once), so a node ending
/// many steps at once tells the others in a few statements rather than one
/// each. On shutdown, sends what is queued and closes the outbox: later events
/// are published by their callers, as before it started.
async fn send_events(
    store: Arc<dyn octo_store::Store>,
    shutdown: CancellationToken,
    mut outbox: mpsc::UnboundedReceiver<ClusterEvent>,
) {
    let mut stopping = false;
    while !stopping {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                outbox.close();
                stopping = true;
                match outbox.try_recv() {
                    Ok(ev) => ev,
                    Err(_) => return,
                }
            }
            ev = outbox.recv() => match ev {
                Some(ev) => ev,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < EVENTS_A_BATCH || stopping {
            match outbox.try_recv() {
                Ok(ev) if !batch.contains(&ev) => batch.push(ev),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if let Err(e) = store.publish_all(&batch).await {
            warn!("telling the other nodes {} events: {e}", batch.len());
        }
    }
}

impl Cluster {
    /// Cancels the steps run here for another node's task `task_id`.
    pub(super) fn cancel_handed(&self, task_id: &str) {
        if let Some((token, _)) = lock(&self.handed).get(task_id) {
            token.cancel();
        }
    }

    /// Notes a handed step as running here; None when it runs here already.
    fn hand_in(&self, r: &StepRef) -> Option<CancellationToken> {
        let mut handed = lock(&self.handed);
        let (token, machines) = handed.entry(r.task_id.clone()).or_default();
        machines.insert(r.machine_id).then(|| token.clone())
    }

    fn hand_out(&self, r: &StepRef) {
        let mut handed = lock(&self.handed);
        if let Some((_, machines)) = handed.get_mut(&r.task_id) {
            machines.remove(&r.machine_id);
            if machines.is_empty() {
                handed.remove(&r.task_id);
            }
        }
    }

    fn is_handed_here(&self, task_id: &str, machine_id: i64) -> bool {
        lock(&self.handed)
            .get(task_id)
            .is_some_and(|(_, m)| m.contains(&machine_id))
    }
}

/// Which tasks a node takes over (see [`Engine::adopt`]).
#[derive(Debug, Clone, Copy)]
enum Adopt<'a> {
    One(&'a str),
    Queued,
    Stale,
}

/// Where a step of a task runs.
pub(super) enum Placement {
    /// On this node; with the machine's row when it was read just before.
    Here(TaskStep, Option<Box<Machine>>),
    /// Another node ran it to its end (recorded), with the machine's health.
    Finished(Option<(String, HealthStatus)>),
    /// The server stops.
    Stopping,
}

/// The polling subscription of machine `m`, when it is a polling machine.
pub(super) fn polling_subscription(m: &Machine) -> Option<String> {
    (m.kind == EndpointKind::Polling)
        .then(|| subscription_of(&m.uri).map(str::to_string))
        .flatten()
}

/// How a step handed to another node went.
enum Handed {
    Finished(TaskStep),
    /// That node went offline before the step ended.
    NodeLost,
    /// That node gave the step back (its tentacle moved on).
    Returned,
    Stopping,
}

/// The polling subscription of `poll://SUBSCRIPTION/`.
fn subscription_of(uri: &str) -> Option<&str> {
    uri.strip_prefix("poll://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|s| !s.is_empty())
}

impl Engine {
    /// The other nodes' events (and this node's own), as this node receives
    /// them; nothing on a store no other node shares.
    pub fn cluster_events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.cluster.events.subscribe()
    }

    /// Tells the other nodes (nothing on an unshared store; a failure is
    /// logged): queued, sent with the other events queued meanwhile
    /// ([`send_events`]), in order.
    pub async fn publish(&self, event: ClusterEvent) {
        if !self.deps.store.shared() {
            return;
        }
        let outbox = self.cluster.outbox.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.tracker.spawn(send_events(
                self.deps.store.clone(),
                self.shutdown.clone(),
                rx,
            ));
            tx
        });
        // Closed: the node stops, and its caller sends it.
        if let Err(mpsc::error::SendError(event)) = outbox.send(event) {
            if let Err(e) = self.deps.store.publish(&event).await {
                warn!("telling the other nodes {event:?}: {e}");
            }
        }
    }

    /// As [`Engine::stop_machine`] (with that grace), and on a cluster the
    /// other nodes stop the machine's steps they run too (a machine deleted
    /// through this node may run steps handed to the node holding its tentacle).
    pub async fn stop_machine_everywhere(
        &self,
        machine_id: i64,
        reason: &str,
        grace: Duration,
    ) -> usize {
        self.publish(ClusterEvent::MachineStop {
            machine_id,
            reason: reason.to_string(),
            node: self.deps.node_name.clone(),
        })
        .await;
        self.stop_machine(machine_id, reason, grace).await
    }

    /// Delivers a decision to a step waiting under guided failure, here or,
    /// on a cluster, on the node where it waits (confirmed by that node
    /// within [`GUIDANCE_CONFIRM_WAIT`]). False when no node has that step
    /// waiting for a decision.
    pub async fn guide_anywhere(
        &self,
        task_id: &str,
        machine_id: i64,
        guidance: octo_api_types::Guidance,
    ) -> octo_store::Result<bool> {
        if self.guide(task_id, machine_id, guidance) {
            return Ok(true);
        }
        if !self.deps.store.shared() {
            return Ok(false);
        }
        let mut events = self.cluster.events.subscribe();
        self.deps
            .store
            .publish(&ClusterEvent::Guidance {
                task_id: task_id.to_string(),
                machine_id,
                guidance,
            })
            .await?;
        let confirmed = async {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent::GuidanceDelivered {
                        task_id: t,
                        machine_id: m,
                    }) if t == task_id && m == machine_id => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        Ok(tokio::time::timeout(GUIDANCE_CONFIRM_WAIT, confirmed)
            .await
            .unwrap_or(false))
    }

    /// Decides where a step runs, and when another node runs it, waits for
    /// its end there.
    pub(super) async fn place(
        self: &Arc<Self>,
        log: &TaskLog,
        step: TaskStep,
        running: &RunningStep,
    ) -> Placement {
        let store = self.deps.store.clone();
        let me = self.deps.node_name.clone();
        let mut waited = false;
        loop {
            if self.shutdown.is_cancelled() {
                return Placement::Stopping;
            }
            // Handed to this node by the task's previous node, and still
            // running here: this node took the task over meanwhile.
            if self.cluster.is_handed_here(&step.task_id, step.machine_id) {
                match self.wait_for_step(&step, &me).await {
                    Handed::Finished(s) => return Placement::Finished(self.health_of(&s).await),
                    Handed::Returned => continue,
                    Handed::NodeLost | Handed::Stopping => return Placement::Stopping,
                }
            }
            // The machine, and whether the step was handed to a node (only
            // the task's node, this one, hands its steps: what is read now
            // holds until it hands this one).
            let (machine, handed) = match store
                .machine_row_and_step_node(&step.task_id, step.machine_id)
                .await
            {
                Ok((Some(m), node)) => (Some(m), node.is_some()),
                Ok((None, _)) => (None, true),
                Err(e) => {
                    warn!(
                        "placing step {} of task {}: {e}",
                        step.machine_name, step.task_id
                    );
                    (None, true)
                }
            };
            let subscription = machine.as_ref().and_then(polling_subscription);
            let Some(subscription) = subscription else {
                return self.here(step, machine.map(Box::new), handed).await;
            };
            let polling = self.deps.comms.polling().clone();
            if polling.is_connected(&subscription) {
                return self.here(step, machine.map(Box::new), handed).await;
            }
            let mut events = self.cluster.events.subscribe();
            let nodes = store
                .polling_nodes(&subscription, now_ms())
                .await
                .unwrap_or_else(|e| {
                    warn!("finding the node of poll://{subscription}/: {e}");
                    Vec::new()
                });
            if let Some(node) = nodes.into_iter().find(|n| !n.eq_ignore_ascii_case(&me)) {
                match self.hand_to(log, &step, &node).await {
                    Handed::Finished(s) => {
                        return Placement::Finished(self.health_of(&s).await);
                    }
                    Handed::NodeLost => {
                        log.server(format!(
                            "{}: node {node} went offline while it ran the step; placing it again",
                            step.machine_name
                        ))
                        .await;
                        continue;
                    }
                    Handed::Returned => continue,
                    Handed::Stopping => return Placement::Stopping,
                }
            }
            if waited {
                return self.here(step, None, true).await;
            }
            waited = true;
            // Connected nowhere yet: wait for it to connect to any node.
            let here = polling.wait_until(|r| r.is_connected(&subscription), PLACE_WAIT);
            let elsewhere = async {
                loop {
                    match events.recv().await {
                        Ok(ClusterEvent::Presence {
                            subscription_id, ..
                        }) if subscription_id == subscription => return,
                        Ok(ClusterEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            return
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            };
            tokio::select! {
                _ = here => {}
                () = elsewhere => {}
                () = self.shutdown.cancelled() => return Placement::Stopping,
                () = running.cancel.cancelled() => return self.here(step, None, true).await,
            }
        }
    }

    /// The step runs here (with its machine's row when just read): an
    /// earlier hand-over (`handed`: there may have been one) is undone first.
    async fn here(&self, step: TaskStep, machine: Option<Box<Machine>>, handed: bool) -> Placement {
        if !handed {
            return Placement::Here(step, machine);
        }
        if let Err(e) = self
            .deps
            .store
            .assign_step(&step.task_id, step.machine_id, None)
            .await
        {
            warn!(
                "taking step {} of task {} back: {e}",
                step.machine_name, step.task_id
            );
        }
        Placement::Here(step, machine)
    }

    /// The machine's health as last recorded (what a health step on another
    /// node found).
    async fn health_of(&self, step: &TaskStep) -> Option<(String, HealthStatus)> {
        match self.deps.store.machine_row(step.machine_id).await {
            Ok(Some(m)) => Some((step.machine_name.clone(), m.status)),
            Ok(None) => None,
            Err(e) => {
                warn!("reading the health of {}: {e}", step.machine_name);
                None
            }
        }
    }

    /// Hands a step to `node` and waits for its end there.
    async fn hand_to(&self, log: &TaskLog, step: &TaskStep, node: &str) -> Handed {
        let store = &self.deps.store;
        if let Err(e) = store
            .assign_step(&step.task_id, step.machine_id, Some(node))
            .await
        {
            error!(
                "handing step {} of task {} to node {node}: {e}",
                step.machine_name, step.task_id
            );
            return Handed::NodeLost;
        }
        self.publish(ClusterEvent::StepAssigned {
            task_id: step.task_id.clone(),
            machine_id: step.machine_id,
            node: node.to_string(),
        })
        .await;
        log.server(format!(
            "{}: its polling tentacle is connected to node {node}, which runs this step",
            step.machine_name
        ))
        .await;
        self.wait_for_step(step, node).await
    }

    /// Waits for a step that `node` runs to end (recorded in the store).
    async fn wait_for_step(&self, step: &TaskStep, node: &str) -> Handed {
        let store = &self.deps.store;
        let mut events = self.cluster.events.subscribe();
        let mut tick = tokio::time::interval(SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            match store.task_step(&step.task_id, step.machine_id).await {
                Ok(Some(s)) if s.state.is_final() => return Handed::Finished(s),
                Ok(Some(_)) => {}
                Ok(None) => return Handed::Finished(step.clone()),
                Err(e) => warn!(
                    "reading step {} of task {}: {e}",
                    step.machine_name, step.task_id
                ),
            }
            if !node.eq_ignore_ascii_case(&self.deps.node_name) && !self.node_live(node).await {
                return Handed::NodeLost;
            }
            match store.step_node(&step.task_id, step.machine_id).await {
                Ok(Some(n)) if n.eq_ignore_ascii_case(node) => {}
                Ok(_) => return Handed::Returned,
                Err(e) => warn!(
                    "reading which node runs step {} of task {}: {e}",
                    step.machine_name, step.task_id
                ),
            }
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ClusterEvent::StepFinished { task_id, machine_id })
                            if task_id == step.task_id && machine_id == step.machine_id => break,
                        Ok(ClusterEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Closed) => return Handed::Stopping,
                    },
                    _ = tick.tick() => break,
                    () = self.shutdown.cancelled() => return Handed::Stopping,
                }
            }
        }
    }

    /// The polling subscription a step's tentacle may move away with (on a
    /// cluster, for a polling machine; None otherwise).
    pub(super) async fn moving_subscription(&self, step: &TaskStep) -> Option<String> {
        if !self.deps.store.shared() {
            return None;
        }
        match self.deps.store.machine_row(step.machine_id).await {
            Ok(Some(m)) => polling_subscription(&m),
            Ok(None) => None,
            Err(e) => {
                warn!("reading machine {}: {e}", step.machine_name);
                None
            }
        }
    }

    /// Returns (with the node's name) once the tentacle of `subscription`
    /// is connected to another live node and no longer to this one.
    pub(super) async fn moved_elsewhere(&self, subscription: &str) -> String {
        let mut events = self.cluster.events.subscribe();
        let polling = self.deps.comms.polling().clone();
        let me = self.deps.node_name.clone();
        loop {
            let check = match events.recv().await {
                Ok(ClusterEvent::Presence {
                    subscription_id, ..
                }) => subscription_id == subscription,
                Ok(ClusterEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Ok(_) => false,
                Err(broadcast::error::RecvError::Closed) => {
                    return std::future::pending().await;
                }
            };
            if !check || polling.is_connected(subscription) {
                continue;
            }
            match self.deps.store.polling_nodes(subscription, now_ms()).await {
                Ok(nodes) => {
                    if let Some(n) = nodes.into_iter().find(|n| !n.eq_ignore_ascii_case(&me)) {
                        return n;
                    }
                }
                Err(e) => warn!("finding the node of poll://{subscription}/: {e}"),
            }
        }
    }

    /// Whether `node` heartbeat recently (read at most every [`LIVE_NODES_FRESH`]).
    async fn node_live(&self, node: &str) -> bool {
        let fresh = {
            let live = lock(&self.cluster.live);
            live.0.is_some_and(|at| at.elapsed() < LIVE_NODES_FRESH)
        };
        if !fresh {
            match self.deps.store.list_nodes().await {
                Ok(nodes) => {
                    let names = nodes
                        .into_iter()
                        .filter(|n| n.state != octo_store::NodeState::Offline)
                        .map(|n| n.name.to_ascii_lowercase())
                        .collect();
                    *lock(&self.cluster.live) = (Some(Instant::now()), names);
                }
                // Not knowing is not "offline": keep waiting.
                Err(e) => {
                    warn!("listing the nodes: {e}");
                    return true;
                }
            }
        }
        lock(&self.cluster.live)
            .1
            .contains(&node.to_ascii_lowercase())
    }

    /// Runs a step another node handed to this one (once, however often it is told).
    fn run_handed(self: &Arc<Self>, r: StepRef) {
        if self.shutdown.is_cancelled()
            || lock(&self.steps).contains_key(&(r.task_id.clone(), r.machine_id))
        {
            return;
        }
        let Some(cancel) = self.cluster.hand_in(&r) else {
            return;
        };
        let this = self.clone();
        self.tracker.spawn(async move {
            this.run_handed_step(&r, cancel).await;
            this.cluster.hand_out(&r);
        });
    }

    async fn run_handed_step(self: &Arc<Self>, r: &StepRef, cancel: CancellationToken) {
        let store = self.deps.store.clone();
        let task = match store.task(&r.task_id).await {
            Ok(Some(t)) if !t.state.is_final() => t,
            Ok(_) => return,
            Err(e) => return error!("loading task {} to run a step handed here: {e}", r.task_id),
        };
        let step = match store.task_step(&r.task_id, r.machine_id).await {
            Ok(Some(s)) if !s.state.is_final() => s,
            Ok(_) => return,
            Err(e) => return error!("loading a step of task {} handed here: {e}", r.task_id),
        };
        match store.step_node(&r.task_id, r.machine_id).await {
            Ok(Some(n)) if n.eq_ignore_ascii_case(&self.deps.node_name) => {}
            Ok(_) => return,
            Err(e) => return error!("reading which node runs a step of task {}: {e}", r.task_id),
        }
        if task.cancel_requested {
            cancel.cancel();
        }
        info!(
            "running step {} of task {} for its node",
            step.machine_name, task.id
        );
        let (secrets, masks) = self.secrets_of(&task.id).await;
        let masker = self.masker_for(&task.id, &secrets, masks).await;
        let log = self.log_with(&task.id, masker);
        match secrets.and_then(|s| Self::runner_of(&task, &s)) {
            Ok(runner) => {
                let registered = self.register_step(&step, cancel.child_token());
                let name = step.machine_name.clone();
                if let Ran::Moved = self
                    .run_here(log, step, None, registered, runner, None)
                    .await
                {
                    // Back to the task's node, which places it again.
                    if let Err(e) = store.assign_step(&r.task_id, r.machine_id, None).await {
                        error!("giving step {name} of task {} back: {e}", r.task_id);
                    }
                    // Readers here are woken as for every change made here
                    // (this node ignores its own event's echo).
                    self.notifiers.state_changed(&r.task_id);
                    self.publish(ClusterEvent::StepFinished {
                        task_id: r.task_id.clone(),
                        machine_id: r.machine_id,
                    })
                    .await;
                }
            }
            Err(why) => {
                self.finish_step(&log, step, TaskState::Failed, Some(why), Vec::new(), None)
                    .await;
            }
        }
    }

    /// The cluster's background work: records this node's polling tentacles,
    /// forwards log growth, handles the other nodes' events and scans for
    /// missed work and tasks of offline nodes. Returns at once on an unshared store.
    pub(super) async fn run_cluster(self: Arc<Self>) {
        let store = self.deps.store.clone();
        if !store.shared() {
            return;
        }
        let mut events = match store.listen().await {
            Ok(rx) => rx,
            Err(e) => {
                error!("node {}: {e}; other nodes' events will not reach this node at once (it scans every {} s)", self.deps.node_name, SCAN_INTERVAL.as_secs());
                None
            }
        };
        self.tracker.spawn(self.clone().record_presence());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.notifiers.forward_to(tx);
        self.tracker.spawn(self.clone().forward_logs(rx));
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + SCAN_INTERVAL, SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut load = self.load.subscribe();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                r = load.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.take_queued().await;
                }
                ev = async {
                    match events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ev {
                    Some(heard) => self.on_event(heard.event, heard.own).await,
                    None => {
                        error!("node {}: the store stopped delivering other nodes' events; scanning every {} s", self.deps.node_name, SCAN_INTERVAL.as_secs());
                        events = None;
                    }
                },
                _ = tick.tick() => self.scan().await,
            }
        }
    }

    /// Acts on an event; `own` when this node published it (see
    /// [`octo_store::Heard`]).
    async fn on_event(self: &Arc<Self>, ev: ClusterEvent, own: bool) {
        match &ev {
            ClusterEvent::StepAssigned {
                task_id,
                machine_id,
                node,
            } if node.eq_ignore_ascii_case(&self.deps.node_name) => self.run_handed(StepRef {
                task_id: task_id.clone(),
                machine_id: *machine_id,
            }),
            ClusterEvent::StepAssigned { .. }
            | ClusterEvent::Presence { .. }
            | ClusterEvent::TrustChanged => {}
            // This node's own changes woke its readers when they were
            // stored: its echo would only have them read the store again.
            ClusterEvent::StepFinished { .. }
            | ClusterEvent::TaskChanged { .. }
            | ClusterEvent::LogAppended { .. }
                if own => {}
            ClusterEvent::StepFinished { task_id, .. } | ClusterEvent::TaskChanged { task_id } => {
                self.notifiers.state_changed(task_id);
            }
            ClusterEvent::LogAppended { task_id } => self.notifiers.remote_log_changed(task_id),
            ClusterEvent::MasksChanged { task_id } => self.masks_changed(task_id).await,
            ClusterEvent::TaskCancel { task_id } => self.cancel(task_id),
            ClusterEvent::TaskQueued { task_id } => self.adopt(Adopt::One(task_id)).await,
            ClusterEvent::Guidance {
                task_id,
                machine_id,
                guidance,
            } => {
                if self.guidance.deliver(task_id, *machine_id, *guidance) {
                    info!("delivered a decision for task {task_id} from another node");
                    self.publish(ClusterEvent::GuidanceDelivered {
                        task_id: task_id.clone(),
                        machine_id: *machine_id,
                    })
                    .await;
                }
            }
            ClusterEvent::GuidanceDelivered { .. } => {}
            ClusterEvent::MachineStop {
                machine_id,
                reason,
                node,
            } => {
                if !node.eq_ignore_ascii_case(&self.deps.node_name) {
                    let (this, id, reason) = (self.clone(), *machine_id, reason.clone());
                    self.tracker.spawn(async move {
                        let n = this.stop_machine(id, &reason, MACHINE_STOP_GRACE).await;
                        if n > 0 {
                            info!("canceled {n} steps of machine #{id} here: {reason}");
                        }
                    });
                }
            }
            ClusterEvent::Resync => self.scan().await,
        }
        let _ = self.cluster.events.send(ev);
    }

    /// Runs the steps handed here that are not running, and takes over the
    /// tasks no live node runs.
    async fn scan(self: &Arc<Self>) {
        match self
            .deps
            .store
            .steps_assigned_to(&self.deps.node_name)
            .await
        {
            Ok(refs) => {
                for r in refs {
                    self.run_handed(r);
                }
            }
            Err(e) => warn!("listing the steps handed to this node: {e}"),
        }
        self.adopt(Adopt::Stale).await;
    }

    /// A new task this node claimed while it runs its cap: given back for a
    /// node with room (the first to have room takes it, this one included).
    pub(super) async fn give_back_full(&self, log: &TaskLog, id: &str) {
        let me = &self.deps.node_name;
        log.server(format!(
            "Waiting: node {me} runs its cap of {} tasks; the first node with room takes the task",
            self.load.borrow().cap
        ))
        .await;
        if let Err(e) = self.deps.store.release_task(id, me).await {
            warn!("giving task {id} back: {e}");
        }
        self.cluster.queued.store(true, Ordering::Relaxed);
        self.publish(ClusterEvent::TaskQueued {
            task_id: id.to_string(),
        })
        .await;
    }

    /// Takes over the tasks no live node runs: `Adopt::One` (queued by a
    /// node that is draining or full), `Adopt::Queued` (any unclaimed, as
    /// room appeared here) or `Adopt::Stale` (a scan: those of offline
    /// nodes, and those nobody took for a while). Never on a draining node;
    /// new tasks only as far as this node has room under its cap.
    async fn adopt(self: &Arc<Self>, what: Adopt<'_>) {
        if self.load.borrow().draining || self.shutdown.is_cancelled() {
            return;
        }
        let now = now_ms();
        let (only, unclaimed_before) = match what {
            Adopt::One(id) => (Some(id), i64::MAX),
            Adopt::Queued => (None, i64::MAX),
            Adopt::Stale => (None, now - ADOPT_UNCLAIMED_AFTER_MS),
        };
        let tasks = match self.deps.store.adoptable_tasks(now, unclaimed_before).await {
            Ok(t) => t,
            Err(e) => return warn!("listing the tasks no live node runs: {e}"),
        };
        let mut room = self.room();
        for task in tasks {
            if only.is_some_and(|id| id != task.id) || self.is_running(&task.id) {
                continue;
            }
            let new = task.state != TaskState::Executing;
            if new && room == 0 {
                // Taken by the first node with room (see `take_queued`).
                self.cluster.queued.store(true, Ordering::Relaxed);
                continue;
            }
            match self
                .deps
                .store
                .claim_task(&task.id, &self.deps.node_name, now)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    warn!("taking over task {}: {e}", task.id);
                    continue;
                }
            }
            if task.state == TaskState::Executing && task.kind == kind::HEALTH {
                // Its results would be stale: as after a restart.
                let why = "the node running it went offline";
                let log = self.log_of(&task.id);
                log.server(format!("Task failed: {why}")).await;
                self.fail_unfinished(&log, why).await;
                self.set_task_state(&task.id, TaskState::Failed, Some(why))
                    .await;
                continue;
            }
            info!(
                "node {} takes over task {} ({})",
                self.deps.node_name, task.id, task.description
            );
            let why = if new {
                room = room.saturating_sub(1);
                "no other node with room took it"
            } else {
                "the node running it went offline"
            };
            self.log_of(&task.id)
                .server(format!(
                    "Node {} takes the task: {why}",
                    self.deps.node_name
                ))
                .await;
            self.start(task);
        }
    }

    /// Room appeared here (a task ended, the node was undrained): takes
    /// the tasks waiting for a node with room, when some may be waiting.
    async fn take_queued(self: &Arc<Self>) {
        if self.room() > 0 && self.cluster.queued.swap(false, Ordering::Relaxed) {
            self.adopt(Adopt::Queued).await;
        }
    }

    /// Keeps this node's polling tentacles recorded in the store.
    async fn record_presence(self: Arc<Self>) {
        let store = self.deps.store.clone();
        let me = self.deps.node_name.clone();
        let polling = self.deps.comms.polling().clone();
        let mut changes = polling.presence();
        let resync = || async {
            if let Err(e) = store.clear_polling_presence(&me).await {
                warn!("forgetting this node's polling tentacles: {e}");
            }
            for sub in polling.subscriptions() {
                if let Err(e) = store.set_polling_presence(&me, &sub, true, now_ms()).await {
                    warn!("recording poll://{sub}/ on this node: {e}");
                }
            }
        };
        resync().await;
        loop {
            let change = tokio::select! {
                () = self.shutdown.cancelled() => break,
                c = changes.recv() => c,
            };
            match change {
                Ok(p) => {
                    if let Err(e) = store
                        .set_polling_presence(&me, &p.subscription_id, p.present, now_ms())
                        .await
                    {
                        warn!("recording poll://{}/ on this node: {e}", p.subscription_id);
                    }
                    self.publish(ClusterEvent::Presence {
                        subscription_id: p.subscription_id,
                        node: me.clone(),
                    })
                    .await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => resync().await,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        // A stopping node holds no tentacle: the others stop handing it steps.
        if let Err(e) = store.clear_polling_presence(&me).await {
            warn!("forgetting this node's polling tentacles: {e}");
        }
    }

    /// Tells the other nodes whose logs grew here: each task once a batch of
    /// events ([`send_events`]) however many lines came meanwhile.
    async fn forward_logs(self: Arc<Self>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
        loop {
            let first = tokio::select! {
                () = self.shutdown.cancelled() => return,
                id = rx.recv() => match id { Some(id) => id, None => return },
            };
            let mut tasks = HashSet::from([first]);
            while let Ok(id) = rx.try_recv() {
                tasks.insert(id);
            }
            for task_id in tasks {
                self.publish(ClusterEvent::LogAppended { task_id }).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subscription_of;

    #[test]
    fn subscriptions_come_from_polling_uris_only() {
        assert_eq!(subscription_of("poll://ABC123/"), Some("ABC123"));
        assert_eq!(subscription_of("poll://ABC123"), Some("ABC123"));
        assert_eq!(subscription_of("poll:///"), None);
        assert_eq!(subscription_of("https://host:10933/"), None);
    }
}
