//! Replacing the tentacle's own binary: the upgrade service, the record of an
//! upgrade, and the guards that put the previous binary back.
//!
//! # An upgrade
//!
//! The server uploads the new binary through the file service (verified by
//! SHA-256) and calls `Upgrade`. The tentacle then, in order:
//!
//! 1. checks the file's SHA-256 again, and that it runs and reports the version
//!    the server expects (`BINARY version --format json`), so a binary for
//!    another platform, or a wrong one, is refused before anything changes;
//! 2. refuses new scripts (UNAVAILABLE, which the server retries) and waits,
//!    bounded by the request, for the running ones to end; if some still run,
//!    it refuses the upgrade naming their tickets and takes scripts again;
//! 3. copies its binary to `BINARY.previous`, and moves the new one in with a
//!    rename in the binary's folder (atomic: a crash leaves the old or the new
//!    file, never half of one);
//! 4. writes the record (`HOME/Upgrade/state.json`, phase Pending, with a
//!    deadline), starts the **guard process** from the previous binary, answers,
//!    and restarts: through systemd when it runs as a service
//!    (`systemctl restart --no-block UNIT`, else an exit code systemd's
//!    `Restart=` acts on), or by re-executing itself in place otherwise (same
//!    process id, same arguments).
//!
//! The restarted tentacle reports a new `boot_id`. When the server sees the new
//! version it calls `ConfirmUpgrade` (phase Confirmed). When it sees another
//! version it calls `RollbackUpgrade`.
//!
//! # Guards
//!
//! Nothing is left to chance when the new binary does not come back:
//!
//! - a tentacle that starts with a Pending record runs an **in-process guard**:
//!   not confirmed by the deadline, it restores the previous binary and
//!   restarts into it;
//! - the **guard process** (`tentacle upgrade-guard`, run from
//!   `BINARY.previous`, outside the service's control group under systemd)
//!   covers a new binary that never gets that far: when the re-executed
//!   process dies before the confirmation, or nothing restored the previous
//!   binary a grace period after the deadline, it restores it and starts it
//!   again (systemd: `systemctl restart`; otherwise the recorded command line,
//!   detached, its output in `HOME/Logs/tentacle-restored.log`).
//!
//! Restoring is the same rename as the swap. The record's message says what
//! happened; the server reads it with `GetUpgradeState` and puts it in the
//! task's log.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use octo_proto::v1::upgrade_service_server::UpgradeService;
use octo_proto::v1::upgrade_state::Phase as WirePhase;
use octo_proto::v1::{
    ConfirmUpgradeRequest, GetUpgradeStateRequest, RollbackUpgradeRequest, UpgradeReply,
    UpgradeRequest, UpgradeState,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{error, info, warn};

use crate::scripts::ScriptServiceImpl;
use crate::AgentContext;

/// The record of the last upgrade, relative to the home.
pub const RECORD: &str = "Upgrade/state.json";
/// How long `BINARY version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for running scripts a request may ask for.
const MAX_SCRIPT_WAIT: Duration = Duration::from_secs(3600);
/// Bounds on the confirmation deadline a request may ask for.
const MIN_CONFIRM: Duration = Duration::from_secs(5);
const MAX_CONFIRM: Duration = Duration::from_secs(3600);
/// The guard process acts this long after the deadline, when the in-process
/// guard did not.
const GUARD_GRACE: Duration = Duration::from_secs(10);
/// How often the guard process looks.
const GUARD_TICK: Duration = Duration::from_millis(200);
/// Exit code asking systemd (`Restart=`) for a restart when `systemctl` cannot.
pub const RESTART_EXIT_CODE: i32 = 75;

/// Where an upgrade is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Phase {
    #[default]
    None,
    Pending,
    Confirmed,
    Restored,
}

/// `HOME/Upgrade/state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub phase: Phase,
    pub from_version: String,
    pub to_version: String,
    /// The binary replaced.
    pub binary: PathBuf,
    /// The copy of the binary it replaced.
    pub previous: PathBuf,
    /// Unix ms by which the server must confirm.
    pub deadline_unix_ms: i64,
    /// "systemd" or "re-exec".
    pub restart: String,
    /// The systemd unit, when it runs as a service.
    pub unit: Option<String>,
    /// The process running the tentacle (updated at each start).
    pub pid: u32,
    /// Its arguments (without the program) and folder, to start it again.
    pub args: Vec<String>,
    pub cwd: PathBuf,
    pub message: String,
    /// The new binary serves on a listening socket passed to it (its
    /// `version --format json` lists `passed-sockets`); absent in records
    /// older tentacles wrote.
    #[serde(default)]
    pub to_takes_passed_sockets: bool,
}

