//! One machine's part of a script task.
//!
//! Connect, `StartScript` with the step's ticket, `StreamLogs` from the step's
//! stored `next_sequence`, store lines in small batches, and on the `completed`
//! event record the exit code, then `CompleteScript` (best effort; the step's
//! end waits for it only when the log's end is still due from it). A dropped
//! connection or a retryable failure is retried with backoff: StartScript again
//! is idempotent on the ticket and the stream resumes from the stored sequence,
//! so no line is lost or stored twice. The step gives up after
//! [`GIVE_UP_AFTER`] without reaching the machine, or at once on an error that
//! retrying cannot fix (an untrusted certificate, ...).
//!
//! Cancel: a step that never sent StartScript ends Canceled at once; otherwise
//! CancelScript goes to the tentacle (safe even when the ticket is unknown there)
//! and the log is read to the script's end.
//!
//! Log limit: a step stores at most `StepContext::max_log_bytes` of its
//! machine's output (all its runs together, counted from the store when a run
//! starts). Past it, lines are counted and dropped (service messages still get
//! [`SERVICE_MESSAGE_ALLOWANCE`] more, so output variables survive); the log
//! says so once when it starts and once, with the count, when the run ends. The
//! script runs on: the limit is about the server's disk, not the script.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use octo_api_types::{Isolation, ScriptRequest, Syntax};
use octo_comms::{Backoff, Connection, Endpoint};
use octo_proto::exit_codes;
use octo_proto::v1::{
    script_event, CancelScriptRequest, CompleteScriptRequest, IsolationLevel, LogLine, LogStream,
    RunScriptRequest, ScriptEvent, ScriptState, ScriptStatus, ScriptStatusRequest, ScriptSyntax,
    StartScriptRequest,
};
use octo_store::{now_ms, NewLogLine, TaskState, TaskStep};
use tokio::time::Instant;

use super::{load_machine, machine_now, Afterwards, StepEnd};
use crate::context::{StepContext, TaskLog};
use crate::outputs;

/// Lines stored in one batch at most.
const BATCH_LINES: usize = 500;
/// Longest a received line waits before it is stored.
const BATCH_DELAY: Duration = Duration::from_millis(50);
/// Retry delays: jittered over a window that starts here and doubles up to
/// [`RETRY_MAX`], so that the steps of many machines that lost the server at
/// once (a network cut) do not all come back in lock-step.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a step keeps trying to reach its machine.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);
/// How long a cancel keeps trying to reach the machine before the step is
/// recorded Canceled anyway.
const CANCEL_GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Bound on single unary calls (StartScript, CancelScript, CompleteScript).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a step's stored end a cleanup that brings nothing (the
/// log's end came with the script's `completed` event) waits before it goes
/// to the tentacle. The cleanup is housekeeping (the work folder removed, the
/// ticket freed); started at once, its round trip and the tentacle's file
/// deletions took the same cores as the task's end on its way to whoever
/// follows it, and a one-machine task reached its caller 0.25-1 ms later
/// (BENCHMARKS, issue 15, twenty-first session). Not a wait for anything:
/// the work is only put behind the end's delivery.
pub const CLEANUP_DEFER: Duration = Duration::from_millis(20);
/// Service messages (`##octopus[...]`, output variables) stored past the log
/// limit, at most.
pub(crate) const SERVICE_MESSAGE_ALLOWANCE: u64 = 1024 * 1024;
/// While lines are dropped, the resume point is saved at most this often (so
/// a restarted server does not fetch them again).
const DROPPED_SAVE_EVERY: Duration = Duration::from_secs(1);

/// What a step may still store of its machine's output.
#[derive(Debug, Clone)]
pub(crate) struct LogBudget {
    /// Bytes of line text the step may store.
    limit: u64,
    /// Bytes stored (before this run, and by it).
    stored: u64,
    /// Bytes of service messages stored past the limit.
    extra: u64,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// Lines dropped since the resume point was last saved.
    unsaved: bool,
    /// The first drop is still to be told in the log.
    announce: bool,
}

impl LogBudget {
    /// The budget of `step` under `limit` bytes, counting what the store holds.
    /// A step whose stored resume point is 0 holds no tentacle lines (storing
    /// any moves it, in the same transaction): nothing to count then.
    pub(crate) async fn of(ctx: &StepContext, step: &TaskStep) -> Self {
        let measured = if step.next_sequence == 0 {
            Ok((0, 0))
        } else {
            ctx.store
                .step_log_size(&step.task_id, step.machine_id)
                .await
        };
        let stored = match measured {
            Ok((_, bytes)) => u64::try_from(bytes).unwrap_or(0),
            Err(e) => {
                tracing::warn!(
                    "measuring the stored log of {} in task {}: {e}; counting from zero",
                    step.machine_name,
                    step.task_id
                );
                0
            }
        };
        LogBudget {
            limit: ctx.max_log_bytes,
            stored,
            extra: 0,
            dropped_lines: 0,
            dropped_bytes: 0,
            unsaved: false,
            // A resumed step past its limit said so before.
            announce: stored < ctx.max_log_bytes,
        }
    }

    /// Whether to store a line; counts it either way.
    fn admit(&mut self, text: &str) -> bool {
        let len = text.len() as u64;
        let dropping = self.dropped_lines > 0;
        if !dropping && self.stored.saturating_add(len) <= self.limit {
            self.stored += len;
            return true;
        }
        if text.starts_with("##octopus[")
            && self.extra.saturating_add(len) <= SERVICE_MESSAGE_ALLOWANCE
        {
            self.extra += len;
            return true;
        }
        self.dropped_lines += 1;
        self.dropped_bytes = self.dropped_bytes.saturating_add(len);
        self.unsaved = true;
        false
    }

