//! The file service: resumable, hash-verified uploads and resumable downloads.
//!
//! Paths: relative request paths resolve under the instance's home directory and
//! may not climb out of it with `..`; absolute paths are accepted (the server is
//! trusted, as in the original Tentacle) after lexical normalisation
//! ([`resolve_path`]).
//!
//! Uploads: data is written to `<target>.partial` next to the target. The partial
//! file always holds a prefix of the sender's file, so an upload cut at any point
//! can be resumed from its length (`GetUploadState`). The SHA-256 is computed
//! while the data arrives, on its own thread, and covers bytes a resumed upload
//! already held. Only when the sender's `UploadFinish` matches (hash and length)
//! is the partial file synced and renamed onto the target; a mismatch deletes the
//! partial file, so a corrupt upload never looks complete.
//!
//! Downloads: `DownloadStart`, 256 KiB chunks from the requested offset, then
//! `DownloadFinish` with the SHA-256 of the whole file (the part before the offset
//! is hashed on a separate thread while the rest streams).
//!
//! All sizes and offsets are `u64`; nothing holds a whole file in memory; file IO
//! and hashing run on blocking threads, fed through bounded channels, never on the
//! async workers.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use octo_proto::v1::file_service_server::FileService;
use octo_proto::v1::{
    download_reply, upload_request, DownloadFinish, DownloadReply, DownloadRequest, DownloadStart,
    FileChunk, UploadFinish, UploadReply, UploadRequest, UploadStart, UploadStateReply,
    UploadStateRequest,
};
use ring::digest::{Context as Sha256, Digest, SHA256};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::AgentContext;

/// Size of the chunks a download is sent in.
pub const DOWNLOAD_CHUNK: usize = 256 << 10;
/// Messages in flight between the network, the file and the hasher (per transfer).
const PIPE_DEPTH: usize = 8;
/// Buffer for re-reading a file to hash it.
const HASH_BUFFER: usize = 1 << 20;
/// How long an upload or a state query waits for an earlier upload to the same
/// path to wind down (e.g. one whose connection was cut and not yet noticed).
const ACTIVE_WAIT: Duration = Duration::from_secs(10);
/// Transfers at least this large log their progress every 10 %.
const PROGRESS_MIN: u64 = 16 << 20;
/// Progress step when the length is not known in advance.
const PROGRESS_UNKNOWN_STEP: u64 = 256 << 20;

/// The real file service of a tentacle. Clones share the registry of uploads in
/// progress, so build one and clone it.
#[derive(Clone)]
pub struct FileServiceImpl {
    ctx: Arc<AgentContext>,
    active: ActiveUploads,
}

impl fmt::Debug for FileServiceImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileServiceImpl")
            .field("home", &self.ctx.home)
            .field("active_uploads", &self.active.len())
            .finish()
    }
}

impl FileServiceImpl {
    /// The file service of the instance described by `ctx`.
    pub fn new(ctx: AgentContext) -> Self {
        Self {
            ctx: Arc::new(ctx),
            active: ActiveUploads::default(),
        }
    }
}

// ---------------------------------------------------------------------------
// Paths