impl Record {
    fn path(home: &Path) -> PathBuf {
        home.join(RECORD)
    }

    /// The record in `home`, if any (an unreadable one counts as none, logged).
    pub fn load(home: &Path) -> Option<Record> {
        Self::load_file(&Self::path(home))
    }

    fn load_file(path: &Path) -> Option<Record> {
        let text = std::fs::read_to_string(path).ok()?;
        match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(
                    "ignoring the unreadable upgrade record {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    fn save_file(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::config::write_atomic(path, &text, 0o600)
    }

    fn wire(&self) -> UpgradeState {
        UpgradeState {
            phase: match self.phase {
                Phase::None => WirePhase::None,
                Phase::Pending => WirePhase::Pending,
                Phase::Confirmed => WirePhase::Confirmed,
                Phase::Restored => WirePhase::Restored,
            } as i32,
            from_version: self.from_version.clone(),
            to_version: self.to_version.clone(),
            message: self.message.clone(),
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How the running tentacle restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartMode {
    /// Under systemd, as this unit.
    Systemd { unit: String },
    /// In the foreground: execute the binary again in this process.
    ReExec,
}

impl RestartMode {
    /// systemd when this process runs as a systemd service (it sets
    /// `INVOCATION_ID`, and our control group names the unit), else re-exec.
    pub fn detect() -> RestartMode {
        if std::env::var_os("INVOCATION_ID").is_none() {
            return RestartMode::ReExec;
        }
        std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|text| unit_of_cgroup(&text))
            .map_or(RestartMode::ReExec, |unit| RestartMode::Systemd { unit })
    }

    fn name(&self) -> &'static str {
        match self {
            RestartMode::Systemd { .. } => "systemd",
            RestartMode::ReExec => "re-exec",
        }
    }
}

/// The `.service` unit in a `/proc/self/cgroup` text.
fn unit_of_cgroup(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.rsplit(':').next())
        .flat_map(|path| path.split('/').rev())
        .find(|part| part.ends_with(".service"))
        .map(str::to_string)
}

/// The running tentacle process, as the upgrade service needs to know it.
#[derive(Debug)]
pub struct Host {
    /// The binary this process runs (resolved at start, before any swap).
    pub binary: PathBuf,
    /// Its arguments, without the program.
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    pub mode: RestartMode,
    /// The instance's upgrade record (`HOME/Upgrade/state.json`).
    pub record: PathBuf,
    /// Cancelled when the agent must stop and restart (see [`restart`]).
    pub restart: CancellationToken,
}

impl Host {
    /// This process (its binary, arguments, folder and restart mode), running
    /// the instance whose home is `home`.
    pub fn current(home: &Path) -> std::io::Result<Host> {
        Ok(Host {
            binary: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
            cwd: std::env::current_dir()?,
            mode: RestartMode::detect(),
            record: Record::path(home),
            restart: CancellationToken::new(),
        })
    }
}

/// SHA-256 of a file, upper-case hex.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02X}")).collect())
}

