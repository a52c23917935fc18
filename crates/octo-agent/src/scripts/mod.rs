//! The script service: runs scripts in their own work directories and process
//! groups, records their output, isolates them with named reader/writer locks, and
//! cancels them with everything they started.
//!
//! # Work directory
//!
//! Each ticket gets `HOME/Work/<ticket>/` (mode 0700) holding the script
//! (`script.sh`, `script.py` or `script.ps1`), the request's extra files,
//! `state.json` (stage, exit code, pid, times; rewritten in place by one write) and `output.log`
//! (one JSON object per line, appended as lines are read). Because the state is on
//! disk, StartScript stays idempotent across a tentacle restart, and a restarted
//! tentacle marks scripts that were pending or running as complete with
//! `TENTACLE_RESTARTED` (-5); their logs stay readable, and processes they left (found
//! by environment, see below) are killed so the outcome stays "unknown", not
//! "still running unsupervised".
//!
//! # Processes
//!
//! The script runs as `bash|sh|python3 -u|pwsh -File <script> <arguments...>` in its
//! work directory, stdin `/dev/null`, as the leader of its own process group, with the
//! tentacle's environment plus the request's plus `TentacleHome`,
//! `TentacleApplications`, `TentacleInstanceName`, `TentacleVersion` and
//! `TentacleScriptTicket`. The script is complete when that process exits (code, or
//! 128+signal). Its output is then drained for at most one second (a background
//! process holding stdout open cannot hang completion), and whatever is left in its
//! process group is killed (`SIGKILL`). Processes that left the group (`setsid`) are
//! left alone on a normal exit, so a deployment may start a long-lived service that
//! way.
//!
//! **Cancel** sends `SIGTERM` to the process group *and* to every process carrying the
//! script's `TentacleScriptTicket` and `TentacleHome` in its environment (which
//! catches `setsid`/daemonised descendants), waits up to `cancel_grace` for all of them
//! to exit, then sends `SIGKILL` to whatever remains; the exit code is `CANCELLED`
//! (-2). A pending script leaves the mutex queue at once.
//!
//! # Isolation
//!
//! One reader/writer lock per mutex name (empty = `default`): FULL holds it
//! exclusively, NONE shared. Requests are granted strictly in arrival order, so a FULL
//! script waiting blocks NONE scripts that arrive after it (no starvation). While
//! waiting, the script is PENDING and its log says what it waits for
//! ("waiting for the isolation mutex 'X' held by ticket Y", and again whenever the
//! holder changes). `mutex_timeout_ms` > 0 bounds the wait; then the script completes
//! with `MUTEX_TIMEOUT` (-3).
//!
//! # Abandoned callers (the mutex rule)
//!
//! A caller's connection may drop at any time; scripts keep running and logging
//! without one, and the caller resumes with GetStatus/StreamLogs from the sequence it
//! had. But a script whose caller is gone for good must not hold or wait for the
//! mutex forever:
//!
//! 1. A **running** script is never killed for lack of a caller: it finishes on its
//!    own, and its log waits for a caller to collect it.
//! 2. A script **releases the mutex the moment it completes**, whether or not anybody
//!    ever calls CompleteScript.
//! 3. A **pending** script (waiting for the mutex) that no caller has asked about for
//!    `abandoned_after` (default 1 h) is cancelled: it leaves the queue and completes
//!    with `CANCELLED` (-2) and a service log line saying why. "Asked about" means
//!    any RPC naming its ticket (StartScript again, GetStatus, StreamLogs,
//!    CancelScript, CompleteScript); an open StreamLogs counts as asking for as long as
//!    it stays open. The rule is judged on elapsed time alone: a caller returning
//!    after the period finds the script cancelled even if the timer had not fired yet.
//! 4. A completed script whose caller never calls CompleteScript has its work
//!    directory removed `retention` (default 24 h) after it completed, also across
//!    restarts; its ticket is then unknown.
//!
//! # Reading logs
//!
//! Every line (stdout, stderr, or a SERVICE line from the tentacle) gets the next
//! sequence number of its script, starting at 0. GetStatus returns at most 10,000
//! lines or about 3 MiB per reply (under gRPC clients' default 4 MiB message limit)
//! with `more_logs` set when more remain. StreamLogs pushes lines as they are written
//! (no polling), then one `completed` status, through a bounded channel: a slow or
//! vanished reader never blocks the script or other readers. Unknown tickets are not
//! RPC errors: every RPC answers them with a COMPLETE status whose exit code is
//! `UNKNOWN_TICKET` (-4).
//!
//! **CompleteScript** returns the log from `since_sequence` and removes the work
//! directory, but only once the script is complete and the reply holds the rest of the
//! log: for a pending or running script it only returns the status; when the rest of
//! the log does not fit in one reply it returns a page with `more_logs` set and keeps
//! everything, so the caller calls CompleteScript again from `next_sequence`.

mod log;
mod mutex;
mod process;
mod state;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use nix::sys::signal::Signal;
use octo_proto::exit_codes::{
    CANCELLED, COULD_NOT_START, FATAL, MUTEX_TIMEOUT, TENTACLE_RESTARTED, UNKNOWN_TICKET,
};
use octo_proto::v1::script_service_server::ScriptService;
use octo_proto::v1::{
    script_event, CancelScriptRequest, CompleteScriptRequest, IsolationLevel, LogStream,
    RunScriptRequest, ScriptEvent, ScriptState, ScriptStatus, ScriptStatusRequest, ScriptSyntax,
    StartScriptRequest,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use self::log::{LineSplitter, LogStore, Page, Plan};
use self::mutex::{IsolationLocks, Lease, Wait};
use self::process::{Cookie, Interpreter, Selector};
use self::state::{Persisted, Stage, LOG_FILE, STATE_FILE, STATE_TMP};
use crate::AgentContext;

/// Most lines in one GetStatus/CancelScript/CompleteScript reply.
const REPLY_LINES: usize = 10_000;
/// About the most bytes of log in one reply.
const REPLY_BYTES: usize = 3 << 20;
/// Lines read per batch by a log stream.
const STREAM_BATCH_LINES: usize = 1_000;
const STREAM_BATCH_BYTES: usize = 1 << 20;
/// Events buffered per log stream before its reader waits for the consumer.
const STREAM_BUFFER: usize = 64;
/// How long output is read after the script's process exited.
const DRAIN: Duration = Duration::from_secs(1);
/// How long to wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Longest `wait_ms` honoured.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Longest ticket.
const MAX_TICKET: usize = 128;
/// In the name of a completed script's work directory moved aside for
/// deletion: `<ticket>~<n>` (never a ticket: tickets have no `~`).
const REMOVED_MARK: &str = "~";
/// Numbers the directories moved aside, so that a ticket used again never
/// meets its previous directory still being deleted.
static REMOVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Longest mutex name.
const MAX_MUTEX_NAME: usize = 1024;

/// Tunables of the script service.
#[derive(Debug, Clone)]
pub struct ScriptOptions {
    /// After SIGTERM on cancel, how long the script's processes get before SIGKILL.
    pub cancel_grace: Duration,
    /// How long the work directory of a script that completed but was never
    /// CompleteScript'ed is kept.
    pub retention: Duration,
    /// Longer output lines are split into several lines (at least 16).
    pub max_line_bytes: usize,
    /// A pending script nobody asked about for this long is cancelled (see the module
    /// documentation, "Abandoned callers").
    pub abandoned_after: Duration,
}

impl Default for ScriptOptions {
    fn default() -> Self {
        Self {
            cancel_grace: Duration::from_secs(10),
            retention: Duration::from_secs(24 * 3600),
            max_line_bytes: 64 << 10,
            abandoned_after: Duration::from_secs(3600),
        }
    }
}

/// The script service (see the module documentation). Cheap to clone; clones share
/// the same scripts.
#[derive(Clone)]
pub struct ScriptServiceImpl {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ScriptServiceImpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptServiceImpl")
            .field("work_root", &self.shared.ctx.work_root())
            .field("scripts", &self.shared.map().len())
            .field("options", &self.shared.opts)
            .finish()
    }
}