/// Resolves a request path: a relative one under `home`, an absolute one as is;
/// both lexically normalised (`.` dropped, `..` applied). A relative path whose
/// `..` components would climb above `home` is refused (`InvalidArgument`, naming
/// the path and the home directory). Symbolic links are not resolved.
pub fn resolve_path(home: &Path, requested: &str) -> Result<PathBuf, Status> {
    if requested.is_empty() {
        return Err(Status::invalid_argument(
            "the file path is empty; give a path relative to the tentacle's home directory or an absolute one",
        ));
    }
    if requested.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "the file path {requested:?} contains a NUL byte"
        )));
    }
    let requested_path = Path::new(requested);
    if requested_path.is_absolute() {
        return Ok(normalise(requested_path));
    }
    let home = std::path::absolute(home).unwrap_or_else(|_| home.to_path_buf());
    let home = normalise(&home);
    let mut out = home.clone();
    let mut depth = 0usize;
    for component in requested_path.components() {
        match component {
            Component::CurDir => {}
            Component::Normal(name) => {
                out.push(name);
                depth += 1;
            }
            Component::ParentDir => {
                if depth == 0 {
                    return Err(Status::invalid_argument(format!(
                        "the path {requested:?} leads outside the tentacle's home directory {}; \
                         relative paths must stay under it (send an absolute path to write elsewhere)",
                        home.display()
                    )));
                }
                out.pop();
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Status::invalid_argument(format!(
                    "the path {requested:?} is neither relative nor absolute"
                )));
            }
        }
    }
    Ok(out)
}

/// Lexical normalisation of an absolute path: `.` dropped, `..` pops (never above `/`).
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if out.parent().is_some() {
                    out.pop();
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// Where an upload to `target` keeps its data until it is verified.
pub fn partial_path(target: &Path) -> Option<PathBuf> {
    let mut name = target.file_name()?.to_os_string();
    name.push(".partial");
    Some(target.with_file_name(name))
}

// ---------------------------------------------------------------------------
// Free space, errors, hex

/// Free bytes (available to unprivileged users) on the file system holding `path`.
pub(crate) fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// The nearest existing directory at or above `path`'s parent.
fn nearest_existing_dir(path: &Path) -> Option<&Path> {
    path.ancestors().skip(1).find(|p| p.is_dir())
}

/// A gRPC status for a failed file operation, saying what was being done where.
fn io_status(what: &str, path: &Path, e: &io::Error) -> Status {
    let msg = format!("{what} {}: {e}", path.display());
    let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
    match (e.kind(), errno) {
        (_, Some(nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT)) => {
            Status::resource_exhausted(msg)
        }
        (io::ErrorKind::NotFound, _) => Status::not_found(msg),
        (io::ErrorKind::PermissionDenied, _) => Status::permission_denied(msg),
        _ => Status::internal(msg),
    }
}

/// Upper-case hex of a digest.
fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Runs blocking work off the async workers.
async fn blocking<T, F>(f: F) -> Result<T, Status>
where
    F: FnOnce() -> Result<T, Status> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("file worker thread failed: {e}")))?
}

// ---------------------------------------------------------------------------
// Hashing

/// Hashes the first `prefix` bytes of `file` (positional reads: the file's cursor
/// is not moved, so another thread may append meanwhile), then every chunk from
/// `chunks` until the channel closes. Stops early when `cancel` is set.
fn hash_prefix_then_chunks(
    file: &File,
    prefix: u64,
    chunks: &std_mpsc::Receiver<Bytes>,
    cancel: &AtomicBool,
) -> io::Result<Digest> {
    let mut ctx = Sha256::new(&SHA256);
    hash_prefix(&mut ctx, file, prefix, cancel)?;
    for chunk in chunks {
        ctx.update(&chunk);
    }
    Ok(ctx.finish())
}

fn hash_prefix(ctx: &mut Sha256, file: &File, len: u64, cancel: &AtomicBool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; HASH_BUFFER];
    let mut pos = 0u64;
    while pos < len {
        if cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "hashing cancelled",
            ));
        }
        let n = usize::try_from(len - pos).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..n], pos)?;
        ctx.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(())
}

/// SHA-256 of a whole file, upper-case hex.
fn hash_file(path: &Path) -> io::Result<String> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut ctx = Sha256::new(&SHA256);
    hash_prefix(&mut ctx, &file, len, &AtomicBool::new(false))?;
    Ok(hex_upper(ctx.finish().as_ref()))
}

// ---------------------------------------------------------------------------
// Progress