/// Copies `from` into `dir` under a temporary name (mode `mode`, synced) and
/// renames it to `to`: `to` is never seen half-written.
fn copy_into_place(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().unwrap_or(Path::new("."));
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tentacle".into());
    let tmp = dir.join(format!(".{name}.upgrade-{}", std::process::id()));
    let result = (|| {
        std::fs::copy(from, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, to)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Puts `rec.previous` back at `rec.binary` (unless they are the same file
/// already). Ok(true) when the binary changed.
pub fn restore(rec: &Record) -> std::io::Result<bool> {
    if !rec.previous.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the previous binary {} is missing", rec.previous.display()),
        ));
    }
    if rec.binary.is_file() && sha256_file(&rec.binary)? == sha256_file(&rec.previous)? {
        return Ok(false);
    }
    copy_into_place(&rec.previous, &rec.binary, 0o755)?;
    Ok(true)
}

/// What this build can do that an older one could not, listed by `tentacle
/// version --format json` so that an upgrade knows what the next binary
/// takes: `passed-sockets`, a listening socket handed over in `LISTEN_FDS`
/// (see [`restart`]).
pub const FEATURES: &[&str] = &[PASSED_SOCKETS];
const PASSED_SOCKETS: &str = "passed-sockets";

/// What a tentacle binary says of itself.
#[derive(Debug)]
struct BinaryVersion {
    version: String,
    /// It serves on a listening socket passed to it.
    takes_passed_sockets: bool,
}

/// What `BINARY version --format json` says, or why it did not.
async fn version_of(binary: &Path) -> Result<BinaryVersion, String> {
    let run = tokio::process::Command::new(binary)
        .args(["version", "--format", "json"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("it cannot run here: {e}")),
        Err(_) => {
            return Err(format!(
                "`version` did not answer within {} s",
                VERSION_TIMEOUT.as_secs()
            ))
        }
    };
    if !out.status.success() {
        return Err(format!(
            "`version --format json` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "`version --format json` printed {:?}, not JSON: {e}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })?;
    let version = v["version"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("`version --format json` printed no version: {v}"))?;
    let takes_passed_sockets = v["features"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(PASSED_SOCKETS)));
    Ok(BinaryVersion {
        version,
        takes_passed_sockets,
    })
}

/// The upgrade service of one running tentacle.
#[derive(Debug, Clone)]
pub struct UpgradeServiceImpl {
    ctx: AgentContext,
    scripts: ScriptServiceImpl,
    host: Arc<Host>,
    /// One upgrade at a time.
    busy: Arc<tokio::sync::Mutex<()>>,
    /// New scripts stay refused from a swap until the process is replaced.
    held: Arc<std::sync::Mutex<Option<crate::scripts::ScriptHold>>>,
}

impl UpgradeServiceImpl {
    /// The service of the tentacle described by `ctx`, whose scripts run in
    /// `scripts`, running as `host`.
    pub fn new(ctx: AgentContext, scripts: ScriptServiceImpl, host: Arc<Host>) -> Self {
        Self {
            ctx,
            scripts,
            host,
            busy: Arc::new(tokio::sync::Mutex::new(())),
            held: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    fn record_path(&self) -> PathBuf {
        Record::path(&self.ctx.home)
    }

    /// Waits until no script runs, at most `wait`; Err names the tickets.
    async fn wait_for_scripts(&self, wait: Duration) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let active = self.scripts.active_tickets();
            if active.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::failed_precondition(format!(
                    "script ticket{} {} still running after {} s; the upgrade waits for scripts and was not done (nothing changed; new scripts are taken again)",
                    if active.len() == 1 { "" } else { "s" },
                    active.join(", "),
                    wait.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn upgrade(&self, req: UpgradeRequest) -> Result<UpgradeReply, Status> {
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(Status::failed_precondition(
                "an upgrade of this tentacle is already in progress",
            ));
        };
        if let Some(rec) = Record::load(&self.ctx.home) {
            if rec.phase == Phase::Pending && rec.deadline_unix_ms > now_ms() {
                return Err(Status::failed_precondition(format!(
                    "the upgrade from {} to {} waits for its confirmation; try again after it",
                    rec.from_version, rec.to_version
                )));
            }
        }
        let file = crate::files::resolve_path(&self.ctx.home, &req.path)?;
        let version = req.version.trim().to_string();
        if version.is_empty() {
            return Err(Status::invalid_argument(
                "the upgrade request names no version",
            ));
        }
        let expected = req.sha256.to_ascii_uppercase();
        let hashed = {
            let f = file.clone();
            tokio::task::spawn_blocking(move || sha256_file(&f))
                .await
                .map_err(|e| Status::internal(format!("hashing worker failed: {e}")))?
        };
        match hashed {
            Ok(h) if h == expected => {}
            Ok(h) => {
                return Err(Status::failed_precondition(format!(
                    "{} has SHA-256 {h}, not {expected}; upload it again",
                    file.display()
                )))
            }
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "cannot read the new binary {}: {e}",
                    file.display()
                )))
            }
        }
        let takes_passed_sockets = match version_of(&file).await {
            Ok(v) if v.version == version => v.takes_passed_sockets,
            Ok(v) => {
                return Err(Status::failed_precondition(format!(
                    "the new binary reports version {}, not {version}; nothing changed",
                    v.version
                )))
            }
            Err(why) => {
                return Err(Status::failed_precondition(format!(
                    "the new binary {} does not work on this machine ({why}); nothing changed",
                    file.display()
                )))
            }
        };
        let from = crate::version().to_string();
        let wait = Duration::from_millis(req.wait_for_scripts_ms).min(MAX_SCRIPT_WAIT);
        let confirm = Duration::from_millis(req.confirm_within_ms).clamp(MIN_CONFIRM, MAX_CONFIRM);
        let hold = self.scripts.hold_new_scripts(format!(
            "the tentacle is upgrading from {from} to {version}; start the script again shortly"
        ));
        self.wait_for_scripts(wait).await?;
        let host = self.host.clone();
        let binary = host.binary.clone();
        let previous = PathBuf::from(format!("{}.previous", binary.display()));
        let record = Record {
            phase: Phase::Pending,
            from_version: from.clone(),
            to_version: version.clone(),
            binary: binary.clone(),
            previous: previous.clone(),
            deadline_unix_ms: now_ms()
                .saturating_add(i64::try_from(confirm.as_millis()).unwrap_or(i64::MAX)),
            restart: host.mode.name().into(),
            unit: match &host.mode {
                RestartMode::Systemd { unit } => Some(unit.clone()),
                RestartMode::ReExec => None,
            },
            pid: std::process::id(),
            args: host
                .args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            cwd: host.cwd.clone(),
            message: format!("upgrading from {from} to {version}"),
            to_takes_passed_sockets: takes_passed_sockets,
        };
        let record_path = self.record_path();
        let swapped = {
            let (file, binary, previous, record, record_path) = (
                file.clone(),
                binary.clone(),
                previous.clone(),
                record.clone(),
                record_path.clone(),
            );
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                copy_into_place(&binary, &previous, 0o755).map_err(|e| {
                    format!(
                        "cannot keep a copy of the running binary as {}: {e}; the tentacle needs write access to {} to upgrade itself (run it as the user owning that folder, or upgrade it with its package)",
                        previous.display(),
                        previous.parent().map_or_else(String::new, |d| d.display().to_string())
                    )
                })?;
                record
                    .save_file(&record_path)
                    .map_err(|e| format!("cannot write {}: {e}", record_path.display()))?;
                if let Err(e) = copy_into_place(&file, &binary, 0o755) {
                    let _ = std::fs::remove_file(&record_path);
                    return Err(format!("cannot replace {}: {e}", binary.display()));
                }
                Ok(())
            })
            .await
            .map_err(|e| Status::internal(format!("upgrade worker failed: {e}")))?
        };
        if let Err(why) = swapped {
            return Err(Status::failed_precondition(format!(
                "{why}; nothing changed"
            )));
        }
        if let Err(e) = start_guard_process(&previous, &record_path, &self.ctx.home, &host.mode) {
            warn!("{e}; only the upgraded tentacle itself will restore the previous binary if the server does not confirm the upgrade");
        }
        info!(
            "swapped in tentacle {version} at {} (previous {from} kept as {}); restarting ({})",
            binary.display(),
            previous.display(),
            host.mode.name()
        );
        // Scripts stay refused until the process is replaced.
        *self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(hold);
        // Restart now: the stop is graceful, so this answer (a call in
        // flight) still reaches the server before the connection closes.
        host.restart.cancel();
        Ok(UpgradeReply {
            previous_version: from,
            restart: host.mode.name().into(),
            binary: binary.display().to_string(),
        })
    }

    async fn rollback(&self, reason: String) -> Result<UpgradeState, Status> {
        let _busy = self.busy.lock().await;
        let path = self.record_path();
        let Some(mut rec) = Record::load_file(&path) else {
            return Err(Status::failed_precondition(
                "this tentacle has no upgrade to roll back",
            ));
        };
        let rec2 = rec.clone();
        let restored = tokio::task::spawn_blocking(move || restore(&rec2))
            .await
            .map_err(|e| Status::internal(format!("restore worker failed: {e}")))?
            .map_err(|e| {
                Status::failed_precondition(format!("cannot restore the previous binary: {e}"))
            })?;
        let me = crate::version();
        let must_restart = me != rec.from_version;
        rec.phase = Phase::Restored;
        rec.message = format!(
            "{reason}; the previous binary ({}) was {} {}",
            rec.from_version,
            if restored {
                "put back at"
            } else {
                "already at"
            },
            rec.binary.display()
        );
        if must_restart {
            rec.message
                .push_str(&format!("; this tentacle ({me}) restarts into it"));
        }
        rec.save_file(&path)
            .map_err(|e| Status::internal(format!("writing {}: {e}", path.display())))?;
        warn!("upgrade rolled back: {}", rec.message);
        if must_restart {
            // As after a swap: this answer goes out before the connection closes.
            self.host.restart.cancel();
        }
        Ok(rec.wire())
    }
}