    /// The line that says the limit was reached, once.
    fn take_announcement(&mut self) -> Option<String> {
        if !(self.announce && self.dropped_lines > 0) {
            return None;
        }
        self.announce = false;
        Some(format!(
            "this step's log reached its limit of {} (--max-log-mib-per-step): further output is counted but not stored; the script runs on",
            mib(self.limit)
        ))
    }

    /// The line that says how much was dropped since `since` (this budget
    /// earlier), when anything was.
    fn summary(&self, since: Option<&LogBudget>) -> Option<String> {
        let (lines, bytes) = since.map_or((0, 0), |b| (b.dropped_lines, b.dropped_bytes));
        let lines = self.dropped_lines.saturating_sub(lines);
        let bytes = self.dropped_bytes.saturating_sub(bytes);
        (lines > 0).then(|| {
            format!(
                "{lines} {}line{} ({}) of output past this step's log limit of {} {} dropped, not stored",
                if since.is_some() { "more " } else { "" },
                if lines == 1 { "" } else { "s" },
                mib(bytes),
                mib(self.limit),
                if lines == 1 { "was" } else { "were" },
            )
        })
    }
}

/// "1.5 MiB", or bytes below 1 MiB.
fn mib(bytes: u64) -> String {
    if bytes < 1024 * 1024 {
        format!("{bytes} bytes")
    } else {
        #[allow(clippy::cast_precision_loss)]
        let m = bytes as f64 / (1024.0 * 1024.0);
        format!("{m:.1} MiB")
    }
}

/// How one attempt ended.
enum Attempt {
    /// The step is final (recorded).
    Done,
    /// The server is stopping.
    Shutdown,
    /// Worth trying again; the connection was established (and then lost) or not.
    Retry { reason: String, was_connected: bool },
}

/// What to run on the tentacle, and how to record it.
#[derive(Debug, Clone)]
pub(crate) struct ScriptSpec {
    /// The request to send; its ticket is replaced by the step's.
    pub request: StartScriptRequest,
    /// What the log calls it: "the script", "the deployment".
    pub label: &'static str,
    /// Parse `##octopus[setVariable ...]` lines of the step's log into the step's
    /// output variables when it ends.
    pub record_outputs: bool,
    /// Which run of the step's script this is (guided-failure retries): run 0
    /// uses the step's ticket and stores tentacle sequence N as N; run K uses
    /// ticket `<ticket>.r<K>` and stores N as `K << ATTEMPT_SHIFT | N`, so every
    /// run's lines stay unique and in order.
    pub attempt: u32,
    /// A failure leaves the step Executing and is returned to the caller (which
    /// asks a person what to do) instead of ending the step.
    pub hold_failure: bool,
}

/// Stored sequences of run K of a step start at `K << ATTEMPT_SHIFT`.
pub(crate) const ATTEMPT_SHIFT: u32 = 40;

impl ScriptSpec {
    /// The ticket of this run of `step`'s script.
    fn ticket(&self, step: &TaskStep) -> String {
        if self.attempt == 0 {
            step.ticket.clone()
        } else {
            format!("{}.r{}", step.ticket, self.attempt)
        }
    }

    /// The stored sequence of this run's first line.
    pub(crate) fn base(&self) -> u64 {
        u64::from(self.attempt) << ATTEMPT_SHIFT
    }
}

impl ScriptSpec {
    /// A script task's request: its variables, and its secret values (which
    /// go to the tentacle only in the script's environment), as environment
    /// variables.
    pub(crate) fn of_script(args: &ScriptRequest, secrets: &BTreeMap<String, String>) -> Self {
        let mut environment: HashMap<String, String> = args
            .variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        environment.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
        ScriptSpec {
            request: StartScriptRequest {
                script_body: args.script.clone(),
                environment,
                syntax: match args.syntax {
                    Syntax::Bash => ScriptSyntax::Bash,
                    Syntax::Sh => ScriptSyntax::Sh,
                    Syntax::Python3 => ScriptSyntax::Python3,
                } as i32,
                isolation: match args.isolation {
                    Isolation::Full => IsolationLevel::Full,
                    Isolation::None => IsolationLevel::None,
                } as i32,
                ..StartScriptRequest::default()
            },
            label: "the script",
            record_outputs: false,
            attempt: 0,
            hold_failure: false,
        }
    }
}

/// How a script run ended.
pub(crate) enum ScriptEnd {
    /// Final: record it (the step carries the exit code, resume point and outputs).
    Finished {
        step: TaskStep,
        state: TaskState,
        error: Option<String>,
        /// Cleanup on the tentacle that may bring the log's last lines: run
        /// once the outcome is recorded, and waited for.
        afterwards: Option<Afterwards>,
        /// Cleanup that only frees the ticket and the work folder: started
        /// once the outcome is stored, not waited for.
        release: Option<Afterwards>,
        /// The lines saying how the script ended (after its first line when
        /// that is still to store), stored with the step's end.
        lines: Vec<NewLogLine>,
    },
    /// Failed with `hold_failure`: the step stays Executing, `why` goes back to
    /// the caller (which asks a person what to do).
    Held { step: TaskStep, why: String },
    /// The server is stopping.
    Interrupted,
}