/// Debug lines every ~10 % of a large transfer; the closing info line's numbers.
struct Progress<'a> {
    what: &'static str,
    path: &'a Path,
    total: u64,
    step: u64,
    next: u64,
    first: u64,
    started: Instant,
}

impl<'a> Progress<'a> {
    fn new(what: &'static str, path: &'a Path, total: u64, first: u64) -> Self {
        let step = if total == 0 {
            PROGRESS_UNKNOWN_STEP
        } else if total >= PROGRESS_MIN {
            (total / 10).max(1)
        } else {
            u64::MAX
        };
        let mut p = Self {
            what,
            path,
            total,
            step,
            next: u64::MAX,
            first,
            started: Instant::now(),
        };
        p.next = p.next_after(first);
        p
    }

    fn next_after(&self, at: u64) -> u64 {
        (at / self.step).saturating_add(1).saturating_mul(self.step)
    }

    fn update(&mut self, at: u64) {
        if at < self.next {
            return;
        }
        self.next = self.next_after(at);
        if self.total > 0 {
            let pct = u128::from(at) * 100 / u128::from(self.total);
            debug!(
                path = %self.path.display(),
                bytes = at,
                total = self.total,
                "{} of {}: {pct} % ({at} of {} bytes)",
                self.what,
                self.path.display(),
                self.total
            );
        } else {
            debug!(path = %self.path.display(), bytes = at, "{} of {}: {at} bytes", self.what, self.path.display());
        }
    }

    /// (bytes moved by this call, seconds, bytes per second).
    fn rate(&self, at: u64) -> (u64, f64, u64) {
        let moved = at.saturating_sub(self.first);
        let secs = self.started.elapsed().as_secs_f64();
        let per_sec = if secs > 0.0 {
            (moved as f64 / secs) as u64
        } else {
            0
        };
        (moved, secs, per_sec)
    }
}

// ---------------------------------------------------------------------------
// Uploads in progress

/// Uploads in progress by target path. An entry lives exactly as long as the
/// thread that writes the partial file, so "idle" means the partial file's length
/// is final.
#[derive(Clone, Default)]
struct ActiveUploads(Arc<Mutex<HashMap<PathBuf, watch::Receiver<()>>>>);

/// Holds a path's slot; dropping it frees the slot and wakes waiters.
struct ActiveGuard {
    uploads: ActiveUploads,
    path: PathBuf,
    _done: watch::Sender<()>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.uploads.lock().remove(&self.path);
        // `_done` drops after this, which wakes the waiters (the entry is gone by then).
    }
}

