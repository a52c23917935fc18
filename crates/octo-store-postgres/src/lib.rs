//! The store on PostgreSQL: [`PgStore`], for several server nodes that share
//! one database.
//!
//! The store's logic and SQL are `octo_store::sql`'s, the same as SQLite's;
//! this crate is PostgreSQL's connections ([`Engine`]), its [`Dialect`] and
//! its schema (`migrations/postgres/`, run on connect; sqlx takes an advisory
//! lock, so nodes starting together migrate once).
//!
//! - Transactions: a write is `READ COMMITTED`, and the rows a write reads to
//!   decide what to write are locked (`SELECT ... FOR UPDATE`) until it
//!   commits; several reads that must agree share one `REPEATABLE READ, READ
//!   ONLY` snapshot.
//! - Text: every text parameter is bound as `citext`, and names that SQLite
//!   compares with `COLLATE NOCASE` are `citext COLLATE "C"` columns, so a
//!   comparison ignores case exactly where SQLite's does (against such a
//!   column) and is exact elsewhere (PostgreSQL then compares as `text`).
//! - Lists: arrays (`bigint[]`, `citext[]`), expanded with `unnest`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use octo_store::sql::{Access, Col, Columns, Dialect, Engine, Params, Tx, Value, CLUSTER_CHANNEL};
use octo_store::{ClusterEvent, Heard, Result, StoreError};
use sqlx::pool::PoolConnection;
use sqlx::postgres::types::PgCiText;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Arguments, Connection, Decode, PgConnection, Postgres, Row, Transaction, Type};

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections in a node's pool.
const POOL_SIZE: u32 = 16;

/// How long a query waits for a connection of the pool (or to connect).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where PostgreSQL's SQL differs.
static DIALECT: Dialect = Dialect {
    ids: "unnest(CAST(? AS bigint[])) AS value",
    texts: "unnest(CAST(? AS citext[])) AS value",
    json_rows,
    nocase,
    json_array_of,
    greatest: "GREATEST",
    find: "strpos",
    for_update: " FOR UPDATE",
    serial_writes: false,
};

fn json_rows(column: &str, alias: &str) -> String {
    format!("jsonb_array_elements_text(CAST({column} AS jsonb)) AS {alias}(value)")
}

fn json_array_of(expr: &str) -> String {
    format!("COALESCE(CAST(json_agg({expr} ORDER BY {expr}) AS text), '[]')")
}

fn nocase(expr: &str) -> String {
    format!("CAST({expr} AS citext) COLLATE \"C\"")
}