impl ScriptServiceImpl {
    /// Creates the service with default options; see [`ScriptServiceImpl::with_options`].
    pub fn new(ctx: AgentContext) -> Self {
        Self::with_options(ctx, ScriptOptions::default())
    }

    /// Creates the service. Scans `ctx.work_root()` for work directories of a previous
    /// run: scripts that were pending or running are marked complete with
    /// `TENTACLE_RESTARTED` (their logs stay readable, leftover processes are killed),
    /// expired ones are removed, and the rest are scheduled for removal after
    /// `opts.retention`. Call it inside a Tokio runtime (the removal timers are tasks;
    /// without a runtime, expired directories are swept on the next StartScript).
    pub fn with_options(ctx: AgentContext, opts: ScriptOptions) -> Self {
        let shared = Arc::new(Shared {
            ctx,
            opts,
            scripts: Mutex::new(HashMap::new()),
            locks: Arc::new(IsolationLocks::default()),
            held: Mutex::new(None),
        });
        shared.recover();
        Self { shared }
    }

    /// Refuses new scripts until the returned hold is dropped: StartScript of
    /// a ticket not known yet answers UNAVAILABLE with `why` (callers retry),
    /// while scripts already known keep running and answering. Used while the
    /// tentacle replaces its own binary.
    pub fn hold_new_scripts(&self, why: String) -> ScriptHold {
        *lock(&self.shared.held) = Some(why);
        ScriptHold {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Tickets of the scripts not complete yet (pending or running).
    pub fn active_tickets(&self) -> Vec<String> {
        let mut active: Vec<String> = self
            .shared
            .map()
            .values()
            .filter(|s| !s.is_complete())
            .map(|s| s.ticket.clone())
            .collect();
        active.sort();
        active
    }
}

/// New scripts are refused while this lives ([`ScriptServiceImpl::hold_new_scripts`]).
#[derive(Debug)]
pub struct ScriptHold {
    shared: Arc<Shared>,
}

impl Drop for ScriptHold {
    fn drop(&mut self) {
        *lock(&self.shared.held) = None;
    }
}

#[derive(Debug)]
struct Shared {
    ctx: AgentContext,
    opts: ScriptOptions,
    scripts: Mutex<HashMap<String, Arc<Script>>>,
    locks: Arc<IsolationLocks>,
    /// Why new scripts are refused now, if they are.
    held: Mutex<Option<String>>,
}

/// One script, known by its ticket.
#[derive(Debug)]
struct Script {
    ticket: String,
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Bumped on every new line and state change; readers wait on it.
    changed: watch::Sender<u64>,
    /// CancelScript was called.
    cancel: CancellationToken,
    /// The abandonment rule fired (see the module documentation).
    abandon: CancellationToken,
    /// Serialises writes of state.json with the removal of the work directory, so no
    /// write lands in a removed (or re-created) directory.
    disk: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Inner {
    stage: Stage,
    exit_code: i32,
    pid: Option<i32>,
    created_ms: i64,
    started_ms: Option<i64>,
    finished_ms: Option<i64>,
    log: LogStore,
    /// Last RPC naming this ticket.
    last_touch: std::time::Instant,
    /// Log streams open on this ticket.
    open_streams: usize,
    /// The work directory exists (state.json is kept up to date).
    on_disk: bool,
    /// Being removed (CompleteScript or retention).
    removing: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Script {
    fn new(ticket: String, dir: PathBuf, inner: Inner) -> Self {
        Self {
            ticket,
            dir,
            inner: Mutex::new(inner),
            changed: watch::Sender::new(0),
            cancel: CancellationToken::new(),
            abandon: CancellationToken::new(),
            disk: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn append(&self, stream: LogStream, texts: Vec<String>) {
        if texts.is_empty() {
            return;
        }
        self.lock().log.append(stream, texts, now_ms());
        self.bump();
    }

    /// A line from the tentacle itself.
    fn service(&self, text: String) {
        tracing::info!(ticket = %self.ticket, "{text}");
        self.append(LogStream::Service, vec![text]);
    }

    fn is_complete(&self) -> bool {
        self.lock().stage == Stage::Complete
    }

    /// Waits until the script is complete.
    async fn wait_complete(&self) {
        let mut rx = self.changed.subscribe();
        while !self.is_complete() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn snapshot(&self) -> Persisted {
        let i = self.lock();
        persisted(&self.ticket, &i)
    }

    /// Writes state.json (if the work directory exists).
    async fn persist(&self) {
        let _disk = self.disk.lock().await;
        let snapshot = {
            let i = self.lock();
            if !i.on_disk || i.removing {
                return;
            }
            persisted(&self.ticket, &i)
        };
        // One small write into the page cache, like the log's lines: done
        // here rather than handed to a blocking thread and back.
        if let Err(e) = state::write(&self.dir, &snapshot) {
            tracing::warn!(ticket = %self.ticket, "cannot write {STATE_FILE}: {e}");
        }
    }

    /// Records an RPC naming this ticket, applying the abandonment rule first.
    fn touch(&self, abandoned_after: Duration) {
        let mut i = self.lock();
        if i.stage == Stage::Pending
            && i.open_streams == 0
            && i.last_touch.elapsed() >= abandoned_after
        {
            self.abandon.cancel();
        } else {
            i.last_touch = std::time::Instant::now();
        }
    }

    /// When to judge abandonment next; `None` if the script is abandoned now.
    fn abandonment_check(&self, abandoned_after: Duration) -> Option<Instant> {
        let i = self.lock();
        let now = std::time::Instant::now();
        // A period too long to represent means never; look again in a year.
        let never = || Some(Instant::from_std(now + Duration::from_secs(86400 * 365)));
        if i.open_streams > 0 {
            // Someone is listening: look again a whole period later.
            return now
                .checked_add(abandoned_after)
                .map(Instant::from_std)
                .or_else(never);
        }
        match i.last_touch.checked_add(abandoned_after) {
            Some(due) if due <= now => None,
            Some(due) => Some(Instant::from_std(due)),
            None => never(),
        }
    }

    fn set_running(&self, pid: Option<i32>) {
        {
            let mut i = self.lock();
            i.stage = Stage::Running;
            i.pid = pid;
            i.started_ms = Some(now_ms());
        }
        self.bump();
    }

    /// Completes the script with `code`; false if it already was.
    fn finish(&self, code: i32) -> bool {
        {
            let mut i = self.lock();
            if i.stage == Stage::Complete {
                return false;
            }
            i.stage = Stage::Complete;
            i.exit_code = code;
            i.finished_ms = Some(now_ms());
            i.log.close();
        }
        tracing::info!(ticket = %self.ticket, exit_code = code, "script completed");
        self.bump();
        true
    }

    /// Reads log lines from `since`, at most `max_lines` lines and about `max_bytes`
    /// bytes (at least one line), from `output.log` and then memory.
    async fn read(&self, since: u64, max_lines: usize, max_bytes: usize) -> Result<Page, Status> {
        let mut page = self.read_part(since, max_lines, max_bytes).await?;
        let mut bytes: usize = page
            .lines
            .iter()
            .map(|l| l.text.len() + log::LINE_OVERHEAD)
            .sum();
        while page.more && page.lines.len() < max_lines && bytes < max_bytes {
            let part = self
                .read_part(page.next, max_lines - page.lines.len(), max_bytes - bytes)
                .await?;
            let part_bytes: usize = part
                .lines
                .iter()
                .map(|l| l.text.len() + log::LINE_OVERHEAD)
                .sum();
            if part.lines.is_empty() || bytes + part_bytes > max_bytes {
                break;
            }
            bytes += part_bytes;
            page.lines.extend(part.lines);
            page.next = part.next;
            page.more = part.more;
        }
        Ok(page)
    }

    /// One part of [`Script::read`]: from the file or from memory, not both.
    async fn read_part(
        &self,
        since: u64,
        max_lines: usize,
        max_bytes: usize,
    ) -> Result<Page, Status> {
        loop {
            let plan = self.lock().log.plan(since, max_lines, max_bytes);
            match plan {
                Plan::Done(page) => return Ok(page),
                Plan::NeedIndex(path) => {
                    let index = tokio::task::spawn_blocking(move || log::build_index(&path))
                        .await
                        .map_err(|e| Status::internal(format!("indexing the log failed: {e}")))?;
                    self.lock().log.install_index(index);
                }
                Plan::File(read) => {
                    return tokio::task::spawn_blocking(move || log::read_file(&read))
                        .await
                        .map_err(|e| Status::internal(format!("reading the log failed: {e}")))?
                        .map_err(|e| {
                            Status::internal(format!(
                                "cannot read the log of script {} from {}: {e}",
                                self.ticket,
                                self.dir.join(LOG_FILE).display()
                            ))
                        });
                }
            }
        }
    }

    /// The status with a page of log from `since`.
    async fn status(&self, since: u64) -> Result<ScriptStatus, Status> {
        // Stage first: a script is complete only after its last line was appended, so a
        // COMPLETE status always carries the whole log.
        let (stage, code) = {
            let i = self.lock();
            (i.stage, i.exit_code)
        };
        let page = self.read(since, REPLY_LINES, REPLY_BYTES).await?;
        Ok(ScriptStatus {
            ticket: self.ticket.clone(),
            state: wire_state(stage) as i32,
            exit_code: if stage == Stage::Complete { code } else { 0 },
            logs: page.lines,
            next_sequence: page.next,
            more_logs: page.more,
        })
    }
}

fn persisted(ticket: &str, i: &Inner) -> Persisted {
    Persisted {
        ticket: ticket.to_string(),
        state: i.stage,
        exit_code: (i.stage == Stage::Complete).then_some(i.exit_code),
        pid: i.pid,
        created_unix_ms: i.created_ms,
        started_unix_ms: i.started_ms,
        finished_unix_ms: i.finished_ms,
        tentacle_version: crate::version().to_string(),
    }
}

fn wire_state(stage: Stage) -> ScriptState {
    match stage {
        Stage::Pending => ScriptState::Pending,
        Stage::Running => ScriptState::Running,
        Stage::Complete => ScriptState::Complete,
    }
}

fn unknown(ticket: String) -> ScriptStatus {
    ScriptStatus {
        ticket,
        state: ScriptState::Complete as i32,
        exit_code: UNKNOWN_TICKET,
        logs: Vec::new(),
        next_sequence: 0,
        more_logs: false,
    }
}

/// Everything a validated StartScript needs to run.
#[derive(Debug)]
struct Job {
    interp: Interpreter,
    body: String,
    files: Vec<(PathBuf, Vec<u8>)>,
    arguments: Vec<String>,
    env: Vec<(OsString, OsString)>,
    exclusive: bool,
    mutex_name: String,
    mutex_timeout: Option<Duration>,
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= 64 {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(64).collect();
        format!("{head:?}...")
    }
}

/// Checks a ticket: `[A-Za-z0-9._-]{1,128}`, not `.` or `..`.
fn validate_ticket(ticket: &str) -> Result<(), Status> {
    let ok = (1..=MAX_TICKET).contains(&ticket.len())
        && ticket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && ticket != "."
        && ticket != "..";
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid ticket {}: a ticket is 1 to {MAX_TICKET} characters from A-Z, a-z, 0-9, \
             '.', '_' and '-' ([A-Za-z0-9._-]{{1,128}}), and is not '.' or '..'",
            shorten(ticket)
        )))
    }
}

/// Checks an extra file's name; returns it relative to the work directory.
fn validate_file_name(name: &str, script_file: &str) -> Result<PathBuf, Status> {
    let bad =
        |why: &str| Status::invalid_argument(format!("invalid file name {}: {why}", shorten(name)));
    if name.contains('\0') {
        return Err(bad("it contains a NUL character"));
    }
    let mut clean = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad("'..' is not allowed; names are relative to the work directory and must stay inside it"))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("absolute paths are not allowed; names are relative to the work directory"))
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(bad("it names no file"));
    }
    if [STATE_FILE, STATE_TMP, LOG_FILE, script_file]
        .iter()
        .any(|r| clean == Path::new(r))
    {
        return Err(bad(
            "the name is reserved for the tentacle's own files in the work directory",
        ));
    }
    Ok(clean)
}

