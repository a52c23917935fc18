//! The embedded store: SQLite, [`SqliteStore`].
//!
//! One database file, WAL journal, foreign keys on, a busy timeout so that writers
//! queue instead of failing, and a small pool. Every write that is more than one
//! statement runs in a `BEGIN IMMEDIATE` transaction: it takes the write lock at
//! the start (waiting for it under the busy timeout), so a transaction never fails
//! half-way when it turns from reading to writing, and no row lock is needed.
//! A transaction's BEGIN is sent with its first statement that returns rows, in
//! the same call (see `Conn`).
//! Writers of one store take turns in the process first ([`WriteTurn`]): a
//! writer waiting in SQLite's busy handler sleeps (1, 2, 5, 10 ms ...) even
//! when the lock is free again after 50 µs, which made many steps writing at
//! once slow; waiting for an async turn wakes the next writer at once.
//!
//! The connections are the store's own ([`Conns`]), not an sqlx pool: sqlx's
//! pool pings a connection's worker thread when it lends it and again, from a
//! task of its own, when it is given back, so every store call cost two more
//! thread hand-offs than its statements (a connection to a local file does
//! not go away; a connection that failed is closed instead of lent again).
//!
//! The WAL is copied back into the database (checkpointed) by a connection of
//! its own, [`Checkpointer`], after every [`CHECKPOINT_AFTER_WRITES`] writes,
//! not by whichever write crossed SQLite's threshold (1,000 pages, about as
//! often): a checkpoint syncs the WAL and the database to disk (milliseconds),
//! which every 40th task or so waited for in its own commit. What a writer
//! still syncs is the WAL's header when it starts the WAL over after a whole
//! checkpoint, once per checkpoint; a checkpoint on a timer would make that
//! the lot of nearly every write of a quiet server. Writers still checkpoint
//! past [`WRITER_CHECKPOINT_PAGES`], should the checkpointer fall behind.
//!
//! The store's logic and SQL are `octo_store::sql`'s, for every engine; this
//! crate is SQLite's connections ([`Engine`]), its [`Dialect`] (list
//! parameters as JSON arrays expanded with `json_each`, `COLLATE NOCASE`) and
//! its schema, in `migrations/sqlite/`, run on open.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use octo_store::sql::{Access, Col, Columns, Dialect, Engine, Params, Tx, Value};
use octo_store::{Result, StoreError};
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Arguments, ConnectOptions, Connection, Decode, Row, Sqlite, Type};

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the pool of a file database.
const POOL_SIZE: u32 = 4;

/// Write transactions after which the [`Checkpointer`] copies the WAL back
/// into the database: about SQLite's own 1,000 pages, at the few pages most
/// writes add.
const CHECKPOINT_AFTER_WRITES: u32 = 128;

/// WAL pages past which a writer checkpoints in its own commit (SQLite's
/// `wal_autocheckpoint`, 1,000 by default): a backstop, ten times SQLite's
/// default, for a checkpointer that falls behind.
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// Where SQLite's SQL differs.
static DIALECT: Dialect = Dialect {
    ids: "json_each(?)",
    texts: "json_each(?)",
    json_rows,
    nocase,
    json_array_of,
    greatest: "MAX",
    find: "instr",
    for_update: "",
    serial_writes: true,
};

fn json_rows(column: &str, alias: &str) -> String {
    format!("json_each({column}) {alias}")
}

fn json_array_of(expr: &str) -> String {
    format!("json_group_array({expr} ORDER BY {expr})")
}

fn nocase(expr: &str) -> String {
    format!("{expr} COLLATE NOCASE")
}

/// What SQLite said, without sqlx's wrapping ("file is not a database").
fn sqlite_message(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    }
}

/// The store on an SQLite database.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    conns: Arc<Conns>,
    /// Whose turn it is to write.
    turn: WriteTurn,
    /// None in memory (no WAL).
    checkpointer: Option<Arc<Checkpointer>>,
}

