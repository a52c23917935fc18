//! Where the built-in feed keeps package content: in the database, chunked
//! and content-addressed (`Store::begin_package_content` and the rest), so
//! every node of a cluster reads what any node received; and, on each node,
//! a cache of whole files under `DATA/packages/<sha256>` that deployment
//! steps upload to tentacles from (the file service reads a local file at
//! any offset to resume a transfer).
//!
//! A cache file is only ever made from database content whose SHA-256 it
//! matched while written (`.incoming-*`, then renamed), or by a push that
//! hashed it; the database is the truth, a cache file a copy that can be
//! deleted at any time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use octo_store::{now_ms, Package, PackageContent, Store, StoreError, PACKAGE_CHUNK_SIZE};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Pushes in progress and cache files being filled are written as
/// `DATA/packages/.incoming-*`.
pub const INCOMING_PREFIX: &str = ".incoming-";

/// A pending upload older than this was abandoned by its node (which died
/// and never came back under its name); any node removes it at start.
pub const ABANDONED_AFTER_MS: i64 = 24 * 60 * 60 * 1000;

/// Chunks read from the database per query when streaming content out.
pub const CHUNKS_PER_READ: i64 = 4;

/// Why package content could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the content of package file {} has SHA-256 {actual}, not {expected}; it is damaged: \
         delete it and push the package again",
        path.display()
    )]
    Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "the content of package {sha256} is not in the database (it was deleted, or pushed to a \
         server before packages lived in the database and never imported); push the package \
         again with `octopus package push --replace`"
    )]
    Missing { sha256: String },
    #[error(
        "the content of package {sha256} in the database is damaged: {why}; push the package \
         again with `octopus package push --replace`"
    )]
    Damaged { sha256: String, why: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FeedError + 'a {
    move |source| FeedError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Lower-case hex.
fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a file name is a SHA-256 (64 lower-case hex digits).
fn is_sha256_name(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A name for a new `.incoming-*` file, unique in this process and others.
pub fn incoming_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{INCOMING_PREFIX}{}-{}-{}",
        std::process::id(),
        now_ms(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes content to the store chunk by chunk while hashing it: only whole
/// chunks of [`PACKAGE_CHUNK_SIZE`] are held in memory. Nothing is visible
/// until [`ContentWriter::finish`]; dropped unfinished, the upload is
/// dropped from the store (in the background).
#[derive(Debug)]
pub struct ContentWriter {
    store: Arc<dyn Store>,
    id: i64,
    buf: Vec<u8>,
    next: i64,
    size: u64,
    hasher: Sha256,
    finished: bool,
}

impl ContentWriter {
    /// Starts an upload on behalf of `node`.
    pub async fn begin(store: Arc<dyn Store>, node: &str) -> Result<Self, StoreError> {
        let chunk = i64::try_from(PACKAGE_CHUNK_SIZE).unwrap_or(i64::MAX);
        let id = store.begin_package_content(node, chunk, now_ms()).await?;
        Ok(Self {
            store,
            id,
            buf: Vec::with_capacity(PACKAGE_CHUNK_SIZE),
            next: 0,
            size: 0,
            hasher: Sha256::new(),
            finished: false,
        })
    }

    /// Appends bytes (writing every chunk they complete).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (PACKAGE_CHUNK_SIZE - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == PACKAGE_CHUNK_SIZE {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            self.store
                .put_package_chunk(self.id, self.next, &self.buf)
                .await?;
            self.next += 1;
            self.buf.clear();
        }
        Ok(())
    }

    /// Writes the last chunk and completes the content, when its SHA-256 is
    /// `expected` (if given): then, and only then, readers find it.
    pub async fn finish(
        mut self,
        expected: Option<&str>,
        shown: &Path,
    ) -> Result<PackageContent, FeedError> {
        self.flush().await?;
        let actual = hex(&std::mem::take(&mut self.hasher).finalize());
        if let Some(expected) = expected {
            if !expected.eq_ignore_ascii_case(&actual) {
                return Err(FeedError::Mismatch {
                    path: shown.to_path_buf(),
                    expected: expected.to_ascii_lowercase(),
                    actual,
                });
            }
        }
        let size = i64::try_from(self.size).unwrap_or(i64::MAX);
        let content = self
            .store
            .finish_package_content(self.id, &actual, size)
            .await?;
        self.finished = true;
        Ok(content)
    }
}

impl Drop for ContentWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let (store, id) = (self.store.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.abandon_package_content(id).await {
                    tracing::warn!("cannot drop the unfinished package upload {id}: {e}");
                }
            });
        }
    }
}

/// The feed's content (in the store) and this node's cache of it under a
/// server's data directory, and the lock that makes placing content and
/// recording (or deleting) its row one step on this node.
#[derive(Debug, Clone)]
pub struct PackageFiles {
    dir: PathBuf,
    store: Arc<dyn Store>,
    node: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Held while a cache file is filled: steps deploying the same package
    /// at once wait for one copy rather than each making their own.
    filling: Arc<tokio::sync::Mutex<()>>,
}