#[tonic::async_trait]
impl UpgradeService for UpgradeServiceImpl {
    async fn upgrade(
        &self,
        request: Request<UpgradeRequest>,
    ) -> Result<Response<UpgradeReply>, Status> {
        let req = request.into_inner();
        info!("upgrade to {} requested", req.version);
        match self.upgrade(req).await {
            Ok(r) => Ok(Response::new(r)),
            Err(s) => {
                warn!("upgrade refused: {}", s.message());
                Err(s)
            }
        }
    }

    async fn get_upgrade_state(
        &self,
        _request: Request<GetUpgradeStateRequest>,
    ) -> Result<Response<UpgradeState>, Status> {
        Ok(Response::new(
            Record::load(&self.ctx.home).unwrap_or_default().wire(),
        ))
    }

    async fn confirm_upgrade(
        &self,
        request: Request<ConfirmUpgradeRequest>,
    ) -> Result<Response<UpgradeState>, Status> {
        let version = request.into_inner().version;
        let _busy = self.busy.lock().await;
        let path = self.record_path();
        let Some(mut rec) = Record::load_file(&path) else {
            return Err(Status::failed_precondition(
                "this tentacle has no upgrade to confirm",
            ));
        };
        if rec.phase != Phase::Pending || rec.to_version != version || crate::version() != version {
            return Err(Status::failed_precondition(format!(
                "nothing to confirm: this tentacle runs {} and its last upgrade ({} to {}) is {:?}: {}",
                crate::version(),
                rec.from_version,
                rec.to_version,
                rec.phase,
                rec.message
            )));
        }
        rec.phase = Phase::Confirmed;
        rec.message = format!(
            "upgraded from {} to {}; the previous binary is kept as {}",
            rec.from_version,
            rec.to_version,
            rec.previous.display()
        );
        rec.save_file(&path)
            .map_err(|e| Status::internal(format!("writing {}: {e}", path.display())))?;
        info!("{}", rec.message);
        Ok(Response::new(rec.wire()))
    }