/// Checkpoints the WAL from a connection of its own (see the module's
/// documentation), until [`SqliteStore::close`] or the last clone of the
/// store is dropped.
#[derive(Debug)]
struct Checkpointer {
    /// Write transactions begun since the last call for a checkpoint.
    writes: std::sync::atomic::AtomicU32,
    due: Arc<tokio::sync::Notify>,
    /// Stops the task: by a send, or by being dropped with the store.
    stop: tokio::sync::watch::Sender<bool>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Checkpointer {
    fn start(mut conn: SqliteConnection, what: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let due = Arc::new(tokio::sync::Notify::new());
        let wake = due.clone();
        let task = tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    () = wake.notified() => {}
                    // A stop, or the store dropped.
                    _ = stopped.changed() => break,
                }
                // PASSIVE: copies what no reader still needs, never waits
                // for a lock, never holds up a writer; a WAL already copied
                // costs a look at its header.
                match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&mut conn)
                    .await
                {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(
                            "checkpointing the database's WAL ({what}): {e}; writers checkpoint it themselves past {WRITER_CHECKPOINT_PAGES} pages"
                        );
                    }
                    Err(_) => {}
                }
            }
            if let Err(e) = conn.close().await {
                tracing::debug!("closing the checkpointer's connection: {e}");
            }
        });
        Checkpointer {
            writes: std::sync::atomic::AtomicU32::new(0),
            due,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// A write transaction begins: every [`CHECKPOINT_AFTER_WRITES`]th calls
    /// for a checkpoint (one called for meanwhile is not repeated).
    fn wrote(&self) {
        use std::sync::atomic::Ordering;
        let n = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= CHECKPOINT_AFTER_WRITES {
            self.writes.store(0, Ordering::Relaxed);
            self.due.notify_one();
        }
    }

    /// Stops the task and waits for it.
    async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// The store's connections: at most `size`, opened when first needed and
/// kept open until [`Conns::close`].
#[derive(Debug)]
struct Conns {
    /// Connections not lent, each with whether it must roll back first (it was
    /// given back in a transaction: its user was dropped half-way).
    idle: std::sync::Mutex<Vec<(SqliteConnection, bool)>>,
    /// One permit per connection that may be lent.
    permits: tokio::sync::Semaphore,
    size: u32,
    /// How to open another connection; None in memory (the one connection
    /// is the database).
    options: Option<SqliteConnectOptions>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one push or pop: poisoning cannot leave the
    // list inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Conns {
    fn new(first: SqliteConnection, size: u32, options: Option<SqliteConnectOptions>) -> Self {
        Conns {
            idle: std::sync::Mutex::new(vec![(first, false)]),
            permits: tokio::sync::Semaphore::new(size as usize),
            size,
            options,
        }
    }

    /// A connection, waiting for one to be given back when all are lent.
    async fn get(self: &Arc<Self>) -> std::result::Result<Lent, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        permit.forget();
        // From here the permit is the Lent's (given back when it drops).
        let mut lent = Lent {
            conn: None,
            conns: self.clone(),
            in_tx: false,
            broken: false,
            turn: None,
            rolling_back: false,
        };
        let idle = lock(&self.idle).pop();
        let conn = match idle {
            Some((c, false)) => {
                lent.conn = Some(c);
                return Ok(lent);
            }
            Some((mut c, true)) => {
                if sqlx::query("ROLLBACK").execute(&mut c).await.is_err() {
                    // Not in a transaction after all (it had ended): fine.
                }
                c
            }
            None => match &self.options {
                Some(o) => o.connect().await?,
                None => return Err(sqlx::Error::PoolClosed),
            },
        };
        lent.conn = Some(conn);
        Ok(lent)
    }

    /// Waits for every connection to be given back, then closes them all;
    /// no connection is lent after this.
    async fn close(&self) {
        if let Ok(all) = self.permits.acquire_many(self.size).await {
            all.forget();
        }
        self.permits.close();
        let idle = std::mem::take(&mut *lock(&self.idle));
        for (c, _) in idle {
            if let Err(e) = c.close().await {
                tracing::debug!("closing a database connection: {e}");
            }
        }
    }
}

/// A lent connection, given back when dropped.
#[derive(Debug)]
struct Lent {
    conn: Option<SqliteConnection>,
    conns: Arc<Conns>,
    /// In a transaction this store began (rolled back when given back
    /// unless committed).
    in_tx: bool,
    /// It failed other than with an SQL error: closed instead of given back.
    broken: bool,
    /// The store's write turn while this connection writes: released only
    /// once the connection is given back, its transaction ended.
    turn: Option<Turn>,
    /// This is the rollback of a transaction given back unfinished: if it
    /// cannot run, the connection is given back marked rather than rolled
    /// back again.
    rolling_back: bool,
}

