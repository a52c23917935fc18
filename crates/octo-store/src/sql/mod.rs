//! The store on any SQL engine, written once.
//!
//! Every [`Store`](crate::Store) operation is implemented here, in SQL common
//! to SQLite and PostgreSQL (`store.rs`), for every type that implements
//! [`Engine`]. An engine crate supplies only what differs:
//!
//! - connections and transactions ([`Engine::begin`], [`Tx`]): how a write
//!   transaction starts (SQLite takes the write lock at once, PostgreSQL
//!   locks the rows it reads with [`Dialect::for_update`]), how parameters
//!   ([`Value`]) are bound and how columns are read ([`Columns`]);
//! - the few pieces of SQL that differ ([`Dialect`]): a list parameter as
//!   rows, case-insensitive comparison, and a handful of function names;
//! - its schema (migrations) and how it opens.
//!
//! SQL is written with `?` placeholders; an engine that numbers them
//! (PostgreSQL's `$1`) rewrites them ([`numbered_placeholders`]). Every query
//! is `query(sql, params![...], op)` and then what to read: records
//! ([`Query::all`]), one value ([`Query::value`]) or the rows a statement
//! changed ([`Query::execute`]), each failure named by its operation
//! ([`Op`]).

use std::fmt;

use crate::error::Op;
use crate::rows::Row;
use crate::{Result, StoreError};

mod store;

/// A query parameter. Text compares as the column it meets does: without
/// case against a column that ignores case (SQLite `COLLATE NOCASE`,
/// PostgreSQL `citext`), exactly against any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'q> {
    /// An integer (or NULL).
    I64(Option<i64>),
    /// A 32-bit integer (or NULL): an exit code.
    I32(Option<i32>),
    /// Text (or NULL).
    Text(Option<std::borrow::Cow<'q, str>>),
    /// A boolean.
    Bool(bool),
    /// A list of ids, to expand with [`Dialect::ids`].
    Ids(Vec<i64>),
    /// A list of texts, to expand with [`Dialect::texts`].
    Texts(Vec<String>),
    /// Bytes (SQLite BLOB, PostgreSQL bytea): a chunk of package content.
    Bytes(std::borrow::Cow<'q, [u8]>),
}

impl Value<'_> {
    /// A list of ids.
    pub fn ids(ids: &[i64]) -> Value<'static> {
        Value::Ids(ids.to_vec())
    }

    /// A list of texts.
    pub fn texts<S: AsRef<str>>(texts: &[S]) -> Value<'static> {
        Value::Texts(texts.iter().map(|s| s.as_ref().to_string()).collect())
    }
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::I64(Some(v))
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::I64(v)
    }
}

impl From<Option<i32>> for Value<'_> {
    fn from(v: Option<i32>) -> Self {
        Value::I32(v)
    }
}

impl<'q> From<&'q [u8]> for Value<'q> {
    fn from(v: &'q [u8]) -> Self {
        Value::Bytes(v.into())
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl<'q> From<&'q str> for Value<'q> {
    fn from(v: &'q str) -> Self {
        Value::Text(Some(v.into()))
    }
}

impl<'q> From<&'q String> for Value<'q> {
    fn from(v: &'q String) -> Self {
        Value::Text(Some(v.as_str().into()))
    }
}

impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Value::Text(Some(v.into()))
    }
}

impl<'q> From<Option<&'q str>> for Value<'q> {
    fn from(v: Option<&'q str>) -> Self {
        Value::Text(v.map(Into::into))
    }
}

impl<'q> From<&'q Option<String>> for Value<'q> {
    fn from(v: &'q Option<String>) -> Self {
        Value::Text(v.as_deref().map(Into::into))
    }
}

impl From<Option<String>> for Value<'_> {
    fn from(v: Option<String>) -> Self {
        Value::Text(v.map(Into::into))
    }
}

/// A query's parameters, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params<'q>(pub Vec<Value<'q>>);

impl<'q> Params<'q> {
    /// Adds the next parameter.
    pub fn and(mut self, value: impl Into<Value<'q>>) -> Self {
        self.0.push(value.into());
        self
    }
}