    async fn rollback_upgrade(
        &self,
        request: Request<RollbackUpgradeRequest>,
    ) -> Result<Response<UpgradeState>, Status> {
        let reason = request.into_inner().reason;
        let reason = if reason.trim().is_empty() {
            "the server asked for the previous binary".to_string()
        } else {
            reason
        };
        self.rollback(reason).await.map(Response::new)
    }
}

/// Starts `PREVIOUS upgrade-guard --state RECORD`: under systemd as a transient
/// unit (outside the service's control group, which a restart empties),
/// otherwise detached in a session of its own (through a launcher that exits
/// at once, so no zombie is left with the tentacle).
pub fn start_guard_process(
    previous: &Path,
    record: &Path,
    home: &Path,
    mode: &RestartMode,
) -> Result<(), String> {
    let log = home.join("Logs").join("upgrade-guard.log");
    let status = match mode {
        RestartMode::Systemd { unit } => std::process::Command::new("systemd-run")
            .args(["--collect", "--quiet", "--no-block"])
            .arg(format!(
                "--unit={}-upgrade-guard-{}",
                unit.trim_end_matches(".service"),
                now_ms()
            ))
            .arg("--")
            .arg(previous)
            .arg("upgrade-guard")
            .arg("--state")
            .arg(record)
            .stdin(std::process::Stdio::null())
            .status(),
        RestartMode::ReExec => std::process::Command::new(previous)
            .arg("upgrade-guard")
            .arg("--state")
            .arg(record)
            .arg("--detach")
            .arg("--log")
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .status(),
    };
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("the upgrade guard process did not start ({s})")),
        Err(e) => Err(format!("the upgrade guard process did not start: {e}")),
    }
}