impl Lent {
    fn connection(&mut self) -> std::result::Result<&mut SqliteConnection, sqlx::Error> {
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Runs a statement of the store's own (BEGIN, COMMIT).
    async fn run(&mut self, sql: &'static str) -> std::result::Result<(), sqlx::Error> {
        let done = sqlx::query(sql).execute(self.connection()?).await;
        self.check(done).map(drop)
    }

    /// Ends the transaction it was given back in (see `Drop`).
    async fn roll_back(&mut self) {
        match self.run("ROLLBACK").await {
            // Fails harmlessly where none is open any more (a COMMIT that
            // ran though its caller was gone).
            Ok(()) | Err(sqlx::Error::Database(_)) => self.in_tx = false,
            // Broken: closed rather than given back.
            Err(e) => tracing::debug!("rolling back a transaction given back unfinished: {e}"),
        }
    }

    /// Notes a failure that leaves the connection unfit to lend again.
    fn check<T>(
        &mut self,
        r: std::result::Result<T, sqlx::Error>,
    ) -> std::result::Result<T, sqlx::Error> {
        if let Err(e) = &r {
            if !matches!(
                e,
                sqlx::Error::Database(_)
                    | sqlx::Error::Encode(_)
                    | sqlx::Error::ColumnNotFound(_)
                    | sqlx::Error::ColumnDecode { .. }
                    | sqlx::Error::Decode(_)
            ) {
                self.broken = true;
            }
        }
        r
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.in_tx && !self.broken && !self.rolling_back {
                // Given back in a transaction (its user returned early or was
                // cancelled): rolled back now, not when next lent. A write
                // transaction holds the database's write lock until it ends,
                // and an idle connection may wait long to be lent again while
                // the others serve: every writer meanwhile failed with
                // "database is locked". The connection, its permit and the
                // write turn go with the rollback, so the next writer waits
                // for the turn, not for SQLite's lock.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let mut rest = Lent {
                        conn: Some(c),
                        conns: self.conns.clone(),
                        in_tx: true,
                        broken: false,
                        turn: self.turn.take(),
                        rolling_back: true,
                    };
                    runtime.spawn(async move { rest.roll_back().await });
                    return;
                }
            }
            if !self.broken {
                // Marked if still in a transaction (no runtime to roll it
                // back now): rolled back before it is lent again.
                lock(&self.conns.idle).push((c, self.in_tx));
            }
            // A broken one is dropped (closed); the next `get` opens another.
        }
        self.conns.permits.add_permits(1);
    }
}

/// The writers of one store, one at a time and in order of arrival (see the
/// module's documentation). A writer that waits longer than the busy timeout
/// goes on to SQLite's own lock, which then decides.
#[derive(Clone, Debug, Default)]
struct WriteTurn(Arc<tokio::sync::Mutex<()>>);

impl WriteTurn {
    async fn take(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        tokio::time::timeout(BUSY_TIMEOUT, self.0.clone().lock_owned())
            .await
            .ok()
    }
}

impl SqliteStore {
    /// Opens the database at `path`, creating it (and its directory) when missing,
    /// and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                StoreError::Database(format!("creating the directory {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string())
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let first = options.connect().await.map_err(|e| {
            StoreError::Database(format!("opening the database {}: {e}", path.display()))
        })?;
        let store = Self::migrated(first, Some(options), &path.display().to_string()).await?;
        tracing::debug!(path = %path.display(), "store opened");
        Ok(store)
    }

    /// Opens the existing database at `path`, which must be one this store made
    /// (it holds the record of applied migrations), and brings its schema up to
    /// date. Never creates a file: a missing file, a file that is not SQLite, and
    /// an SQLite database of something else are refused, naming the file, so a
    /// damaged or wrong file is never taken for a new, empty database.
    pub async fn open_existing(path: &Path) -> Result<Self> {
        let shown = path.display();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string())
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let mut first = options.connect().await.map_err(|e| {
            StoreError::Database(format!(
                "the database {shown} cannot be opened: {}",
                sqlite_message(&e)
            ))
        })?;
        let ours: std::result::Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&mut first)
        .await;
        match ours {
            Ok(1) => {}
            Ok(_) => {
                let _ = first.close().await;
                return Err(StoreError::Database(format!(
                    "the database {shown} is an SQLite database, but not one this server made (it has no record of the server's schema)"
                )));
            }
            Err(e) => {
                let _ = first.close().await;
                return Err(StoreError::Database(format!(
                    "the database {shown} cannot be read: reading the database's schema: {}",
                    sqlite_message(&e)
                )));
            }
        }
        Self::migrated(first, Some(options), &shown.to_string()).await
    }

    /// A fresh database in memory, for tests. The store has one connection,
    /// never closed, so every query sees the same database.
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| StoreError::Database(format!("opening an in-memory database: {e}")))?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let first = options
            .connect()
            .await
            .map_err(|e| StoreError::Database(format!("opening an in-memory database: {e}")))?;
        Self::migrated(first, None, "in memory").await
    }

    /// Closes the connections, waiting for those in use to be given back.
    pub async fn close(&self) {
        if let Some(c) = &self.checkpointer {
            c.stop().await;
        }
        self.conns.close().await;
    }

    /// The store, its schema brought up to date through its first
    /// connection; more are opened with `options` (None: that one only).
    async fn migrated(
        mut first: SqliteConnection,
        options: Option<SqliteConnectOptions>,
        what: &str,
    ) -> Result<Self> {
        if let Err(e) = MIGRATOR.run_direct(&mut first).await {
            let _ = first.close().await;
            return Err(StoreError::Database(format!(
                "migrating the database ({what}): {e}"
            )));
        }
        let checkpointer = match &options {
            Some(o) => match o.connect().await {
                Ok(c) => Some(Arc::new(Checkpointer::start(c, what.to_string()))),
                Err(e) => {
                    let _ = first.close().await;
                    return Err(StoreError::Database(format!(
                        "opening the database ({what}) for its checkpoints: {e}"
                    )));
                }
            },
            None => None,
        };
        let size = if options.is_some() { POOL_SIZE } else { 1 };
        Ok(Self {
            conns: Arc::new(Conns::new(first, size, options)),
            turn: WriteTurn::default(),
            checkpointer,
        })
    }
}

