//! [`Store`] on every [`Engine`]: the store's logic and its SQL, written once.
//!
//! Every write that is more than one statement runs in an [`Access::Write`]
//! transaction; a read in it that decides what to write ends with
//! [`Dialect::for_update`], so that on an engine with row locks (PostgreSQL)
//! two writers cannot both act on what they read (SQLite's write
//! transactions hold the whole database already). Several reads that must
//! agree run in one [`Access::Read`] snapshot. Lists are passed as one
//! parameter ([`Value::ids`], [`Value::texts`]) and expanded by the engine
//! ([`Dialect::ids`], [`Dialect::texts`]), so a query has a fixed number of
//! parameters whatever the list's length.

use std::collections::HashMap;

use crate::error::{
    conflict, environment_in_use, environment_still_used, expect_rows, invalid, missing_policy,
    missing_reference, name_list, not_found, shell_word, Ctx, Op,
};
use crate::input::{
    arguments_text, check_new_machine, check_new_tenant, distinct_ids, missing_machine,
    next_sequences, normal_thumbprint, output_variables_text, require_name, task_transition,
    TASK_ID_PREFIX,
};
use crate::machines::{ListValues, MachineList, MachineRefs};
use crate::rows::{
    group, ApiKeyRow, ApiKeyWithUserRow, AuditRow, EnvironmentRow, GrantRow, ListRow, LogLineRow,
    MachineRow, MachineWithListsRow, NodeRow, PackageContentRow, PackageRow, PolicyRow, RoleRow,
    Row, SecretOrMaskRow, SpaceRow, StepRefRow, StepRow, TaskRow, TeamRow, TenantRow, UserRow,
    UserWithHashRow, IS_SYSTEM_ADMINISTRATOR,
};
use crate::sql::{
    query, returning, select, Access, Col, Dialect, Engine, On, Params, Prefixed, Tx, Value,
};
use crate::text::{TextEnum, UNFINISHED_STATES};
use crate::{
    now_ms, params, ticket, ApiKey, AuditEvent, AuditFilter, ClusterEvent, EndpointKind,
    Environment, Grant, HealthUpdate, Machine, MachineFilter, MachinePolicy, MachineQuery,
    MachineUpdate, NewAuditEvent, NewLogLine, NewMachine, NewPackage, NewTask, Node, NodeBeat,
    Package, PackageContent, PolicySettings, Result, Role, Space, StepRef, Store, StoreError, Task,
    TaskLogLine, TaskQuery, TaskSecretsAndMasks, TaskState, TaskStep, TaskWithLog, Team, Tenant,
    User, DEFAULT_POLICY,
};

/// A write transaction (see the module's documentation).
async fn write_tx(e: &dyn Engine, op: &str) -> Result<Box<dyn Tx>> {
    e.begin(Access::Write).await.ctx(op)
}

/// A read transaction: one consistent snapshot for several queries.
async fn read_tx(e: &dyn Engine, op: &str) -> Result<Box<dyn Tx>> {
    e.begin(Access::Read).await.ctx(op)
}

/// Statements of one transaction, run in order. Where writes hold the whole
/// database (SQLite, whose connections each run on a thread of their own),
/// they are sent together, in one call: one hand-off to that thread and
/// back rather than one for each. Elsewhere (PostgreSQL, whose statements
/// take one parameter list each) they become parts of one statement (see
/// [`task_creation_statement`]).
#[derive(Default)]
struct Batch<'q> {
    statements: Vec<(String, Params<'q>)>,
}

impl<'q> Batch<'q> {
    fn push(&mut self, sql: String, params: Params<'q>) {
        self.statements.push((sql, params));
    }

    /// Where writes hold the whole database: the rows the statements return,
    /// in order, and the transaction committed, with the statements in the
    /// same call. Nothing is committed when a statement fails.
    async fn rows_committed(
        self,
        tx: Box<dyn Tx>,
        d: &Dialect,
        op: &str,
    ) -> Result<Vec<Box<dyn crate::sql::Columns + Send>>> {
        debug_assert!(
            d.serial_writes,
            "statements sent together on an engine that cannot"
        );
        let (sql, params) = self.joined();
        tx.fetch_and_commit(&sql, params)
            .await
            .map_err(|e| Op::new(op).fail(&e))
    }

    /// The statements as one list, with their parameters in order.
    fn joined(self) -> (String, Params<'q>) {
        let mut sql = String::new();
        let mut params = Params::default();
        for (i, (statement, p)) in self.statements.into_iter().enumerate() {
            if i > 0 {
                sql.push_str(";\n");
            }
            sql.push_str(&statement);
            params.0.extend(p.0);
        }
        (sql, params)
    }
}

/// Why a task naming `machine_ids` was not created: the first of them that
/// does not exist (any more).
async fn missing_machine_of<E: Engine>(e: &E, machine_ids: &[i64], op: &str) -> StoreError {
    let sql = format!(
        "SELECT id FROM machines WHERE id IN ({})",
        id_list(e.dialect())
    );
    match query(&sql, params![Value::ids(machine_ids)], op)
        .scalars::<i64>(e)
        .await
    {
        Ok(found) => match machine_ids.iter().find(|id| !found.contains(id)) {
            Some(missing) => missing_machine(*missing),
            None => StoreError::Database(format!("{op}: no row was returned")),
        },
        Err(err) => err,
    }
}

/// The statement saving a step as it is now. Its resume point only moves
/// forward: `append_log` may have advanced it since the caller read the step.
fn step_update<'q>(d: &Dialect, step: &'q TaskStep) -> (String, Params<'q>) {
    let sql = format!(
        "UPDATE task_steps SET state = ?, exit_code = ?, next_sequence = {}(next_sequence, ?), \
         error = ?, started_at = ?, completed_at = ?, output_variables = ? \
         WHERE task_id = ? AND machine_id = ?",
        d.greatest
    );
    let params = params![
        step.state.text(),
        step.exit_code,
        step.next_sequence,
        &step.error,
        step.started_at,
        step.completed_at,
        output_variables_text(&step.output_variables),
        &step.task_id,
        step.machine_id,
    ];
    (sql, params)
}

fn step_not_found(step: &TaskStep) -> StoreError {
    not_found(
        "task step",
        format!("{} on machine #{}", step.task_id, step.machine_id),
    )
}

/// The task, then its steps, from the rows of a task's creation.
fn task_and_steps(
    rows: &[Box<dyn crate::sql::Columns + Send>],
    op: &str,
) -> Result<(Task, Vec<TaskStep>)> {
    let mut rows = rows.iter();
    let task = match rows.next() {
        Some(row) => TaskRow::from_columns(row.as_ref()).and_then(Row::into_record)?,
        None => return Err(StoreError::Database(format!("{op}: no row was returned"))),
    };
    let steps = rows
        .map(|row| StepRow::from_columns(row.as_ref()).and_then(Row::into_record))
        .collect::<Result<Vec<TaskStep>>>()?;
    Ok((task, steps))
}

/// Where rows lock (PostgreSQL): a task's creation as one statement, which
/// commits by itself. `batch` holds the task's insert, then its steps' (when
/// `steps`), then its other rows' (secrets, its audit record), each reading
/// the counter as `c` and the new task as `t`; the statement moves the
/// counter on first. Its rows: the task, then its steps (as
/// [`task_and_steps`] reads them); None when the task was not inserted (a
/// machine named is gone).
async fn task_creation_statement(
    e: &dyn Engine,
    batch: Batch<'_>,
    steps: bool,
    op: &str,
) -> Result<Option<(Task, Vec<TaskStep>)>> {
    let mut sql = String::from(
        "WITH c AS (UPDATE counters SET value = value + 1 WHERE name = 'task' RETURNING value)",
    );
    let mut params = Params::default();
    for (i, (statement, p)) in batch.statements.into_iter().enumerate() {
        let name = match i {
            0 => "t".to_string(),
            1 if steps => "s".to_string(),
            _ => format!("w{i}"),
        };
        sql.push_str(&format!(", {name} AS ({statement})"));
        params.0.extend(p.0);
    }
    sql.push(' ');
    sql.push_str(&parts_union(&[
        Part {
            columns: TaskRow::COLUMNS,
            table: "tasks",
            from: "FROM t".into(),
            order: None,
        },
        Part {
            columns: if steps { StepRow::COLUMNS } else { "" },
            table: "task_steps",
            from: "FROM s".into(),
            order: Some("machine_id".into()),
        },
    ]));
    let mut conn = e.begin(Access::SingleWrite).await.ctx(op)?;
    let rows = conn.fetch(&sql, params).await.ctx(op)?;
    let mut task = None;
    let mut created = Vec::new();
    for row in &rows {
        match part_of(row.as_ref(), PART_PREFIXES, op)? {
            (0, task_row) => task = Some(TaskRow::from_columns(&task_row)?.into_record()?),
            (_, step_row) => created.push(StepRow::from_columns(&step_row)?.into_record()?),
        }
    }
    Ok(task.map(|task| (task, created)))
}

/// Rows of several kinds from one statement (where a statement cannot
/// return several results, PostgreSQL): one [`Part`] each, numbered from 0.
struct Part {
    /// Its row's [`Row::COLUMNS`] (plain names); none for a part left out.
    columns: &'static str,
    /// A table with those columns, whose types they take.
    table: &'static str,
    /// The rest of its `SELECT`: `FROM ...`, with its conditions.
    from: String,
    /// Its rows' order, when it has several.
    order: Option<String>,
}

/// The statement returning the rows of `parts`, in order, each part's rows
/// in its order: column `part` says whose a row is, and a part's columns are
/// named with its prefix ([`PART_PREFIXES`]; read with [`part_of`]). Columns
/// of another part are NULL.
///
/// A `UNION` types its columns pair by pair, left to right, and a column
/// NULL in both of a pair would be typed text: the first branch, of no row,
/// takes every column from its part's table, so that each has its type.
fn parts_union(parts: &[Part]) -> String {
    assert!(
        parts.len() <= PART_PREFIXES.len(),
        "more parts than prefixes"
    );
    let named: Vec<(&str, Vec<&str>)> = parts
        .iter()
        .zip(PART_PREFIXES)
        .map(|(p, prefix)| {
            let columns = p.columns.split(", ").filter(|c| !c.is_empty());
            (prefix, columns.collect())
        })
        .collect();
    let mut typed = String::from("SELECT CAST(-1 AS bigint) AS part, CAST(0 AS bigint) AS n");
    let mut tables = Vec::new();
    for (j, ((prefix, columns), part)) in named.iter().zip(parts).enumerate() {
        for c in columns {
            typed.push_str(&format!(", x{j}.{c} AS {prefix}{c}"));
        }
        if !columns.is_empty() {
            tables.push(format!("{} AS x{j}", part.table));
        }
    }
    let mut branches = vec![format!("{typed} FROM {} WHERE FALSE", tables.join(", "))];
    for (i, part) in parts.iter().enumerate() {
        if part.columns.is_empty() {
            continue;
        }
        let n = match &part.order {
            Some(order) => format!("row_number() OVER (ORDER BY {order})"),
            None => "0".into(),
        };
        let mut list = format!("SELECT CAST({i} AS bigint) AS part, {n} AS n");
        for (j, (prefix, columns)) in named.iter().enumerate() {
            for c in columns {
                if i == j {
                    list.push_str(&format!(", {c} AS {prefix}{c}"));
                } else {
                    list.push_str(&format!(", NULL AS {prefix}{c}"));
                }
            }
        }
        branches.push(format!("{list} {}", part.from));
    }
    format!(
        "SELECT * FROM ({}) AS parts ORDER BY part, n",
        branches.join(" UNION ALL ")
    )
}

/// Whose row of a [`parts_union`] `row` is, and its columns as that part's
/// (under `prefixes`: [`PART_PREFIXES`], or none where each part is a
/// statement of its own).
fn part_of<'a>(
    row: &'a dyn crate::sql::Columns,
    prefixes: [&'static str; 3],
    op: &str,
) -> Result<(i64, Prefixed<'a>)> {
    let part = row
        .i64(Col::Name("part"))
        .map_err(|e| Op::new(op).fail(&e))?
        .ok_or_else(|| StoreError::Database(format!("{op}: a row of no part")))?;
    let prefix = usize::try_from(part)
        .ok()
        .and_then(|i| prefixes.get(i))
        .ok_or_else(|| {
            StoreError::Database(format!(
                "{op}: a row of part {part}, which the statement has not"
            ))
        })?;
    Ok((part, Prefixed { row, prefix }))
}

/// The prefix of each [`parts_union`] part's columns, in order.
const PART_PREFIXES: [&str; 3] = ["p0_", "p1_", "p2_"];

/// Machines matching `where_sql` (one statement: one snapshot).
async fn read_machines(
    e: &dyn Engine,
    op: &str,
    where_sql: &str,
    params: Params<'_>,
) -> Result<Vec<Machine>> {
    query_machines(On::Engine(e), e.dialect(), where_sql, params)
        .await
        .map_err(|err| match err {
            StoreError::Database(m) => StoreError::Database(format!("{op}: {m}")),
            other => other,
        })
}

/// Adds a machine, or with `replace` rewrites the one of the same name.
async fn save_machine(e: &dyn Engine, m: &NewMachine, replace: bool) -> Result<Machine> {
    let op = if replace {
        "replacing a machine"
    } else {
        "adding a machine"
    };
    check_new_machine(m)?;
    let d = e.dialect();
    let mut tx = write_tx(e, op).await?;
    let sql = format!(
        "SELECT id FROM machines WHERE space_id = ? AND name = ?{}",
        d.for_update
    );
    let existing = query(&sql, params![m.space_id, &m.name], op)
        .scalar::<i64>(&mut *tx)
        .await?;
    let id = match (existing, replace) {
        (Some(_), false) => return Err(conflict("machine", &m.name)),
        (None, true) => return Err(not_found("machine", &m.name)),
        (None, false) => {
            let refs = resolve_refs(&mut tx, m).await?;
            let params = machine_params(m, &refs).and(now_ms()).and(m.space_id);
            let op = Op::new(op).unique(conflict("machine", &m.name));
            let id = query(INSERT_MACHINE, params, op)
                .value::<i64>(&mut *tx)
                .await?;
            write_links(&mut tx, d, id, m, &refs).await?;
            id
        }
        (Some(id), true) => {
            let refs = resolve_refs(&mut tx, m).await?;
            let op = Op::new(op).unique(conflict("machine", &m.name));
            query(REPLACE_MACHINE, machine_params(m, &refs).and(id), op)
                .execute(&mut *tx)
                .await?;
            write_links(&mut tx, d, id, m, &refs).await?;
            id
        }
    };
    let machine = query_machines(&mut tx, d, "WHERE m.id = ?", params![id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Database(format!("{op}: machine '{}' vanished", m.name)))?;
    tx.commit().await.ctx(op)?;
    Ok(machine)
}

// Queries of more than one statement, and query shapes used more than once.

/// The record whose `column` is `key` in `table` (both constants of this module).
async fn by_key<R: Row>(
    on: impl Into<On<'_>>,
    table: &str,
    column: &str,
    key: &str,
    op: &str,
) -> Result<Option<R::Record>> {
    let sql = select::<R>(&format!("FROM {table} WHERE {column} = ?"));
    query(&sql, params![key], op).optional::<R>(on).await
}

/// A list as the JSON array text a column keeps (a task's environments, a
/// role's permissions).
fn json_text<T: serde::Serialize>(items: &[T]) -> Result<String> {
    serde_json::to_string(items).map_err(|e| StoreError::Database(format!("encoding a list: {e}")))
}

/// The ids of a [`Value::Ids`] parameter, as a subquery.
fn id_list(d: &Dialect) -> String {
    format!("SELECT value FROM {}", d.ids)
}

/// The texts of a [`Value::Texts`] parameter, as a subquery.
fn text_list(d: &Dialect) -> String {
    format!("SELECT value FROM {}", d.texts)
}

/// Machines matching `where_sql` (on `machines m`), ordered by name, with their
/// environments, roles, tenants and tenant tags (one statement, however many).
async fn query_machines(
    on: impl Into<On<'_>>,
    d: &Dialect,
    where_sql: &str,
    params: Params<'_>,
) -> Result<Vec<Machine>> {
    query_machines_paged(on, d, where_sql, params, "").await
}

/// As [`query_machines`], with `page` (e.g. `LIMIT 50 OFFSET 100`) after the order.
async fn query_machines_paged(
    on: impl Into<On<'_>>,
    d: &Dialect,
    where_sql: &str,
    params: Params<'_>,
    page: &str,
) -> Result<Vec<Machine>> {
    const OP: &str = "loading machines";
    let sql = format!(
        "SELECT {}, {} {} {where_sql} ORDER BY m.name, m.id {page}",
        MachineRow::COLUMNS,
        MachineList::columns(d.json_array_of),
        MachineRow::FROM
    );
    query(&sql, params, OP).all::<MachineWithListsRow>(on).await
}

/// The statement that moves an unfinished task to `state`, and its
/// parameters: `started_at` is set once, when it starts executing;
/// `completed_at` when it ends.
fn task_state_change<'q>(
    id: &'q str,
    state: TaskState,
    error: Option<&'q str>,
    now: i64,
) -> (String, Params<'q>) {
    let sql = format!(
        "UPDATE tasks SET state = ?, error = COALESCE(?, error), \
         started_at = COALESCE(started_at, ?), completed_at = ? \
         WHERE id = ? AND state IN {UNFINISHED_STATES}"
    );
    let started = (state == TaskState::Executing).then_some(now);
    let completed = state.is_final().then_some(now);
    (sql, params![state.text(), error, started, completed, id])
}