/// `upgrade-guard --detach`: starts the guard in a session of its own and
/// returns at once.
pub fn detach_guard(record: &Path, log: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    std::process::Command::new(std::env::current_exe()?)
        .arg("upgrade-guard")
        .arg("--state")
        .arg(record)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .map(|_| ())
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Starts the restored binary with the recorded command line, detached, its
/// output appended to `HOME/Logs/tentacle-restored.log`. Returns its pid.
fn relaunch(rec: &Record, home: &Path) -> std::io::Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = home.join("Logs").join("tentacle-restored.log");
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let child = std::process::Command::new(&rec.binary)
        .args(&rec.args)
        .current_dir(&rec.cwd)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()?;
    Ok(child.id())
}

/// The guard process (`tentacle upgrade-guard --state RECORD`), see the module
/// documentation. Returns when the upgrade is settled.
pub fn guard(record: &Path) -> Result<(), String> {
    let say = |text: &str| {
        let mut err = std::io::stderr();
        let _ = writeln!(err, "[upgrade-guard {}] {text}", now_ms());
    };
    let home = record
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} is not HOME/{RECORD}", record.display()))?;
    say(&format!("watching {}", record.display()));
    let grace = i64::try_from(GUARD_GRACE.as_millis()).unwrap_or(i64::MAX);
    loop {
        let Some(mut rec) = Record::load_file(record) else {
            say("the record is gone; nothing to guard");
            return Ok(());
        };
        if rec.phase != Phase::Pending {
            say(&format!("the upgrade is {:?}: {}", rec.phase, rec.message));
            return Ok(());
        }
        let now = now_ms();
        let died = rec.unit.is_none() && !alive(rec.pid);
        let overdue = now > rec.deadline_unix_ms.saturating_add(grace);
        if died || overdue {
            let why = if died {
                format!(
                    "the upgraded tentacle (process {}) ended before the server confirmed version {}",
                    rec.pid, rec.to_version
                )
            } else {
                format!(
                    "version {} was not confirmed by the server in time, and the tentacle did not restore the previous binary itself",
                    rec.to_version
                )
            };
            say(&why);
            if let Err(e) = restore(&rec) {
                rec.message = format!("{why}; restoring the previous binary failed: {e}");
                let _ = rec.save_file(record);
                return Err(rec.message);
            }
            rec.phase = Phase::Restored;
            match rec.unit.clone() {
                Some(unit) => {
                    rec.message = format!(
                        "{why}; the guard put the previous binary ({}) back and restarted {unit}",
                        rec.from_version
                    );
                    let _ = rec.save_file(record);
                    let status = std::process::Command::new("systemctl")
                        .args(["restart", "--no-block", &unit])
                        .status();
                    if !status.is_ok_and(|s| s.success()) {
                        say(&format!(
                            "`systemctl restart {unit}` failed; restart it by hand"
                        ));
                    }
                }
                None => {
                    if alive(rec.pid) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(i32::try_from(rec.pid).unwrap_or(i32::MAX)),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    // Recorded before it starts, so the restored tentacle
                    // and the server never read a Pending record.
                    rec.message = format!(
                        "{why}; the guard put the previous binary ({}) back and is starting it again",
                        rec.from_version
                    );
                    let _ = rec.save_file(record);
                    match relaunch(&rec, &home) {
                        Ok(pid) => {
                            rec.message = format!(
                                "{why}; the guard put the previous binary ({}) back and started it again (process {pid}, output in {})",
                                rec.from_version,
                                home.join("Logs/tentacle-restored.log").display()
                            );
                            rec.pid = pid;
                        }
                        Err(e) => {
                            rec.message = format!(
                                "{why}; the guard put the previous binary ({}) back but could not start it: {e}",
                                rec.from_version
                            );
                        }
                    }
                    let _ = rec.save_file(record);
                }
            }
            say(&rec.message);
            return Ok(());
        }
        std::thread::sleep(GUARD_TICK);
    }
}