impl ActiveUploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, watch::Receiver<()>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Takes the slot for `path`, waiting (bounded) for an earlier upload to end.
    async fn acquire(&self, path: &Path) -> Result<ActiveGuard, Status> {
        let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
        loop {
            let busy = {
                let mut map = self.lock();
                match map.get(path) {
                    Some(rx) => rx.clone(),
                    None => {
                        let (tx, rx) = watch::channel(());
                        map.insert(path.to_path_buf(), rx);
                        return Ok(ActiveGuard {
                            uploads: self.clone(),
                            path: path.to_path_buf(),
                            _done: tx,
                        });
                    }
                }
            };
            Self::wait_end(busy, deadline, path).await?;
        }
    }

    /// Waits (bounded) until no upload to `path` is in progress.
    async fn wait_idle(&self, path: &Path) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
        loop {
            let busy = self.lock().get(path).cloned();
            match busy {
                None => return Ok(()),
                Some(rx) => Self::wait_end(rx, deadline, path).await?,
            }
        }
    }

    async fn wait_end(
        mut rx: watch::Receiver<()>,
        deadline: tokio::time::Instant,
        path: &Path,
    ) -> Result<(), Status> {
        debug!(path = %path.display(), "waiting for an upload in progress to the same path to end");
        // Resolves with an error when the holder's sender drops; nothing is ever sent.
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Status::aborted(format!(
                "another upload to {} is still in progress (possibly one whose connection was cut \
                 and not yet noticed; that takes up to 30 s); retry shortly",
                path.display()
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// Upload

/// Everything the writer thread needs, prepared (checked and opened) up front.
struct UploadJob {
    target: PathBuf,
    partial: PathBuf,
    file: File,
    resume_from: u64,
    total_hint: u64,
    overwrite: bool,
    /// Permission bits for the final file (0: leave the default).
    mode: u32,
    active: ActiveGuard,
}

enum WriterMsg {
    Data(Bytes),
    Finish(UploadFinish),
}

enum UploadOutcome {
    Complete(UploadReply),
    /// The stream ended without `UploadFinish`; this many bytes are held.
    Interrupted(u64),
}

/// Checks an upload can proceed and opens its partial file (blocking).
fn prepare_upload(
    start: &UploadStart,
    target: PathBuf,
    active: ActiveGuard,
) -> Result<UploadJob, Status> {
    let shown = target.display();
    match fs::metadata(&target) {
        Ok(m) if m.is_dir() => {
            return Err(Status::invalid_argument(format!(
                "{shown} is a directory; uploads need a file path"
            )))
        }
        Ok(_) if !start.overwrite => {
            return Err(Status::already_exists(format!(
                "{shown} already exists; pass overwrite to replace it"
            )))
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_status("cannot inspect", &target, &e)),
    }
    let partial = partial_path(&target).ok_or_else(|| {
        Status::invalid_argument(format!("{shown} does not name a file to upload to"))
    })?;
    if start.total_length > 0 && start.resume_from > start.total_length {
        return Err(Status::invalid_argument(format!(
            "cannot resume the upload of {shown} from byte {} of a {}-byte file",
            start.resume_from, start.total_length
        )));
    }
    if start.total_length > 0 {
        let needed = start.total_length - start.resume_from;
        if let Some(dir) = nearest_existing_dir(&target) {
            let free =
                free_bytes(dir).map_err(|e| io_status("cannot read the free space of", dir, &e))?;
            if needed > free {
                return Err(Status::resource_exhausted(format!(
                    "not enough free space for {shown}: {needed} bytes needed, {free} bytes free \
                     on the file system holding {}",
                    dir.display()
                )));
            }
        }
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| io_status("cannot create the directory", parent, &e))?;
    }
    let file = if start.resume_from == 0 {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| io_status("cannot create", &partial, &e))?
    } else {
        let mut file = match OpenOptions::new().read(true).write(true).open(&partial) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Status::failed_precondition(format!(
                    "cannot resume the upload of {shown} from byte {}: the tentacle holds 0 bytes \
                     of it (no {}); ask GetUploadState and resume from its received_bytes",
                    start.resume_from,
                    partial.display()
                )))
            }
            Err(e) => return Err(io_status("cannot open", &partial, &e)),
        };
        let held = file
            .metadata()
            .map_err(|e| io_status("cannot inspect", &partial, &e))?
            .len();
        if held != start.resume_from {
            return Err(Status::failed_precondition(format!(
                "cannot resume the upload of {shown} from byte {}: the tentacle holds {held} bytes \
                 of it; ask GetUploadState and resume from its received_bytes",
                start.resume_from
            )));
        }
        file.seek(SeekFrom::Start(held))
            .map_err(|e| io_status("cannot seek in", &partial, &e))?;
        file
    };
    Ok(UploadJob {
        target,
        partial,
        file,
        resume_from: start.resume_from,
        total_hint: start.total_length,
        overwrite: start.overwrite,
        mode: start.mode & 0o777,
        active,
    })
}