fn validate(req: StartScriptRequest) -> Result<Job, Status> {
    let syntax = ScriptSyntax::try_from(req.syntax).map_err(|_| {
        Status::invalid_argument(format!(
            "unknown script syntax {}; expected BASH, SH, PYTHON3 or POWERSHELL",
            req.syntax
        ))
    })?;
    let isolation = IsolationLevel::try_from(req.isolation).map_err(|_| {
        Status::invalid_argument(format!(
            "unknown isolation level {}; expected FULL or NONE",
            req.isolation
        ))
    })?;
    let interp = process::interpreter(syntax);
    let files = req
        .files
        .into_iter()
        .map(|f| Ok((validate_file_name(&f.name, interp.script_file)?, f.contents)))
        .collect::<Result<Vec<_>, Status>>()?;
    if let Some(a) = req.arguments.iter().find(|a| a.contains('\0')) {
        return Err(Status::invalid_argument(format!(
            "argument {} contains a NUL character",
            shorten(a)
        )));
    }
    let mut env = Vec::with_capacity(req.environment.len());
    for (k, v) in req.environment {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "invalid environment variable name {}: it must be non-empty without '=' or NUL",
                shorten(&k)
            )));
        }
        if v.contains('\0') {
            return Err(Status::invalid_argument(format!(
                "the value of environment variable {k} contains a NUL character"
            )));
        }
        env.push((OsString::from(k), OsString::from(v)));
    }
    if req.mutex_name.len() > MAX_MUTEX_NAME {
        return Err(Status::invalid_argument(format!(
            "the mutex name is longer than {MAX_MUTEX_NAME} bytes"
        )));
    }
    Ok(Job {
        interp,
        body: req.script_body,
        files,
        arguments: req.arguments,
        env,
        exclusive: isolation != IsolationLevel::None,
        mutex_name: if req.mutex_name.is_empty() {
            "default".to_string()
        } else {
            req.mutex_name
        },
        mutex_timeout: (req.mutex_timeout_ms > 0)
            .then(|| Duration::from_millis(req.mutex_timeout_ms)),
    })
}