/// One audit event (the space's name is kept with it, as it was then).
const AUDIT_INSERT: &str =
    "INSERT INTO audit_events (at, user_id, username, source, action, kind, object, \
     space_id, space, details) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, (SELECT name FROM spaces WHERE id = ?), ?)";

/// The parameters of [`AUDIT_INSERT`] for `e`, about `object`; without it
/// where the statement takes the object from elsewhere.
fn audit_params<'q>(e: &'q NewAuditEvent, object: Option<&'q str>) -> Params<'q> {
    let mut params = params![e.at, e.user_id, &e.username, &e.source, &e.action, &e.kind];
    if let Some(object) = object {
        params = params.and(object);
    }
    params.and(e.space_id).and(e.space_id).and(&e.details)
}

/// Takes a task for a node (then its id, the node again, and the last
/// heartbeat of a node still online).
const CLAIM_TASK: &str =
    "UPDATE tasks SET node = ? WHERE id = ? AND (node IS NULL OR node = ? OR NOT EXISTS \
     (SELECT 1 FROM nodes n WHERE n.name = tasks.node AND n.last_seen >= ?))";

/// Adds a machine's row: its fields, its policy, then `created_at` and its space.
const INSERT_MACHINE: &str =
    "INSERT INTO machines (name, kind, uri, thumbprint, policy_id, worker_pool, created_at, space_id) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id";

/// Rewrites a machine's row: its fields, its policy, then its id. A new
/// registration: what was known about the old one's health no longer holds.
const REPLACE_MACHINE: &str =
    "UPDATE machines SET name = ?, kind = ?, uri = ?, thumbprint = ?, policy_id = ?, worker_pool = ?, \
     status = 'Unknown', status_reason = '', last_health_at = NULL, tentacle_version = NULL, \
     tool_version = NULL, os = NULL, free_bytes = NULL WHERE id = ?";

/// The parameters [`INSERT_MACHINE`] (then `created_at` and the space) and
/// [`REPLACE_MACHINE`] (then the id) start with.
fn machine_params<'q>(m: &'q NewMachine, refs: &MachineRefs) -> Params<'q> {
    params![
        &m.name,
        m.kind.text(),
        &m.uri,
        normal_thumbprint(&m.thumbprint),
        refs.policy_id,
        &m.worker_pool,
    ]
}

/// What a new machine refers to, resolved to row ids.
async fn resolve_refs(conn: &mut Box<dyn Tx>, m: &NewMachine) -> Result<MachineRefs> {
    let policy = m.policy.as_deref().unwrap_or(DEFAULT_POLICY);
    let sql = "SELECT id FROM machine_policies WHERE space_id = ? AND name = ?";
    let policy_id = query(sql, params![m.space_id, policy], RESOLVE)
        .scalar::<i64>(&mut *conn)
        .await?
        .ok_or_else(|| missing_policy(policy))?;
    Ok(MachineRefs {
        policy_id,
        environment_ids: ids_by_name(conn, m.space_id, "environment", &m.environments).await?,
        tenant_ids: ids_by_name(conn, m.space_id, "tenant", &m.tenants).await?,
    })
}

const RESOLVE: &str = "checking a machine's environments, tenants and policy";

/// The row ids of the `kind`s (in table `<kind>s`) of a space named, each once.
async fn ids_by_name(
    conn: &mut Box<dyn Tx>,
    space_id: i64,
    kind: &str,
    names: &[String],
) -> Result<Vec<i64>> {
    let sql = format!("SELECT id FROM {kind}s WHERE space_id = ? AND name = ?");
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        let id = query(&sql, params![space_id, name], RESOLVE)
            .scalar::<i64>(&mut *conn)
            .await?;
        ids.push(id.ok_or_else(|| missing_reference(kind, name))?);
    }
    Ok(distinct_ids(&ids))
}

/// Writes a machine's rows in the join tables (after clearing them), each list
/// in one statement.
async fn write_links(
    conn: &mut Box<dyn Tx>,
    d: &Dialect,
    machine_id: i64,
    m: &NewMachine,
    refs: &MachineRefs,
) -> Result<()> {
    const CLEAR: &str = "saving a machine's environments, roles and tenants";
    const SAVE: &str = "saving the machine's environments, roles and tenants";
    for list in MachineList::ALL {
        let sql = format!("DELETE FROM {} WHERE machine_id = ?", list.table());
        query(&sql, params![machine_id], CLEAR)
            .execute(&mut *conn)
            .await?;
    }
    for list in MachineList::ALL {
        let (values, from) = match list.values(m, refs) {
            ListValues::Ids(ids) => (Value::ids(ids), d.ids),
            ListValues::Texts(texts) => (Value::texts(texts), d.texts),
        };
        // WHERE true: an INSERT ... SELECT with ON CONFLICT needs a WHERE (SQLite's
        // parser would take ON for a join's).
        let sql = format!(
            "INSERT INTO {} (machine_id, {}) SELECT ?, value FROM {from} WHERE true \
             ON CONFLICT DO NOTHING",
            list.table(),
            list.column()
        );
        query(&sql, params![machine_id, values], SAVE)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// `expr` is one of a [`Value::Texts`] parameter's texts, ignoring case.
fn nocase_in(d: &Dialect, expr: &str) -> String {
    format!("{} IN ({})", (d.nocase)(expr), text_list(d))
}

/// A machine is in one of the environments of a [`Value::Texts`] parameter.
fn in_environments(d: &Dialect) -> String {
    format!(
        "EXISTS (SELECT 1 FROM machine_environments me JOIN environments e ON e.id = me.environment_id \
         WHERE me.machine_id = m.id AND {})",
        nocase_in(d, "e.name")
    )
}

/// The WHERE clause (on `machines m`) and parameters of a machine filter:
/// each non-empty list of it a condition, given the list as one parameter.
fn machine_conditions(d: &Dialect, filter: &MachineFilter) -> (String, Params<'static>) {
    let conditions = [
        (&filter.names, nocase_in(d, "m.name")),
        (&filter.environments, in_environments(d)),
        (
            &filter.roles,
            format!(
                "EXISTS (SELECT 1 FROM machine_roles r WHERE r.machine_id = m.id AND {})",
                nocase_in(d, "r.role")
            ),
        ),
        (
            &filter.tenants,
            format!(
                "EXISTS (SELECT 1 FROM machine_tenants mt JOIN tenants t ON t.id = mt.tenant_id \
                 WHERE mt.machine_id = m.id AND {})",
                nocase_in(d, "t.name")
            ),
        ),
    ];
    let mut sql = String::from("WHERE (? IS NULL OR m.space_id = ?)");
    let mut params = params![filter.space_id, filter.space_id];
    for (values, condition) in conditions {
        if !values.is_empty() {
            sql.push_str(" AND ");
            sql.push_str(&condition);
            params = params.and(Value::texts(values));
        }
    }
    (sql, params)
}

/// The WHERE clause and parameters of a page of machines.
fn page_conditions(d: &Dialect, q: &MachineQuery) -> (String, Params<'static>) {
    let (mut sql, mut params) = machine_conditions(d, &q.filter);
    if let Some(text) = q.name_contains.as_deref().filter(|t| !t.is_empty()) {
        // A position, not LIKE: no wildcards to escape.
        sql.push_str(&format!(" AND {}(lower(m.name), lower(?)) > 0", d.find));
        params = params.and(text.to_string());
    }
    if !q.health.is_empty() {
        let any: Vec<&str> = q.health.iter().map(|h| h.sql()).collect();
        sql.push_str(&format!(" AND ({})", any.join(" OR ")));
    }
    if let Some(kind) = q.kind {
        sql.push_str(" AND m.kind = ?");
        params = params.and(kind.text());
    }
    match q.workers {
        Some(true) => sql.push_str(" AND m.worker_pool IS NOT NULL"),
        Some(false) => sql.push_str(" AND m.worker_pool IS NULL"),
        None => {}
    }
    if let Some(envs) = &q.visible_environments {
        sql.push_str(" AND ");
        sql.push_str(&in_environments(d));
        params = params.and(Value::texts(envs));
    }
    (sql, params)
}

/// Tags by tenant, of one tenant or of all.
async fn tenant_tags(
    conn: &mut Box<dyn Tx>,
    tenant_id: Option<i64>,
) -> Result<HashMap<i64, Vec<String>>> {
    let sql = "SELECT tenant_id AS owner, tag AS value FROM tenant_tags \
               WHERE ? IS NULL OR tenant_id = ? ORDER BY tenant_id, tag";
    let rows = query(sql, params![tenant_id, tenant_id], "loading tenant tags")
        .all::<ListRow>(&mut *conn)
        .await?;
    Ok(group(rows))
}

/// Log lines stored by one `INSERT` at most (6 parameters each, far below
/// either engine's limit on parameters).
const LOG_ROWS_PER_INSERT: usize = 500;

/// Stores `lines` (at most [`LOG_ROWS_PER_INSERT`]) of task `task_id` in one
/// statement, in order; lines stored already (same machine and sequence) are
/// skipped. NotFound when the task does not exist.
async fn insert_log_lines(on: On<'_>, task_id: &str, lines: &[NewLogLine]) -> Result<()> {
    let (sql, params) = log_lines_insert(task_id, lines);
    query(&sql, params, log_lines_op(task_id))
        .execute(on)
        .await
        .map(drop)
}

/// How storing lines of task `task_id` fails.
fn log_lines_op(task_id: &str) -> Op<'static> {
    Op::new("appending to a task's log").foreign_key(not_found("task", task_id))
}

/// The statement that stores `lines` of task `task_id` (each once), and its parameters.
fn log_lines_insert<'q>(task_id: &'q str, lines: &'q [NewLogLine]) -> (String, Params<'q>) {
    let mut sql = String::with_capacity(96 + lines.len() * 22);
    sql.push_str(
        "INSERT INTO task_log (task_id, machine_id, sequence, timestamp, stream, text) VALUES ",
    );
    let mut params = Params::default();
    for (i, l) in lines.iter().enumerate() {
        sql.push_str(if i == 0 {
            "(?, ?, ?, ?, ?, ?)"
        } else {
            ", (?, ?, ?, ?, ?, ?)"
        });
        params = line_params(params, task_id, l);
    }
    sql.push_str(" ON CONFLICT DO NOTHING");
    (sql, params)
}

/// `params` and a log line's six: task, machine, sequence, timestamp, stream, text.
fn line_params<'q>(params: Params<'q>, task_id: &'q str, l: &'q NewLogLine) -> Params<'q> {
    params
        .and(task_id)
        .and(l.machine_id)
        .and(l.sequence)
        .and(l.timestamp)
        .and(l.stream.as_str())
        .and(l.text.as_str())
}

/// Where rows lock (PostgreSQL, [`Dialect::serial_writes`] false): one
/// statement that takes task `task_id`'s row with `gate`, then stores `lines`
/// (at most [`LOG_ROWS_PER_INSERT`], in order; each once) and runs each of
/// `thens`, all only once `gate` holds the row, so that the lines' ids grow in
/// the order they are committed (see `require_task`).
///
/// `gate` returns the task's row and locks it: `SELECT id FROM tasks WHERE id
/// = ? FOR UPDATE`, or a state change of the task with `RETURNING id`. Each
/// `then` is an `UPDATE` ending in its `WHERE` clause: of `task_steps`, or a
/// state change of the task whose row `gate` locked.
///
/// One statement commits by itself, so the task's row is held for that
/// statement and its commit. In a transaction it was held for five round
/// trips (`BEGIN`, the lock, the lines, the step, `COMMIT`), each back to a
/// busy server: the steps of a fan-out, ending together, queued on that lock
/// (`bench fleet --database-url`, BENCHMARKS.md).
///
/// The statement answers -1 when `gate` found no row (nothing was written),
/// otherwise a number whose bit `i` is set when the `i`-th `then` changed no
/// row (see [`Gated`]).
fn gated_log_write<'q>(
    gate: (String, Params<'q>),
    task_id: &'q str,
    lines: &[&'q NewLogLine],
    thens: Vec<(String, Params<'q>)>,
) -> (String, Params<'q>) {
    debug_assert!(lines.len() <= LOG_ROWS_PER_INSERT);
    debug_assert!(thens.len() < 8);
    let (gate, mut params) = gate;
    let mut sql = String::with_capacity(320 + gate.len() + lines.len() * 30);
    sql.push_str("WITH gate AS (");
    sql.push_str(&gate);
    sql.push(')');
    if !lines.is_empty() {
        // The ordinal makes the order of the rows, so of their ids, explicit.
        sql.push_str(
            ", lines AS (INSERT INTO task_log (task_id, machine_id, sequence, timestamp, stream, text) \
             SELECT v.task_id, v.machine_id, v.sequence, v.timestamp, v.stream, v.text FROM (VALUES ",
        );
        for (i, l) in lines.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("({i}, ?, ?, ?, ?, ?, ?)"));
            params = line_params(params, task_id, l);
        }
        sql.push_str(
            ") AS v (n, task_id, machine_id, sequence, timestamp, stream, text) \
             WHERE EXISTS (SELECT 1 FROM gate) ORDER BY v.n ON CONFLICT DO NOTHING RETURNING 1)",
        );
    }
    let mut missed = String::new();
    for (i, (then, then_params)) in thens.into_iter().enumerate() {
        sql.push_str(&format!(", then{i} AS ("));
        sql.push_str(&then);
        sql.push_str(" AND EXISTS (SELECT 1 FROM gate) RETURNING 1)");
        params.0.extend(then_params.0);
        missed.push_str(&format!(
            " + CASE WHEN EXISTS (SELECT 1 FROM then{i}) THEN 0 ELSE {} END",
            1u32 << i
        ));
    }
    sql.push_str(&format!(
        " SELECT CAST(CASE WHEN NOT EXISTS (SELECT 1 FROM gate) THEN -1 ELSE 0{missed} END AS bigint)"
    ));
    (sql, params)
}