impl From<ScriptEnd> for StepEnd {
    fn from(end: ScriptEnd) -> StepEnd {
        match end {
            ScriptEnd::Finished {
                step,
                state,
                error,
                afterwards,
                release,
                lines,
            } => StepEnd::Finished {
                step,
                state,
                error,
                health: None,
                afterwards,
                release,
                lines,
            },
            // Only deployments hold failures, and they ask for guidance first.
            ScriptEnd::Held { step, why } => StepEnd::finished(step, TaskState::Failed, Some(why)),
            ScriptEnd::Interrupted => StepEnd::Interrupted,
        }
    }
}

struct Run<'a> {
    ctx: &'a StepContext,
    step: TaskStep,
    spec: &'a ScriptSpec,
    endpoint: Endpoint,
    /// StartScript may have reached the tentacle (so cancel must go there).
    start_attempted: bool,
    /// The tentacle refused RunScript as unknown: the script is started and
    /// its log streamed apart (StartScript, StreamLogs).
    legacy: bool,
    /// CancelScript was delivered.
    cancel_sent: bool,
    /// When a cancel request was first noticed.
    cancel_since: Option<Instant>,
    /// The next sequence to ask for (everything before it is stored).
    next_sequence: u64,
    /// The tentacle ticket of this run.
    ticket: String,
    /// Added to tentacle sequences when stored (see [`ScriptSpec::attempt`]).
    base: u64,
    /// How the run ended, once it has.
    end: Option<(TaskState, Option<String>)>,
    /// The cleanup on the tentacle, made when the script completed (see
    /// [`Run::completed`]), started once the step's end is stored; the step's
    /// end waits for it unless `cleanup_detached`.
    cleanup: Option<Cleanup>,
    /// The `completed` event carried the log's end (every line is stored or
    /// counted): the cleanup only frees the ticket and the work folder, and
    /// the step's end does not wait for it.
    cleanup_detached: bool,
    /// The tentacle's last service line (why a script could not start).
    last_service: Option<String>,
    /// What the step may still store of the output.
    budget: LogBudget,
    /// When the resume point was last saved while lines were dropped.
    saved_at: Instant,
    /// The step's first line ("MACHINE: starting ..."), made (and stamped)
    /// when the step starts, not yet stored: it goes with the script's first
    /// lines or the step's end (one store call less a step), and at the
    /// latest [`BATCH_DELAY`] after StartScript was sent, always before any
    /// other line of the step.
    announce: Option<NewLogLine>,
    /// The lines saying how the script ended, until the step's end stores them.
    end_lines: Vec<NewLogLine>,
}

/// Whether the tentacle on `conn` said (in its Hello) that it has RunScript.
fn speaks_run_script(conn: &Connection) -> bool {
    conn.hello()
        .is_some_and(|h| h.protocol_version >= octo_proto::RUN_SCRIPT_SINCE)
}

/// One machine's part of a script task.
pub(crate) async fn run_script_step(
    ctx: &StepContext,
    step: TaskStep,
    spec: &ScriptSpec,
) -> StepEnd {
    let resumed = step.state == TaskState::Executing;
    run_step(ctx, step, spec, resumed).await.into()
}

/// Runs (or resumes, when `resumed`: StartScript may have reached the tentacle
/// before) one step's script to its end; returns early only when the server
/// stops. With `spec.hold_failure`, a failure is returned as held instead of final.
///
/// A new step is stored as started while its machine is read and its script
/// sent, not before: the store's answer is not on the script's path. Nothing
/// is lost if the server stops before it lands: the step, still queued, is
/// started again with the same ticket, which the tentacle answers with the
/// script it has. Every other write of the step waits for it.
pub(crate) async fn run_step(
    ctx: &StepContext,
    mut step: TaskStep,
    spec: &ScriptSpec,
    resumed: bool,
) -> ScriptEnd {
    if resumed {
        return run_started(ctx, step, spec, resumed).await;
    }
    step.state = TaskState::Executing;
    step.started_at.get_or_insert_with(now_ms);
    let (step_ctx, start_stored) = ctx.after_step_start();
    let started = step.clone();
    let store_start = async move {
        ctx.save(&started).await;
        drop(start_stored);
    };
    let ((), end) = tokio::join!(
        store_start,
        Box::pin(run_started(&step_ctx, step, spec, resumed))
    );
    end
}

