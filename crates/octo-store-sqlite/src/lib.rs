//! The embedded store: SQLite, [`SqliteStore`].
//!
//! One database file, WAL journal, foreign keys on, a busy timeout so that writers
//! queue instead of failing, and a small pool. Every write that is more than one
//! statement runs in a `BEGIN IMMEDIATE` transaction: it takes the write lock at
//! the start (waiting for it under the busy timeout), so a transaction never fails
//! half-way when it turns from reading to writing, and no row lock is needed.
//!
//! The store's logic and SQL are `octo_store::sql`'s, for every engine; this
//! crate is SQLite's connections ([`Engine`]), its [`Dialect`] (list
//! parameters as JSON arrays expanded with `json_each`, `COLLATE NOCASE`) and
//! its schema, in `migrations/sqlite/`, run on open.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use octo_store::sql::{Access, Col, Columns, Dialect, Engine, Params, Tx, Value};
use octo_store::{Result, StoreError};
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Arguments, Decode, Row, Sqlite, Transaction, Type};

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the pool of a file database.
const POOL_SIZE: u32 = 4;

/// Where SQLite's SQL differs.
static DIALECT: Dialect = Dialect {
    ids: "json_each(?)",
    texts: "json_each(?)",
    json_rows,
    nocase,
    greatest: "MAX",
    find: "instr",
    for_update: "",
};

fn json_rows(column: &str, alias: &str) -> String {
    format!("json_each({column}) {alias}")
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
    pool: SqlitePool,
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
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Database(format!("opening the database {}: {e}", path.display()))
            })?;
        let store = Self::migrated(pool, &path.display().to_string()).await?;
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
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Database(format!(
                    "the database {shown} cannot be opened: {}",
                    sqlite_message(&e)
                ))
            })?;
        let ours: std::result::Result<i64, sqlx::Error> = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&pool)
        .await;
        match ours {
            Ok(1) => {}
            Ok(_) => {
                pool.close().await;
                return Err(StoreError::Database(format!(
                    "the database {shown} is an SQLite database, but not one this server made (it has no record of the server's schema)"
                )));
            }
            Err(e) => {
                pool.close().await;
                return Err(StoreError::Database(format!(
                    "the database {shown} cannot be read: reading the database's schema: {}",
                    sqlite_message(&e)
                )));
            }
        }
        Self::migrated(pool, &shown.to_string()).await
    }

    /// A fresh database in memory, for tests. The pool has one connection, never
    /// closed, so every query sees the same database.
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(|e| StoreError::Database(format!("opening an in-memory database: {e}")))?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Database(format!("opening an in-memory database: {e}")))?;
        Self::migrated(pool, "in memory").await
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrated(pool: SqlitePool, what: &str) -> Result<Self> {
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(format!("migrating the database ({what}): {e}")))?;
        Ok(Self { pool })
    }
}

#[async_trait::async_trait]
impl Engine for SqliteStore {
    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    async fn begin(&self, access: Access) -> std::result::Result<Box<dyn Tx>, sqlx::Error> {
        Ok(match access {
            Access::Single => Box::new(Conn::Single(self.pool.acquire().await?)),
            // A deferred transaction reads one snapshot (WAL).
            Access::Read => Box::new(Conn::Tx(self.pool.begin().await?)),
            // The write lock from the start.
            Access::Write => Box::new(Conn::Tx(self.pool.begin_with("BEGIN IMMEDIATE").await?)),
        })
    }

    async fn close_pool(&self) {
        self.pool.close().await;
    }
}

/// A pooled connection, in a transaction or not.
enum Conn {
    Single(PoolConnection<Sqlite>),
    Tx(Transaction<'static, Sqlite>),
}

impl Conn {
    fn connection(&mut self) -> &mut sqlx::SqliteConnection {
        match self {
            Conn::Single(c) => c,
            Conn::Tx(t) => t,
        }
    }
}

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
        let rows = sqlx::query_with(sql, arguments(params)?)
            .fetch_all(self.connection())
            .await?;
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
        let done = sqlx::query_with(sql, arguments(params)?)
            .execute(self.connection())
            .await?;
        Ok(done.rows_affected())
    }

    async fn commit(self: Box<Self>) -> std::result::Result<(), sqlx::Error> {
        match *self {
            Conn::Single(_) => Ok(()),
            Conn::Tx(t) => t.commit().await,
        }
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