/// The writer thread: appends chunks to the partial file, feeds the hasher
/// thread, and on `UploadFinish` verifies and renames. Owns the path's slot in
/// [`ActiveUploads`] until the partial file is final.
fn run_upload(job: UploadJob, mut rx: mpsc::Receiver<WriterMsg>) -> Result<UploadOutcome, Status> {
    let UploadJob {
        target,
        partial,
        file,
        resume_from,
        total_hint,
        overwrite,
        mode,
        active: _active,
    } = job;
    let cancel = AtomicBool::new(false);
    let mut progress = Progress::new("upload", &target, total_hint, resume_from);

    let (held, finish, failure, hashed) = std::thread::scope(|s| {
        let (htx, hrx) = std_mpsc::sync_channel::<Bytes>(PIPE_DEPTH);
        let (file_ref, cancel_ref) = (&file, &cancel);
        let hasher = std::thread::Builder::new()
            .name("upload-sha256".into())
            .spawn_scoped(s, move || {
                hash_prefix_then_chunks(file_ref, resume_from, &hrx, cancel_ref)
            });
        let hasher = match hasher {
            Ok(h) => h,
            Err(e) => {
                let failure = Status::internal(format!("cannot start a hashing thread: {e}"));
                return (resume_from, None, Some(failure), None);
            }
        };
        let mut held = resume_from;
        let mut finish = None;
        let mut failure = None;
        let mut hasher_gone = false;
        let mut writer = &file;
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                WriterMsg::Data(data) => {
                    if let Err(e) = writer.write_all(&data) {
                        failure = Some(io_status("cannot write", &partial, &e));
                        break;
                    }
                    held += data.len() as u64;
                    progress.update(held);
                    if htx.send(data).is_err() {
                        hasher_gone = true; // It failed; joining it says why.
                        break;
                    }
                }
                WriterMsg::Finish(f) => {
                    finish = Some(f);
                    break;
                }
            }
        }
        // Nothing more is read: let a sender blocked on a full channel go.
        rx.close();
        drop(htx);
        if finish.is_none() || failure.is_some() {
            cancel.store(true, Ordering::Relaxed);
        }
        let hashed = hasher.join();
        if hasher_gone && failure.is_none() {
            failure = Some(match &hashed {
                Ok(Err(e)) => io_status("cannot hash", &partial, e),
                _ => Status::internal(format!(
                    "the hashing thread for {} stopped",
                    target.display()
                )),
            });
        }
        (held, finish, failure, Some(hashed))
    });

    if let Some(failure) = failure {
        warn!(path = %target.display(), held, "upload failed: {}", failure.message());
        return Err(failure);
    }
    let Some(finish) = finish else {
        let (moved, secs, _) = progress.rate(held);
        info!(
            path = %target.display(),
            held,
            "upload of {} interrupted after {held} bytes ({moved} in this call, {secs:.1} s); \
             {} is kept for resuming",
            target.display(),
            partial.display()
        );
        return Ok(UploadOutcome::Interrupted(held));
    };
    let digest = match hashed {
        Some(Ok(Ok(d))) => d,
        Some(Ok(Err(e))) => return Err(io_status("cannot hash", &partial, &e)),
        Some(Err(_)) | None => {
            return Err(Status::internal(format!(
                "the hashing thread for {} failed",
                target.display()
            )))
        }
    };
    let actual = hex_upper(digest.as_ref());
    if !finish.sha256.eq_ignore_ascii_case(&actual) || finish.total_length != held {
        drop(file);
        if let Err(e) = fs::remove_file(&partial) {
            warn!(
                "cannot delete {} after a failed upload: {e}",
                partial.display()
            );
        }
        warn!(
            path = %target.display(),
            "upload of {} failed verification: sender's SHA-256 {} and {} bytes, received {actual} and {held} bytes; the data was discarded",
            target.display(),
            finish.sha256,
            finish.total_length
        );
        return Err(Status::data_loss(format!(
            "upload of {} failed verification: expected SHA-256 {} and {} bytes, received SHA-256 \
             {actual} and {held} bytes; the received data was discarded, upload the file again",
            target.display(),
            finish.sha256.to_ascii_uppercase(),
            finish.total_length
        )));
    }
    if mode != 0 {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| io_status("cannot set the permissions of", &partial, &e))?;
    }
    file.sync_all()
        .map_err(|e| io_status("cannot flush", &partial, &e))?;
    drop(file);
    if !overwrite && target.exists() {
        return Err(Status::already_exists(format!(
            "{} appeared while it was being uploaded; pass overwrite to replace it \
             (the verified data is kept in {}: resume from byte {held})",
            target.display(),
            partial.display()
        )));
    }
    fs::rename(&partial, &target).map_err(|e| {
        io_status(
            &format!("cannot move {} to", partial.display()),
            &target,
            &e,
        )
    })?;
    if let Some(parent) = target.parent() {
        // Makes the rename durable; best effort.
        if let Err(e) = File::open(parent).and_then(|d| d.sync_all()) {
            debug!("cannot sync directory {}: {e}", parent.display());
        }
    }
    let (moved, secs, per_sec) = progress.rate(held);
    info!(
        path = %target.display(),
        bytes = held,
        received = moved,
        seconds = secs,
        bytes_per_sec = per_sec,
        "received {} ({held} bytes, {moved} in this call) in {secs:.2} s: {per_sec} bytes/s ({:.1} MiB/s)",
        target.display(),
        per_sec as f64 / f64::from(1u32 << 20)
    );
    Ok(UploadOutcome::Complete(UploadReply {
        full_path: target.display().to_string(),
        length: held,
        sha256: actual,
    }))
}