impl PartialEq for PackageFiles {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl Eq for PackageFiles {}

/// What [`PackageFiles::import_files`] did at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Files whose content the database lacked, now stored there.
    pub imported: usize,
    /// Files no package uses, deleted.
    pub removed: usize,
    /// Files kept as cache copies of content the database has.
    pub cached: usize,
    /// Files that could not be imported (logged, left in place).
    pub failed: usize,
}

impl PackageFiles {
    /// The feed of the server whose data directory is `data`, writing to
    /// `store` as node `node`.
    pub fn new(data: &Path, store: Arc<dyn Store>, node: &str) -> Self {
        Self {
            dir: data.join("packages"),
            store,
            node: node.to_string(),
            lock: Arc::default(),
            filling: Arc::default(),
        }
    }

    /// The folder holding the cache files (and pushes in progress, `.incoming-*`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file of a package (it may not exist: see [`Self::local_copy`]).
    pub fn file_of(&self, p: &Package) -> PathBuf {
        self.by_sha256(&p.sha256)
    }

    /// The cache file with this content.
    pub fn by_sha256(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256.to_ascii_lowercase())
    }

    /// Held while content is placed and its row recorded, or a row deleted and
    /// its content with it, on this node (across nodes the store's
    /// transactions decide; see `Store::delete_unused_package_content`).
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// The complete content with this SHA-256, if the database has it.
    pub async fn content(&self, sha256: &str) -> Result<Option<PackageContent>, StoreError> {
        self.store.package_content(sha256).await
    }

    /// Starts writing content to the database (see [`ContentWriter`]).
    pub async fn writer(&self) -> Result<ContentWriter, StoreError> {
        ContentWriter::begin(self.store.clone(), &self.node).await
    }

    /// Stores a local file's content in the database (unless it is there),
    /// streaming it chunk by chunk; refused unless its SHA-256 is `expected`
    /// (when given).
    pub async fn store_file(
        &self,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<PackageContent, FeedError> {
        if let Some(sha) = expected {
            if let Some(c) = self.store.package_content(sha).await? {
                return Ok(c);
            }
        }
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(io("opening", path))?;
        let mut writer = self.writer().await?;
        let mut buf = vec![0u8; PACKAGE_CHUNK_SIZE];
        loop {
            let n = file.read(&mut buf).await.map_err(io("reading", path))?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]).await?;
        }
        writer.finish(expected, path).await
    }

    /// The local file of content `sha256`: the cache file, filled from the
    /// database first when this node has none (written aside, its SHA-256
    /// checked, then renamed into place).
    pub async fn local_copy(&self, sha256: &str) -> Result<PathBuf, FeedError> {
        let target = self.by_sha256(sha256);
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            return Ok(target);
        }
        let _filling = self.filling.lock().await;
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            return Ok(target);
        }
        let content =
            self.store
                .package_content(sha256)
                .await?
                .ok_or_else(|| FeedError::Missing {
                    sha256: sha256.to_ascii_lowercase(),
                })?;
        create_private_dir(&self.dir).await?;
        let incoming = self.dir.join(incoming_name());
        let filled = self.fill(&content, &incoming).await;
        let renamed = match filled {
            Ok(()) => tokio::fs::rename(&incoming, &target)
                .await
                .map_err(io("moving the package into", &target)),
            Err(e) => Err(e),
        };
        if renamed.is_err() {
            let _ = tokio::fs::remove_file(&incoming).await;
        }
        renamed.map(|()| target)
    }

    async fn fill(&self, content: &PackageContent, path: &Path) -> Result<(), FeedError> {
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .await
            .map_err(io("creating", path))?;
        let mut hasher = Sha256::new();
        let mut chunks = ChunkReader::new(self.store.clone(), content.clone(), 0);
        while let Some(chunk) = chunks.next().await? {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io("writing", path))?;
        }
        let actual = hex(&hasher.finalize());
        if actual != content.sha256 {
            return Err(FeedError::Damaged {
                sha256: content.sha256.clone(),
                why: format!("its chunks hash to {actual}"),
            });
        }
        file.sync_all().await.map_err(io("flushing", path))?;
        Ok(())
    }

    /// Deletes content no package uses any more, from the database and from
    /// this node's cache (best effort, logged). Other nodes' cache copies go
    /// at their next start.
    pub async fn remove_if_unused(&self, sha256: &str) {
        match self.store.delete_unused_package_content(sha256).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("cannot delete the unused package content {sha256}: {e}");
                return;
            }
        }
        match self.store.count_packages_with_sha256(sha256).await {
            Ok(0) => {
                let path = self.by_sha256(sha256);
                if let Err(e) = tokio::fs::remove_file(&path).await {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(
                            "cannot delete the unused package file {}: {e}",
                            path.display()
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot tell whether package {sha256} is still used: {e}"),
        }
    }

    /// Removes what pushes left when a server died during them (at start,
    /// before any push): this node's `.incoming-*` files, its pending uploads
    /// in the database and any node's abandoned ones. Answers how many files
    /// and uploads.
    pub async fn remove_incoming(&self) -> Result<(usize, u64), FeedError> {
        let mut removed = 0;
        match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io("listing", &self.dir))?;
                    if entry
                        .file_name()
                        .to_string_lossy()
                        .starts_with(INCOMING_PREFIX)
                    {
                        let path = entry.path();
                        std::fs::remove_file(&path).map_err(io("deleting", &path))?;
                        removed += 1;
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("listing", &self.dir)(e)),
        }
        let pending = self
            .store
            .remove_pending_package_contents(&self.node, now_ms() - ABANDONED_AFTER_MS)
            .await?;
        Ok((removed, pending))
    }

    /// At start: every `DATA/packages/<sha256>` file is imported into the
    /// database when a package uses it and the database lacks its content
    /// (a data directory from before packages lived in the database),
    /// verified against its name; kept as a cache copy when the database has
    /// it; deleted when no package uses it.
    pub async fn import_files(&self) -> Result<Imported, FeedError> {
        let mut done = Imported::default();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
            Err(e) => return Err(io("listing", &self.dir)(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_sha256_name(&name) && entry.path().is_file() {
                names.push(name);
            }
        }
        names.sort();
        for sha in names {
            let path = self.dir.join(&sha);
            if self.store.package_content(&sha).await?.is_some() {
                done.cached += 1;
                continue;
            }
            if self.store.count_packages_with_sha256(&sha).await? == 0 {
                std::fs::remove_file(&path).map_err(io("deleting", &path))?;
                done.removed += 1;
                continue;
            }
            match self.store_file(&path, Some(&sha)).await {
                Ok(c) => {
                    tracing::info!(
                        "imported package file {} into the database ({} bytes)",
                        path.display(),
                        c.size
                    );
                    done.imported += 1;
                }
                Err(e) => {
                    tracing::warn!("cannot import package file {}: {e}", path.display());
                    done.failed += 1;
                }
            }
        }
        Ok(done)
    }
}