/// [`Params`] of the values, in order.
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        $crate::sql::Params::default()$(.and($value))*
    };
}
pub use params;

/// A column of a row, by name or by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col<'a> {
    /// By name (rows: `SELECT ... AS name`).
    Name(&'a str),
    /// By position from 0 (single values).
    Index(usize),
}

impl fmt::Display for Col<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Col::Name(n) => write!(f, "'{n}'"),
            Col::Index(i) => write!(f, "#{i}"),
        }
    }
}

/// One row as an engine returned it: its columns, read as the few types the
/// store keeps (NULL is None).
pub trait Columns {
    /// An integer column.
    fn i64(&self, c: Col<'_>) -> std::result::Result<Option<i64>, sqlx::Error>;
    /// A 32-bit integer column.
    fn i32(&self, c: Col<'_>) -> std::result::Result<Option<i32>, sqlx::Error>;
    /// A text column.
    fn text(&self, c: Col<'_>) -> std::result::Result<Option<String>, sqlx::Error>;
    /// A boolean column (SQLite: 0 or 1).
    fn bool(&self, c: Col<'_>) -> std::result::Result<Option<bool>, sqlx::Error>;
    /// A bytes column (SQLite BLOB, PostgreSQL bytea).
    fn bytes(&self, c: Col<'_>) -> std::result::Result<Option<Vec<u8>>, sqlx::Error>;
}

/// A row's columns read under a prefix: column `name` is read as
/// `{prefix}name` (rows of several kinds in one result, see `parts_union`).
pub(crate) struct Prefixed<'a> {
    /// The row as the engine returned it.
    pub(crate) row: &'a dyn Columns,
    /// What each column's name starts with in it.
    pub(crate) prefix: &'a str,
}

impl Prefixed<'_> {
    fn read<T>(
        &self,
        c: Col<'_>,
        read: impl FnOnce(&dyn Columns, Col<'_>) -> std::result::Result<T, sqlx::Error>,
    ) -> std::result::Result<T, sqlx::Error> {
        match c {
            Col::Name(name) if !self.prefix.is_empty() => {
                read(self.row, Col::Name(&format!("{}{name}", self.prefix)))
            }
            _ => read(self.row, c),
        }
    }
}

impl Columns for Prefixed<'_> {
    fn i64(&self, c: Col<'_>) -> std::result::Result<Option<i64>, sqlx::Error> {
        self.read(c, |r, c| r.i64(c))
    }
    fn i32(&self, c: Col<'_>) -> std::result::Result<Option<i32>, sqlx::Error> {
        self.read(c, |r, c| r.i32(c))
    }
    fn text(&self, c: Col<'_>) -> std::result::Result<Option<String>, sqlx::Error> {
        self.read(c, |r, c| r.text(c))
    }
    fn bool(&self, c: Col<'_>) -> std::result::Result<Option<bool>, sqlx::Error> {
        self.read(c, |r, c| r.bool(c))
    }
    fn bytes(&self, c: Col<'_>) -> std::result::Result<Option<Vec<u8>>, sqlx::Error> {
        self.read(c, |r, c| r.bytes(c))
    }
}

/// A value a column holds.
pub trait Column: Sized {
    /// Reads column `c` of `row`.
    fn column(row: &dyn Columns, c: Col<'_>) -> Result<Self>;
}

fn read_failed(c: Col<'_>, e: &sqlx::Error) -> StoreError {
    StoreError::Database(format!("reading column {c}: {e}"))
}

fn null(c: Col<'_>) -> StoreError {
    StoreError::Database(format!("column {c} is NULL where a value must be"))
}

/// `Column` for `T` and `Option<T>`, read with a method of [`Columns`].
macro_rules! column {
    ($ty:ty, $method:ident) => {
        impl Column for Option<$ty> {
            fn column(row: &dyn Columns, c: Col<'_>) -> Result<Self> {
                row.$method(c).map_err(|e| read_failed(c, &e))
            }
        }

        impl Column for $ty {
            fn column(row: &dyn Columns, c: Col<'_>) -> Result<Self> {
                <Option<$ty>>::column(row, c)?.ok_or_else(|| null(c))
            }
        }
    };
}

column!(i64, i64);
column!(i32, i32);
column!(String, text);
column!(bool, bool);
column!(Vec<u8>, bytes);

/// How a connection is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// One statement, outside any transaction (it commits by itself).
    Single,
    /// One statement that writes, outside any transaction (it commits by
    /// itself). An engine whose writers take turns database-wide (SQLite)
    /// queues it with its other writes rather than in the database's lock.
    SingleWrite,
    /// Several reads that must see one consistent state (a snapshot).
    Read,
    /// A write of more than one statement, all or nothing. Reads in it that
    /// decide what to write lock what they read ([`Dialect::for_update`]).
    Write,
}

impl Access {
    /// How one statement alone runs: [`Access::SingleWrite`] when it changes
    /// rows (`INSERT`, `UPDATE` or `DELETE`, with `RETURNING` say).
    fn of(sql: &str) -> Access {
        let verb = sql.trim_start().get(..6).unwrap_or_default();
        if ["INSERT", "UPDATE", "DELETE"]
            .iter()
            .any(|w| verb.eq_ignore_ascii_case(w))
        {
            Access::SingleWrite
        } else {
            Access::Single
        }
    }
}

/// A connection of an engine, in a transaction ([`Access::Read`],
/// [`Access::Write`]) or not ([`Access::Single`]). Dropped without
/// [`Tx::commit`], a transaction rolls back.
#[async_trait::async_trait]
pub trait Tx: Send {
    /// The rows `sql` returns.
    async fn fetch(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Box<dyn Columns + Send>>, sqlx::Error>;
    /// Runs `sql`; the number of rows it changed.
    async fn execute(
        &mut self,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<u64, sqlx::Error>;
    /// Commits (nothing to do outside a transaction).
    async fn commit(self: Box<Self>) -> std::result::Result<(), sqlx::Error>;
    /// The rows `sql` returns, then commits: where an engine can, in one
    /// call (the statements followed by the COMMIT). When `sql` fails nothing
    /// is committed.
    async fn fetch_and_commit(
        mut self: Box<Self>,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<Vec<Box<dyn Columns + Send>>, sqlx::Error> {
        let rows = self.fetch(sql, params).await?;
        self.commit().await?;
        Ok(rows)
    }
}

/// A database engine: its connections and its SQL. Every engine is a
/// [`Store`](crate::Store) (`store.rs`).
#[async_trait::async_trait]
pub trait Engine: Send + Sync + fmt::Debug + 'static {
    /// Where this engine's SQL differs from the others'.
    fn dialect(&self) -> &'static Dialect;
    /// A connection from the pool, used as `access` says.
    async fn begin(&self, access: Access) -> std::result::Result<Box<dyn Tx>, sqlx::Error>;
    /// Closes the pool, waiting for connections to be returned.
    async fn close_pool(&self);
    /// Whether several nodes may share the database (see [`crate::Store::shared`]).
    fn shared(&self) -> bool {
        false
    }
    /// The events of [`CLUSTER_CHANNEL`], on a connection of their own
    /// (see [`crate::Store::listen`]); None where nobody else publishes.
    async fn listen(&self) -> crate::Result<Option<tokio::sync::mpsc::Receiver<crate::Heard>>> {
        Ok(None)
    }
    /// This store's token in the events it publishes (see
    /// [`crate::cluster_payload`]): its own events come back to it marked.
    fn publisher(&self) -> &str {
        ""
    }
}

/// The channel nodes publish [`crate::ClusterEvent`]s on (as JSON, see
/// [`crate::cluster_payload`]).
pub const CLUSTER_CHANNEL: &str = "octopus_cluster";

/// The SQL that differs between engines. Everything else the store runs is
/// the same text on every engine.
#[derive(Debug)]
pub struct Dialect {
    /// A `FROM` item: the ids of a [`Value::Ids`] parameter as rows of one
    /// column `value` (SQLite `json_each(?)`).
    pub ids: &'static str,
    /// A `FROM` item: the texts of a [`Value::Texts`] parameter as rows of
    /// one column `value`, compared as a case-insensitive column would be.
    pub texts: &'static str,
    /// A `FROM` item: the elements of a JSON array of texts held in a column
    /// (`json_rows(column, alias)`), as rows of `alias.value`.
    pub json_rows: fn(&str, &str) -> String,
    /// An expression compared and ordered without regard to (ASCII) case.
    pub nocase: fn(&str) -> String,
    /// An aggregate: the JSON array (as text) of `expr` over the rows, in
    /// the order of `expr` (its column's collation), `[]` when there is none.
    pub json_array_of: fn(&str) -> String,
    /// The larger of two values: `greatest(a, b)`.
    pub greatest: &'static str,
    /// The position of a text in another from 1, 0 when absent:
    /// `find(haystack, needle)`.
    pub find: &'static str,
    /// Appended to a `SELECT` in a write transaction whose result decides
    /// what to write: it locks the rows until the transaction ends (SQLite's
    /// write transactions hold the whole database already: nothing).
    pub for_update: &'static str,
    /// Whether every write holds the whole database until it ends (SQLite):
    /// one statement alone is then as good as a transaction that locks the
    /// rows it touches, so the store may skip the transaction and the lock.
    pub serial_writes: bool,
}

/// `SELECT` the columns of `R` and then `rest` ("FROM ... WHERE ...").
pub fn select<R: Row>(rest: &str) -> String {
    format!("SELECT {} {rest}", R::COLUMNS)
}

/// `statement` (an INSERT, UPDATE or DELETE) `RETURNING` the columns of `R`.
pub fn returning<R: Row>(statement: &str) -> String {
    format!("{statement} RETURNING {}", R::COLUMNS)
}

/// `sql` with its parameters; `op` names it in errors.
pub fn query<'q, 'o>(sql: &'q str, params: Params<'q>, op: impl Into<Op<'o>>) -> Query<'q, 'o> {
    Query {
        sql,
        params,
        op: op.into(),
    }
}

/// Where a query runs: a connection of its own from the engine's pool, or a
/// transaction (or connection) already held.
pub enum On<'a> {
    /// A connection of its own, for this one statement.
    Engine(&'a dyn Engine),
    /// A transaction held by the caller.
    Tx(&'a mut (dyn Tx + 'static)),
}

impl fmt::Debug for On<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            On::Engine(e) => f.debug_tuple("Engine").field(e).finish(),
            On::Tx(_) => f.write_str("Tx"),
        }
    }
}

impl<'a, E: Engine> From<&'a E> for On<'a> {
    fn from(e: &'a E) -> Self {
        On::Engine(e)
    }
}