/// [`run_step`] once the step is stored as started (or being stored so).
async fn run_started(
    ctx: &StepContext,
    step: TaskStep,
    spec: &ScriptSpec,
    resumed: bool,
) -> ScriptEnd {
    let endpoint = match load_machine(ctx, &step).await {
        Ok((_, endpoint)) => endpoint,
        Err(why) => {
            return ScriptEnd::Finished {
                step,
                state: TaskState::Failed,
                error: Some(why),
                afterwards: None,
                release: None,
                lines: Vec::new(),
            }
        }
    };
    let base = spec.base();
    let next_sequence = u64::try_from(step.next_sequence)
        .unwrap_or(0)
        .saturating_sub(base);
    let label = spec.label;
    let announce = if resumed {
        ctx.say(format!("resuming {label} from log line {next_sequence}"))
            .await;
        None
    } else {
        let name = &step.machine_name;
        Some(
            ctx.log
                .server_line(&format!("{name}: starting {label} ({endpoint})")),
        )
    };
    let ticket = spec.ticket(&step);
    let budget = LogBudget::of(ctx, &step).await;
    let mut run = Run {
        ctx,
        step,
        spec,
        endpoint,
        start_attempted: resumed,
        legacy: false,
        cancel_sent: false,
        cancel_since: None,
        next_sequence,
        ticket,
        base,
        end: None,
        cleanup: None,
        cleanup_detached: false,
        last_service: None,
        budget,
        saved_at: Instant::now(),
        announce,
        end_lines: Vec::new(),
    };
    Box::pin(run.run()).await;
    run.flush_announce().await;
    let Some((state, error)) = run.end.take() else {
        run.flush_end_line().await;
        return ScriptEnd::Interrupted;
    };
    if let Some(text) = run.budget.summary(None) {
        run.flush_end_line().await;
        ctx.say(text).await;
    }
    if state == TaskState::Failed && spec.hold_failure {
        run.flush_end_line().await;
        return ScriptEnd::Held {
            step: run.step,
            why: error.unwrap_or_else(|| "failed".into()),
        };
    }
    // The cleanup frees the script's ticket on the tentacle, so it starts
    // once the step's end is stored, never before: a server restarted before
    // that resumes the step and must find the script there, ended, not start
    // it again. Detached (the log's end came with `completed`), the task goes
    // on without waiting for it (it ends by itself, or with the server's
    // shutdown), and it starts [`CLEANUP_DEFER`] later; otherwise it may
    // bring the log's last lines, and the step's end waits for it.
    let (afterwards, release) = match run.cleanup.take() {
        Some(cleanup) if run.cleanup_detached => {
            (None, Some(Box::pin(cleanup.run_deferred()) as Afterwards))
        }
        Some(cleanup) => (Some(Box::pin(cleanup.run()) as Afterwards), None),
        None => (None, None),
    };
    ScriptEnd::Finished {
        lines: std::mem::take(&mut run.end_lines),
        step: run.step,
        state,
        error,
        afterwards,
        release,
    }
}