#[async_trait::async_trait]
impl Engine for SqliteStore {
    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    async fn begin(&self, access: Access) -> std::result::Result<Box<dyn Tx>, sqlx::Error> {
        // A writer takes its turn first, then a connection: waiting writers
        // hold none.
        let turn = match access {
            Access::SingleWrite | Access::Write => {
                if let Some(c) = &self.checkpointer {
                    c.wrote();
                }
                self.turn.take().await
            }
            Access::Single | Access::Read => None,
        };
        let mut lent = self.conns.get().await?;
        let begin = match access {
            Access::Single | Access::SingleWrite => None,
            // A deferred transaction reads one snapshot (WAL).
            Access::Read => Some("BEGIN"),
            // The write lock from the start.
            Access::Write => Some("BEGIN IMMEDIATE"),
        };
        // Marked now: a transaction dropped at any point from here is rolled
        // back before the connection is lent again (a ROLLBACK where none
        // began fails harmlessly).
        lent.in_tx = begin.is_some();
        lent.turn = turn;
        Ok(Box::new(Conn { lent, begin }))
    }

    async fn close_pool(&self) {
        self.conns.close().await;
    }
}

/// A lent connection, in a transaction or not, with the store's write turn
/// while it writes (see [`Lent`]).
struct Conn {
    lent: Lent,
    /// The transaction's BEGIN, not sent yet: it goes in front of the first
    /// statement, in the same call when that returns rows (one hand-off to the
    /// connection's thread rather than two), alone before one that counts the
    /// rows it changes.
    begin: Option<&'static str>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.begin.is_some() {
            // No statement ran: no transaction began, none to roll back.
            self.lent.in_tx = false;
        }
    }
}

impl Conn {
    /// `sql`, after the transaction's BEGIN if that is still to be sent.
    fn with_begin<'s>(&mut self, sql: &'s str) -> std::borrow::Cow<'s, str> {
        match self.begin.take() {
            Some(begin) => format!("{begin}; {sql}").into(),
            None => sql.into(),
        }
    }
}

/// A writer's turn, held until its connection is given back (after the
/// commit or the rollback).
type Turn = tokio::sync::OwnedMutexGuard<()>;

/// A list as one JSON array.
fn json<T: serde::Serialize>(list: &[T]) -> std::result::Result<String, sqlx::Error> {
    serde_json::to_string(list).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// The arguments of a query, or the first that could not be bound.
fn arguments<'q>(params: Params<'q>) -> std::result::Result<SqliteArguments<'q>, sqlx::Error> {
    let mut args = SqliteArguments::default();
    for value in params.0 {
        let added = match value {
            Value::I64(v) => args.add(v),
            Value::I32(v) => args.add(v),
            Value::Text(v) => args.add(v),
            Value::Bool(v) => args.add(v),
            // A list is one JSON array, expanded by json_each.
            Value::Ids(ids) => args.add(json(&ids)?),
            Value::Texts(texts) => args.add(json(&texts)?),
            Value::Bytes(std::borrow::Cow::Borrowed(b)) => args.add(b),
            Value::Bytes(std::borrow::Cow::Owned(b)) => args.add(b),
        };
        added.map_err(sqlx::Error::Encode)?;
    }
    Ok(args)
}