/// What a [`gated_log_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gated {
    /// The gate found no row (no such task, or its state did not change):
    /// nothing was written.
    Shut,
    /// The gate held the task's row: the lines are stored, and bit `i` of
    /// `missed` is set when the `i`-th `then` changed no row.
    Open { missed: i64 },
}

impl Gated {
    /// Whether the gate held and the `i`-th `then` changed a row.
    fn changed(self, i: u32) -> bool {
        matches!(self, Gated::Open { missed } if missed & (1 << i) == 0)
    }
}

/// Runs a [`gated_log_write`] statement, committed by itself.
async fn run_gated_log_write(
    e: &dyn Engine,
    (sql, params): (String, Params<'_>),
    task_id: &str,
    op: &str,
) -> Result<Gated> {
    let mut conn = e.begin(Access::SingleWrite).await.ctx(op)?;
    let answer = query(&sql, params, log_lines_op(task_id))
        .value::<i64>(&mut conn)
        .await?;
    match answer {
        -1 => Ok(Gated::Shut),
        missed if (0..256).contains(&missed) => Ok(Gated::Open { missed }),
        other => Err(StoreError::Database(format!(
            "{op}: unexpected answer {other} from the database"
        ))),
    }
}

/// Where rows lock: `lines`, a state change of `step`'s task and `step` as
/// it is now, stored as one [`gated_log_write`], each part as when made
/// apart (the lines whenever the task exists; the step even when the task's
/// state cannot change). How the task's part went, then the step's.
async fn gated_state_and_step<E: Engine>(
    e: &E,
    op: &str,
    lines: &[&NewLogLine],
    step: &TaskStep,
    (state, error, now): (TaskState, Option<&str>, i64),
) -> (Result<()>, Result<()>) {
    let id = step.task_id.as_str();
    let d = e.dialect();
    let thens = vec![
        task_state_change(id, state, error, now),
        step_update(d, step),
    ];
    let write = gated_log_write(task_lock(d, id), id, lines, thens);
    match run_gated_log_write(e, write, id, op).await {
        Ok(Gated::Shut) => (Err(not_found("task", id)), Err(not_found("task", id))),
        Ok(done) => (
            if done.changed(0) {
                Ok(())
            } else {
                task_state_reached(e, id, state, error, now).await
            },
            if done.changed(1) {
                Ok(())
            } else {
                Err(step_not_found(step))
            },
        ),
        Err(e) => both_failed(e),
    }
}

/// Both parts of one statement that failed (so wrote nothing): the error,
/// and the same words for the other part.
fn both_failed(e: StoreError) -> (Result<()>, Result<()>) {
    let again = StoreError::Database(e.to_string());
    (Err(e), Err(again))
}

/// The statement that locks task `id`'s row until its transaction ends (see
/// `require_task`), as a [`gated_log_write`] gate.
fn task_lock<'q>(d: &Dialect, id: &'q str) -> (String, Params<'q>) {
    (
        format!("SELECT id FROM tasks WHERE id = ?{}", d.for_update),
        params![id],
    )
}

/// The statement moving the resume point of each machine in `next` (machine
/// id to next sequence) of task `task_id` forward, as a [`gated_log_write`]
/// `then`; None when there is none to move.
fn resume_points_update<'q>(
    d: &Dialect,
    task_id: &'q str,
    next: &HashMap<i64, i64>,
) -> Option<(String, Params<'q>)> {
    if next.is_empty() {
        return None;
    }
    let mut params = Params::default();
    let mut values = String::new();
    for (i, (machine_id, next)) in next.iter().enumerate() {
        values.push_str(if i == 0 { "(?, ?)" } else { ", (?, ?)" });
        params = params.and(*machine_id).and(*next);
    }
    let sql = format!(
        "UPDATE task_steps AS s SET next_sequence = {}(s.next_sequence, n.next) \
         FROM (VALUES {values}) AS n (machine_id, next) \
         WHERE s.task_id = ? AND s.machine_id = n.machine_id",
        d.greatest
    );
    Some((sql, params.and(task_id)))
}

/// NotFound unless task `id` exists. In a write transaction: the task's row
/// stays locked until it ends, so that writes to one task (its log lines,
/// whose ids must grow in the order they are committed) happen one at a time.
async fn require_task(conn: &mut Box<dyn Tx>, d: &Dialect, id: &str, op: &str) -> Result<()> {
    let sql = format!("SELECT id FROM tasks WHERE id = ?{}", d.for_update);
    let found = query(&sql, params![id], op)
        .scalar::<String>(&mut *conn)
        .await?;
    found.map(drop).ok_or_else(|| not_found("task", id))
}

/// The version of a package of a space, by ID (any case) and exact version;
/// `lock` ends the query ([`Dialect::for_update`] or nothing).
async fn package_version(
    on: impl Into<On<'_>>,
    (space_id, package_id, version): (i64, &str, &str),
    lock: &str,
    op: &str,
) -> Result<Option<Package>> {
    let sql = select::<PackageRow>(&format!(
        "FROM packages WHERE space_id = ? AND package_id = ? AND version = ?{lock}"
    ));
    query(&sql, params![space_id, package_id, version], op)
        .optional::<PackageRow>(on)
        .await
}

/// The record of a space whose `column` is `key` in `table`.
async fn by_space_key<R: Row>(
    on: impl Into<On<'_>>,
    table: &str,
    space_id: i64,
    column: &str,
    key: &str,
    op: &str,
) -> Result<Option<R::Record>> {
    let sql = select::<R>(&format!("FROM {table} WHERE space_id = ? AND {column} = ?"));
    query(&sql, params![space_id, key], op)
        .optional::<R>(on)
        .await
}

/// A user by id, with whether they are an administrator.
async fn user_by(on: impl Into<On<'_>>, id: i64, op: &str) -> Result<Option<User>> {
    let sql = select::<UserRow>("FROM users WHERE id = ?");
    query(&sql, params![id], op).optional::<UserRow>(on).await
}

/// Teams matching `where_sql` (on `teams t`), ordered by space then name,
/// with their members and grants.
async fn query_teams(
    conn: &mut Box<dyn Tx>,
    d: &Dialect,
    where_sql: &str,
    params: Params<'_>,
) -> Result<Vec<Team>> {
    const OP: &str = "loading teams";
    let sql = select::<TeamRow>(&format!(
        "{} {where_sql} ORDER BY t.space_id IS NOT NULL, s.name, t.name, t.id",
        TeamRow::FROM
    ));
    let mut teams = query(&sql, params, OP).all::<TeamRow>(&mut *conn).await?;
    if teams.is_empty() {
        return Ok(teams);
    }
    let ids = teams.iter().map(|t| t.id).collect::<Vec<_>>();
    let sql = format!(
        "SELECT tm.team_id AS owner, u.username AS value FROM team_members tm \
         JOIN users u ON u.id = tm.user_id WHERE tm.team_id IN ({}) \
         ORDER BY tm.team_id, u.username",
        id_list(d)
    );
    let mut members = group(
        query(&sql, params![Value::ids(&ids)], OP)
            .all::<ListRow>(&mut *conn)
            .await?,
    );
    let mut grants = query_grants(
        conn,
        d,
        &format!("WHERE g.team_id IN ({})", id_list(d)),
        params![Value::ids(&ids)],
    )
    .await?;
    for t in &mut teams {
        t.members = members.remove(&t.id).unwrap_or_default();
        t.grants = grants.remove(&t.id).unwrap_or_default();
    }
    Ok(teams)
}

/// Grants matching `where_sql` (on `grants g`), by team, with their
/// environments and tenants.
async fn query_grants(
    conn: &mut Box<dyn Tx>,
    d: &Dialect,
    where_sql: &str,
    params: Params<'_>,
) -> Result<HashMap<i64, Vec<Grant>>> {
    const OP: &str = "loading grants";
    let sql = select::<GrantRow>(&format!("{} {where_sql} ORDER BY g.id", GrantRow::FROM));
    let rows = query(&sql, params, OP).all::<GrantRow>(&mut *conn).await?;
    let mut by_team: HashMap<i64, Vec<Grant>> = HashMap::new();
    if rows.is_empty() {
        return Ok(by_team);
    }
    let ids = rows.iter().map(|(_, g)| g.id).collect::<Vec<_>>();
    let scopes = [
        "SELECT ge.grant_id AS owner, e.name AS value FROM grant_environments ge \
         JOIN environments e ON e.id = ge.environment_id",
        "SELECT gt.grant_id AS owner, t.name AS value FROM grant_tenants gt \
         JOIN tenants t ON t.id = gt.tenant_id",
    ];
    let mut lists = Vec::with_capacity(2);
    for (i, base) in scopes.iter().enumerate() {
        let column = if i == 0 { "ge" } else { "gt" };
        let sql = format!(
            "{base} WHERE {column}.grant_id IN ({}) ORDER BY {column}.grant_id, value",
            id_list(d)
        );
        lists.push(group(
            query(&sql, params![Value::ids(&ids)], OP)
                .all::<ListRow>(&mut *conn)
                .await?,
        ));
    }
    for (team_id, mut g) in rows {
        g.environments = lists[0].remove(&g.id).unwrap_or_default();
        g.tenants = lists[1].remove(&g.id).unwrap_or_default();
        by_team.entry(team_id).or_default().push(g);
    }
    Ok(by_team)
}

/// Adds a space's default machine policy.
async fn add_default_policy(conn: &mut Box<dyn Tx>, space_id: i64, op: &str) -> Result<()> {
    let sql = "INSERT INTO machine_policies (space_id, name, health_check_interval_s, \
               health_check_timeout_s, polling_wait_s) VALUES (?, ?, 3600, 60, 120)";
    query(sql, params![space_id, DEFAULT_POLICY], op)
        .execute(&mut *conn)
        .await
        .map(drop)
}