impl Run<'_> {
    fn name(&self) -> &str {
        &self.step.machine_name
    }

    async fn log(&mut self, text: String) {
        self.flush_announce().await;
        self.flush_end_line().await;
        self.ctx.say(text).await;
    }

    /// Stores the step's first line if it is still pending.
    async fn flush_announce(&mut self) {
        if let Some(line) = self.announce.take() {
            self.ctx.log.put(line).await;
        }
    }

    /// Stores the lines saying how the script ended if they are still
    /// pending (normally they go with the step's end: [`ScriptEnd::Finished`]).
    async fn flush_end_line(&mut self) {
        for line in std::mem::take(&mut self.end_lines) {
            self.ctx.log.put(line).await;
        }
    }

    /// Decides how the run ended (the engine records it).
    async fn finish(&mut self, state: TaskState, error: Option<String>) {
        self.step.next_sequence =
            i64::try_from(self.base.saturating_add(self.next_sequence)).unwrap_or(i64::MAX);
        if state == TaskState::Failed && self.spec.hold_failure {
            self.ctx.save(&self.step).await;
        } else if self.spec.record_outputs {
            outputs::collect(self.ctx.store.as_ref(), &mut self.step).await;
        }
        self.end = Some((state, error));
    }

    fn held(&self) -> bool {
        self.spec.hold_failure && matches!(self.end, Some((TaskState::Failed, _)))
    }

    async fn fail(&mut self, why: String) {
        self.log(format!("failed: {why}")).await;
        self.finish(TaskState::Failed, Some(why)).await;
    }

    /// Whether the step should stop trying to cancel and record Canceled.
    async fn cancel_gave_up(&mut self, reason: &str) -> bool {
        let since = *self.cancel_since.get_or_insert_with(Instant::now);
        if since.elapsed() < CANCEL_GIVE_UP_AFTER {
            return false;
        }
        let why = format!(
            "canceled, but the cancel could not be delivered within {} s ({reason}); the script may still be running on {}",
            CANCEL_GIVE_UP_AFTER.as_secs(),
            self.name()
        );
        self.log(why.clone()).await;
        self.finish(TaskState::Canceled, Some(why)).await;
        true
    }

    async fn run(&mut self) {
        let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
        let mut failing_since: Option<Instant> = None;
        loop {
            let attempt = Box::pin(self.attempt()).await;
            let (reason, was_connected) = match attempt {
                Attempt::Done | Attempt::Shutdown => return,
                Attempt::Retry {
                    reason,
                    was_connected,
                } => (reason, was_connected),
            };
            if was_connected {
                backoff.reset();
                failing_since = None;
            }
            if self.ctx.cancel.is_cancelled() {
                // Never started: nothing to stop on the machine.
                if !self.start_attempted {
                    self.log("canceled before the script started".into()).await;
                    return self.finish(TaskState::Canceled, None).await;
                }
                if self.cancel_gave_up(&reason).await {
                    return;
                }
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= GIVE_UP_AFTER {
                let why = format!(
                    "could not reach {} for {} minutes: {reason}",
                    self.name(),
                    GIVE_UP_AFTER.as_secs() / 60
                );
                return self.fail(why).await;
            }
            self.flush_announce().await;
            let delay = backoff.next_delay();
            let what = if was_connected {
                format!("connection to {} lost", self.name())
            } else {
                format!("cannot reach {}", self.name())
            };
            self.ctx
                .log
                .server(format!(
                    "{what}: {reason}; resuming in {:.1} s",
                    delay.as_secs_f32()
                ))
                .await;
            // A cancel request cuts the wait short once, so it is delivered promptly.
            let wait_for_cancel = !self.ctx.cancel.is_cancelled();
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                _ = self.ctx.cancel.cancelled(), if wait_for_cancel => {}
                _ = tokio::time::sleep(delay) => {}
            }
            if let Some(now) = machine_now(self.ctx, &self.step, &self.endpoint).await {
                self.endpoint = now;
            }
        }
    }

    /// One connection's worth of work.
    async fn attempt(&mut self) -> Attempt {
        let shutdown = &self.ctx.shutdown;
        // A polling machine may take minutes to connect: a cancel meanwhile ends the
        // step at once when the script was never started, and otherwise bounds the wait.
        let comms = self.ctx.comms.clone();
        let endpoint = self.endpoint.clone();
        let connect = async move { comms.connect(&endpoint).await };
        tokio::pin!(connect);
        let ready = futures_util::FutureExt::now_or_never(&mut connect);
        if ready.is_none() {
            // Not at once (a polling tentacle still to connect, a handshake):
            // the step says it is starting meanwhile.
            self.flush_announce().await;
        }
        let connected = if let Some(r) = ready {
            r
        } else {
            loop {
                let cancel_noticed = self.cancel_since.is_some();
                let cancel_deadline = self.cancel_since.map(|s| s + CANCEL_GIVE_UP_AFTER);
                tokio::select! {
                    r = &mut connect => break r,
                    _ = shutdown.cancelled() => return Attempt::Shutdown,
                    _ = self.ctx.cancel.cancelled(), if !cancel_noticed => {
                        if !self.start_attempted {
                            self.log("canceled before the script started".into()).await;
                            self.finish(TaskState::Canceled, None).await;
                            return Attempt::Done;
                        }
                        self.cancel_since = Some(Instant::now());
                    }
                    _ = sleep_until(cancel_deadline), if cancel_deadline.is_some() => {
                        return Attempt::Retry {
                            reason: format!("{} did not connect", self.name()),
                            was_connected: false,
                        };
                    }
                }
            }
        };
        let conn = match connected {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                return Attempt::Retry {
                    reason: e.to_string(),
                    was_connected: false,
                }
            }
            Err(e) => {
                // Refused as the step looks for it (a certificate it no longer
                // presents)? Registered again or rotated since: tried again as
                // it is now.
                if let Some(now) = machine_now(self.ctx, &self.step, &self.endpoint).await {
                    self.endpoint = now;
                    return Attempt::Retry {
                        reason: e.to_string(),
                        was_connected: false,
                    };
                }
                self.fail(e.to_string()).await;
                return Attempt::Done;
            }
        };

        if self.ctx.cancel.is_cancelled() {
            if !self.start_attempted {
                self.log("canceled before the script started".into()).await;
                self.finish(TaskState::Canceled, None).await;
                return Attempt::Done;
            }
            if !self.cancel_sent {
                if let Some(end) = self.send_cancel(&conn).await {
                    return end;
                }
            }
        } else {
            self.start_attempted = true;
            if !self.legacy && speaks_run_script(&conn) {
                match self.run_script(&conn).await {
                    Ok(events) => return self.follow(&conn, events).await,
                    Err(Some(end)) => return end,
                    // Refused as unknown: started and streamed apart, from now on.
                    Err(None) => self.legacy = true,
                }
            }
            if let Some(end) = self.start_script(&conn).await {
                return end;
            }
        }
        self.stream(&conn).await
    }

    /// Awaits `call` (a start sent to the tentacle); meanwhile the step's first
    /// line, when still to store, waits to be stored with the script's first
    /// lines or its end (one store call less a step), or for [`BATCH_DELAY`]:
    /// a slow start stores it meanwhile. None when the server stops.
    async fn starting<T>(&mut self, call: impl std::future::Future<Output = T>) -> Option<T> {
        let shutdown = self.ctx.shutdown.clone();
        let start = async {
            tokio::select! {
                r = call => Some(r),
                _ = shutdown.cancelled() => None,
            }
        };
        tokio::pin!(start);
        let pending = self.announce.is_some();
        tokio::select! {
            biased;
            r = &mut start => r,
            () = tokio::time::sleep(BATCH_DELAY), if pending => {
                self.flush_announce().await;
                start.await
            }
        }
    }

    /// RunScript: starts the script and opens its log in one call. Err(None)
    /// when the tentacle does not know the call (start and stream apart then);
    /// Err(Some(end)) when the attempt is over.
    async fn run_script(
        &mut self,
        conn: &Connection,
    ) -> Result<tonic::Streaming<ScriptEvent>, Option<Attempt>> {
        let req = RunScriptRequest {
            start: Some(self.start_request()),
            since_sequence: self.next_sequence,
        };
        let mut client = conn.scripts();
        let call = tokio::time::timeout(CALL_TIMEOUT, client.run_script(req));
        let Some(opened) = self.starting(call).await else {
            return Err(Some(Attempt::Shutdown));
        };
        match opened {
            Ok(Ok(events)) => Ok(events.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                tracing::debug!(
                    machine = %self.name(),
                    "the tentacle has no RunScript; starting the script and streaming its log apart"
                );
                Err(None)
            }
            Ok(Err(status)) => Err(Some(self.start_failed("RunScript", Some(status)).await)),
            Err(_) => Err(Some(self.start_failed("RunScript", None).await)),
        }
    }

    /// StartScript (the stream is opened apart); Some(end) when the attempt is over.
    async fn start_script(&mut self, conn: &Connection) -> Option<Attempt> {
        let req = self.start_request();
        let mut client = conn.scripts();
        let call = tokio::time::timeout(CALL_TIMEOUT, client.start_script(req));
        let Some(started) = self.starting(call).await else {
            return Some(Attempt::Shutdown);
        };
        match started {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(self.start_failed("StartScript", Some(status)).await),
            Err(_) => Some(self.start_failed("StartScript", None).await),
        }
    }

    /// The end of an attempt whose start (`call`) failed with `status`, or got
    /// no answer in time (None).
    async fn start_failed(&mut self, call: &str, status: Option<tonic::Status>) -> Attempt {
        match status {
            Some(status) if octo_comms::is_retryable(&status) => Attempt::Retry {
                reason: status.message().to_string(),
                was_connected: false,
            },
            Some(status) => {
                self.fail(format!(
                    "the tentacle refused to start the script: {} ({:?})",
                    status.message(),
                    status.code()
                ))
                .await;
                Attempt::Done
            }
            None => Attempt::Retry {
                reason: format!("{call} got no answer within {} s", CALL_TIMEOUT.as_secs()),
                was_connected: false,
            },
        }
    }

    fn start_request(&self) -> StartScriptRequest {
        StartScriptRequest {
            ticket: self.ticket.clone(),
            ..self.spec.request.clone()
        }
    }

    /// Sends CancelScript; Some(end) when the attempt is over.
    async fn send_cancel(&mut self, conn: &Connection) -> Option<Attempt> {
        let req = CancelScriptRequest {
            ticket: self.ticket.clone(),
            since_sequence: self.next_sequence,
        };
        let mut client = conn.scripts();
        let sent = tokio::select! {
            r = tokio::time::timeout(CALL_TIMEOUT, client.cancel_script(req)) => r,
            _ = self.ctx.shutdown.cancelled() => return Some(Attempt::Shutdown),
        };
        match sent {
            Ok(Ok(_)) => {
                self.cancel_sent = true;
                self.log("cancel sent to the tentacle".into()).await;
                None
            }
            Ok(Err(status)) if octo_comms::is_retryable(&status) => Some(Attempt::Retry {
                reason: status.message().to_string(),
                was_connected: true,
            }),
            Ok(Err(status)) => {
                let why = format!(
                    "the tentacle refused to cancel the script: {} ({:?})",
                    status.message(),
                    status.code()
                );
                self.log(why.clone()).await;
                self.finish(TaskState::Canceled, Some(why)).await;
                Some(Attempt::Done)
            }
            Err(_) => Some(Attempt::Retry {
                reason: format!(
                    "CancelScript got no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                ),
                was_connected: true,
            }),
        }
    }

    /// Streams the log to the script's end (or until the connection fails).
    async fn stream(&mut self, conn: &Connection) -> Attempt {
        let shutdown = &self.ctx.shutdown;
        let req = ScriptStatusRequest {
            ticket: self.ticket.clone(),
            since_sequence: self.next_sequence,
        };
        let mut client = conn.scripts();
        let opened = tokio::select! {
            r = client.stream_logs(req) => r,
            _ = shutdown.cancelled() => return Attempt::Shutdown,
        };
        match opened {
            Ok(r) => self.follow(conn, r.into_inner()).await,
            Err(status) if octo_comms::is_retryable(&status) => Attempt::Retry {
                reason: status.message().to_string(),
                was_connected: true,
            },
            Err(status) => {
                self.fail(format!(
                    "the tentacle refused to stream the log: {} ({:?})",
                    status.message(),
                    status.code()
                ))
                .await;
                Attempt::Done
            }
        }
    }

    /// Reads the log's `events` to the script's end (or until the connection fails).
    async fn follow(
        &mut self,
        conn: &Connection,
        mut events: tonic::Streaming<ScriptEvent>,
    ) -> Attempt {
        let shutdown = &self.ctx.shutdown;
        let mut batch: Vec<NewLogLine> = Vec::new();
        // The step's first line, still to store, is stored within
        // [`BATCH_DELAY`] (with the script's lines or its end if they come sooner).
        let mut flush_at: Option<Instant> =
            self.announce.as_ref().map(|_| Instant::now() + BATCH_DELAY);
        loop {
            let cancel_pending = !self.cancel_sent;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Attempt::Shutdown,
                _ = self.ctx.cancel.cancelled(), if cancel_pending => {
                    if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                        return end;
                    }
                    if let Some(end) = self.send_cancel(conn).await {
                        return end;
                    }
                }
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                        return end;
                    }
                    self.flush_announce().await;
                }
                event = events.message() => match event {
                    Ok(Some(ev)) => match ev.event {
                        Some(script_event::Event::Log(line)) => {
                            self.push(&mut batch, line);
                            if batch.len() >= BATCH_LINES {
                                if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                                    return end;
                                }
                            } else if flush_at.is_none() {
                                flush_at = Some(Instant::now() + BATCH_DELAY);
                            }
                        }
                        Some(script_event::Event::Completed(status)) => {
                            for line in status.logs.iter().cloned() {
                                self.push(&mut batch, line);
                            }
                            if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                                return end;
                            }
                            self.completed(conn, &status).await;
                            return Attempt::Done;
                        }
                        None => {}
                    },
                    Ok(None) => {
                        if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                            return end;
                        }
                        return Attempt::Retry {
                            reason: "the log stream ended before the script completed".into(),
                            was_connected: true,
                        };
                    }
                    Err(status) => {
                        if let Err(end) = self.flush(&mut batch, &mut flush_at).await {
                            return end;
                        }
                        if octo_comms::is_retryable(&status) {
                            return Attempt::Retry {
                                reason: status.message().to_string(),
                                was_connected: true,
                            };
                        }
                        self.fail(format!(
                            "reading the log failed: {} ({:?})",
                            status.message(),
                            status.code()
                        ))
                        .await;
                        return Attempt::Done;
                    }
                },
            }
        }
    }

    /// Adds a line unless it is stored already.
    fn push(&mut self, batch: &mut Vec<NewLogLine>, line: LogLine) {
        if line.stream == LogStream::Service as i32 && line.sequence >= self.next_sequence {
            self.last_service = Some(line.text.clone());
        }
        let lines = Lines {
            log: &self.ctx.log,
            machine_id: self.step.machine_id,
            base: self.base,
            mask_outputs: self.spec.record_outputs,
        };
        lines.push(&mut self.next_sequence, &mut self.budget, batch, line);
    }

    /// Stores the batch. Err(end) when the store failed (the step is then Failed).
    async fn flush(
        &mut self,
        batch: &mut Vec<NewLogLine>,
        flush_at: &mut Option<Instant>,
    ) -> Result<(), Attempt> {
        *flush_at = None;
        if !batch.is_empty() {
            let mut lines = std::mem::take(batch);
            // The step's first line, if still to store, goes before them.
            if let Some(line) = self.announce.take() {
                lines.insert(0, line);
            }
            if let Err(e) = self.ctx.log.append(&lines).await {
                self.fail(format!("storing the log failed: {e}")).await;
                return Err(Attempt::Done);
            }
        }
        if let Some(text) = self.budget.take_announcement() {
            self.log(text).await;
        }
        // Dropped lines do not move the stored resume point: save it now and
        // then, so a restarted server does not fetch them again.
        if self.budget.unsaved && self.saved_at.elapsed() >= DROPPED_SAVE_EVERY {
            self.budget.unsaved = false;
            self.saved_at = Instant::now();
            self.step.next_sequence =
                i64::try_from(self.base.saturating_add(self.next_sequence)).unwrap_or(i64::MAX);
            self.ctx.save(&self.step).await;
        }
        Ok(())
    }

    /// Records the script's end and makes the cleanup on the tentacle, which
    /// starts once the end is stored.
    async fn completed(&mut self, conn: &Connection, status: &ScriptStatus) {
        let code = status.exit_code;
        self.step.exit_code = Some(code);
        let (state, error) = if code == 0 {
            (TaskState::Success, None)
        } else if self.ctx.cancel.is_cancelled()
            && (code == exit_codes::CANCELLED || code == exit_codes::UNKNOWN_TICKET)
        {
            // Cancelled, or cancelled before the start ever reached the tentacle.
            (TaskState::Canceled, None)
        } else {
            (
                TaskState::Failed,
                Some(describe_exit(code, self.last_service.as_deref())),
            )
        };
        // The cleanup (CompleteScript: the rest of the log, normally nothing,
        // and the work folder removed, the ticket freed) starts once the end
        // is stored (see the end of `run_step`). A held run stays on the tentacle until a person decides: a resumed
        // step then finds it complete instead of running it again.
        let held = self.spec.hold_failure && state == TaskState::Failed;
        if !held {
            let cleanup = Cleanup {
                log: self.ctx.log.clone(),
                shutdown: self.ctx.shutdown.clone(),
                conn: conn.clone(),
                ticket: self.ticket.clone(),
                machine_id: self.step.machine_id,
                machine_name: self.step.machine_name.clone(),
                next_sequence: self.next_sequence,
                base: self.base,
                mask_outputs: self.spec.record_outputs,
                budget: self.budget.clone(),
            };
            self.cleanup = Some(cleanup);
            // Every line up to the tentacle's last is stored or counted: the
            // cleanup has nothing to bring back (a line it brought anyway
            // would be stored after the end, never dropped), and the task's
            // end need not wait for its round trip.
            self.cleanup_detached = !status.more_logs && self.next_sequence >= status.next_sequence;
        }
        // Stored with the step's end, after the step's first line when that
        // is still to store (one call where that saves one); a line that must
        // come after them (the log budget's summary) stores them first.
        let text = match &error {
            None => format!("{} finished ({state:?}, exit code {code})", self.spec.label),
            Some(e) => format!("{} finished ({state:?}): {e}", self.spec.label),
        };
        let name = &self.ctx.machine_name;
        self.end_lines.extend(self.announce.take());
        let end = self.ctx.log.server_line(&format!("{name}: {text}"));
        self.end_lines.push(end);
        self.finish(state, error).await;
        debug_assert_eq!(held, self.held(), "the cleanup decision matches the end");
    }
}