/// Reads the rest of an upload stream into the writer; `Ok` once `UploadFinish`
/// was handed over (or the writer stopped, which then reports why).
async fn pump_upload(
    stream: &mut Streaming<UploadRequest>,
    tx: &mpsc::Sender<WriterMsg>,
    target: &Path,
    resume_from: u64,
    total_hint: u64,
) -> Result<(), Status> {
    let mut expected = resume_from;
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Status::aborted(format!(
                    "the upload of {} ended without UploadFinish after {expected} bytes; they are \
                     kept: ask GetUploadState and resume from its received_bytes",
                    target.display()
                )))
            }
            Err(e) => {
                return Err(Status::new(
                    e.code(),
                    format!(
                        "the upload of {} was cut after {expected} bytes ({}); they are kept: ask \
                         GetUploadState and resume from its received_bytes",
                        target.display(),
                        e.message()
                    ),
                ))
            }
        };
        match msg.part {
            Some(upload_request::Part::Chunk(chunk)) => {
                if chunk.offset != expected {
                    return Err(Status::invalid_argument(format!(
                        "upload of {}: chunk at offset {} but the file so far has {expected} bytes; \
                         chunks must be contiguous",
                        target.display(),
                        chunk.offset
                    )));
                }
                let end = expected.saturating_add(chunk.data.len() as u64);
                if total_hint > 0 && end > total_hint {
                    return Err(Status::invalid_argument(format!(
                        "upload of {}: chunk ends at byte {end}, beyond the announced total_length {total_hint}",
                        target.display()
                    )));
                }
                expected = end;
                if chunk.data.is_empty() {
                    continue;
                }
                if tx.send(WriterMsg::Data(chunk.data)).await.is_err() {
                    return Ok(()); // The writer stopped; it reports why.
                }
            }
            Some(upload_request::Part::Finish(finish)) => {
                if !is_sha256_hex(&finish.sha256) {
                    return Err(Status::invalid_argument(format!(
                        "upload of {}: UploadFinish.sha256 must be 64 hex characters, got {:?}; \
                         the {expected} bytes received are kept for resuming",
                        target.display(),
                        finish.sha256
                    )));
                }
                let _ = tx.send(WriterMsg::Finish(finish)).await;
                return Ok(());
            }
            Some(upload_request::Part::Start(_)) => {
                return Err(Status::invalid_argument(format!(
                    "upload of {}: a second UploadStart; an upload has exactly one, first",
                    target.display()
                )))
            }
            None => {
                return Err(Status::invalid_argument(format!(
                    "upload of {}: a message with no part",
                    target.display()
                )))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Download

/// Opens a file for download and checks the offset (blocking).
fn open_download(path: &Path, offset: u64) -> Result<(File, u64), Status> {
    let file = File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Status::not_found(format!("{} does not exist on the tentacle", path.display()))
        } else {
            io_status("cannot open", path, &e)
        }
    })?;
    let meta = file
        .metadata()
        .map_err(|e| io_status("cannot inspect", path, &e))?;
    if meta.is_dir() {
        return Err(Status::invalid_argument(format!(
            "{} is a directory; downloads need a file path",
            path.display()
        )));
    }
    let len = meta.len();
    if offset > len {
        return Err(Status::out_of_range(format!(
            "cannot download {} from byte {offset}: it has only {len} bytes",
            path.display()
        )));
    }
    Ok((file, len))
}