#[async_trait::async_trait]
impl Tx for Conn {
    async fn fetch(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Box<dyn Columns + Send>>, sqlx::Error> {
        let args = arguments(params)?;
        let sql = self.with_begin(sql);
        let rows = sqlx::query_with(&sql, args)
            .fetch_all(self.lent.connection()?)
            .await;
        let rows = self.lent.check(rows)?;
        Ok(rows
            .into_iter()
            .map(|r| Box::new(SqliteColumns(r)) as Box<dyn Columns + Send>)
            .collect())
    }

    async fn execute(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<u64, sqlx::Error> {
        let args = arguments(params)?;
        // Alone: a statement list's count of changed rows would include the
        // BEGIN's, which SQLite reports as the connection's last count.
        if let Some(begin) = self.begin.take() {
            self.lent.run(begin).await?;
        }
        let done = sqlx::query_with(sql, args)
            .execute(self.lent.connection()?)
            .await;
        Ok(self.lent.check(done)?.rows_affected())
    }

    async fn fetch_and_commit(
        mut self: Box<Self>,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Box<dyn Columns + Send>>, sqlx::Error> {
        if !self.lent.in_tx {
            return self.fetch(sql, params).await;
        }
        // The statements and the COMMIT in one call. SQLite stops at the
        // first statement that fails: the COMMIT then never runs, and the
        // transaction (still marked) is rolled back when the connection is
        // given back.
        let rows = self.fetch(&format!("{sql};\nCOMMIT"), params).await?;
        self.lent.in_tx = false;
        Ok(rows)
    }

    async fn commit(self: Box<Self>) -> std::result::Result<(), sqlx::Error> {
        let mut conn = *self;
        if conn.begin.take().is_some() {
            // No statement ran: no transaction began, nothing to commit.
            conn.lent.in_tx = false;
        }
        if conn.lent.in_tx {
            conn.lent.run("COMMIT").await?;
            conn.lent.in_tx = false;
        }
        Ok(())
    }
}

/// A row's columns.
struct SqliteColumns(SqliteRow);

impl SqliteColumns {
    fn get<T>(&self, c: Col<'_>) -> std::result::Result<Option<T>, sqlx::Error>
    where
        T: for<'r> Decode<'r, Sqlite> + Type<Sqlite>,
    {
        match c {
            Col::Name(n) => self.0.try_get(n),
            Col::Index(i) => self.0.try_get(i),
        }
    }
}

impl Columns for SqliteColumns {
    fn i64(&self, c: Col<'_>) -> std::result::Result<Option<i64>, sqlx::Error> {
        self.get(c)
    }
    fn i32(&self, c: Col<'_>) -> std::result::Result<Option<i32>, sqlx::Error> {
        self.get(c)
    }
    fn text(&self, c: Col<'_>) -> std::result::Result<Option<String>, sqlx::Error> {
        self.get(c)
    }
    fn bool(&self, c: Col<'_>) -> std::result::Result<Option<bool>, sqlx::Error> {
        self.get(c)
    }
    fn bytes(&self, c: Col<'_>) -> std::result::Result<Option<Vec<u8>>, sqlx::Error> {
        self.get(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawnable<F: std::future::Future + Send + 'static>(f: F) -> F {
        f
    }

    /// The server spawns what opens and uses the store: those futures must
    /// be Send for any lifetime (sqlx's higher-ranked bounds can break that).
    #[test]
    fn store_futures_can_be_spawned() {
        let path = std::path::PathBuf::from("unused.db");
        drop(spawnable(async move {
            let store = SqliteStore::open(&path).await?;
            let mut tx = store
                .begin(Access::Write)
                .await
                .map_err(|e| StoreError::Database(e.to_string()))?;
            tx.execute("SELECT 1", Params::default())
                .await
                .map_err(|e| StoreError::Database(e.to_string()))?;
            tx.commit()
                .await
                .map_err(|e| StoreError::Database(e.to_string()))?;
            store.close().await;
            Ok::<_, StoreError>(())
        }));
        drop(spawnable(async {
            let store = SqliteStore::open_in_memory().await?;
            SqliteStore::open_existing(std::path::Path::new("x")).await?;
            store.close_pool().await;
            Ok::<_, StoreError>(())
        }));
    }
}