/// How a run's tentacle lines are stored.
struct Lines<'a> {
    /// Learns the values of output variables marked sensitive.
    log: &'a TaskLog,
    machine_id: i64,
    /// Added to tentacle sequences (see [`ScriptSpec::attempt`]).
    base: u64,
    /// Mask sensitive output variables (deployments).
    mask_outputs: bool,
}

impl Lines<'_> {
    /// Adds `line` to `batch` unless it is before `next_sequence` (stored
    /// already) or past the budget (counted there), and moves `next_sequence`
    /// past it.
    fn push(
        &self,
        next_sequence: &mut u64,
        budget: &mut LogBudget,
        batch: &mut Vec<NewLogLine>,
        line: LogLine,
    ) {
        if line.sequence < *next_sequence {
            return;
        }
        *next_sequence = line.sequence.saturating_add(1);
        if !budget.admit(&line.text) {
            return;
        }
        let stream = match LogStream::try_from(line.stream) {
            Ok(LogStream::Stderr) => "stderr",
            Ok(LogStream::Service) => "service",
            _ => "stdout",
        };
        let text = if self.mask_outputs && stream == "stdout" {
            match outputs::sensitive_value(&line.text) {
                Some((value, masked)) => {
                    self.log.add_secret(&value);
                    masked
                }
                None => line.text,
            }
        } else {
            line.text
        };
        batch.push(NewLogLine {
            machine_id: Some(self.machine_id),
            sequence: Some(
                i64::try_from(self.base.saturating_add(line.sequence)).unwrap_or(i64::MAX),
            ),
            timestamp: line.timestamp_unix_ms,
            stream: stream.into(),
            text,
        });
    }
}