/// One write of a task's, for [`serial_task_writes`].
enum TaskWrite<'a> {
    /// Server lines (no sequence), as `append_log` stores them.
    Lines(&'a [NewLogLine]),
    /// A step as it is now, as `update_step` stores it.
    Step(&'a TaskStep),
    /// The task's new state, as `set_task_state` changes it.
    State(TaskState, Option<&'a str>, i64),
}

/// Where writes hold the whole database (SQLite): a task's writes as one
/// call, in order, each statement its own commit as when made apart (one
/// hand-off to the database's thread rather than one each). True when every
/// statement changed what it should (each line inserted, the step and the
/// task's state updated).
async fn serial_task_writes<E: Engine>(
    e: &E,
    task_id: &str,
    parts: &[TaskWrite<'_>],
) -> Result<bool> {
    let mut statements = Vec::with_capacity(parts.len());
    let mut params = Params::default();
    let mut expected = 0u64;
    for part in parts {
        let (sql, p) = match part {
            TaskWrite::Lines([]) => continue,
            TaskWrite::Lines(lines) => {
                expected += lines.len() as u64;
                log_lines_insert(task_id, lines)
            }
            TaskWrite::Step(step) => {
                expected += 1;
                step_update(e.dialect(), step)
            }
            TaskWrite::State(state, error, now) => {
                expected += 1;
                task_state_change(task_id, *state, *error, *now)
            }
        };
        statements.push(sql);
        params.0.extend(p.0);
    }
    let n = query(&statements.join("; "), params, log_lines_op(task_id))
        .execute(e)
        .await?;
    Ok(n == expected)
}

/// After a batch of [`serial_task_writes`] that did not change everything:
/// Ok when the step is there (its update then happened), NotFound otherwise.
async fn step_exists<S: Store + ?Sized>(s: &S, step: &TaskStep) -> Result<()> {
    match s.task_step(&step.task_id, step.machine_id).await? {
        Some(_) => Ok(()),
        None => Err(step_not_found(step)),
    }
}

/// After such a batch: Ok when the task is in `state` now; otherwise the
/// change made apart, which says why it cannot be made.
async fn task_state_reached<S: Store + ?Sized>(
    s: &S,
    id: &str,
    state: TaskState,
    error: Option<&str>,
    now: i64,
) -> Result<()> {
    match s.task(id).await {
        Ok(Some(t)) if t.state == state => Ok(()),
        _ => s.set_task_state(id, state, error, now).await,
    }
}

#[async_trait::async_trait]
impl<E: Engine> Store for E {
    async fn close(&self) {
        self.close_pool().await;
    }

    // Spaces.

    async fn create_space(&self, name: &str, description: &str) -> Result<Space> {
        const OP: &str = "adding a space";
        require_name("space", name)?;
        let mut tx = write_tx(self, OP).await?;
        let sql = returning::<SpaceRow>(
            "INSERT INTO spaces (name, description, is_default, created_at) VALUES (?, ?, FALSE, ?)",
        );
        let op = Op::new(OP).unique(conflict("space", name));
        let space = query(&sql, params![name, description, now_ms()], op)
            .one::<SpaceRow>(&mut *tx)
            .await?;
        add_default_policy(&mut tx, space.id, OP).await?;
        tx.commit().await.ctx(OP)?;
        Ok(space)
    }

    async fn list_spaces(&self) -> Result<Vec<Space>> {
        let sql = select::<SpaceRow>("FROM spaces ORDER BY is_default DESC, name, id");
        query(&sql, params![], "listing spaces")
            .all::<SpaceRow>(self)
            .await
    }

    async fn space_by_name(&self, name: &str) -> Result<Option<Space>> {
        by_key::<SpaceRow>(self, "spaces", "name", name, "looking up a space").await
    }

    async fn space_by_id(&self, id: i64) -> Result<Option<Space>> {
        let sql = select::<SpaceRow>("FROM spaces WHERE id = ?");
        query(&sql, params![id], "looking up a space")
            .optional::<SpaceRow>(self)
            .await
    }

    async fn delete_space(&self, id: i64) -> Result<Space> {
        const OP: &str = "deleting a space";
        let mut tx = write_tx(self, OP).await?;
        let sql = select::<SpaceRow>(&format!(
            "FROM spaces WHERE id = ?{}",
            self.dialect().for_update
        ));
        let space = query(&sql, params![id], OP)
            .optional::<SpaceRow>(&mut *tx)
            .await?
            .ok_or_else(|| not_found("space", format!("#{id}")))?;
        if space.is_default {
            return Err(invalid(format!(
                "space '{}' is the default space (requests that name no space use it) and cannot be deleted",
                space.name
            )));
        }
        let machines = query(
            "SELECT COUNT(*) FROM machines WHERE space_id = ?",
            params![id],
            OP,
        )
        .value::<i64>(&mut *tx)
        .await?;
        if machines > 0 {
            return Err(invalid(format!(
                "space '{}' holds {machines} machine(s); delete them first (`octopus machine list --space {}`)",
                space.name,
                shell_word(&space.name)
            )));
        }
        // Grants first: their scopes refer to the space's environments and
        // tenants, which may not go while a grant is narrowed to them.
        query("DELETE FROM grants WHERE space_id = ?", params![id], OP)
            .execute(&mut *tx)
            .await?;
        let sql = "DELETE FROM grants WHERE team_id IN (SELECT id FROM teams WHERE space_id = ?)";
        query(sql, params![id], OP).execute(&mut *tx).await?;
        query("DELETE FROM spaces WHERE id = ?", params![id], OP)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.ctx(OP)?;
        Ok(space)
    }

    // Users and API keys.

    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: Option<&str>,
    ) -> Result<User> {
        const OP: &str = "adding a user";
        require_name("user", username)?;
        let mut tx = write_tx(self, OP).await?;
        let sql = "INSERT INTO users (username, display_name, password_hash, created_at) \
                   VALUES (?, ?, ?, ?) RETURNING id";
        let params = params![username, display_name, password_hash, now_ms()];
        let op = Op::new(OP).unique(conflict("user", username));
        let id = query(sql, params, op).value::<i64>(&mut *tx).await?;
        let user = user_by(&mut *tx, id, OP)
            .await?
            .ok_or_else(|| StoreError::Database(format!("{OP}: user '{username}' vanished")))?;
        tx.commit().await.ctx(OP)?;
        Ok(user)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<(User, Option<String>)>> {
        let op = "looking up a user";
        by_key::<UserWithHashRow>(self, "users", "username", username, op).await
    }

    async fn user_by_id(&self, id: i64) -> Result<Option<User>> {
        user_by(self, id, "looking up a user").await
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        let sql = select::<UserRow>("FROM users ORDER BY username, id");
        query(&sql, params![], "listing users")
            .all::<UserRow>(self)
            .await
    }

    async fn set_user_disabled(&self, id: i64, disabled: bool) -> Result<User> {
        const OP: &str = "disabling or enabling a user";
        let mut tx = write_tx(self, OP).await?;
        let n = query(
            "UPDATE users SET disabled = ? WHERE id = ?",
            params![disabled, id],
            OP,
        )
        .execute(&mut *tx)
        .await?;
        expect_rows(n, not_found("user", format!("#{id}")))?;
        let user = user_by(&mut *tx, id, OP)
            .await?
            .ok_or_else(|| not_found("user", format!("#{id}")))?;
        tx.commit().await.ctx(OP)?;
        Ok(user)
    }

    async fn set_password_hash(&self, id: i64, password_hash: &str) -> Result<()> {
        let sql = "UPDATE users SET password_hash = ? WHERE id = ?";
        let n = query(sql, params![password_hash, id], "setting a password")
            .execute(self)
            .await?;
        expect_rows(n, not_found("user", format!("#{id}")))
    }

    async fn count_users(&self) -> Result<i64> {
        query("SELECT COUNT(*) FROM users", params![], "counting users")
            .value::<i64>(self)
            .await
    }

    async fn holders_of(&self, role: &str) -> Result<Vec<User>> {
        // The same test as IS_SYSTEM_ADMINISTRATOR, for any role.
        let role_test =
            IS_SYSTEM_ADMINISTRATOR.replace(&format!("'{}'", crate::SYSTEM_ADMINISTRATOR), "?");
        let sql = select::<UserRow>(&format!(
            "FROM users WHERE users.disabled = FALSE AND {role_test} ORDER BY users.username"
        ));
        query(&sql, params![role], "listing the holders of a role")
            .all::<UserRow>(self)
            .await
    }

    async fn create_api_key(
        &self,
        user_id: i64,
        purpose: &str,
        key_sha256: &str,
        prefix: &str,
        session: bool,
    ) -> Result<ApiKey> {
        let sql = returning::<ApiKeyRow>(
            "INSERT INTO api_keys (user_id, purpose, key_sha256, prefix, created_at, session) \
             VALUES (?, ?, ?, ?, ?, ?)",
        );
        let key_sha256 = key_sha256.to_ascii_lowercase();
        let params = params![user_id, purpose, key_sha256, prefix, now_ms(), session];
        let op = Op::new("adding an API key")
            .unique(conflict("API key", prefix))
            .foreign_key(not_found("user", format!("#{user_id}")));
        query(&sql, params, op).one::<ApiKeyRow>(self).await
    }

    async fn authenticate_api_key(
        &self,
        key_sha256: &str,
        now: i64,
        session_idle_ms: i64,
    ) -> Result<Option<(ApiKey, User)>> {
        const OP: &str = "checking an API key";
        // Reads only, in the common case: the use time is written when the
        // recorded one is older than the grain (see `crate::api_key_use_grain_ms`),
        // not on every request, which made every API call a write.
        // The key and its user in one read (each read is a round trip).
        let sql = select::<ApiKeyWithUserRow>(
            "FROM api_keys JOIN users ON users.id = api_keys.user_id \
             WHERE api_keys.key_sha256 = ? AND api_keys.revoked = FALSE AND users.disabled = FALSE \
             AND (api_keys.session = FALSE \
                  OR COALESCE(api_keys.last_used_at, api_keys.created_at) >= ?)",
        );
        let idle_since = now.saturating_sub(session_idle_ms);
        let params = params![key_sha256.to_ascii_lowercase(), idle_since];
        let Some((mut key, user)) = query(&sql, params, OP)
            .optional::<ApiKeyWithUserRow>(self)
            .await?
        else {
            return Ok(None);
        };
        let grain = crate::api_key_use_grain_ms(session_idle_ms);
        if key
            .last_used_at
            .is_none_or(|t| t < now.saturating_sub(grain))
        {
            // Revoked meanwhile: refused, and not marked used.
            let n = query(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? AND revoked = FALSE",
                params![now, key.id],
                OP,
            )
            .execute(self)
            .await?;
            if n == 0 {
                return Ok(None);
            }
            key.last_used_at = Some(now);
        }
        Ok(Some((key, user)))
    }

    async fn list_api_keys(&self, user_id: Option<i64>) -> Result<Vec<ApiKey>> {
        let sql = select::<ApiKeyRow>("FROM api_keys WHERE ? IS NULL OR user_id = ? ORDER BY id");
        query(&sql, params![user_id, user_id], "listing API keys")
            .all::<ApiKeyRow>(self)
            .await
    }

    async fn api_key(&self, id: i64) -> Result<Option<ApiKey>> {
        let sql = select::<ApiKeyRow>("FROM api_keys WHERE id = ?");
        query(&sql, params![id], "looking up an API key")
            .optional::<ApiKeyRow>(self)
            .await
    }

    async fn revoke_api_key(&self, id: i64) -> Result<()> {
        let sql = "UPDATE api_keys SET revoked = TRUE WHERE id = ?";
        let n = query(sql, params![id], "revoking an API key")
            .execute(self)
            .await?;
        expect_rows(n, not_found("API key", format!("#{id}")))
    }

    // Roles, teams and grants.

    async fn create_role(&self, role: &Role) -> Result<Role> {
        require_name("role", &role.name)?;
        let names: Vec<&str> = role.permissions.iter().map(|p| p.name()).collect();
        let sql = returning::<RoleRow>(
            "INSERT INTO roles (name, description, permissions, created_at) VALUES (?, ?, ?, ?)",
        );
        let params = params![&role.name, &role.description, json_text(&names)?, now_ms()];
        let op = Op::new("adding a role").unique(conflict("role", &role.name));
        query(&sql, params, op).one::<RoleRow>(self).await
    }

    async fn list_roles(&self) -> Result<Vec<Role>> {
        let sql = select::<RoleRow>("FROM roles ORDER BY name");
        query(&sql, params![], "listing roles")
            .all::<RoleRow>(self)
            .await
    }

    async fn create_team(
        &self,
        space_id: Option<i64>,
        name: &str,
        description: &str,
    ) -> Result<Team> {
        const OP: &str = "adding a team";
        require_name("team", name)?;
        let mut tx = write_tx(self, OP).await?;
        let sql =
            "INSERT INTO teams (space_id, name, description, created_at) VALUES (?, ?, ?, ?) \
                   RETURNING id";
        let op = Op::new(OP)
            .unique(conflict("team", name))
            .foreign_key(not_found("space", format!("#{}", space_id.unwrap_or(0))));
        let id = query(sql, params![space_id, name, description, now_ms()], op)
            .value::<i64>(&mut *tx)
            .await?;
        let team = query_teams(&mut tx, self.dialect(), "WHERE t.id = ?", params![id])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Database(format!("{OP}: team '{name}' vanished")))?;
        tx.commit().await.ctx(OP)?;
        Ok(team)
    }

    async fn list_teams(&self, space_id: Option<i64>) -> Result<Vec<Team>> {
        const OP: &str = "listing teams";
        let mut tx = read_tx(self, OP).await?;
        let teams = match space_id {
            Some(id) => {
                let sql = "WHERE t.space_id IS NULL OR t.space_id = ?";
                query_teams(&mut tx, self.dialect(), sql, params![id]).await?
            }
            None => query_teams(&mut tx, self.dialect(), "", params![]).await?,
        };
        tx.commit().await.ctx(OP)?;
        Ok(teams)
    }

    async fn team(&self, id: i64) -> Result<Option<Team>> {
        const OP: &str = "looking up a team";
        let mut tx = read_tx(self, OP).await?;
        let team = query_teams(&mut tx, self.dialect(), "WHERE t.id = ?", params![id])
            .await?
            .into_iter()
            .next();
        tx.commit().await.ctx(OP)?;
        Ok(team)
    }

    async fn delete_team(&self, id: i64) -> Result<()> {
        const OP: &str = "deleting a team";
        let mut tx = write_tx(self, OP).await?;
        let team = query_teams(&mut tx, self.dialect(), "WHERE t.id = ?", params![id])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| not_found("team", format!("#{id}")))?;
        if team.built_in {
            return Err(invalid(format!(
                "team '{}' is built in and cannot be deleted; remove its members instead",
                team.name
            )));
        }
        query("DELETE FROM teams WHERE id = ?", params![id], OP)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.ctx(OP)
    }

    async fn add_team_member(&self, team_id: i64, user_id: i64) -> Result<()> {
        let sql =
            "INSERT INTO team_members (team_id, user_id) VALUES (?, ?) ON CONFLICT DO NOTHING";
        let op = Op::new("adding a team member")
            .foreign_key(not_found("team or user", format!("#{team_id}/#{user_id}")));
        query(sql, params![team_id, user_id], op)
            .execute(self)
            .await
            .map(drop)
    }

    async fn remove_team_member(&self, team_id: i64, user_id: i64) -> Result<()> {
        let sql = "DELETE FROM team_members WHERE team_id = ? AND user_id = ?";
        let n = query(sql, params![team_id, user_id], "removing a team member")
            .execute(self)
            .await?;
        expect_rows(n, not_found("team member", format!("#{user_id}")))
    }

    async fn add_grant(
        &self,
        team_id: i64,
        role: &str,
        space_id: Option<i64>,
        environments: &[String],
        tenants: &[String],
    ) -> Result<Grant> {
        const OP: &str = "giving a team a role";
        require_name("role", role)?;
        let mut tx = write_tx(self, OP).await?;
        let (environment_ids, tenant_ids) = match space_id {
            Some(space) => (
                ids_by_name(&mut tx, space, "environment", environments).await?,
                ids_by_name(&mut tx, space, "tenant", tenants).await?,
            ),
            None if environments.is_empty() && tenants.is_empty() => (Vec::new(), Vec::new()),
            None => {
                return Err(invalid(
                    "a grant in every space cannot be narrowed to environments or tenants: \
                     give it in one space",
                ))
            }
        };
        let sql = "INSERT INTO grants (team_id, role, space_id, created_at) VALUES (?, ?, ?, ?) \
                   RETURNING id";
        let op = Op::new(OP).foreign_key(not_found("team", format!("#{team_id}")));
        let id = query(sql, params![team_id, role, space_id, now_ms()], op)
            .value::<i64>(&mut *tx)
            .await?;
        for (table, column, ids) in [
            ("grant_environments", "environment_id", &environment_ids),
            ("grant_tenants", "tenant_id", &tenant_ids),
        ] {
            let sql = format!(
                "INSERT INTO {table} (grant_id, {column}) SELECT ?, value FROM {} \
                 WHERE true ON CONFLICT DO NOTHING",
                self.dialect().ids
            );
            query(&sql, params![id, Value::ids(ids)], OP)
                .execute(&mut *tx)
                .await?;
        }
        let grant = query_grants(&mut tx, self.dialect(), "WHERE g.id = ?", params![id])
            .await?
            .remove(&team_id)
            .and_then(|mut g| g.pop())
            .ok_or_else(|| StoreError::Database(format!("{OP}: grant #{id} vanished")))?;
        tx.commit().await.ctx(OP)?;
        Ok(grant)
    }

    async fn remove_grant(&self, team_id: i64, grant_id: i64) -> Result<()> {
        let sql = "DELETE FROM grants WHERE team_id = ? AND id = ?";
        let n = query(sql, params![team_id, grant_id], "removing a grant")
            .execute(self)
            .await?;
        expect_rows(n, not_found("grant", format!("#{grant_id}")))
    }

    async fn grants_of_user(&self, user_id: i64) -> Result<Vec<Grant>> {
        const OP: &str = "loading a user's grants";
        let mut tx = read_tx(self, OP).await?;
        let sql = "WHERE g.team_id IN (SELECT team_id FROM team_members WHERE user_id = ?)";
        let grants = query_grants(&mut tx, self.dialect(), sql, params![user_id]).await?;
        tx.commit().await.ctx(OP)?;
        let mut all: Vec<Grant> = grants.into_values().flatten().collect();
        all.sort_by_key(|g| g.id);
        Ok(all)
    }

    // The audit log.

    async fn append_audit(&self, e: &NewAuditEvent) -> Result<()> {
        query(
            AUDIT_INSERT,
            audit_params(e, Some(&e.object)),
            "recording an audit event",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditEvent>> {
        let sql = select::<AuditRow>(&format!(
            "FROM audit_events WHERE \
             ((? IS NULL AND (space_id IS NOT NULL OR ?)) OR space_id = ? OR (? AND space_id IS NULL)) \
             AND (? IS NULL OR {} = ?) AND (? IS NULL OR at >= ?) \
             ORDER BY id DESC LIMIT ?",
            (self.dialect().nocase)("username")
        ));
        let params = params![
            f.space_id,
            f.include_system,
            f.space_id,
            f.include_system,
            &f.username,
            &f.username,
            f.since,
            f.since,
            f.limit,
        ];
        query(&sql, params, "listing audit events")
            .all::<AuditRow>(self)
            .await
    }

    // Server nodes.

    async fn node_heartbeat(&self, b: &NodeBeat) -> Result<Node> {
        require_name("node", &b.name)?;
        let sql = returning::<NodeRow>(
            "INSERT INTO nodes (name, started_at, last_seen, task_cap, running_tasks, running_steps) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at, \
             last_seen = excluded.last_seen, task_cap = excluded.task_cap, \
             running_tasks = excluded.running_tasks, running_steps = excluded.running_steps",
        );
        let params = params![
            &b.name,
            b.started_at,
            b.at,
            b.task_cap,
            b.running_tasks,
            b.running_steps
        ];
        query(&sql, params, "recording a node's heartbeat")
            .one::<NodeRow>(self)
            .await
    }

    async fn list_nodes(&self) -> Result<Vec<Node>> {
        let sql = select::<NodeRow>("FROM nodes ORDER BY name");
        query(&sql, params![], "listing nodes")
            .all::<NodeRow>(self)
            .await
    }

    async fn node(&self, name: &str) -> Result<Option<Node>> {
        let sql = select::<NodeRow>("FROM nodes WHERE name = ?");
        query(&sql, params![name], "reading a node")
            .optional::<NodeRow>(self)
            .await
    }

    async fn set_node_draining(&self, name: &str, draining: bool) -> Result<Node> {
        let sql = returning::<NodeRow>("UPDATE nodes SET draining = ? WHERE name = ?");
        query(&sql, params![draining, name], "draining a node")
            .optional::<NodeRow>(self)
            .await?
            .ok_or_else(|| not_found("node", name))
    }

    async fn claim_task(&self, task_id: &str, node: &str, now: i64) -> Result<bool> {
        let offline_before = now.saturating_sub(crate::NODE_OFFLINE_AFTER_MS);
        query(
            CLAIM_TASK,
            params![node, task_id, node, offline_before],
            "taking a task for a node",
        )
        .execute(self)
        .await
        .map(|changed| changed == 1)
    }

    async fn claim_task_row(&self, task_id: &str, node: &str, now: i64) -> Result<Option<Task>> {
        let offline_before = now.saturating_sub(crate::NODE_OFFLINE_AFTER_MS);
        query(
            &returning::<TaskRow>(CLAIM_TASK),
            params![node, task_id, node, offline_before],
            "taking a task for a node",
        )
        .optional::<TaskRow>(self)
        .await
    }

    async fn lease(&self, name: &str, holder: &str, now: i64, ttl_ms: i64) -> Result<bool> {
        let sql = "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?) \
                   ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until \
                   WHERE leases.holder = excluded.holder OR leases.until < ?";
        let until = now.saturating_add(ttl_ms);
        query(
            sql,
            params![name, holder, until, now],
            "taking a cluster-wide lease",
        )
        .execute(self)
        .await
        .map(|changed| changed == 1)
    }

    // Settings.

    async fn setting(&self, name: &str) -> Result<Option<String>> {
        query(
            "SELECT value FROM settings WHERE name = ?",
            params![name],
            "reading a setting",
        )
        .scalar::<String>(self)
        .await
    }

    async fn set_setting(&self, name: &str, value: &str) -> Result<()> {
        let sql = "INSERT INTO settings (name, value) VALUES (?, ?) \
                   ON CONFLICT (name) DO UPDATE SET value = excluded.value";
        query(sql, params![name, value], "saving a setting")
            .execute(self)
            .await
            .map(drop)
    }

    // Environments and tenants.

    async fn create_environment(
        &self,
        space_id: i64,
        name: &str,
        description: &str,
    ) -> Result<Environment> {
        require_name("environment", name)?;
        let sql = returning::<EnvironmentRow>(
            "INSERT INTO environments (space_id, name, description, sort_order, created_at) \
             VALUES (?, ?, ?, (SELECT COALESCE(MAX(sort_order), 0) + 1 FROM environments \
             WHERE space_id = ?), ?)",
        );
        let op = Op::new("adding an environment")
            .unique(conflict("environment", name))
            .foreign_key(not_found("space", format!("#{space_id}")));
        query(
            &sql,
            params![space_id, name, description, space_id, now_ms()],
            op,
        )
        .one::<EnvironmentRow>(self)
        .await
    }

    async fn list_environments(&self, space_id: i64) -> Result<Vec<Environment>> {
        let sql = select::<EnvironmentRow>(
            "FROM environments WHERE space_id = ? ORDER BY sort_order, name, id",
        );
        query(&sql, params![space_id], "listing environments")
            .all::<EnvironmentRow>(self)
            .await
    }

    async fn environment(&self, space_id: i64, name: &str) -> Result<Option<Environment>> {
        let op = "looking up an environment";
        by_space_key::<EnvironmentRow>(self, "environments", space_id, "name", name, op).await
    }

    async fn delete_environment(&self, space_id: i64, name: &str) -> Result<()> {
        const OP: &str = "deleting an environment";
        let mut tx = write_tx(self, OP).await?;
        let env =
            by_space_key::<EnvironmentRow>(&mut *tx, "environments", space_id, "name", name, OP)
                .await?
                .ok_or_else(|| not_found("environment", name))?;
        let sql = "SELECT m.name FROM machine_environments me \
                   JOIN machines m ON m.id = me.machine_id \
                   WHERE me.environment_id = ? ORDER BY m.name";
        let users = query(sql, params![env.id], OP)
            .scalars::<String>(&mut *tx)
            .await?;
        if !users.is_empty() {
            return Err(environment_in_use(&env.name, &users));
        }
        let sql = "SELECT DISTINCT t.name FROM grant_environments ge JOIN grants g ON g.id = ge.grant_id \
                   JOIN teams t ON t.id = g.team_id WHERE ge.environment_id = ? ORDER BY t.name";
        let teams = query(sql, params![env.id], OP)
            .scalars::<String>(&mut *tx)
            .await?;
        if !teams.is_empty() {
            return Err(invalid(format!(
                "environment '{}' narrows role grants of team(s) {}; revoke those grants first \
                 (`octopus team show TEAM`, then `octopus team revoke TEAM GRANT_ID`), as deleting \
                 it would widen them",
                env.name,
                name_list(&teams)
            )));
        }
        let op = Op::new(OP).foreign_key(environment_still_used(&env.name));
        query("DELETE FROM environments WHERE id = ?", params![env.id], op)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.ctx(OP)
    }

    async fn update_environment(
        &self,
        space_id: i64,
        name: &str,
        new_name: &str,
        description: &str,
    ) -> Result<Environment> {
        require_name("environment", new_name)?;
        let sql = returning::<EnvironmentRow>(
            "UPDATE environments SET name = ?, description = ? WHERE space_id = ? AND name = ?",
        );
        let op = Op::new("changing an environment").unique(conflict("environment", new_name));
        query(&sql, params![new_name, description, space_id, name], op)
            .optional::<EnvironmentRow>(self)
            .await?
            .ok_or_else(|| not_found("environment", name))
    }

    async fn move_environment(&self, space_id: i64, name: &str, position: u32) -> Result<()> {
        const OP: &str = "moving an environment";
        let mut tx = write_tx(self, OP).await?;
        let sql = format!(
            "SELECT name FROM environments WHERE space_id = ? ORDER BY sort_order, name, id{}",
            self.dialect().for_update
        );
        let mut names = query(&sql, params![space_id], OP)
            .scalars::<String>(&mut *tx)
            .await?;
        let at = names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))
            .ok_or_else(|| not_found("environment", name))?;
        let moved = names.remove(at);
        let to = usize::try_from(position)
            .unwrap_or(usize::MAX)
            .min(names.len());
        names.insert(to, moved);
        let sql = "UPDATE environments SET sort_order = ? WHERE space_id = ? AND name = ?";
        for (i, n) in names.iter().enumerate() {
            let order = i64::try_from(i).unwrap_or(i64::MAX);
            query(sql, params![order, space_id, n], OP)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await.ctx(OP)
    }

    async fn create_tenant(&self, space_id: i64, name: &str, tags: &[String]) -> Result<Tenant> {
        const OP: &str = "adding a tenant";
        check_new_tenant(name, tags)?;
        let mut tx = write_tx(self, OP).await?;
        let sql = returning::<TenantRow>(
            "INSERT INTO tenants (space_id, name, created_at) VALUES (?, ?, ?)",
        );
        let op = Op::new(OP).unique(conflict("tenant", name));
        let mut tenant = query(&sql, params![space_id, name, now_ms()], op)
            .one::<TenantRow>(&mut *tx)
            .await?;
        let sql = "INSERT INTO tenant_tags (tenant_id, tag) VALUES (?, ?) ON CONFLICT DO NOTHING";
        for tag in tags {
            query(sql, params![tenant.id, tag], OP)
                .execute(&mut *tx)
                .await?;
        }
        let mut tags = tenant_tags(&mut tx, Some(tenant.id)).await?;
        tenant.tags = tags.remove(&tenant.id).unwrap_or_default();
        tx.commit().await.ctx(OP)?;
        Ok(tenant)
    }

    async fn list_tenants(&self, space_id: i64) -> Result<Vec<Tenant>> {
        const OP: &str = "listing tenants";
        let mut tx = read_tx(self, OP).await?;
        let sql = select::<TenantRow>("FROM tenants WHERE space_id = ? ORDER BY name, id");
        let mut tenants = query(&sql, params![space_id], OP)
            .all::<TenantRow>(&mut *tx)
            .await?;
        let mut tags = tenant_tags(&mut tx, None).await?;
        tx.commit().await.ctx(OP)?;
        for t in &mut tenants {
            t.tags = tags.remove(&t.id).unwrap_or_default();
        }
        Ok(tenants)
    }

    // Machine policies.

    async fn policy(&self, space_id: i64, name: &str) -> Result<Option<MachinePolicy>> {
        let op = "looking up a machine policy";
        by_space_key::<PolicyRow>(self, "machine_policies", space_id, "name", name, op).await
    }

    async fn list_policies(&self, space_id: i64) -> Result<Vec<MachinePolicy>> {
        let sql = select::<PolicyRow>("FROM machine_policies WHERE space_id = ? ORDER BY name, id");
        query(&sql, params![space_id], "listing machine policies")
            .all::<PolicyRow>(self)
            .await
    }

    // Machines.

    async fn create_machine(&self, m: &NewMachine) -> Result<Machine> {
        save_machine(self, m, false).await
    }

    async fn replace_machine(&self, m: &NewMachine) -> Result<Machine> {
        save_machine(self, m, true).await
    }

    async fn machine(&self, space_id: i64, name: &str) -> Result<Option<Machine>> {
        let sql = "WHERE m.space_id = ? AND m.name = ?";
        let op = "looking up a machine";
        let ms = read_machines(self, op, sql, params![space_id, name]).await?;
        Ok(ms.into_iter().next())
    }

    async fn machine_by_id(&self, id: i64) -> Result<Option<Machine>> {
        let ms = read_machines(self, "looking up a machine", "WHERE m.id = ?", params![id]).await?;
        Ok(ms.into_iter().next())
    }

    async fn machines_by_thumbprint(
        &self,
        space_id: Option<i64>,
        thumbprint: &str,
    ) -> Result<Vec<Machine>> {
        let op = "looking up machines by thumbprint";
        let params = params![normal_thumbprint(thumbprint), space_id, space_id];
        let sql = "WHERE m.thumbprint = ? AND (? IS NULL OR m.space_id = ?)";
        read_machines(self, op, sql, params).await
    }

    async fn offer_machine_thumbprint(&self, current: &str, next: &str) -> Result<Vec<Machine>> {
        const OP: &str = "recording a machine's next certificate";
        let (current, next) = (normal_thumbprint(current), normal_thumbprint(next));
        let d = self.dialect();
        let mut tx = write_tx(self, OP).await?;
        let sql = "WHERE (m.thumbprint = ? OR m.next_thumbprint = ?) AND m.thumbprint <> ?";
        let others = query_machines(&mut tx, d, sql, params![&next, &next, &current]).await?;
        if let Some(other) = others.first() {
            return Err(StoreError::Invalid(format!(
                "thumbprint {next} belongs to machine '{}', another tentacle: a certificate cannot be shared (cloned machine image?)",
                other.name
            )));
        }
        let sql = "UPDATE machines SET next_thumbprint = ? WHERE thumbprint = ?";
        query(sql, params![&next, &current], OP)
            .execute(&mut *tx)
            .await?;
        let machines =
            query_machines(&mut tx, d, "WHERE m.thumbprint = ?", params![&current]).await?;
        tx.commit().await.ctx(OP)?;
        Ok(machines)
    }

    async fn promote_machine_thumbprint(&self, next: &str) -> Result<Vec<Machine>> {
        const OP: &str = "making a machine's next certificate its own";
        let next = normal_thumbprint(next);
        let d = self.dialect();
        // Asked on every connection a tentacle opens, and almost always
        // answered "none": that answer is a read (indexed), which takes no
        // write lock; a rotation found is done in a write transaction.
        const LOOKUP: &str = "WHERE m.next_thumbprint = ?";
        if read_machines(self, OP, LOOKUP, params![&next])
            .await?
            .is_empty()
        {
            return Ok(Vec::new());
        }
        let mut tx = write_tx(self, OP).await?;
        let before = query_machines(&mut tx, d, LOOKUP, params![&next]).await?;
        let sql = "UPDATE machines SET thumbprint = next_thumbprint, next_thumbprint = NULL \
                   WHERE next_thumbprint = ?";
        query(sql, params![&next], OP).execute(&mut *tx).await?;
        tx.commit().await.ctx(OP)?;
        Ok(before)
    }

    async fn list_machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>> {
        let (sql, params) = machine_conditions(self.dialect(), filter);
        read_machines(self, "listing machines", &sql, params).await
    }

    async fn machine_page(&self, q: &MachineQuery) -> Result<(Vec<Machine>, i64)> {
        const OP: &str = "listing a page of machines";
        let mut tx = read_tx(self, OP).await?;
        let (sql, params) = page_conditions(self.dialect(), q);
        let count_sql = format!("SELECT COUNT(*) FROM machines m {sql}");
        let total = query(&count_sql, params, OP).value::<i64>(&mut *tx).await?;
        let (sql, params) = page_conditions(self.dialect(), q);
        let page = format!(
            "LIMIT {} OFFSET {}",
            q.limit.clamp(0, 10_000),
            q.offset.max(0)
        );
        let machines = query_machines_paged(&mut tx, self.dialect(), &sql, params, &page).await?;
        tx.commit().await.ctx(OP)?;
        Ok((machines, total))
    }

    async fn delete_machine(&self, space_id: i64, name: &str) -> Result<()> {
        let sql = "DELETE FROM machines WHERE space_id = ? AND name = ?";
        let n = query(sql, params![space_id, name], "deleting a machine")
            .execute(self)
            .await?;
        expect_rows(n, not_found("machine", name))
    }

    async fn update_machine(&self, id: i64, u: &MachineUpdate) -> Result<Machine> {
        const OP: &str = "changing a machine";
        let mut tx = write_tx(self, OP).await?;
        // Locked: two changes at once must not each keep what the other set.
        let sql = format!(
            "SELECT id FROM machines WHERE id = ?{}",
            self.dialect().for_update
        );
        query(&sql, params![id], OP)
            .scalar::<i64>(&mut *tx)
            .await?
            .ok_or_else(|| not_found("machine", format!("#{id}")))?;
        let current = query_machines(&mut tx, self.dialect(), "WHERE m.id = ?", params![id])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| not_found("machine", format!("#{id}")))?;
        let new = NewMachine {
            space_id: current.space_id,
            name: current.name.clone(),
            kind: current.kind,
            uri: current.uri.clone(),
            thumbprint: current.thumbprint.clone(),
            environments: u.environments.clone().unwrap_or(current.environments),
            roles: u.roles.clone().unwrap_or(current.roles),
            tenants: u.tenants.clone().unwrap_or(current.tenants),
            tenant_tags: u.tenant_tags.clone().unwrap_or(current.tenant_tags),
            policy: Some(u.policy.clone().unwrap_or(current.policy)),
            worker_pool: current.worker_pool.clone(),
        };
        check_new_machine(&new)?;
        let refs = resolve_refs(&mut tx, &new).await?;
        let sql = "UPDATE machines SET policy_id = ?, disabled = ? WHERE id = ?";
        let disabled = u.disabled.unwrap_or(current.disabled);
        query(sql, params![refs.policy_id, disabled, id], OP)
            .execute(&mut *tx)
            .await?;
        write_links(&mut tx, self.dialect(), id, &new, &refs).await?;
        let machine = query_machines(&mut tx, self.dialect(), "WHERE m.id = ?", params![id])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| not_found("machine", format!("#{id}")))?;
        tx.commit().await.ctx(OP)?;
        Ok(machine)
    }

    async fn record_health(&self, machine_id: i64, h: &HealthUpdate) -> Result<()> {
        const OP: &str = "recording a health check";
        // A result older than the one stored (a slow check finishing late) is ignored;
        // versions are kept when a check could not learn them.
        let sql = "UPDATE machines SET status = ?, status_reason = ?, last_health_at = ?, \
                   tentacle_version = COALESCE(?, tentacle_version), tool_version = COALESCE(?, tool_version), \
                   os = COALESCE(?, os), free_bytes = COALESCE(?, free_bytes) \
                   WHERE id = ? AND (last_health_at IS NULL OR last_health_at <= ?)";
        let params = params![
            h.status.text(),
            &h.reason,
            h.at,
            &h.tentacle_version,
            &h.tool_version,
            &h.os,
            h.free_bytes,
            machine_id,
            h.at,
        ];
        if query(sql, params, OP).execute(self).await? > 0 {
            return Ok(());
        }
        let sql = "SELECT id FROM machines WHERE id = ?";
        let exists = query(sql, params![machine_id], OP)
            .scalar::<i64>(self)
            .await?;
        exists
            .map(drop)
            .ok_or_else(|| not_found("machine", format!("#{machine_id}")))
    }

    // Tasks.

    async fn create_task_with_steps(&self, t: &NewTask, now: i64) -> Result<(Task, Vec<TaskStep>)> {
        const OP: &str = "adding a task";
        let d = self.dialect();
        let arguments = arguments_text(&t.arguments)?;
        let environments = json_text(&t.environments)?;
        let machine_ids = distinct_ids(&t.machine_ids);
        // The counter moves on, and the task takes its number (its id is
        // [`task_id`]'s, made in SQL) only when every machine named still
        // exists; its steps (each machine's name from its row, the ticket as
        // `ticket` makes it), its secrets and its record only with it.
        // Otherwise nothing but the counter is written, and that number is
        // never used.
        //
        // Where writes hold the whole database (SQLite): statements of one
        // transaction, sent together (the BEGIN, these and the COMMIT in one
        // call), each reading the task back by the counter's value.
        // Elsewhere (PostgreSQL): one statement, whose parts read the counter
        // and the task from the parts before them (`c` and `t`): one round
        // trip rather than six.
        let (counter, task) = if d.serial_writes {
            (
                "counters c WHERE c.name = 'task'".to_string(),
                format!(
                    "tasks t WHERE t.id = (SELECT '{TASK_ID_PREFIX}' || value FROM counters \
                     WHERE name = 'task')"
                ),
            )
        } else {
            ("c WHERE TRUE".to_string(), "t WHERE TRUE".to_string())
        };
        let mut batch = Batch::default();
        let mut insert_task = format!(
            "INSERT INTO tasks (id, seq, space_id, environments, kind, description, state, \
             arguments, created_at) SELECT '{TASK_ID_PREFIX}' || c.value, c.value, ?, ?, ?, ?, \
             'Queued', ?, ? FROM {counter}"
        );
        let mut task_params = params![
            t.space_id,
            &environments,
            &t.kind,
            &t.description,
            &arguments,
            now
        ];
        if !machine_ids.is_empty() {
            insert_task.push_str(&format!(
                " AND (SELECT COUNT(*) FROM machines WHERE id IN ({})) = ?",
                id_list(d)
            ));
            let wanted = i64::try_from(machine_ids.len()).unwrap_or(i64::MAX);
            task_params = task_params.and(Value::ids(&machine_ids)).and(wanted);
        }
        batch.push(returning::<TaskRow>(&insert_task), task_params);
        if !machine_ids.is_empty() {
            batch.push(
                returning::<StepRow>(&format!(
                    "INSERT INTO task_steps (task_id, machine_id, machine_name, state, ticket) \
                     SELECT t.id, m.id, m.name, 'Queued', t.id || '-m' || m.id \
                     FROM machines m, {task} AND m.id IN ({})",
                    id_list(d)
                )),
                params![Value::ids(&machine_ids)],
            );
        }
        for (name, ciphertext) in &t.secrets {
            batch.push(
                format!(
                    "INSERT INTO task_secrets (task_id, name, ciphertext) SELECT t.id, ?, ? FROM {task}"
                ),
                params![name, ciphertext],
            );
        }
        if let Some(e) = &t.audit {
            batch.push(
                format!(
                    "INSERT INTO audit_events (at, user_id, username, source, action, kind, \
                     object, space_id, space, details) \
                     SELECT ?, ?, ?, ?, ?, ?, t.id, ?, (SELECT name FROM spaces WHERE id = ?), ? \
                     FROM {task}"
                ),
                audit_params(e, None),
            );
        }
        let created = if d.serial_writes {
            batch.statements.insert(
                0,
                (
                    "UPDATE counters SET value = value + 1 WHERE name = 'task'".into(),
                    params![],
                ),
            );
            let tx = write_tx(self, OP).await?;
            // Not held across an await (rows are not Sync).
            let rows = batch.rows_committed(tx, d, OP).await?;
            if rows.is_empty() {
                None
            } else {
                Some(task_and_steps(&rows, OP)?)
            }
        } else {
            task_creation_statement(self, batch, !machine_ids.is_empty(), OP).await?
        };
        let Some((task, mut steps)) = created else {
            return Err(missing_machine_of(self, &machine_ids, OP).await);
        };
        debug_assert_eq!(steps.len(), machine_ids.len());
        debug_assert!(steps
            .iter()
            .all(|s| s.ticket == ticket(&task.id, s.machine_id)));
        // As `task_steps` orders them.
        steps.sort_by(|a, b| {
            let name = |s: &TaskStep| s.machine_name.to_ascii_lowercase();
            name(a).cmp(&name(b)).then(a.machine_id.cmp(&b.machine_id))
        });
        Ok((task, steps))
    }

    async fn task(&self, id: &str) -> Result<Option<Task>> {
        by_key::<TaskRow>(self, "tasks", "id", id, "looking up a task").await
    }

    async fn list_tasks(&self, space_id: Option<i64>, limit: i64) -> Result<Vec<Task>> {
        let sql = select::<TaskRow>(
            "FROM tasks WHERE (? IS NULL OR space_id = ?) ORDER BY seq DESC LIMIT ?",
        );
        query(&sql, params![space_id, space_id, limit], "listing tasks")
            .all::<TaskRow>(self)
            .await
    }

    async fn task_page(&self, q: &TaskQuery) -> Result<(Vec<Task>, i64)> {
        const OP: &str = "listing a page of tasks";
        let d = self.dialect();
        let environments = (d.json_rows)("t.environments", "je");
        let build = || -> (String, Params<'static>) {
            let mut sql = String::from("WHERE (? IS NULL OR t.space_id = ?)");
            let mut params = params![q.space_id, q.space_id];
            if !q.states.is_empty() {
                let states: Vec<&str> = q.states.iter().map(|s| s.text()).collect();
                sql.push_str(&format!(" AND t.state IN ({})", text_list(d)));
                params = params.and(Value::texts(&states));
            }
            if let Some(kind) = q.kind.as_deref().filter(|k| !k.is_empty()) {
                sql.push_str(" AND t.kind = ?");
                params = params.and(kind.to_string());
            }
            if let Some(machine) = q.machine.as_deref().filter(|m| !m.is_empty()) {
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM task_steps st WHERE st.task_id = t.id \
                     AND {} = ?)",
                    (d.nocase)("st.machine_name")
                ));
                params = params.and(machine.to_string());
            }
            if let Some(env) = q.environment.as_deref().filter(|e| !e.is_empty()) {
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM {environments} WHERE {} = ?)",
                    (d.nocase)("je.value")
                ));
                params = params.and(env.to_string());
            }
            if let Some(envs) = &q.visible_environments {
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM {environments} WHERE {})",
                    nocase_in(d, "je.value")
                ));
                params = params.and(Value::texts(envs));
            }
            (sql, params)
        };
        let mut tx = read_tx(self, OP).await?;
        let (sql, params) = build();
        let total = query(&format!("SELECT COUNT(*) FROM tasks t {sql}"), params, OP)
            .value::<i64>(&mut *tx)
            .await?;
        let (sql, params) = build();
        let columns = <TaskRow as Row>::COLUMNS
            .split(", ")
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let page = format!(
            "SELECT {columns} FROM tasks t {sql} ORDER BY t.seq DESC LIMIT {} OFFSET {}",
            q.limit.clamp(0, 10_000),
            q.offset.max(0)
        );
        let tasks = query(&page, params, OP).all::<TaskRow>(&mut *tx).await?;
        tx.commit().await.ctx(OP)?;
        Ok((tasks, total))
    }

    async fn unfinished_tasks(&self) -> Result<Vec<Task>> {
        let sql = select::<TaskRow>(&format!(
            "FROM tasks WHERE state IN {UNFINISHED_STATES} ORDER BY seq DESC"
        ));
        query(&sql, params![], "listing unfinished tasks")
            .all::<TaskRow>(self)
            .await
    }

    async fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        const OP: &str = "changing a task's state";
        // One statement while the task is unfinished (every change is allowed
        // then); a final state never changes again, so when nothing changed,
        // reading the state afterwards says why without a race.
        // started_at is set once, when it starts executing; completed_at when it ends.
        let (sql, params) = task_state_change(id, state, error, now);
        if query(&sql, params, OP).execute(self).await? == 1 {
            return Ok(());
        }
        let current = query("SELECT state FROM tasks WHERE id = ?", params![id], OP)
            .scalar::<String>(self)
            .await?
            .ok_or_else(|| not_found("task", id))?;
        task_transition(id, TaskState::from_text(&current)?, state).map(drop)
    }

    async fn set_task_state_logged(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
        line: &NewLogLine,
    ) -> Result<()> {
        const OP: &str = "changing a task's state and logging it";
        if !self.dialect().serial_writes {
            // The change locks the task's row, as `append_log` does, so that
            // its line's id grows in the order it is committed; one statement.
            let (change, params) = task_state_change(id, state, error, now);
            let gate = (format!("{change} RETURNING id"), params);
            let write = gated_log_write(gate, id, &[line], Vec::new());
            if run_gated_log_write(self, write, id, OP).await? != Gated::Shut {
                return Ok(());
            }
            // Nothing changed (the task is finished or gone) and nothing was
            // written: done apart, which says why.
            self.append_log(id, std::slice::from_ref(line)).await?;
            return self.set_task_state(id, state, error, now).await;
        }
        let line = std::slice::from_ref(line);
        // Where writes hold the whole database (SQLite): both statements in
        // one call, each its own commit as when made apart (a transaction's
        // BEGIN and COMMIT would cost more than the commit they save), in
        // one hand-off to the database's thread rather than two.
        let (insert, mut params) = log_lines_insert(id, line);
        let (update, update_params) = task_state_change(id, state, error, now);
        params.0.extend(update_params.0);
        let sql = format!("{insert}; {update}");
        if query(&sql, params, log_lines_op(id)).execute(self).await? == 2 {
            return Ok(());
        }
        // The line is stored (a server line never collides) and the state
        // did not change: say why.
        self.set_task_state(id, state, error, now).await
    }

    async fn request_cancel(&self, id: &str) -> Result<()> {
        const OP: &str = "requesting a task's cancellation";
        let mut tx = write_tx(self, OP).await?;
        require_task(&mut tx, self.dialect(), id, OP).await?;
        // A finished task has nothing left to cancel.
        let sql = format!(
            "UPDATE tasks SET cancel_requested = TRUE WHERE id = ? AND state IN {UNFINISHED_STATES}"
        );
        query(&sql, params![id], OP).execute(&mut *tx).await?;
        tx.commit().await.ctx(OP)
    }

    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>> {
        let sql = select::<StepRow>(&format!(
            "FROM task_steps WHERE task_id = ? ORDER BY {}, machine_id",
            (self.dialect().nocase)("machine_name")
        ));
        query(&sql, params![task_id], "listing a task's steps")
            .all::<StepRow>(self)
            .await
    }

    async fn update_step(&self, step: &TaskStep) -> Result<()> {
        let (sql, params) = step_update(self.dialect(), step);
        let n = query(&sql, params, "updating a task step")
            .execute(self)
            .await?;
        expect_rows(n, step_not_found(step))
    }

    async fn update_step_logged(&self, step: &TaskStep, lines: &[NewLogLine]) -> Result<()> {
        const OP: &str = "updating a task step after its lines";
        let d = self.dialect();
        if lines.is_empty() || lines.iter().any(|l| l.sequence.is_some()) {
            self.append_log(&step.task_id, lines).await?;
            return self.update_step(step).await;
        }
        if !d.serial_writes && lines.len() <= LOG_ROWS_PER_INSERT {
            // One statement, so one commit (each waits for the write-ahead
            // log to reach the disk) and one round trip holding the task's
            // row: the row locked as `append_log` locks it, the lines, then
            // the step.
            let lines: Vec<&NewLogLine> = lines.iter().collect();
            let write = gated_log_write(
                task_lock(d, &step.task_id),
                &step.task_id,
                &lines,
                vec![step_update(d, step)],
            );
            return match run_gated_log_write(self, write, &step.task_id, OP).await? {
                Gated::Shut => Err(not_found("task", &step.task_id)),
                done if done.changed(0) => Ok(()),
                Gated::Open { .. } => Err(step_not_found(step)),
            };
        }
        if !d.serial_writes {
            // As above, in one transaction: more lines than one statement takes.
            let mut tx = write_tx(self, OP).await?;
            require_task(&mut tx, d, &step.task_id, OP).await?;
            for chunk in lines.chunks(LOG_ROWS_PER_INSERT) {
                insert_log_lines((&mut tx).into(), &step.task_id, chunk).await?;
            }
            let (sql, params) = step_update(d, step);
            let n = query(&sql, params, OP).execute(&mut *tx).await?;
            tx.commit().await.ctx(OP)?;
            return expect_rows(n, step_not_found(step));
        }
        if lines.len() > LOG_ROWS_PER_INSERT {
            self.append_log(&step.task_id, lines).await?;
            return self.update_step(step).await;
        }
        // As `set_task_state_logged`: one hand-off to the database's
        // thread for both statements, each its own commit.
        let (insert, mut params) = log_lines_insert(&step.task_id, lines);
        let (update, update_params) = step_update(self.dialect(), step);
        params.0.extend(update_params.0);
        let sql = format!("{insert}; {update}");
        let n = query(&sql, params, log_lines_op(&step.task_id))
            .execute(self)
            .await?;
        // The lines are stored (server lines never collide): one row more
        // says the step was there.
        expect_rows(n.saturating_sub(lines.len() as u64), step_not_found(step))
    }

    async fn start_task_with_step(
        &self,
        state: TaskState,
        now: i64,
        line: &NewLogLine,
        step: &TaskStep,
    ) -> (Result<()>, Result<()>) {
        let id = step.task_id.as_str();
        if !self.dialect().serial_writes {
            // The task's row locked, its line, its change and the step's:
            // one statement, as when made apart (the step is stored even
            // when the task's state cannot change).
            let op = "starting a task with its first step";
            return gated_state_and_step(self, op, &[line], step, (state, None, now)).await;
        }
        let parts = [
            TaskWrite::Lines(std::slice::from_ref(line)),
            TaskWrite::State(state, None, now),
            TaskWrite::Step(step),
        ];
        match serial_task_writes(self, id, &parts).await {
            Ok(true) => (Ok(()), Ok(())),
            // A line never collides: the task's change or the step did not
            // happen. Each part says why as when made apart.
            Ok(false) => (
                task_state_reached(self, id, state, None, now).await,
                step_exists(self, step).await,
            ),
            // Some statements may have been stored: the line is not written
            // again (it would be there twice).
            Err(e) => {
                let stepped = match self.task_step(id, step.machine_id).await {
                    Ok(Some(stored)) if stored.state == step.state => Ok(()),
                    _ => self.update_step(step).await,
                };
                (Err(e), stepped)
            }
        }
    }

    async fn finish_step_and_task(
        &self,
        step: &TaskStep,
        step_lines: &[NewLogLine],
        state: TaskState,
        error: Option<&str>,
        now: i64,
        line: &NewLogLine,
    ) -> (Result<()>, Result<()>) {
        let id = step.task_id.as_str();
        let server_lines = step_lines.iter().all(|l| l.sequence.is_none());
        if !self.dialect().serial_writes && server_lines && step_lines.len() < LOG_ROWS_PER_INSERT {
            // The task's row locked, the step's lines and the task's, the
            // step, and the task's change: one statement, as when made apart
            // (the step is stored even when the task's state cannot change;
            // every line is stored).
            let lines: Vec<&NewLogLine> = step_lines.iter().chain([line]).collect();
            let op = "ending a task with its last step";
            let (ended, stepped) =
                gated_state_and_step(self, op, &lines, step, (state, error, now)).await;
            return (stepped, ended);
        }
        if !self.dialect().serial_writes || !server_lines || step_lines.len() > LOG_ROWS_PER_INSERT
        {
            let stepped = self.update_step_logged(step, step_lines).await;
            let ended = self
                .set_task_state_logged(id, state, error, now, line)
                .await;
            return (stepped, ended);
        }
        let parts = [
            TaskWrite::Lines(step_lines),
            TaskWrite::Step(step),
            TaskWrite::Lines(std::slice::from_ref(line)),
            TaskWrite::State(state, error, now),
        ];
        match serial_task_writes(self, id, &parts).await {
            Ok(true) => (Ok(()), Ok(())),
            // Lines never collide: the step or the task's change did not
            // happen. Each part says why as when made apart.
            Ok(false) => (
                step_exists(self, step).await,
                task_state_reached(self, id, state, error, now).await,
            ),
            // Some statements may have been stored: the step's lines are not
            // written again (they would be there twice); the task's end is
            // made unless it is there already (a missing task says so).
            Err(e) => {
                let ended = match self.task(id).await {
                    Ok(Some(t)) if t.state == state => Ok(()),
                    _ => {
                        self.set_task_state_logged(id, state, error, now, line)
                            .await
                    }
                };
                (Err(e), ended)
            }
        }
    }

    async fn append_log(&self, task_id: &str, lines: &[NewLogLine]) -> Result<()> {
        const OP: &str = "appending to a task's log";
        if lines.is_empty() {
            return Ok(());
        }
        let d = self.dialect();
        let next = next_sequences(lines);
        // Server lines alone, where writes hold the whole database: one
        // statement, its own transaction (a missing task breaks the foreign key).
        if d.serial_writes && next.is_empty() && lines.len() <= LOG_ROWS_PER_INSERT {
            return insert_log_lines(self.into(), task_id, lines).await;
        }
        if !d.serial_writes && lines.len() <= LOG_ROWS_PER_INSERT {
            // The task's row locked (so that its lines' ids grow in the
            // order they are committed), the lines, and each machine's
            // resume point: one statement.
            let lines: Vec<&NewLogLine> = lines.iter().collect();
            let write = gated_log_write(
                task_lock(d, task_id),
                task_id,
                &lines,
                resume_points_update(d, task_id, &next)
                    .into_iter()
                    .collect(),
            );
            // A machine without a step has no resume point to move, as below.
            return match run_gated_log_write(self, write, task_id, OP).await? {
                Gated::Open { .. } => Ok(()),
                Gated::Shut => Err(not_found("task", task_id)),
            };
        }
        let mut tx = write_tx(self, OP).await?;
        // Locks the task's row where rows lock (PostgreSQL), so that its
        // lines' ids grow in the order they are committed.
        if !d.serial_writes {
            require_task(&mut tx, d, task_id, OP).await?;
        }
        for chunk in lines.chunks(LOG_ROWS_PER_INSERT) {
            insert_log_lines((&mut tx).into(), task_id, chunk).await?;
        }
        let sql = format!(
            "UPDATE task_steps SET next_sequence = {}(next_sequence, ?) \
             WHERE task_id = ? AND machine_id = ?",
            d.greatest
        );
        for (machine_id, next) in next {
            query(&sql, params![next, task_id, machine_id], OP)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await.ctx(OP)
    }

    async fn task_log(&self, task_id: &str, after_id: i64, limit: i64) -> Result<Vec<TaskLogLine>> {
        let sql =
            select::<LogLineRow>("FROM task_log WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?");
        let params = params![task_id, after_id, limit];
        query(&sql, params, "reading a task's log")
            .all::<LogLineRow>(self)
            .await
    }

    async fn task_with_log(
        &self,
        id: &str,
        after_id: i64,
        limit: i64,
    ) -> Result<Option<TaskWithLog>> {
        const OP: &str = "reading a task with its steps and log";
        let d = self.dialect();
        let lines_sql = "FROM task_log WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?";
        // Each row says whose it is (column `part`).
        let sql = if d.serial_writes {
            // Where writes hold the whole database (SQLite): one call of
            // three statements, in order: the lines read after the task, so
            // every line stored before the task's state as read is there.
            let steps_sql = format!(
                "FROM task_steps WHERE task_id = ? ORDER BY {}, machine_id",
                (d.nocase)("machine_name")
            );
            let parts = [
                (TaskRow::COLUMNS, "FROM tasks WHERE id = ?"),
                (StepRow::COLUMNS, steps_sql.as_str()),
                (LogLineRow::COLUMNS, lines_sql),
            ];
            let statements: Vec<String> = parts
                .iter()
                .enumerate()
                .map(|(i, (columns, from))| format!("SELECT {i} AS part, {columns} {from}"))
                .collect();
            statements.join(";\n")
        } else {
            // Elsewhere (PostgreSQL): one statement, so one snapshot: every
            // line stored before the task's state as read is there.
            parts_union(&[
                Part {
                    columns: TaskRow::COLUMNS,
                    table: "tasks",
                    from: "FROM tasks WHERE id = ?".into(),
                    order: None,
                },
                Part {
                    columns: StepRow::COLUMNS,
                    table: "task_steps",
                    from: "FROM task_steps WHERE task_id = ?".into(),
                    order: Some(format!("{}, machine_id", (d.nocase)("machine_name"))),
                },
                Part {
                    columns: LogLineRow::COLUMNS,
                    table: "task_log",
                    from: format!("FROM ({}) AS l", select::<LogLineRow>(lines_sql)),
                    order: Some("id".into()),
                },
            ])
        };
        let rows = match self.begin(Access::Single).await {
            Ok(mut c) => c.fetch(&sql, params![id, id, id, after_id, limit]).await,
            Err(e) => Err(e),
        }
        .map_err(|e| Op::new(OP).fail(&e))?;
        let mut task = None;
        let (mut steps, mut lines) = (Vec::new(), Vec::new());
        // Statements of their own name their columns plainly; a union's
        // under each part's prefix.
        let prefixes = if d.serial_writes {
            ["", "", ""]
        } else {
            PART_PREFIXES
        };
        for row in &rows {
            match part_of(row.as_ref(), prefixes, OP)? {
                (0, r) => task = Some(TaskRow::from_columns(&r)?.into_record()?),
                (1, r) => steps.push(StepRow::from_columns(&r)?.into_record()?),
                (_, r) => lines.push(LogLineRow::from_columns(&r)?.into_record()?),
            }
        }
        Ok(task.map(|task| TaskWithLog { task, steps, lines }))
    }

    async fn step_log(&self, task_id: &str, machine_id: i64) -> Result<Vec<TaskLogLine>> {
        let sql =
            select::<LogLineRow>("FROM task_log WHERE task_id = ? AND machine_id = ? ORDER BY id");
        let op = "reading a machine's part of a task's log";
        query(&sql, params![task_id, machine_id], op)
            .all::<LogLineRow>(self)
            .await
    }

    async fn task_secrets(&self, task_id: &str) -> Result<Vec<(String, String)>> {
        let sql = "SELECT name, ciphertext FROM task_secrets WHERE task_id = ? ORDER BY name";
        query(sql, params![task_id], "reading a task's secrets")
            .all::<(String, String)>(self)
            .await
    }

    async fn count_task_secrets(&self) -> Result<i64> {
        query(
            "SELECT COUNT(*) FROM task_secrets",
            params![],
            "counting secrets",
        )
        .value::<i64>(self)
        .await
    }

    // Packages.

    async fn put_package(
        &self,
        p: &NewPackage,
        replace: bool,
        now: i64,
    ) -> Result<(Package, Option<Package>)> {
        const OP: &str = "adding a package";
        require_name("package", &p.package_id)?;
        let mut tx = write_tx(self, OP).await?;
        let key = (p.space_id, p.package_id.as_str(), p.version.as_str());
        let lock = self.dialect().for_update;
        let existing = package_version(&mut *tx, key, lock, OP).await?;
        let package = match &existing {
            Some(_) if !replace => {
                let name = format!("{} {}", p.package_id, p.version);
                return Err(conflict("package", name));
            }
            Some(old) => {
                let sql = returning::<PackageRow>(
                    "UPDATE packages SET format = ?, sha256 = ?, size = ?, file_name = ?, \
                     uploaded_at = ? WHERE id = ?",
                );
                let params = params![&p.format, &p.sha256, p.size, &p.file_name, now, old.id];
                query(&sql, params, OP).one::<PackageRow>(&mut *tx).await?
            }
            None => {
                let sql = returning::<PackageRow>(
                    "INSERT INTO packages (space_id, package_id, version, format, sha256, size, \
                     file_name, uploaded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                );
                let params = params![
                    p.space_id,
                    &p.package_id,
                    &p.version,
                    &p.format,
                    &p.sha256,
                    p.size,
                    &p.file_name,
                    now,
                ];
                let name = format!("{} {}", p.package_id, p.version);
                let op = Op::new(OP).unique(conflict("package", name));
                query(&sql, params, op).one::<PackageRow>(&mut *tx).await?
            }
        };
        tx.commit().await.ctx(OP)?;
        Ok((package, existing))
    }

    async fn package(
        &self,
        space_id: i64,
        package_id: &str,
        version: &str,
    ) -> Result<Option<Package>> {
        let key = (space_id, package_id, version);
        package_version(self, key, "", "reading a package").await
    }

    async fn list_packages(&self, space_id: i64, package_id: Option<&str>) -> Result<Vec<Package>> {
        // With an ID, every row has the same one (compared without case), so the
        // order is by upload time.
        let sql = select::<PackageRow>(
            "FROM packages WHERE space_id = ? AND (? IS NULL OR package_id = ?) \
             ORDER BY package_id, uploaded_at, id",
        );
        query(
            &sql,
            params![space_id, package_id, package_id],
            "listing packages",
        )
        .all::<PackageRow>(self)
        .await
    }

    async fn delete_package(
        &self,
        space_id: i64,
        package_id: &str,
        version: &str,
    ) -> Result<Package> {
        let sql = returning::<PackageRow>(
            "DELETE FROM packages WHERE space_id = ? AND package_id = ? AND version = ?",
        );
        query(
            &sql,
            params![space_id, package_id, version],
            "deleting a package",
        )
        .optional::<PackageRow>(self)
        .await?
        .ok_or_else(|| not_found("package", format!("{package_id} {version}")))
    }

    async fn count_packages_with_sha256(&self, sha256: &str) -> Result<i64> {
        let sql = "SELECT COUNT(*) FROM packages WHERE sha256 = ?";
        query(sql, params![sha256], "counting packages")
            .scalar::<i64>(self)
            .await
            .map(Option::unwrap_or_default)
    }

    // Cluster work.

    fn shared(&self) -> bool {
        Engine::shared(self)
    }

    async fn publish(&self, event: &ClusterEvent) -> Result<()> {
        self.publish_all(std::slice::from_ref(event)).await
    }

    async fn publish_all(&self, events: &[ClusterEvent]) -> Result<()> {
        if !Engine::shared(self) || events.is_empty() {
            return Ok(());
        }
        let payloads = events
            .iter()
            .map(|e| crate::cluster_payload(Engine::publisher(self), e))
            .collect::<Result<Vec<_>>>()?;
        // The payloads in the array's order (a function scan's).
        let sql = format!(
            "SELECT pg_notify(CAST(? AS text), CAST(value AS text)) FROM {}",
            self.dialect().texts
        );
        query(
            &sql,
            params![super::CLUSTER_CHANNEL, Value::Texts(payloads)],
            "telling the other nodes",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn listen(&self) -> Result<Option<tokio::sync::mpsc::Receiver<crate::Heard>>> {
        Engine::listen(self).await
    }

    async fn set_polling_presence(
        &self,
        node: &str,
        subscription_id: &str,
        present: bool,
        now: i64,
    ) -> Result<()> {
        const OP: &str = "recording where a polling tentacle is connected";
        if present {
            let sql =
                "INSERT INTO polling_presence (subscription_id, node, since) VALUES (?, ?, ?) \
                       ON CONFLICT (subscription_id, node) DO UPDATE SET since = excluded.since";
            query(sql, params![subscription_id, node, now], OP)
                .execute(self)
                .await
                .map(drop)
        } else {
            let sql = "DELETE FROM polling_presence WHERE subscription_id = ? AND node = ?";
            query(sql, params![subscription_id, node], OP)
                .execute(self)
                .await
                .map(drop)
        }
    }

    async fn clear_polling_presence(&self, node: &str) -> Result<()> {
        query(
            "DELETE FROM polling_presence WHERE node = ?",
            params![node],
            "forgetting a node's polling tentacles",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn polling_nodes(&self, subscription_id: &str, now: i64) -> Result<Vec<String>> {
        let sql = "SELECT p.node FROM polling_presence p JOIN nodes n ON n.name = p.node \
                   WHERE p.subscription_id = ? AND n.last_seen >= ? ORDER BY p.since DESC, p.node";
        let live_since = now.saturating_sub(crate::NODE_OFFLINE_AFTER_MS);
        query(
            sql,
            params![subscription_id, live_since],
            "finding the node of a polling tentacle",
        )
        .scalars::<String>(self)
        .await
    }

    async fn assign_step(&self, task_id: &str, machine_id: i64, node: Option<&str>) -> Result<()> {
        // Nothing written when the step is there already (a step taken
        // back that was never handed over: every step on a cluster), so no
        // commit to wait for.
        query(
            "UPDATE task_steps SET node = ? \
             WHERE task_id = ? AND machine_id = ? AND node IS DISTINCT FROM ?",
            params![node, task_id, machine_id, node],
            "handing a step to a node",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn step_node(&self, task_id: &str, machine_id: i64) -> Result<Option<String>> {
        query(
            "SELECT node FROM task_steps WHERE task_id = ? AND machine_id = ?",
            params![task_id, machine_id],
            "reading which node runs a step",
        )
        .scalar::<Option<String>>(self)
        .await
        .map(Option::flatten)
    }

    async fn steps_assigned_to(&self, node: &str) -> Result<Vec<StepRef>> {
        let sql = select::<StepRefRow>(&format!(
            "FROM task_steps WHERE node = ? AND state IN {UNFINISHED_STATES} \
             ORDER BY task_id, machine_id"
        ));
        query(&sql, params![node], "listing the steps handed to a node")
            .all::<StepRefRow>(self)
            .await
    }

    async fn release_task(&self, task_id: &str, node: &str) -> Result<()> {
        query(
            "UPDATE tasks SET node = NULL WHERE id = ? AND node = ?",
            params![task_id, node],
            "giving a task back",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn task_step(&self, task_id: &str, machine_id: i64) -> Result<Option<TaskStep>> {
        let sql = select::<StepRow>("FROM task_steps WHERE task_id = ? AND machine_id = ?");
        query(&sql, params![task_id, machine_id], "reading a task's step")
            .optional::<StepRow>(self)
            .await
    }

    async fn adoptable_tasks(&self, now: i64, unclaimed_before: i64) -> Result<Vec<Task>> {
        let sql = select::<TaskRow>(&format!(
            "FROM tasks WHERE state IN {UNFINISHED_STATES} AND \
             ((node IS NULL AND created_at < ?) OR (node IS NOT NULL AND NOT EXISTS \
             (SELECT 1 FROM nodes n WHERE n.name = tasks.node AND n.last_seen >= ?))) \
             ORDER BY seq"
        ));
        let live_since = now.saturating_sub(crate::NODE_OFFLINE_AFTER_MS);
        query(
            &sql,
            params![unclaimed_before, live_since],
            "listing the tasks no live node runs",
        )
        .all::<TaskRow>(self)
        .await
    }

    // Package content (chunked, content-addressed).

    async fn begin_package_content(&self, node: &str, chunk_size: i64, now: i64) -> Result<i64> {
        if chunk_size <= 0 {
            return Err(invalid(format!(
                "a chunk size of {chunk_size} bytes cannot hold package content; give a positive size"
            )));
        }
        require_name("node", node)?;
        let sql = "INSERT INTO package_contents (sha256, size, chunk_size, node, started_at) \
                   VALUES (NULL, 0, ?, ?, ?) RETURNING id";
        query(
            sql,
            params![chunk_size, node, now],
            "starting to write package content",
        )
        .value::<i64>(self)
        .await
    }

    async fn put_package_chunk(&self, id: i64, index: i64, data: &[u8]) -> Result<()> {
        const OP: &str = "writing a chunk of package content";
        let mut tx = write_tx(self, OP).await?;
        let chunk_size = pending_chunk_size(&mut *tx, self.dialect(), id, OP).await?;
        let len = i64::try_from(data.len()).unwrap_or(i64::MAX);
        if index < 0 || data.is_empty() || len > chunk_size {
            return Err(invalid(format!(
                "chunk {index} of package content {id} has {len} bytes; a chunk has 1 to \
                 {chunk_size} bytes at an index from 0"
            )));
        }
        let sql = "INSERT INTO package_chunks (content_id, idx, data) VALUES (?, ?, ?)";
        let op = Op::new(OP).unique(invalid(format!(
            "chunk {index} of package content {id} is written already"
        )));
        query(sql, params![id, index, data], op)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.ctx(OP)
    }

    async fn finish_package_content(
        &self,
        id: i64,
        sha256: &str,
        size: i64,
    ) -> Result<PackageContent> {
        const OP: &str = "completing package content";
        let sha256 = sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!(
                "'{sha256}' is not a SHA-256 (64 hex digits)"
            )));
        }
        let d = self.dialect();
        let mut tx = write_tx(self, OP).await?;
        let chunk_size = pending_chunk_size(&mut *tx, d, id, OP).await?;
        let n = crate::chunks_of(size, chunk_size);
        let count = |extra: &'static str| {
            format!("SELECT COUNT(*) FROM package_chunks WHERE content_id = ?{extra}")
        };
        let all = query(&count(""), params![id], OP)
            .value::<i64>(&mut *tx)
            .await?;
        let in_range = query(&count(" AND idx < ?"), params![id, n], OP)
            .value::<i64>(&mut *tx)
            .await?;
        let short = query(
            &count(" AND idx < ? AND length(data) <> ?"),
            params![id, n - 1, chunk_size],
            OP,
        )
        .value::<i64>(&mut *tx)
        .await?;
        let total = query(
            "SELECT COALESCE(SUM(length(data)), 0) FROM package_chunks WHERE content_id = ?",
            params![id],
            OP,
        )
        .value::<i64>(&mut *tx)
        .await?;
        if size < 0 || all != n || in_range != n || short != 0 || total != size {
            return Err(invalid(format!(
                "package content {id} is incomplete: {all} chunk(s) of {total} bytes written, \
                 {n} chunk(s) of {size} bytes expected (every chunk but the last {chunk_size} bytes); \
                 push the package again"
            )));
        }
        let sql = select::<PackageContentRow>(&format!(
            "FROM package_contents WHERE sha256 = ?{}",
            d.for_update
        ));
        if let Some(existing) = query(&sql, params![&sha256], OP)
            .optional::<PackageContentRow>(&mut *tx)
            .await?
        {
            drop_content(&mut *tx, id, OP).await?;
            tx.commit().await.ctx(OP)?;
            return Ok(existing);
        }
        let sql = "UPDATE package_contents SET sha256 = ?, size = ? WHERE id = ?";
        let op = Op::new(OP).unique(conflict("package content", sha256.clone()));
        let done = match query(sql, params![&sha256, size, id], op)
            .execute(&mut *tx)
            .await
        {
            Ok(_) => tx.commit().await.ctx(OP),
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => Ok(PackageContent {
                id,
                sha256,
                size,
                chunk_size,
            }),
            // Another writer completed the same content meanwhile: use it.
            Err(StoreError::Conflict { .. }) => {
                let existing = self.package_content(&sha256).await?;
                self.abandon_package_content(id).await?;
                existing.ok_or_else(|| {
                    StoreError::Database(format!(
                        "{OP}: content {sha256} was completed by another writer and is gone now; push again"
                    ))
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn abandon_package_content(&self, id: i64) -> Result<()> {
        const OP: &str = "dropping pending package content";
        let mut tx = write_tx(self, OP).await?;
        let sql = format!(
            "SELECT id FROM package_contents WHERE id = ? AND sha256 IS NULL{}",
            self.dialect().for_update
        );
        if query(&sql, params![id], OP)
            .scalar::<i64>(&mut *tx)
            .await?
            .is_some()
        {
            drop_content(&mut *tx, id, OP).await?;
        }
        tx.commit().await.ctx(OP)
    }

    async fn package_content(&self, sha256: &str) -> Result<Option<PackageContent>> {
        let sql = select::<PackageContentRow>("FROM package_contents WHERE sha256 = ?");
        query(
            &sql,
            params![sha256.to_ascii_lowercase()],
            "reading package content",
        )
        .optional::<PackageContentRow>(self)
        .await
    }

    async fn package_chunks(&self, id: i64, from: i64, count: i64) -> Result<Vec<Vec<u8>>> {
        let sql = "SELECT data FROM package_chunks WHERE content_id = ? AND idx >= ? AND idx < ? \
                   AND EXISTS (SELECT 1 FROM package_contents c \
                               WHERE c.id = content_id AND c.sha256 IS NOT NULL) \
                   ORDER BY idx";
        let until = from.saturating_add(count.max(0));
        query(
            sql,
            params![id, from, until],
            "reading chunks of package content",
        )
        .scalars::<Vec<u8>>(self)
        .await
    }

    async fn delete_unused_package_content(&self, sha256: &str) -> Result<bool> {
        const OP: &str = "deleting unused package content";
        let sha256 = sha256.to_ascii_lowercase();
        let mut tx = write_tx(self, OP).await?;
        // Locked first: a push completing this content waits for the delete.
        let sql = format!(
            "SELECT id FROM package_contents WHERE sha256 = ?{}",
            self.dialect().for_update
        );
        let Some(id) = query(&sql, params![&sha256], OP)
            .scalar::<i64>(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let used = query(
            "SELECT COUNT(*) FROM packages WHERE sha256 = ?",
            params![&sha256],
            OP,
        )
        .value::<i64>(&mut *tx)
        .await?;
        if used > 0 {
            return Ok(false);
        }
        drop_content(&mut *tx, id, OP).await?;
        tx.commit().await.ctx(OP)?;
        Ok(true)
    }

    async fn remove_pending_package_contents(
        &self,
        node: &str,
        started_before: i64,
    ) -> Result<u64> {
        const OP: &str = "removing abandoned package uploads";
        const PENDING: &str =
            "SELECT id FROM package_contents WHERE sha256 IS NULL AND (node = ? OR started_at < ?)";
        let mut tx = write_tx(self, OP).await?;
        let chunks = format!("DELETE FROM package_chunks WHERE content_id IN ({PENDING})");
        query(&chunks, params![node, started_before], OP)
            .execute(&mut *tx)
            .await?;
        let rows = format!("DELETE FROM package_contents WHERE id IN ({PENDING})");
        let removed = query(&rows, params![node, started_before], OP)
            .execute(&mut *tx)
            .await?;
        tx.commit().await.ctx(OP)?;
        Ok(removed)
    }

    // Machine policy settings.

    async fn create_policy(
        &self,
        space_id: i64,
        name: &str,
        settings: &PolicySettings,
    ) -> Result<MachinePolicy> {
        require_name("machine policy", name)?;
        let sql = returning::<PolicyRow>(
            "INSERT INTO machine_policies (space_id, name, health_check_interval_s, \
             health_check_timeout_s, polling_wait_s, tentacle_update) VALUES (?, ?, ?, ?, ?, ?)",
        );
        let op = Op::new("adding a machine policy").unique(conflict("machine policy", name));
        let or = |v: Option<u32>, default: i64| v.map_or(default, i64::from);
        let update = settings.tentacle_update.unwrap_or_default();
        query(
            &sql,
            params![
                space_id,
                name,
                or(settings.health_check_interval_s, 3600),
                or(settings.health_check_timeout_s, 60),
                or(settings.polling_wait_s, 120),
                update.text()
            ],
            op,
        )
        .one::<PolicyRow>(self)
        .await
    }

    async fn update_policy(
        &self,
        space_id: i64,
        name: &str,
        settings: &PolicySettings,
    ) -> Result<MachinePolicy> {
        let sql = returning::<PolicyRow>(
            "UPDATE machine_policies SET \
             health_check_interval_s = COALESCE(?, health_check_interval_s), \
             health_check_timeout_s = COALESCE(?, health_check_timeout_s), \
             polling_wait_s = COALESCE(?, polling_wait_s), \
             tentacle_update = COALESCE(?, tentacle_update) \
             WHERE space_id = ? AND name = ?",
        );
        let some = |v: Option<u32>| v.map(i64::from);
        query(
            &sql,
            params![
                some(settings.health_check_interval_s),
                some(settings.health_check_timeout_s),
                some(settings.polling_wait_s),
                settings.tentacle_update.map(TextEnum::text),
                space_id,
                name
            ],
            "changing a machine policy",
        )
        .optional::<PolicyRow>(self)
        .await?
        .ok_or_else(|| not_found("machine policy", name))
    }

    async fn add_task_mask(&self, task_id: &str, ciphertext: &str) -> Result<()> {
        query(
            "INSERT INTO task_masks (task_id, ciphertext) VALUES (?, ?) \
             ON CONFLICT (task_id, ciphertext) DO NOTHING",
            params![task_id, ciphertext],
            "recording a value to mask in a task's log",
        )
        .execute(self)
        .await
        .map(drop)
    }

    async fn task_masks(&self, task_id: &str) -> Result<Vec<String>> {
        query(
            "SELECT ciphertext FROM task_masks WHERE task_id = ? ORDER BY id",
            params![task_id],
            "reading the values masked in a task's log",
        )
        .scalars::<String>(self)
        .await
    }

    async fn task_secrets_and_masks(&self, task_id: &str) -> Result<TaskSecretsAndMasks> {
        // Secrets (part 0) have a name; masks (part 1) have none.
        let sql = "SELECT name, ciphertext FROM (\
             SELECT 0 AS part, name, ciphertext, 0 AS n FROM task_secrets WHERE task_id = ? \
             UNION ALL \
             SELECT 1 AS part, NULL AS name, ciphertext, id AS n FROM task_masks WHERE task_id = ?\
             ) AS both_parts ORDER BY part, name, n";
        let rows = query(
            sql,
            params![task_id, task_id],
            "reading a task's secrets and masks",
        )
        .all::<SecretOrMaskRow>(self)
        .await?;
        let mut out = TaskSecretsAndMasks::default();
        for r in rows {
            match r.name {
                Some(name) => out.secrets.push((name, r.ciphertext)),
                None => out.masks.push(r.ciphertext),
            }
        }
        Ok(out)
    }

    async fn machine_row(&self, id: i64) -> Result<Option<Machine>> {
        let sql = select::<MachineRow>(&format!("{} WHERE m.id = ?", MachineRow::FROM));
        query(&sql, params![id], "looking up a machine")
            .optional::<MachineRow>(self)
            .await
    }

    async fn machine_row_and_step_node(
        &self,
        task_id: &str,
        machine_id: i64,
    ) -> Result<(Option<Machine>, Option<String>)> {
        const OP: &str = "looking up a step's machine";
        let sql = format!(
            "SELECT {}, (SELECT s.node FROM task_steps s WHERE s.task_id = ? AND s.machine_id = m.id) \
             AS step_node {} WHERE m.id = ?",
            MachineRow::COLUMNS,
            MachineRow::FROM
        );
        let rows = match self.begin(Access::Single).await {
            Ok(mut c) => c.fetch(&sql, params![task_id, machine_id]).await,
            Err(e) => Err(e),
        }
        .ctx(OP)?;
        let Some(row) = rows.first() else {
            return Ok((None, None));
        };
        let row = row.as_ref();
        let machine = MachineRow::from_columns(row)?.into_record()?;
        let node = row.text(Col::Name("step_node")).ctx(OP)?;
        Ok((Some(machine), node))
    }

    async fn polling_thumbprints(&self) -> Result<Vec<String>> {
        let polling = EndpointKind::Polling.text();
        query(
            "SELECT thumbprint FROM machines WHERE kind = ? \
             UNION ALL SELECT next_thumbprint FROM machines WHERE kind = ? AND next_thumbprint IS NOT NULL",
            params![polling, polling],
            "reading the thumbprints of polling machines",
        )
        .scalars::<String>(self)
        .await
    }
}

/// The chunk size of pending content `id` (its row locked); Invalid when it
/// is not pending.
async fn pending_chunk_size(
    tx: &mut (dyn Tx + 'static),
    d: &Dialect,
    id: i64,
    op: &str,
) -> Result<i64> {
    let sql = format!(
        "SELECT chunk_size FROM package_contents WHERE id = ? AND sha256 IS NULL{}",
        d.for_update
    );
    query(&sql, params![id], op)
        .scalar::<i64>(tx)
        .await?
        .ok_or_else(|| {
            invalid(format!(
                "package content {id} is not being written (it was completed, or dropped as \
                 abandoned); push the package again"
            ))
        })
}

/// Deletes content `id` and its chunks.
async fn drop_content(tx: &mut (dyn Tx + 'static), id: i64, op: &str) -> Result<()> {
    query(
        "DELETE FROM package_chunks WHERE content_id = ?",
        params![id],
        op,
    )
    .execute(&mut *tx)
    .await?;
    query("DELETE FROM package_contents WHERE id = ?", params![id], op)
        .execute(tx)
        .await?;
    Ok(())
}