/// At the start of the agent: when an upgrade awaits confirmation, records
/// this process and starts the in-process guard (see the module
/// documentation).
pub fn on_start(home: &Path, host: &Arc<Host>) {
    let path = Record::path(home);
    let Some(mut rec) = Record::load_file(&path) else {
        return;
    };
    if rec.phase != Phase::Pending {
        return;
    }
    rec.pid = std::process::id();
    if let Err(e) = rec.save_file(&path) {
        error!("cannot update the upgrade record {}: {e}", path.display());
    }
    let me = crate::version();
    info!(
        "started as {me} during the upgrade from {} to {}; waiting for the server to confirm it",
        rec.from_version, rec.to_version
    );
    let host = host.clone();
    tokio::spawn(async move {
        let left = u64::try_from(rec.deadline_unix_ms.saturating_sub(now_ms())).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(left)).await;
        let Some(mut now) = Record::load_file(&path) else {
            return;
        };
        if now.phase != Phase::Pending {
            return;
        }
        let why = format!(
            "the server did not confirm version {} by the deadline",
            now.to_version
        );
        let restored = tokio::task::spawn_blocking({
            let now = now.clone();
            move || restore(&now)
        })
        .await;
        match restored {
            Ok(Ok(_)) => {
                now.phase = Phase::Restored;
                now.message = format!(
                    "{why}; the tentacle put the previous binary ({}) back and restarted into it",
                    now.from_version
                );
                if let Err(e) = now.save_file(&path) {
                    error!("writing {}: {e}", path.display());
                }
                warn!("{}", now.message);
                host.restart.cancel();
            }
            Ok(Err(e)) => error!("{why}, and restoring the previous binary failed: {e}"),
            Err(e) => error!("{why}, and the restore worker failed: {e}"),
        }
    });
}

/// Restarts this process into its (possibly restored) binary, after the agent
/// has stopped: re-executes it in place, or asks systemd. Returns only when
/// that failed, with why. A re-executed tentacle receives `listener` (its
/// listening socket, kept open meanwhile) as a passed socket, so that a
/// server dialling during the restart waits in its queue instead of being
/// refused.
pub fn restart(host: &Host, listener: Option<octo_comms::HeldListener>) -> String {
    match &host.mode {
        RestartMode::ReExec => {
            use std::os::unix::process::CommandExt;
            // Only the new binary of a pending upgrade that said it takes
            // one: a binary that does not would find the port held by a
            // socket it never serves. A restore runs the previous binary,
            // which may be older.
            let listener = listener.filter(|_| {
                Record::load_file(&host.record)
                    .is_some_and(|r| r.phase == Phase::Pending && r.to_takes_passed_sockets)
            });
            let mut cmd = std::process::Command::new(&host.binary);
            cmd.args(&host.args);
            if let Some(l) = &listener {
                if let Err(e) = l.pass_to(&mut cmd) {
                    warn!(
                        "cannot keep the listening socket on {} across the restart ({e}); the new process binds it again",
                        l.local_addr()
                    );
                }
            }
            let err = cmd.exec();
            // The previous binary binds the port itself.
            drop(listener);
            // The new binary could not even be executed: put the previous one
            // back and run that instead.
            let why = format!("executing {} failed: {err}", host.binary.display());
            if let Some(mut rec) = Record::load_file(&host.record) {
                if rec.phase == Phase::Pending && restore(&rec).is_ok() {
                    rec.phase = Phase::Restored;
                    rec.message = format!(
                        "{why}; the previous binary ({}) was put back and started instead",
                        rec.from_version
                    );
                    let _ = rec.save_file(&host.record);
                    let err = std::process::Command::new(&host.binary)
                        .args(&host.args)
                        .exec();
                    return format!("{why}; the previous binary was put back but could not be executed either: {err}");
                }
            }
            why
        }
        RestartMode::Systemd { unit } => {
            match std::process::Command::new("systemctl")
                .args(["restart", "--no-block", unit])
                .status()
            {
                Ok(s) if s.success() => String::new(),
                Ok(s) => format!("`systemctl restart --no-block {unit}` failed ({s})"),
                Err(e) => format!("running `systemctl restart {unit}`: {e}"),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn systemd_units_are_found_in_cgroups() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/tentacle-web.service\n").as_deref(),
            Some("tentacle-web.service")
        );
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
    }

    #[test]
    fn restore_puts_the_previous_file_back_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("Tentacle");
        let previous = dir.path().join("Tentacle.previous");
        std::fs::write(&binary, b"new").unwrap();
        std::fs::write(&previous, b"old").unwrap();
        let rec = Record {
            binary: binary.clone(),
            previous,
            ..Record::default()
        };
        assert!(restore(&rec).unwrap());
        assert_eq!(std::fs::read(&binary).unwrap(), b"old");
        assert!(!restore(&rec).unwrap(), "already in place");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("upgrade-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_process_that_exited_is_not_alive() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Until reaped it is a zombie, which does not count.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