/// Creates the cache folder (0700) when missing.
async fn create_private_dir(dir: &Path) -> Result<(), FeedError> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .await
        .map_err(io("creating", dir))
}

/// Reads complete content from the store in order, [`CHUNKS_PER_READ`]
/// chunks per query, from a byte offset; at most those chunks are held.
#[derive(Debug)]
pub struct ChunkReader {
    store: Arc<dyn Store>,
    content: PackageContent,
    next: i64,
    skip: usize,
    read: Vec<Vec<u8>>,
}

impl ChunkReader {
    /// Reads `content` from byte `offset` on.
    pub fn new(store: Arc<dyn Store>, content: PackageContent, offset: u64) -> Self {
        let chunk = u64::try_from(content.chunk_size.max(1)).unwrap_or(1);
        Self {
            next: i64::try_from(offset / chunk).unwrap_or(i64::MAX),
            skip: usize::try_from(offset % chunk).unwrap_or(0),
            store,
            content,
            read: Vec::new(),
        }
    }

    /// The next piece (a chunk, or its tail after the offset); None at the
    /// end. Damaged when chunks are missing or of the wrong length (content
    /// deleted while read, say).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, FeedError> {
        let total = self.content.chunks();
        if self.read.is_empty() {
            if self.next >= total {
                return Ok(None);
            }
            let count = CHUNKS_PER_READ.min(total - self.next);
            let mut got = self
                .store
                .package_chunks(self.content.id, self.next, count)
                .await?;
            if got.len() != usize::try_from(count).unwrap_or(0) {
                return Err(FeedError::Damaged {
                    sha256: self.content.sha256.clone(),
                    why: format!(
                        "chunks {} to {} of {total} are missing (was it deleted meanwhile?)",
                        self.next,
                        self.next + count - 1
                    ),
                });
            }
            got.reverse();
            self.read = got;
        }
        let Some(mut chunk) = self.read.pop() else {
            return Ok(None);
        };
        let index = self.next;
        self.next += 1;
        let expected = if index + 1 == total {
            self.content.size - index * self.content.chunk_size
        } else {
            self.content.chunk_size
        };
        if i64::try_from(chunk.len()).unwrap_or(-1) != expected {
            return Err(FeedError::Damaged {
                sha256: self.content.sha256.clone(),
                why: format!("chunk {index} has {} bytes, not {expected}", chunk.len()),
            });
        }
        if self.skip > 0 {
            chunk.drain(..self.skip.min(chunk.len()));
            self.skip = 0;
        }
        Ok(Some(chunk))
    }
}