type Reply = Result<DownloadReply, Status>;

fn part(p: download_reply::Part) -> Reply {
    Ok(DownloadReply { part: Some(p) })
}

/// The reader thread: streams `[offset, len)` in chunks while a hasher thread
/// hashes `[0, offset)` and then the chunks; ends with the whole file's hash.
fn run_download(file: &File, path: &Path, len: u64, offset: u64, tx: &mpsc::Sender<Reply>) {
    if tx
        .blocking_send(part(download_reply::Part::Start(DownloadStart {
            total_length: len,
        })))
        .is_err()
    {
        return;
    }
    let cancel = AtomicBool::new(false);
    let mut progress = Progress::new("download", path, len, offset);
    let result = std::thread::scope(|s| -> Result<Option<Digest>, Status> {
        let (htx, hrx) = std_mpsc::sync_channel::<Bytes>(PIPE_DEPTH);
        let cancel_ref = &cancel;
        let hasher = std::thread::Builder::new()
            .name("download-sha256".into())
            .spawn_scoped(s, move || {
                hash_prefix_then_chunks(file, offset, &hrx, cancel_ref)
            })
            .map_err(|e| Status::internal(format!("cannot start a hashing thread: {e}")))?;
        let mut pos = offset;
        let mut outcome = Ok(true);
        while pos < len {
            let n = usize::try_from(len - pos).map_or(DOWNLOAD_CHUNK, |l| l.min(DOWNLOAD_CHUNK));
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact_at(&mut buf, pos) {
                outcome = Err(io_status("cannot read", path, &e));
                break;
            }
            let data = Bytes::from(buf);
            if htx.send(data.clone()).is_err() {
                break; // The hasher failed; joining it says why.
            }
            let chunk = FileChunk { offset: pos, data };
            if tx
                .blocking_send(part(download_reply::Part::Chunk(chunk)))
                .is_err()
            {
                outcome = Ok(false); // The caller went away.
                break;
            }
            pos += n as u64;
            progress.update(pos);
        }
        drop(htx);
        let keep_going = matches!(outcome, Ok(true));
        if !keep_going {
            cancel.store(true, Ordering::Relaxed);
        }
        let hashed = hasher.join();
        outcome?;
        if !keep_going {
            return Ok(None);
        }
        match hashed {
            Ok(Ok(d)) => Ok(Some(d)),
            Ok(Err(e)) => Err(io_status("cannot hash", path, &e)),
            Err(_) => Err(Status::internal(format!(
                "the hashing thread for {} failed",
                path.display()
            ))),
        }
    });
    match result {
        Ok(Some(digest)) => {
            let sha256 = hex_upper(digest.as_ref());
            let (moved, secs, per_sec) = progress.rate(len);
            if tx
                .blocking_send(part(download_reply::Part::Finish(DownloadFinish {
                    sha256,
                    total_length: len,
                })))
                .is_ok()
            {
                info!(
                    path = %path.display(),
                    bytes = moved,
                    offset,
                    seconds = secs,
                    bytes_per_sec = per_sec,
                    "sent {} ({moved} bytes from offset {offset}) in {secs:.2} s: {per_sec} bytes/s ({:.1} MiB/s)",
                    path.display(),
                    per_sec as f64 / f64::from(1u32 << 20)
                );
            }
        }
        Ok(None) => {
            info!(path = %path.display(), "download of {} abandoned by the caller", path.display());
        }
        Err(status) => {
            warn!(path = %path.display(), "download failed: {}", status.message());
            let _ = tx.blocking_send(Err(status));
        }
    }
}