/// A started script, and for a new one a signal that its work directory is ready.
type Started = (Arc<Script>, Option<oneshot::Receiver<()>>);

impl Shared {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Script>>> {
        lock(&self.scripts)
    }

    fn get(&self, ticket: &str) -> Option<Arc<Script>> {
        self.map().get(ticket).cloned()
    }

    /// The script named by an RPC, recorded as asked about.
    fn touch(&self, ticket: &str) -> Option<Arc<Script>> {
        let script = self.get(ticket)?;
        script.touch(self.opts.abandoned_after);
        Some(script)
    }

    fn dir_of(&self, ticket: &str) -> PathBuf {
        self.ctx.work_root().join(ticket)
    }

    /// StartScript: the existing script for the ticket, or a new one, started. For a
    /// new one, also a receiver that fires once its work directory is prepared.
    fn start(self: &Arc<Self>, req: StartScriptRequest) -> Result<Started, Status> {
        validate_ticket(&req.ticket)?;
        if let Some(s) = self.touch(&req.ticket) {
            return Ok((s, None));
        }
        let ticket = req.ticket.clone();
        if let Some(why) = lock(&self.held).clone() {
            return Err(Status::unavailable(why));
        }
        let job = validate(req)?;
        self.sweep_expired();
        let script = {
            let mut map = self.map();
            if let Some(s) = map.get(&ticket) {
                s.touch(self.opts.abandoned_after);
                return Ok((Arc::clone(s), None));
            }
            // Checked again under the map's lock, which `active_tickets` takes:
            // a script either counts as active there or is refused here.
            if let Some(why) = lock(&self.held).clone() {
                return Err(Status::unavailable(why));
            }
            let dir = self.dir_of(&ticket);
            let script = Arc::new(Script::new(
                ticket.clone(),
                dir.clone(),
                Inner {
                    stage: Stage::Pending,
                    exit_code: 0,
                    pid: None,
                    created_ms: now_ms(),
                    started_ms: None,
                    finished_ms: None,
                    log: LogStore::new(dir.join(LOG_FILE)),
                    last_touch: std::time::Instant::now(),
                    open_streams: 0,
                    on_disk: false,
                    removing: false,
                },
            ));
            map.insert(ticket.clone(), Arc::clone(&script));
            script
        };
        tracing::info!(ticket = %ticket, program = job.interp.program, "script started");
        let (prepared_tx, prepared_rx) = oneshot::channel();
        let runner = tokio::spawn(run(Arc::clone(self), Arc::clone(&script), job, prepared_tx));
        let (shared, s) = (Arc::clone(self), Arc::clone(&script));
        tokio::spawn(async move {
            if let Err(e) = runner.await {
                // The supervisor itself failed (a bug): say so rather than leave the
                // script pending or running forever.
                s.service(format!(
                    "the tentacle failed while supervising the script ({e}); exit code {FATAL}"
                ));
                shared.complete(&s, FATAL).await;
            }
        });
        Ok((script, Some(prepared_rx)))
    }

    /// Completes `script` with `code`, records it, and schedules its removal.
    async fn complete(self: &Arc<Self>, script: &Arc<Script>, code: i32) {
        if script.finish(code) {
            script.persist().await;
            self.schedule_expiry(script);
        }
    }

    fn retention_left(&self, finished_ms: i64) -> Duration {
        let age = Duration::from_millis(u64::try_from(now_ms() - finished_ms).unwrap_or(0));
        self.opts.retention.saturating_sub(age)
    }