impl<'a> From<&'a mut Box<dyn Tx>> for On<'a> {
    fn from(tx: &'a mut Box<dyn Tx>) -> Self {
        On::Tx(tx.as_mut())
    }
}

impl<'a> From<&'a mut (dyn Tx + 'static)> for On<'a> {
    fn from(tx: &'a mut (dyn Tx + 'static)) -> Self {
        On::Tx(tx)
    }
}

/// A query ready to run (see [`query`]).
#[derive(Debug)]
pub struct Query<'q, 'o> {
    sql: &'q str,
    params: Params<'q>,
    op: Op<'o>,
}

impl<'o> Query<'_, 'o> {
    /// The rows, and the operation (to name a failure to read them).
    async fn rows(self, on: On<'_>) -> Result<(Vec<Box<dyn Columns + Send>>, Op<'o>)> {
        let Query { sql, params, op } = self;
        let rows = match on {
            On::Tx(tx) => tx.fetch(sql, params).await,
            On::Engine(e) => match e.begin(Access::of(sql)).await {
                Ok(mut c) => c.fetch(sql, params).await,
                Err(e) => Err(e),
            },
        };
        match rows {
            Ok(rows) => Ok((rows, op)),
            Err(e) => Err(op.fail(&e)),
        }
    }

    /// Every row, as records.
    pub async fn all<R: Row>(self, on: impl Into<On<'_>>) -> Result<Vec<R::Record>> {
        let (rows, op) = self.rows(on.into()).await?;
        rows.iter()
            .map(|r| R::from_columns(r.as_ref()).and_then(Row::into_record))
            .collect::<Result<_>>()
            .map_err(|e| in_op(&op, e))
    }

    /// The row, if any, as a record.
    pub async fn optional<R: Row>(self, on: impl Into<On<'_>>) -> Result<Option<R::Record>> {
        let (rows, op) = self.rows(on.into()).await?;
        rows.first()
            .map(|r| R::from_columns(r.as_ref()).and_then(Row::into_record))
            .transpose()
            .map_err(|e| in_op(&op, e))
    }

    /// The one row (of an `INSERT ... RETURNING`), as a record.
    pub async fn one<R: Row>(self, on: impl Into<On<'_>>) -> Result<R::Record> {
        let what = self.op.what().to_string();
        self.optional::<R>(on)
            .await?
            .ok_or_else(|| StoreError::Database(format!("{what}: no row was returned")))
    }

    /// The first column of the row, if any.
    pub async fn scalar<T: Column>(self, on: impl Into<On<'_>>) -> Result<Option<T>> {
        let (rows, op) = self.rows(on.into()).await?;
        rows.first()
            .map(|r| T::column(r.as_ref(), Col::Index(0)))
            .transpose()
            .map_err(|e| in_op(&op, e))
    }

    /// The first column of the one row (a count, say).
    pub async fn value<T: Column>(self, on: impl Into<On<'_>>) -> Result<T> {
        let what = self.op.what().to_string();
        self.scalar::<T>(on)
            .await?
            .ok_or_else(|| StoreError::Database(format!("{what}: no row was returned")))
    }

    /// The first column of every row.
    pub async fn scalars<T: Column>(self, on: impl Into<On<'_>>) -> Result<Vec<T>> {
        let (rows, op) = self.rows(on.into()).await?;
        rows.iter()
            .map(|r| T::column(r.as_ref(), Col::Index(0)))
            .collect::<Result<_>>()
            .map_err(|e| in_op(&op, e))
    }

    /// Runs the statement; the number of rows it changed.
    pub async fn execute(self, on: impl Into<On<'_>>) -> Result<u64> {
        let Query { sql, params, op } = self;
        let done = match on.into() {
            On::Tx(tx) => tx.execute(sql, params).await,
            On::Engine(e) => match e.begin(Access::SingleWrite).await {
                Ok(mut c) => c.execute(sql, params).await,
                Err(e) => Err(e),
            },
        };
        done.map_err(|e| op.fail(&e))
    }
}