// ---------------------------------------------------------------------------
// The service

type DownloadStream = Pin<Box<dyn Stream<Item = Reply> + Send>>;

#[tonic::async_trait]
impl FileService for FileServiceImpl {
    async fn upload_file(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadReply>, Status> {
        let mut stream = request.into_inner();
        let start = match stream.message().await? {
            Some(UploadRequest {
                part: Some(upload_request::Part::Start(start)),
            }) => start,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of an upload must be UploadStart",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "the upload stream ended before UploadStart",
                ))
            }
        };
        let target = resolve_path(&self.ctx.home, &start.path)?;
        debug!(
            path = %target.display(),
            total_length = start.total_length,
            resume_from = start.resume_from,
            overwrite = start.overwrite,
            "upload starting"
        );
        let active = self.active.acquire(&target).await?;
        let (resume_from, total_hint) = (start.resume_from, start.total_length);
        let job = blocking(move || prepare_upload(&start, target, active)).await?;
        let target = job.target.clone();

        let (tx, rx) = mpsc::channel(PIPE_DEPTH);
        let writer = tokio::task::spawn_blocking(move || run_upload(job, rx));
        // If this future is dropped (the caller reset the call), `tx` drops, the
        // writer sees the end, keeps what it wrote and frees the path.
        let pumped = pump_upload(&mut stream, &tx, &target, resume_from, total_hint).await;
        drop(tx);
        let written = writer
            .await
            .map_err(|e| Status::internal(format!("the upload writer thread failed: {e}")))?;
        match (pumped, written) {
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Ok(()), Ok(UploadOutcome::Complete(reply))) => Ok(Response::new(reply)),
            (Ok(()), Ok(UploadOutcome::Interrupted(held))) => Err(Status::internal(format!(
                "the upload of {} stopped after {held} bytes",
                target.display()
            ))),
        }
    }

    async fn get_upload_state(
        &self,
        request: Request<UploadStateRequest>,
    ) -> Result<Response<UploadStateReply>, Status> {
        let target = resolve_path(&self.ctx.home, &request.into_inner().path)?;
        self.active.wait_idle(&target).await?;
        let reply = blocking(move || {
            let received_bytes = match partial_path(&target).map(fs::metadata) {
                Some(Ok(m)) if m.is_file() => m.len(),
                _ => 0,
            };
            let exists = target.is_file();
            let sha256 = if exists {
                hash_file(&target).map_err(|e| io_status("cannot hash", &target, &e))?
            } else {
                String::new()
            };
            Ok(UploadStateReply {
                received_bytes,
                exists,
                sha256,
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    type DownloadFileStream = DownloadStream;

    async fn download_file(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadFileStream>, Status> {
        let req = request.into_inner();
        let path = resolve_path(&self.ctx.home, &req.path)?;
        let offset = req.offset;
        let (file, len, path) = blocking(move || {
            let (file, len) = open_download(&path, offset)?;
            Ok((file, len, path))
        })
        .await?;
        debug!(path = %path.display(), len, offset, "download starting");
        let (tx, rx) = mpsc::channel(PIPE_DEPTH);
        tokio::task::spawn_blocking(move || run_download(&file, &path, len, offset, &tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