/// After a completed script: the rest of its log (normally nothing), and its
/// work directory removed on the tentacle (best effort).
struct Cleanup {
    log: TaskLog,
    shutdown: tokio_util::sync::CancellationToken,
    conn: Connection,
    ticket: String,
    machine_id: i64,
    machine_name: String,
    next_sequence: u64,
    base: u64,
    mask_outputs: bool,
    budget: LogBudget,
}

impl Cleanup {
    /// [`Cleanup::run`] after [`CLEANUP_DEFER`] (none when the server stops
    /// meanwhile: the tentacle's retention removes the folder in time).
    async fn run_deferred(self) {
        tokio::select! {
            () = tokio::time::sleep(CLEANUP_DEFER) => self.run().await,
            () = self.shutdown.cancelled() => {}
        }
    }

    async fn run(mut self) {
        let before = self.budget.clone();
        let lines = Lines {
            log: &self.log,
            machine_id: self.machine_id,
            base: self.base,
            mask_outputs: self.mask_outputs,
        };
        for _ in 0..10 {
            let req = CompleteScriptRequest {
                ticket: self.ticket.clone(),
                since_sequence: self.next_sequence,
            };
            let mut client = self.conn.scripts();
            let reply = tokio::select! {
                r = tokio::time::timeout(CALL_TIMEOUT, client.complete_script(req)) => r,
                _ = self.shutdown.cancelled() => return,
            };
            let reply = match reply {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(status)) => {
                    return tracing::debug!(
                        "CompleteScript for {} on {}: {}",
                        self.ticket,
                        self.machine_name,
                        status.message()
                    )
                }
                Err(_) => return,
            };
            let mut batch = Vec::new();
            for line in reply.logs {
                lines.push(&mut self.next_sequence, &mut self.budget, &mut batch, line);
            }
            if let Err(e) = self.log.append(&batch).await {
                return tracing::error!("storing the log of {}: {e}", self.log.task_id());
            }
            if !(reply.more_logs && reply.state == ScriptState::Complete as i32) {
                break;
            }
        }
        if let Some(text) = self.budget.summary(Some(&before)) {
            self.log
                .server(format!("{}: {text}", self.machine_name))
                .await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// "exit code 3", with the meaning of the reserved negative codes; a script
/// that could not start says why in the tentacle's words (its last service
/// line: a full disk, a missing interpreter, ...).
fn describe_exit(code: i32, last_service: Option<&str>) -> String {
    let could_not_start;
    let meaning = match code {
        exit_codes::COULD_NOT_START => {
            could_not_start = match last_service.map(str::trim).filter(|l| !l.is_empty()) {
                Some(line) => {
                    let why = line
                        .rsplit_once("; exit code ")
                        .map_or(line, |(why, _)| why);
                    format!(" (the script could not be started: {why})")
                }
                None => " (the script could not be started; the tentacle's log says why)".into(),
            };
            could_not_start.as_str()
        }
        exit_codes::CANCELLED => " (the script was cancelled)",
        exit_codes::MUTEX_TIMEOUT => " (the isolation mutex could not be acquired in time)",
        exit_codes::UNKNOWN_TICKET => {
            " (the tentacle does not know this script: its work directory was removed or the tentacle was reinstalled)"
        }
        exit_codes::TENTACLE_RESTARTED => {
            " (the tentacle restarted while the script ran; its outcome is unknown)"
        }
        exit_codes::FATAL => " (fatal error in the tentacle while supervising the script)",
        _ => "",
    };
    format!("exit code {code}{meaning}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_that_could_not_start_says_why_in_the_tentacles_words() {
        let full = "could not prepare the work directory /h/Work/t: no space left on the device: cannot write /h/Work/t/a (12 KiB free in /h/Work); free some space; exit code -11";
        let said = describe_exit(exit_codes::COULD_NOT_START, Some(full));
        assert!(said.contains("no space left on the device"), "{said}");
        assert!(!said.contains("shell missing"), "{said}");
        assert!(!said.ends_with("exit code -11)"), "{said}");
        let unknown = describe_exit(exit_codes::COULD_NOT_START, None);
        assert!(unknown.contains("the tentacle's log says why"), "{unknown}");
        assert_eq!(describe_exit(3, Some("anything")), "exit code 3");
    }
}