    /// Removes the script's work directory once its retention has passed.
    fn schedule_expiry(self: &Arc<Self>, script: &Arc<Script>) {
        let Some(finished) = script.lock().finished_ms else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // swept by the next StartScript instead
        };
        let left = self.retention_left(finished);
        let (shared, s) = (Arc::downgrade(self), Arc::downgrade(script));
        rt.spawn(async move {
            tokio::time::sleep(left).await;
            if let (Some(shared), Some(s)) = (shared.upgrade(), s.upgrade()) {
                tracing::info!(ticket = %s.ticket, "removing the work directory of a script completed but never collected");
                shared.remove(&s).await;
            }
        });
    }

    /// Removes expired scripts now (for when no timer runs).
    fn sweep_expired(self: &Arc<Self>) {
        let expired: Vec<Arc<Script>> = self
            .map()
            .values()
            .filter(|s| {
                let i = s.lock();
                i.stage == Stage::Complete
                    && !i.removing
                    && i.finished_ms
                        .is_some_and(|f| self.retention_left(f).is_zero())
            })
            .cloned()
            .collect();
        for s in expired {
            let shared = Arc::clone(self);
            tokio::spawn(async move { shared.remove(&s).await });
        }
    }

    /// Removes a complete script: its work directory, then its ticket.
    /// Runs as its own task, so a caller that goes away midway cannot leave the ticket
    /// half removed.
    async fn remove(self: &Arc<Self>, script: &Arc<Script>) {
        let (shared, script) = (Arc::clone(self), Arc::clone(script));
        let task = tokio::spawn(async move {
            let _disk = script.disk.lock().await;
            {
                let mut i = script.lock();
                if i.removing || i.stage != Stage::Complete {
                    return;
                }
                i.removing = true;
            }
            // Moved aside (one rename), its files deleted in the background:
            // the ticket is free again, and CompleteScript answered, without
            // waiting for the deletion. What a stop interrupts, the next start
            // deletes (see `recover`).
            let dir = script.dir.clone();
            let aside = shared.ctx.work_root().join(format!(
                "{}{REMOVED_MARK}{}",
                script.ticket,
                REMOVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            // The rename is one metadata change in the work root, made here
            // (a hand-off to a blocking thread cost more than it, and
            // CompleteScript, which the task's end waits for, waits for it).
            let moved = match fs::rename(&dir, &aside) {
                Ok(()) => Ok(Ok(Some(aside))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ok(None)),
                // Not movable (another file system mounted there, say):
                // deleted in place, before the ticket is free.
                Err(_) => {
                    tokio::task::spawn_blocking(move || match fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                        _ => Ok(None),
                    })
                    .await
                }
            };
            let aside = match moved {
                Ok(Ok(aside)) => aside,
                Ok(Err(e)) => {
                    tracing::warn!(ticket = %script.ticket, dir = %script.dir.display(), "cannot remove the work directory: {e}");
                    None
                }
                Err(_) => None,
            };
            {
                let mut map = shared.map();
                if map
                    .get(&script.ticket)
                    .is_some_and(|s| Arc::ptr_eq(s, &script))
                {
                    map.remove(&script.ticket);
                }
            }
            if let Some(aside) = aside {
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = fs::remove_dir_all(&aside) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(dir = %aside.display(), "cannot remove a completed script's work directory: {e}");
                        }
                    }
                });
            }
        });
        let _ = task.await;
    }

    /// Loads the work directories of a previous run (see `with_options`).
    fn recover(self: &Arc<Self>) {
        let root = self.ctx.work_root();
        let Ok(entries) = fs::read_dir(&root) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            // A completed script's directory whose deletion a stop interrupted.
            if name.to_string_lossy().contains(REMOVED_MARK) {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    tracing::warn!(dir = %entry.path().display(), "cannot remove a completed script's work directory: {e}");
                }
                continue;
            }
            let Some(ticket) = name.to_str().filter(|t| validate_ticket(t).is_ok()) else {
                tracing::warn!(path = %entry.path().display(), "ignoring a directory in the work folder that is not named like a ticket");
                continue;
            };
            if let Some(script) = self.recover_one(ticket, entry.path()) {
                self.map().insert(ticket.to_string(), Arc::clone(&script));
                self.schedule_expiry(&script);
            }
        }
    }

    fn recover_one(&self, ticket: &str, dir: PathBuf) -> Option<Arc<Script>> {
        let read = state::read(&dir);
        let inner = |p: &Persisted, log: LogStore| Inner {
            stage: Stage::Complete,
            exit_code: p.exit_code.unwrap_or(FATAL),
            pid: p.pid,
            created_ms: p.created_unix_ms,
            started_ms: p.started_unix_ms,
            finished_ms: p.finished_unix_ms,
            log,
            last_touch: std::time::Instant::now(),
            open_streams: 0,
            on_disk: true,
            removing: false,
        };
        if let Ok(p) = &read {
            if p.state == Stage::Complete {
                let finished = p.finished_unix_ms.unwrap_or(p.created_unix_ms);
                if self.retention_left(finished).is_zero() {
                    tracing::info!(ticket, "removing the expired work directory of a script completed but never collected");
                    if let Err(e) = fs::remove_dir_all(&dir) {
                        tracing::warn!(dir = %dir.display(), "cannot remove the work directory: {e}");
                    }
                    return None;
                }
                let mut i = inner(p, LogStore::existing(dir.join(LOG_FILE)));
                i.finished_ms = Some(finished);
                return Some(Arc::new(Script::new(ticket.to_string(), dir, i)));
            }
        }
        // Pending or running when the tentacle stopped (or unreadable): outcome unknown.
        let note = match &read {
            Ok(p) if p.state == Stage::Pending => "the tentacle restarted while this script waited for the isolation mutex; it never ran".to_string(),
            Ok(_) => "the tentacle restarted while this script was running; its outcome is unknown".to_string(),
            Err(e) => format!("the tentacle restarted and the script's state is unreadable ({e}); its outcome is unknown"),
        };
        let p = read.unwrap_or_else(|_| Persisted {
            ticket: ticket.to_string(),
            state: Stage::Running,
            exit_code: None,
            pid: None,
            created_unix_ms: now_ms(),
            started_unix_ms: None,
            finished_unix_ms: None,
            tentacle_version: crate::version().to_string(),
        });
        let leftovers = Selector {
            pgid: None,
            cookie: Some(Cookie::new(ticket, &self.ctx.home)),
        };
        let killed = leftovers.kill_all();
        let mut log = LogStore::existing(dir.join(LOG_FILE));
        log.install_index(log::build_index(&dir.join(LOG_FILE)));
        if let Err(e) = log.reopen() {
            tracing::warn!(ticket, "cannot reopen the script log: {e}");
        }
        let mut notes = vec![format!("{note}; exit code {TENTACLE_RESTARTED}")];
        if killed > 0 {
            notes.push(format!(
                "killed {killed} process(es) the script left running before the restart"
            ));
        }
        log.append(LogStream::Service, notes, now_ms());
        log.close();
        let mut i = inner(&p, log);
        i.exit_code = TENTACLE_RESTARTED;
        i.finished_ms = Some(now_ms());
        tracing::warn!(ticket, "{note}");
        if let Err(e) = state::write(&dir, &persisted(ticket, &i)) {
            tracing::warn!(ticket, "cannot write {STATE_FILE}: {e}");
        }
        Some(Arc::new(Script::new(ticket.to_string(), dir, i)))
    }
}