/// A failure to read a row, named by its operation.
fn in_op(op: &Op<'_>, e: StoreError) -> StoreError {
    match e {
        StoreError::Database(m) => StoreError::Database(format!("{}: {m}", op.what())),
        other => other,
    }
}

/// `sql` with each `?` outside quotes numbered `$1`, `$2`, ... in order (for
/// engines that number parameters).
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (None, '?') => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            numbered_placeholders("SELECT ? FROM t WHERE a = ? AND b = '?' AND \"c?\" = ?"),
            "SELECT $1 FROM t WHERE a = $2 AND b = '?' AND \"c?\" = $3"
        );
        assert_eq!(
            numbered_placeholders("x = 'it''s' OR y = ?"),
            "x = 'it''s' OR y = $1"
        );
    }

    #[test]
    fn params_keep_their_order_and_kinds() {
        let name = String::from("web");
        let none: Option<String> = None;
        let p = params![1_i64, &name, &none, true, Some(3_i32)].and(Value::ids(&[1, 2]));
        assert_eq!(
            p.0,
            vec![
                Value::I64(Some(1)),
                Value::Text(Some("web".into())),
                Value::Text(None),
                Value::Bool(true),
                Value::I32(Some(3)),
                Value::Ids(vec![1, 2]),
            ]
        );
    }
}
