//! The one shape every query here takes: [`query`]`(sql, `[`params!`]`[...], op)`,
//! then what to read from it (records, single values, or the count of rows a
//! statement changed), every failure named by its operation ([`Op`]).

use octo_store::error::{Ctx, Op};
use octo_store::rows::Row;
use octo_store::{Result, StoreError};
use sqlx::error::BoxDynError;
use sqlx::query::QueryAs;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Decode, Encode, FromRow, Sqlite, SqliteExecutor, Type};

/// What a query runs on: the pool, a connection or a transaction.
pub(crate) trait Ex<'c>: SqliteExecutor<'c> {}

impl<'c, E: SqliteExecutor<'c>> Ex<'c> for E {}

/// A row struct this engine can read.
pub(crate) trait SqlRow: Row + for<'r> FromRow<'r, SqliteRow> + Send + Unpin {}

impl<T: Row + for<'r> FromRow<'r, SqliteRow> + Send + Unpin> SqlRow for T {}

/// A value this engine can read from a column.
pub(crate) trait SqlValue: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + Send + Unpin {}

impl<T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + Send + Unpin> SqlValue for T {}

/// A query's parameters, bound in order (as `Query::bind` does: the first
/// failure to encode one is reported when the query runs).
#[derive(Default)]
pub(crate) struct Params<'q> {
    arguments: SqliteArguments<'q>,
    failure: Option<BoxDynError>,
}

impl<'q> Params<'q> {
    /// Adds the next parameter.
    pub(crate) fn add<T: 'q + Encode<'q, Sqlite> + Type<Sqlite>>(mut self, value: T) -> Self {
        if self.failure.is_none() {
            if let Err(e) = self.arguments.add(value) {
                self.failure = Some(e);
            }
        }
        self
    }
}

/// [`Params`] of the values, in order.
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        $crate::query::Params::default()$(.add($value))*
    };
}
pub(crate) use params;

/// `SELECT` the columns of `R` and then `rest` ("FROM ... WHERE ...").
pub(crate) fn select<R: Row>(rest: &str) -> String {
    format!("SELECT {} {rest}", R::COLUMNS)
}

/// `statement` (an INSERT, UPDATE or DELETE) `RETURNING` the columns of `R`.
pub(crate) fn returning<R: Row>(statement: &str) -> String {
    format!("{statement} RETURNING {}", R::COLUMNS)
}

/// `sql` with its parameters; `op` names it in errors.
pub(crate) fn query<'q, 'o>(
    sql: &'q str,
    params: Params<'q>,
    op: impl Into<Op<'o>>,
) -> Query<'q, 'o> {
    Query {
        sql,
        params,
        op: op.into(),
    }
}

/// A query ready to run (see [`query`]).
pub(crate) struct Query<'q, 'o> {
    sql: &'q str,
    params: Params<'q>,
    op: Op<'o>,
}

/// A query of rows of type `O`, with its arguments bound.
type Prepared<'q, O> = QueryAs<'q, Sqlite, O, SqliteArguments<'q>>;

impl<'q, 'o> Query<'q, 'o> {
    /// The SQL, its arguments and the operation; an error if a parameter could
    /// not be bound.
    fn prepare(self) -> Result<(&'q str, SqliteArguments<'q>, Op<'o>)> {
        match self.params.failure {
            None => Ok((self.sql, self.params.arguments, self.op)),
            Some(e) => Err(StoreError::Database(format!(
                "{}: binding a parameter: {e}",
                self.op.what()
            ))),
        }
    }

    /// The query reading rows as `O`, and the operation.
    fn rows<O: for<'r> FromRow<'r, SqliteRow>>(self) -> Result<(Prepared<'q, O>, Op<'o>)> {
        let (sql, arguments, op) = self.prepare()?;
        Ok((sqlx::query_as_with(sql, arguments), op))
    }

    /// Every row, as records.
    pub(crate) async fn all<'c, R: SqlRow>(self, ex: impl Ex<'c>) -> Result<Vec<R::Record>> {
        let (q, op) = self.rows::<R>()?;
        let rows = q.fetch_all(ex).await.ctx(op)?;
        rows.into_iter().map(Row::into_record).collect()
    }

    /// The row, if any, as a record.
    pub(crate) async fn optional<'c, R: SqlRow>(
        self,
        ex: impl Ex<'c>,
    ) -> Result<Option<R::Record>> {
        let (q, op) = self.rows::<R>()?;
        q.fetch_optional(ex)
            .await
            .ctx(op)?
            .map(Row::into_record)
            .transpose()
    }

    /// The one row (of an `INSERT ... RETURNING`), as a record.
    pub(crate) async fn one<'c, R: SqlRow>(self, ex: impl Ex<'c>) -> Result<R::Record> {
        let (q, op) = self.rows::<R>()?;
        q.fetch_one(ex).await.ctx(op)?.into_record()
    }

    /// The first column of the row, if any.
    pub(crate) async fn scalar<'c, T: SqlValue>(self, ex: impl Ex<'c>) -> Result<Option<T>> {
        let (q, op) = self.rows::<(T,)>()?;
        Ok(q.fetch_optional(ex).await.ctx(op)?.map(|(v,)| v))
    }

    /// The first column of the one row (a count, say).
    pub(crate) async fn value<'c, T: SqlValue>(self, ex: impl Ex<'c>) -> Result<T> {
        let (q, op) = self.rows::<(T,)>()?;
        Ok(q.fetch_one(ex).await.ctx(op)?.0)
    }

    /// The first column of every row.
    pub(crate) async fn scalars<'c, T: SqlValue>(self, ex: impl Ex<'c>) -> Result<Vec<T>> {
        let (q, op) = self.rows::<(T,)>()?;
        Ok(q.fetch_all(ex)
            .await
            .ctx(op)?
            .into_iter()
            .map(|(v,)| v)
            .collect())
    }

    /// Runs the statement; the number of rows it changed.
    pub(crate) async fn execute<'c>(self, ex: impl Ex<'c>) -> Result<u64> {
        let (sql, arguments, op) = self.prepare()?;
        let done = sqlx::query_with(sql, arguments).execute(ex).await.ctx(op)?;
        Ok(done.rows_affected())
    }
}