/// Why preparing the work directory failed.
#[derive(Debug)]
struct PrepareError {
    dir_created: bool,
    message: String,
}

/// Creates the work directory with state.json, the script, the extra files and an
/// empty output.log (returned, open for appending).
fn prepare(dir: &Path, snapshot: &Persisted, job: &Job) -> Result<File, PrepareError> {
    let fail = |dir_created: bool, what: &Path, e: std::io::Error| PrepareError {
        dir_created,
        message: write_failure(what, &e),
    };
    if let Some(root) = dir.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| fail(false, root, e))?;
    }
    // A directory not known as a ticket (left by hand, or half removed): start afresh.
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(|e| fail(false, dir, e))?;
    }
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail(false, dir, e))?;
    state::write(dir, snapshot).map_err(|e| fail(true, &dir.join(STATE_FILE), e))?;
    let script = dir.join(job.interp.script_file);
    fs::write(&script, &job.body).map_err(|e| fail(true, &script, e))?;
    for (name, contents) in &job.files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| fail(true, parent, e))?;
        }
        fs::write(&path, contents).map_err(|e| fail(true, &path, e))?;
    }
    let log = dir.join(LOG_FILE);
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&log)
        .map_err(|e| fail(true, &log, e))
}

/// Why `path` could not be written, in words a person can act on: a full disk
/// (or quota) says so, with where and how much is free.
fn write_failure(path: &Path, e: &std::io::Error) -> String {
    use nix::errno::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw);
    if !matches!(errno, Some(Errno::ENOSPC | Errno::EDQUOT)) {
        return format!("cannot write {}: {e}", path.display());
    }
    let what = if errno == Some(Errno::EDQUOT) {
        "the disk quota is exhausted"
    } else {
        "no space left on the device"
    };
    let place = path.ancestors().find(|p| p.is_dir()).unwrap_or(path);
    let free = match crate::files::free_bytes(place) {
        Ok(n) => format!("{} free", human_bytes(n)),
        Err(_) => "free space unknown".to_string(),
    };
    format!(
        "{what}: cannot write {} ({free} in {}); free some space on that file system (old deployments under Applications, logs, caches) and try again",
        path.display(),
        place.display()
    )
}

/// `n` bytes for people: "512 bytes", "3.2 MiB".
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// Runs a script from pending to complete.
/// `ready` fires once the work directory is ready (or could not be made), so that
/// StartScript replies only after the script's state is on disk.
async fn run(shared: Arc<Shared>, script: Arc<Script>, job: Job, ready: oneshot::Sender<()>) {
    let code = drive(&shared, &script, job, ready).await;
    shared.complete(&script, code).await;
}

async fn drive(
    shared: &Arc<Shared>,
    script: &Arc<Script>,
    job: Job,
    ready: oneshot::Sender<()>,
) -> i32 {
    // Work directory.
    let snapshot = script.snapshot();
    let dir = script.dir.clone();
    let (job, prepared) = match tokio::task::spawn_blocking(move || {
        let r = prepare(&dir, &snapshot, &job);
        (job, r)
    })
    .await
    {
        Ok(r) => r,
        Err(e) => {
            script.service(format!("preparing the work directory failed: {e}"));
            return FATAL;
        }
    };
    match prepared {
        Ok(file) => {
            let mut i = script.lock();
            i.on_disk = true;
            i.log.attach(file);
        }
        Err(e) => {
            script.lock().on_disk = e.dir_created;
            script.service(format!(
                "could not prepare the work directory {}: {}; exit code {COULD_NOT_START}",
                script.dir.display(),
                e.message
            ));
            return COULD_NOT_START;
        }
    }
    let _ = ready.send(());

    // Isolation.
    let lease = match acquire(shared, script, &job).await {
        Ok(lease) => lease,
        Err(code) => return code,
    };
    if script.cancel.is_cancelled() {
        script.service(format!(
            "cancelled before the script started; exit code {CANCELLED}"
        ));
        return CANCELLED;
    }

    // Process.
    let ctx = &shared.ctx;
    let mut env = job.env.clone();
    env.extend([
        ("TentacleHome".into(), ctx.home.clone().into_os_string()),
        (
            "TentacleApplications".into(),
            ctx.applications.clone().into_os_string(),
        ),
        (
            "TentacleInstanceName".into(),
            ctx.instance_name.clone().into(),
        ),
        ("TentacleVersion".into(), crate::version().into()),
        ("TentacleScriptTicket".into(), script.ticket.clone().into()),
    ]);
    let child = process::command(job.interp, &script.dir, &job.arguments, &env).spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let program = job.interp.program;
            script.service(if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "could not start the script: {program} is not installed (not found on PATH); exit code {COULD_NOT_START}"
                )
            } else {
                format!("could not start the script with {program}: {e}; exit code {COULD_NOT_START}")
            });
            return COULD_NOT_START;
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    script.set_running(pid);
    script.persist().await;
    let code = match pid {
        Some(pid) => supervise(shared, script, child, pid).await,
        None => {
            script.service(format!(
                "the script's process vanished before it could be supervised; exit code {FATAL}"
            ));
            FATAL
        }
    };
    drop(lease);
    code
}

fn holders(held_by: &[String]) -> String {
    match held_by {
        [] => "by scripts queued earlier".to_string(),
        [one] => format!("held by ticket {one}"),
        many => format!("held by tickets {}", many.join(", ")),
    }
}