/// The store on a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The database's URL without its password, for messages.
    name: String,
    /// This store's token in the events it publishes (see
    /// [`octo_store::cluster_payload`]), made anew for each connect.
    publisher: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("url", &self.name).finish()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`,
    /// with libpq's parameters such as `sslmode`) and brings its schema up to date.
    pub async fn connect(url: &str) -> Result<Self> {
        let name = redacted(url);
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Database(format!(
                    "the database URL {name} is not valid: {}; write it as \
                     postgres://USER:PASSWORD@HOST:PORT/DATABASE",
                    redact_text(&e.to_string(), url)
                ))
            })?
            .application_name("octopus-server");
        let unreachable = |e: &dyn fmt::Display| {
            StoreError::Database(format!(
                "connecting to PostgreSQL at {name}: {}; check that it runs and accepts \
                 connections from this machine, and the URL's user, password and database",
                redact_text(&e.to_string(), url)
            ))
        };
        // One connection first: a pool would retry a refused connection until
        // its acquire timeout, where this fails at once with the reason.
        let first = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| unreachable(&format!("no answer within {ACQUIRE_TIMEOUT:?}")))?
            .map_err(|e| unreachable(&e))?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| unreachable(&e))?;
        if let Err(e) = MIGRATOR.run(&pool).await {
            let message = e.to_string();
            let hint = if message.contains("citext") {
                "; the schema needs the citext extension: give the URL's user the database \
                 (ALTER DATABASE ... OWNER TO ...) or have an administrator run \
                 `CREATE EXTENSION citext` in it once"
            } else {
                ""
            };
            pool.close().await;
            return Err(StoreError::Database(format!(
                "migrating the database {name}: {message}{hint}"
            )));
        }
        tracing::debug!(url = %name, "store opened");
        Ok(Self {
            pool,
            name,
            publisher: publisher_token(),
        })
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `url` with its password (in the user part or a `password=` parameter)
/// replaced by `***`.
pub fn redacted(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme) = out.find("://") {
        let authority_end = out[scheme + 3..]
            .find(['/', '?'])
            .map_or(out.len(), |i| scheme + 3 + i);
        if let Some(at) = out[scheme + 3..authority_end].rfind('@') {
            let user = &out[scheme + 3..scheme + 3 + at];
            if let Some(colon) = user.find(':') {
                let start = scheme + 3 + colon + 1;
                out.replace_range(start..scheme + 3 + at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let query: Vec<String> = out[q + 1..]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out.replace_range(q + 1.., &query.join("&"));
    }
    out
}

/// A token no other store publishing on the database has: this process's id
/// and 64 bits the standard library draws from the operating system's random
/// source for each `RandomState`.
fn publisher_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{:x}-{random:016x}", std::process::id())
}

/// `text` (an error message) without the password of `url`, should it hold it.
fn redact_text(text: &str, url: &str) -> String {
    match password_of(url) {
        Some(p) if !p.is_empty() => text.replace(p, "***"),
        _ => text.to_string(),
    }
}

/// The password in the user part of `url`.
fn password_of(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let user = &authority[..authority.rfind('@')?];
    user.split_once(':').map(|(_, p)| p)
}

#[async_trait::async_trait]
impl Engine for PgStore {
    fn dialect(&self) -> &'static Dialect {
        &DIALECT
    }

    async fn begin(&self, access: Access) -> std::result::Result<Box<dyn Tx>, sqlx::Error> {
        Ok(match access {
            Access::Single | Access::SingleWrite => {
                Box::new(Conn::Single(self.pool.acquire().await?))
            }
            Access::Read => Box::new(Conn::Tx(
                self.pool
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    .await?,
            )),
            Access::Write => Box::new(Conn::Tx(self.pool.begin().await?)),
        })
    }

    async fn close_pool(&self) {
        self.pool.close().await;
    }

    fn shared(&self) -> bool {
        true
    }

    fn publisher(&self) -> &str {
        &self.publisher
    }

    async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<Heard>>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| {
                StoreError::Database(format!(
                    "connecting to {} to listen for the other nodes: {e}",
                    self.name
                ))
            })?;
        listener.listen(CLUSTER_CHANNEL).await.map_err(|e| {
            StoreError::Database(format!("LISTEN {CLUSTER_CHANNEL} on {}: {e}", self.name))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENTS_BUFFERED);
        let name = self.name.clone();
        let me = self.publisher.clone();
        let resync = || Heard {
            event: ClusterEvent::Resync,
            own: false,
        };
        tokio::spawn(async move {
            loop {
                let heard = match listener.try_recv().await {
                    Ok(Some(n)) => match octo_store::read_cluster_payload(n.payload(), &me) {
                        Ok(heard) => heard,
                        Err(e) => {
                            tracing::warn!(
                                "ignoring a cluster event this node cannot read ({e}): {}",
                                n.payload()
                            );
                            continue;
                        }
                    },
                    // The connection was lost; the next call makes it again,
                    // and what was published meanwhile is gone.
                    Ok(None) => {
                        tracing::warn!("the connection listening for other nodes' events to {name} was lost; reconnecting");
                        resync()
                    }
                    Err(e) => {
                        if tx.is_closed() {
                            return;
                        }
                        tracing::warn!(
                            "listening for other nodes' events on {name}: {e}; retrying in 1 s"
                        );
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        resync()
                    }
                };
                if tx.send(heard).await.is_err() {
                    return;
                }
            }
        });
        Ok(Some(rx))
    }
}

/// Events read ahead of the node handling them.
const EVENTS_BUFFERED: usize = 4096;

/// A pooled connection, in a transaction or not.
enum Conn {
    Single(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl Conn {
    fn connection(&mut self) -> &mut sqlx::PgConnection {
        match self {
            Conn::Single(c) => c,
            Conn::Tx(t) => t,
        }
    }
}

/// The arguments of a query, or the first that could not be bound.
fn arguments(params: Params<'_>) -> std::result::Result<PgArguments, sqlx::Error> {
    let mut args = PgArguments::default();
    for value in params.0 {
        let added = match value {
            Value::I64(v) => args.add(v),
            Value::I32(v) => args.add(v),
            // citext: see the crate's documentation.
            Value::Text(v) => args.add(v.map(|t| PgCiText(t.into_owned()))),
            Value::Bool(v) => args.add(v),
            Value::Ids(ids) => args.add(ids),
            Value::Texts(texts) => args.add(texts.into_iter().map(PgCiText).collect::<Vec<_>>()),
            Value::Bytes(b) => args.add(b.as_ref()),
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
        let sql = octo_store::sql::numbered_placeholders(sql);
        let rows = sqlx::query_with(&sql, arguments(params)?)
            .fetch_all(self.connection())
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Box::new(PgColumns(r)) as Box<dyn Columns + Send>)
            .collect())
    }

    async fn execute(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<u64, sqlx::Error> {
        let sql = octo_store::sql::numbered_placeholders(sql);
        let done = sqlx::query_with(&sql, arguments(params)?)
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
struct PgColumns(PgRow);

impl PgColumns {
    fn get<T>(&self, c: Col<'_>) -> std::result::Result<Option<T>, sqlx::Error>
    where
        T: for<'r> Decode<'r, Postgres> + Type<Postgres>,
    {
        match c {
            Col::Name(n) => self.0.try_get(n),
            Col::Index(i) => self.0.try_get(i),
        }
    }
}

impl Columns for PgColumns {
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

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redacted("postgres://octo:s3cret@db.example:5432/octopus"),
            "postgres://octo:***@db.example:5432/octopus"
        );
        assert_eq!(
            redacted("postgres://octo@db/octopus?sslmode=require&password=s3cret"),
            "postgres://octo@db/octopus?sslmode=require&password=***"
        );
        assert_eq!(
            redacted("postgresql://db/octopus"),
            "postgresql://db/octopus"
        );
        assert_eq!(
            redact_text("bad p@ss:word here", "postgres://u:p@ss:word@h/d"),
            "bad *** here"
        );
    }
}