/// Waits for the isolation mutex; `Err(exit code)` when the script must complete
/// without running (timeout, cancelled, abandoned).
async fn acquire(shared: &Arc<Shared>, script: &Arc<Script>, job: &Job) -> Result<Lease, i32> {
    let name = &job.mutex_name;
    let mut lease = shared.locks.acquire(name, job.exclusive, &script.ticket);
    let mut held_by = match lease.state() {
        Wait::Granted => return Ok(lease),
        Wait::Queued { held_by } => held_by,
    };
    script.service(format!(
        "waiting for the isolation mutex '{name}' {}",
        holders(&held_by)
    ));
    let began = Instant::now();
    let deadline = job.mutex_timeout.and_then(|t| began.checked_add(t));
    let after = shared.opts.abandoned_after;
    let abandoned = |script: &Script| {
        script.service(format!(
            "cancelled: no caller asked about this script for {after:?} while it waited for the \
             isolation mutex '{name}', so its caller is presumed gone; exit code {CANCELLED}"
        ));
        Err(CANCELLED)
    };
    loop {
        let Some(check_at) = script.abandonment_check(after) else {
            return abandoned(script);
        };
        tokio::select! {
            wait = lease.changed() => match wait {
                Wait::Granted => {
                    script.service(format!(
                        "acquired the isolation mutex '{name}' after {}",
                        fmt_duration(began.elapsed())
                    ));
                    return Ok(lease);
                }
                Wait::Queued { held_by: now } => {
                    if now != held_by && !now.is_empty() {
                        script.service(format!(
                            "still waiting for the isolation mutex '{name}', now {}",
                            holders(&now)
                        ));
                        held_by = now;
                    }
                }
            },
            () = sleep_until(deadline) => {
                script.service(format!(
                    "gave up waiting for the isolation mutex '{name}' after {} ({}); exit code {MUTEX_TIMEOUT}",
                    fmt_duration(began.elapsed()),
                    holders(&held_by)
                ));
                return Err(MUTEX_TIMEOUT);
            }
            () = script.cancel.cancelled() => {
                script.service(format!(
                    "cancelled while waiting for the isolation mutex '{name}'; exit code {CANCELLED}"
                ));
                return Err(CANCELLED);
            }
            () = script.abandon.cancelled() => return abandoned(script),
            () = tokio::time::sleep_until(check_at) => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn fmt_duration(d: Duration) -> String {
    format!("{:?}", Duration::from_millis(d.as_millis() as u64))
}

/// Reads one output stream into the log until EOF or `stop`.
async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: LogStream,
    script: Arc<Script>,
    stop: CancellationToken,
    max_line: usize,
) {
    let mut split = LineSplitter::new(max_line);
    // Read into spare capacity (`read_buf`), nothing zeroed first, and small
    // until the output fills it: many scripts print little or nothing.
    const FIRST_READ: usize = 4 << 10;
    const LARGEST_READ: usize = 64 << 10;
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_READ);
    let mut lines = Vec::new();
    // After `stop`, only what is already in the pipe is taken, without waiting, and at
    // most LEFTOVER bytes of it: a process still writing cannot keep the reader going.
    const LEFTOVER: usize = 4 << 20;
    let mut stopped = false;
    let mut leftover = LEFTOVER;
    loop {
        let read = if stopped {
            match futures_util::FutureExt::now_or_never(reader.read_buf(&mut buf)) {
                Some(r) => r,
                None => break,
            }
        } else {
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    stopped = true;
                    continue;
                }
                r = reader.read_buf(&mut buf) => r,
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(ticket = %script.ticket, "reading script output failed: {e}");
                break;
            }
        };
        split.push(&buf, &mut lines);
        buf.clear();
        if n == buf.capacity() && n < LARGEST_READ {
            buf.reserve_exact(2 * n);
        }
        script.append(stream, std::mem::take(&mut lines));
        if stopped {
            leftover = leftover.saturating_sub(n);
            if leftover == 0 {
                break;
            }
        }
    }
    split.finish(&mut lines);
    script.append(stream, lines);
}

/// Supervises the running process until it and its group are gone; the exit code.
async fn supervise(
    shared: &Arc<Shared>,
    script: &Arc<Script>,
    mut child: tokio::process::Child,
    pgid: i32,
) -> i32 {
    let stop = CancellationToken::new();
    let max_line = shared.opts.max_line_bytes;
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(pump(
            out,
            LogStream::Stdout,
            Arc::clone(script),
            stop.clone(),
            max_line,
        )));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(pump(
            err,
            LogStream::Stderr,
            Arc::clone(script),
            stop.clone(),
            max_line,
        )));
    }
    let group = Selector {
        pgid: Some(pgid),
        cookie: None,
    };
    let everything = Selector {
        pgid: Some(pgid),
        cookie: Some(Cookie::new(&script.ticket, &shared.ctx.home)),
    };
    let (status, cancelled) = tokio::select! {
        s = child.wait() => (s, false),
        () = script.cancel.cancelled() => {
            (terminate(script, &mut child, &everything, shared.opts.cancel_grace).await, true)
        }
    };

    // Output: whatever is still in the pipes, for a bounded time.
    let mut drain = Box::pin(futures_util::future::join_all(readers));
    if tokio::time::timeout(DRAIN, &mut drain).await.is_err() {
        stop.cancel();
        let _ = drain.await;
        if !cancelled {
            script.service(format!(
                "the script exited, but a process it started still holds its output open; stopped reading after {}",
                fmt_duration(DRAIN)
            ));
        }
    }

    // Leftovers: the rest of the group (and, on cancel, everything it started).
    let leftovers = if cancelled { &everything } else { &group };
    let killed = leftovers.kill_all();
    if killed > 0 && !cancelled {
        script.service(format!(
            "killed {killed} process(es) the script left running in its process group \
             (start a service with setsid to keep it running after the script)"
        ));
    }
    if !leftovers.wait_gone(Instant::now() + KILL_WAIT, true).await {
        script.service(format!(
            "some processes of the script were still alive {} after SIGKILL: {:?}",
            fmt_duration(KILL_WAIT),
            leftovers.scan()
        ));
    }

    if cancelled {
        return CANCELLED;
    }
    match status {
        Ok(s) => s
            .code()
            .or_else(|| s.signal().map(|sig| 128 + sig))
            .unwrap_or(FATAL),
        Err(e) => {
            script.service(format!(
                "lost track of the script's process: {e}; exit code {FATAL}"
            ));
            FATAL
        }
    }
}

/// Cancel: SIGTERM to everything, SIGKILL to what is left after `grace`.
async fn terminate(
    script: &Script,
    child: &mut tokio::process::Child,
    everything: &Selector,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let n = everything.signal(Signal::SIGTERM);
    script.service(format!(
        "cancelling: sent SIGTERM to the script's process group and {n} process(es) it started; SIGKILL follows after {}",
        fmt_duration(grace)
    ));
    let deadline = Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400));
    let status = tokio::time::timeout_at(deadline, child.wait()).await.ok();
    let all_gone = status.is_some() && everything.wait_gone(deadline, false).await;
    if !all_gone {
        let n = everything.kill_all();
        script.service(format!(
            "the script did not stop within {}; sent SIGKILL to {n} process(es)",
            fmt_duration(grace)
        ));
    }
    match status {
        Some(s) => s,
        None => tokio::time::timeout(KILL_WAIT, child.wait())
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "the process did not exit after SIGKILL",
                ))
            }),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ScriptEvent, Status>> + Send>>;

/// Counts an open log stream on a script for the abandonment rule.
struct StreamGuard(Arc<Script>);

impl StreamGuard {
    fn new(script: Arc<Script>) -> Self {
        script.lock().open_streams += 1;
        Self(script)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut i = self.0.lock();
        i.open_streams = i.open_streams.saturating_sub(1);
        i.last_touch = std::time::Instant::now();
    }
}

/// Sends the log from `since`, then new lines as they come, then the final status.
/// Cancelled when the tentacle stops and closes the connection `request` came
/// on (never, for a request from no connection: in-process tests).
fn stopping_of<T>(request: &Request<T>) -> CancellationToken {
    request
        .extensions()
        .get::<octo_comms::ConnectionInfo>()
        .map(|i| i.stopping.clone())
        .unwrap_or_default()
}

/// [`stream`], ended when the tentacle stops (its connections' graceful
/// close) with `Unavailable`, instead of the close waiting for a script that
/// may run for hours. The script is not touched: the server reads on from the
/// same sequence once it reaches the tentacle again, where the script's state
/// says what the restart did to it.
async fn stream_until_stopping(
    script: Arc<Script>,
    since: u64,
    tx: mpsc::Sender<Result<ScriptEvent, Status>>,
    stopping: CancellationToken,
) {
    let ended = tx.clone();
    tokio::select! {
        () = stream(script, since, tx) => {}
        () = stopping.cancelled() => {
            let _ = ended
                .send(Err(Status::unavailable(
                    "the tentacle is stopping; read the script's log again from the same sequence once it is back",
                )))
                .await;
        }
    }
}

async fn stream(script: Arc<Script>, since: u64, tx: mpsc::Sender<Result<ScriptEvent, Status>>) {
    let _guard = StreamGuard::new(Arc::clone(&script));
    let mut changed = script.changed.subscribe();
    let mut next = since;
    loop {
        changed.borrow_and_update();
        // Complete before reading: then every line is already in the log.
        let complete = script.is_complete();
        let page = match script
            .read(next, STREAM_BATCH_LINES, STREAM_BATCH_BYTES)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        for line in page.lines {
            let event = ScriptEvent {
                event: Some(script_event::Event::Log(line)),
            };
            if tx.send(Ok(event)).await.is_err() {
                return; // the consumer went away
            }
        }
        next = page.next;
        if page.more {
            continue;
        }
        if complete {
            let (code, total) = {
                let i = script.lock();
                (i.exit_code, i.log.total())
            };
            let done = ScriptStatus {
                ticket: script.ticket.clone(),
                state: ScriptState::Complete as i32,
                exit_code: code,
                logs: Vec::new(),
                next_sequence: total,
                more_logs: false,
            };
            let _ = tx
                .send(Ok(ScriptEvent {
                    event: Some(script_event::Event::Completed(done)),
                }))
                .await;
            return;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl ScriptService for ScriptServiceImpl {
    async fn start_script(
        &self,
        request: Request<StartScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let wait = Duration::from_millis(req.wait_ms).min(MAX_WAIT);
        let (script, prepared) = self.shared.start(req)?;
        if let Some(prepared) = prepared {
            // Dropped unsent when preparing failed; the status then says so.
            let _ = prepared.await;
        }
        if !wait.is_zero() {
            let _ = tokio::time::timeout(wait, script.wait_complete()).await;
        }
        Ok(Response::new(script.status(0).await?))
    }

    async fn get_status(
        &self,
        request: Request<ScriptStatusRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        match self.shared.touch(&req.ticket) {
            Some(s) => Ok(Response::new(s.status(req.since_sequence).await?)),
            None => Ok(Response::new(unknown(req.ticket))),
        }
    }

    type RunScriptStream = EventStream;

    async fn run_script(
        &self,
        request: Request<RunScriptRequest>,
    ) -> Result<Response<Self::RunScriptStream>, Status> {
        let stopping = stopping_of(&request);
        let req = request.into_inner();
        let Some(start) = req.start else {
            return Err(Status::invalid_argument(
                "RunScript needs `start`: the script to start",
            ));
        };
        // As StartScript: the stream opens once the script's state is on disk
        // (or preparing it failed, which its log then says).
        let (script, prepared) = self.shared.start(start)?;
        if let Some(prepared) = prepared {
            let _ = prepared.await;
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(stream_until_stopping(
            script,
            req.since_sequence,
            tx,
            stopping,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type StreamLogsStream = EventStream;

    async fn stream_logs(
        &self,
        request: Request<ScriptStatusRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let stopping = stopping_of(&request);
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        match self.shared.touch(&req.ticket) {
            Some(script) => {
                tokio::spawn(stream_until_stopping(
                    script,
                    req.since_sequence,
                    tx,
                    stopping,
                ));
            }
            None => {
                let _ = tx
                    .send(Ok(ScriptEvent {
                        event: Some(script_event::Event::Completed(unknown(req.ticket))),
                    }))
                    .await;
            }
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_script(
        &self,
        request: Request<CancelScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let Some(script) = self.shared.touch(&req.ticket) else {
            return Ok(Response::new(unknown(req.ticket)));
        };
        if !script.is_complete() && !script.cancel.is_cancelled() {
            tracing::info!(ticket = %script.ticket, "cancel requested");
            script.cancel.cancel();
        }
        Ok(Response::new(script.status(req.since_sequence).await?))
    }

    async fn complete_script(
        &self,
        request: Request<CompleteScriptRequest>,
    ) -> Result<Response<ScriptStatus>, Status> {
        let req = request.into_inner();
        let Some(script) = self.shared.touch(&req.ticket) else {
            return Ok(Response::new(unknown(req.ticket)));
        };
        let status = script.status(req.since_sequence).await?;
        if status.state == ScriptState::Complete as i32 && !status.more_logs {
            self.shared.remove(&script).await;
        }
        Ok(Response::new(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets() {
        for ok in ["a", "A-b_c.9", &"x".repeat(128), "..."] {
            assert!(validate_ticket(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129), "é"] {
            let e = validate_ticket(bad).err().map(|s| s.message().to_string());
            assert!(e.is_some_and(|m| m.contains("[A-Za-z0-9._-]")), "{bad}");
        }
    }

    #[test]
    fn file_names() {
        assert_eq!(
            validate_file_name("./a/b.txt", "script.sh").ok(),
            Some(PathBuf::from("a/b.txt"))
        );
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "state.json",
            "script.sh",
            ".",
        ] {
            assert!(validate_file_name(bad, "script.sh").is_err(), "{bad}");
        }
    }
}
