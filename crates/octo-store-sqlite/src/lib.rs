//! The embedded store: [`Store`] on SQLite, [`SqliteStore`].
//!
//! One database file, WAL journal, foreign keys on, a busy timeout so that writers
//! queue instead of failing, and a small pool. Every write that is more than one
//! statement runs in a `BEGIN IMMEDIATE` transaction: it takes the write lock at
//! the start (waiting for it under the busy timeout), so a transaction never fails
//! half-way when it turns from reading to writing.
//!
//! The schema is in `migrations/sqlite/`, run on open. Queries are built at run
//! time; lists of names are passed as one JSON array and expanded with
//! `json_each`, so a query has a fixed number of parameters whatever the list's
//! length.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::Row;

use octo_store::{
    now_ms, ticket, ApiKey, EndpointKind, Environment, HealthStatus, HealthUpdate, Machine,
    MachineFilter, MachinePolicy, NewLogLine, NewMachine, NewPackage, Package, Result, Store,
    StoreError, Task, TaskLogLine, TaskState, TaskStep, Tenant, User, DEFAULT_POLICY,
};

/// The migrations, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections in the pool of a file database.
const POOL_SIZE: u32 = 4;

/// Machine names listed at most in an error message.
const NAMES_IN_MESSAGE: usize = 10;

/// [`Store`] on an SQLite database.
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

    /// A transaction holding the write lock from its start.
    async fn write_tx(&self, op: &str) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.ctx(op)
    }

    /// A read transaction: one consistent snapshot for several queries.
    async fn read_tx(&self, op: &str) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin().await.ctx(op)
    }
}

// Errors.

fn db_error(op: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Database(format!("{op}: {e}"))
}

/// Adds the operation to a database error.
trait Ctx<T> {
    fn ctx(self, op: &str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, sqlx::Error> {
    fn ctx(self, op: &str) -> Result<T> {
        self.map_err(|e| db_error(op, &e))
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(message.into())
}

fn not_found(kind: &'static str, name: impl Into<String>) -> StoreError {
    StoreError::NotFound {
        kind,
        name: name.into(),
    }
}

fn conflict(kind: &'static str, name: impl Into<String>) -> StoreError {
    StoreError::Conflict {
        kind,
        name: name.into(),
    }
}

fn require_name(kind: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(invalid(format!("a {kind} name cannot be empty")));
    }
    Ok(())
}

/// `name` as one shell word, for the commands suggested in messages.
fn shell_word(name: &str) -> String {
    let plain = !name.is_empty()
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '@' | '+' | ',' | '=')
        });
    if plain {
        name.to_string()
    } else {
        format!("'{}'", name.replace('\'', r"'\''"))
    }
}

/// "a, b, c" or "a, b, and 3 more".
fn name_list(names: &[String]) -> String {
    let shown = names
        .iter()
        .take(NAMES_IN_MESSAGE)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_IN_MESSAGE {
        format!("{shown}, and {} more", names.len() - NAMES_IN_MESSAGE)
    } else {
        shown
    }
}

fn json_array<T: serde::Serialize>(items: &[T]) -> Result<String> {
    serde_json::to_string(items).map_err(|e| StoreError::Database(format!("encoding a list: {e}")))
}

// Enums as text.

fn kind_text(k: EndpointKind) -> &'static str {
    match k {
        EndpointKind::Listening => "Listening",
        EndpointKind::Polling => "Polling",
    }
}

fn parse_kind(s: &str) -> Result<EndpointKind> {
    match s {
        "Listening" => Ok(EndpointKind::Listening),
        "Polling" => Ok(EndpointKind::Polling),
        other => Err(StoreError::Database(format!(
            "unknown endpoint kind '{other}' in the database"
        ))),
    }
}

fn status_text(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Unknown => "Unknown",
        HealthStatus::Healthy => "Healthy",
        HealthStatus::Unhealthy => "Unhealthy",
        HealthStatus::Unavailable => "Unavailable",
    }
}

fn parse_status(s: &str) -> Result<HealthStatus> {
    match s {
        "Unknown" => Ok(HealthStatus::Unknown),
        "Healthy" => Ok(HealthStatus::Healthy),
        "Unhealthy" => Ok(HealthStatus::Unhealthy),
        "Unavailable" => Ok(HealthStatus::Unavailable),
        other => Err(StoreError::Database(format!(
            "unknown health status '{other}' in the database"
        ))),
    }
}

fn state_text(s: TaskState) -> &'static str {
    match s {
        TaskState::Queued => "Queued",
        TaskState::Executing => "Executing",
        TaskState::Success => "Success",
        TaskState::Failed => "Failed",
        TaskState::Canceled => "Canceled",
    }
}

fn parse_state(s: &str) -> Result<TaskState> {
    match s {
        "Queued" => Ok(TaskState::Queued),
        "Executing" => Ok(TaskState::Executing),
        "Success" => Ok(TaskState::Success),
        "Failed" => Ok(TaskState::Failed),
        "Canceled" => Ok(TaskState::Canceled),
        other => Err(StoreError::Database(format!(
            "unknown task state '{other}' in the database"
        ))),
    }
}

/// SQL list of the states that are not final.
const UNFINISHED_STATES: &str = "('Queued', 'Executing')";

// Rows.

fn get<'r, T>(row: &'r SqliteRow, column: &str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(column)
        .map_err(|e| StoreError::Database(format!("reading column {column}: {e}")))
}

const USER_COLUMNS: &str = "id, username, display_name, is_admin, created_at";

fn user_from_row(r: &SqliteRow) -> Result<User> {
    Ok(User {
        id: get(r, "id")?,
        username: get(r, "username")?,
        display_name: get(r, "display_name")?,
        is_admin: get(r, "is_admin")?,
        created_at: get(r, "created_at")?,
    })
}

const API_KEY_COLUMNS: &str = "id, user_id, purpose, prefix, created_at, last_used_at, revoked";

fn api_key_from_row(r: &SqliteRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: get(r, "id")?,
        user_id: get(r, "user_id")?,
        purpose: get(r, "purpose")?,
        prefix: get(r, "prefix")?,
        created_at: get(r, "created_at")?,
        last_used_at: get(r, "last_used_at")?,
        revoked: get(r, "revoked")?,
    })
}

const ENVIRONMENT_COLUMNS: &str = "id, name, description, created_at";

fn environment_from_row(r: &SqliteRow) -> Result<Environment> {
    Ok(Environment {
        id: get(r, "id")?,
        name: get(r, "name")?,
        description: get(r, "description")?,
        created_at: get(r, "created_at")?,
    })
}

const POLICY_COLUMNS: &str =
    "id, name, health_check_interval_s, health_check_timeout_s, polling_wait_s";

fn policy_from_row(r: &SqliteRow) -> Result<MachinePolicy> {
    Ok(MachinePolicy {
        id: get(r, "id")?,
        name: get(r, "name")?,
        health_check_interval_s: get(r, "health_check_interval_s")?,
        health_check_timeout_s: get(r, "health_check_timeout_s")?,
        polling_wait_s: get(r, "polling_wait_s")?,
    })
}

const MACHINE_SELECT: &str =
    "SELECT m.id, m.name, m.kind, m.uri, m.thumbprint, p.name AS policy, m.worker_pool, \
     m.status, m.status_reason, m.last_health_at, m.tentacle_version, m.tool_version, m.created_at \
     FROM machines m JOIN machine_policies p ON p.id = m.policy_id";

fn machine_from_row(r: &SqliteRow) -> Result<Machine> {
    Ok(Machine {
        id: get(r, "id")?,
        name: get(r, "name")?,
        kind: parse_kind(&get::<String>(r, "kind")?)?,
        uri: get(r, "uri")?,
        thumbprint: get(r, "thumbprint")?,
        environments: Vec::new(),
        roles: Vec::new(),
        tenants: Vec::new(),
        tenant_tags: Vec::new(),
        policy: get(r, "policy")?,
        worker_pool: get(r, "worker_pool")?,
        status: parse_status(&get::<String>(r, "status")?)?,
        status_reason: get(r, "status_reason")?,
        last_health_at: get(r, "last_health_at")?,
        tentacle_version: get(r, "tentacle_version")?,
        tool_version: get(r, "tool_version")?,
        created_at: get(r, "created_at")?,
    })
}

const TASK_COLUMNS: &str =
    "id, kind, description, state, arguments, error, cancel_requested, created_at, started_at, completed_at";

fn task_from_row(r: &SqliteRow) -> Result<Task> {
    let id: String = get(r, "id")?;
    let arguments: String = get(r, "arguments")?;
    let arguments = serde_json::from_str(&arguments)
        .map_err(|e| StoreError::Database(format!("reading the arguments of task {id}: {e}")))?;
    Ok(Task {
        kind: get(r, "kind")?,
        description: get(r, "description")?,
        state: parse_state(&get::<String>(r, "state")?)?,
        arguments,
        error: get(r, "error")?,
        cancel_requested: get(r, "cancel_requested")?,
        created_at: get(r, "created_at")?,
        started_at: get(r, "started_at")?,
        completed_at: get(r, "completed_at")?,
        id,
    })
}

const STEP_COLUMNS: &str =
    "task_id, machine_id, machine_name, state, ticket, exit_code, next_sequence, error, started_at, completed_at, output_variables";

const PACKAGE_COLUMNS: &str =
    "id, package_id, version, format, sha256, size, file_name, uploaded_at";

fn package_from_row(r: &SqliteRow) -> Result<Package> {
    Ok(Package {
        id: get(r, "id")?,
        package_id: get(r, "package_id")?,
        version: get(r, "version")?,
        format: get(r, "format")?,
        sha256: get(r, "sha256")?,
        size: get(r, "size")?,
        file_name: get(r, "file_name")?,
        uploaded_at: get(r, "uploaded_at")?,
    })
}

fn step_from_row(r: &SqliteRow) -> Result<TaskStep> {
    Ok(TaskStep {
        task_id: get(r, "task_id")?,
        machine_id: get(r, "machine_id")?,
        machine_name: get(r, "machine_name")?,
        state: parse_state(&get::<String>(r, "state")?)?,
        ticket: get(r, "ticket")?,
        exit_code: get(r, "exit_code")?,
        next_sequence: get(r, "next_sequence")?,
        error: get(r, "error")?,
        started_at: get(r, "started_at")?,
        completed_at: get(r, "completed_at")?,
        output_variables: {
            let text: String = get(r, "output_variables")?;
            serde_json::from_str(&text).map_err(|e| {
                StoreError::Database(format!(
                    "a task step's output variables are not valid JSON: {e}"
                ))
            })?
        },
    })
}

fn log_line_from_row(r: &SqliteRow) -> Result<TaskLogLine> {
    Ok(TaskLogLine {
        id: get(r, "id")?,
        task_id: get(r, "task_id")?,
        machine_id: get(r, "machine_id")?,
        sequence: get(r, "sequence")?,
        timestamp: get(r, "timestamp")?,
        stream: get(r, "stream")?,
        text: get(r, "text")?,
    })
}

// Machines: loading, and the parts of adding shared by create and replace.

/// A query parameter of a dynamically built query.
enum Arg {
    Int(i64),
    Text(String),
}

/// Machines matching `where_sql` (on `machines m`), ordered by name, with their
/// environments, roles, tenants and tenant tags (five queries, however many).
async fn query_machines(
    conn: &mut SqliteConnection,
    where_sql: &str,
    args: Vec<Arg>,
) -> Result<Vec<Machine>> {
    const OP: &str = "loading machines";
    let sql = format!("{MACHINE_SELECT} {where_sql} ORDER BY m.name, m.id");
    let mut query = sqlx::query(&sql);
    for arg in args {
        query = match arg {
            Arg::Int(i) => query.bind(i),
            Arg::Text(s) => query.bind(s),
        };
    }
    let rows = query.fetch_all(&mut *conn).await.ctx(OP)?;
    let mut machines = rows
        .iter()
        .map(machine_from_row)
        .collect::<Result<Vec<_>>>()?;
    if machines.is_empty() {
        return Ok(machines);
    }
    let index: HashMap<i64, usize> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id, i))
        .collect();
    let ids = json_array(&machines.iter().map(|m| m.id).collect::<Vec<_>>())?;

    const LINKS: [&str; 4] = [
        "SELECT me.machine_id AS machine_id, e.name AS value FROM machine_environments me \
         JOIN environments e ON e.id = me.environment_id \
         WHERE me.machine_id IN (SELECT value FROM json_each(?)) ORDER BY me.machine_id, e.name",
        "SELECT machine_id, role AS value FROM machine_roles \
         WHERE machine_id IN (SELECT value FROM json_each(?)) ORDER BY machine_id, role",
        "SELECT mt.machine_id AS machine_id, t.name AS value FROM machine_tenants mt \
         JOIN tenants t ON t.id = mt.tenant_id \
         WHERE mt.machine_id IN (SELECT value FROM json_each(?)) ORDER BY mt.machine_id, t.name",
        "SELECT machine_id, tag AS value FROM machine_tenant_tags \
         WHERE machine_id IN (SELECT value FROM json_each(?)) ORDER BY machine_id, tag",
    ];
    for (which, sql) in LINKS.iter().enumerate() {
        let rows = sqlx::query(sql)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .ctx(OP)?;
        for row in &rows {
            let machine_id: i64 = get(row, "machine_id")?;
            let value: String = get(row, "value")?;
            let Some(&i) = index.get(&machine_id) else {
                continue;
            };
            let m = &mut machines[i];
            match which {
                0 => m.environments.push(value),
                1 => m.roles.push(value),
                2 => m.tenants.push(value),
                _ => m.tenant_tags.push(value),
            }
        }
    }
    Ok(machines)
}

async fn query_machine(
    conn: &mut SqliteConnection,
    where_sql: &str,
    args: Vec<Arg>,
) -> Result<Option<Machine>> {
    Ok(query_machines(conn, where_sql, args)
        .await?
        .into_iter()
        .next())
}

/// What a new machine refers to, resolved to row ids.
struct MachineRefs {
    policy_id: i64,
    environment_ids: Vec<i64>,
    tenant_ids: Vec<i64>,
}

fn check_new_machine(m: &NewMachine) -> Result<()> {
    require_name("machine", &m.name)?;
    if m.uri.trim().is_empty() {
        return Err(invalid(format!("machine '{}' has no URI", m.name)));
    }
    if m.thumbprint.trim().is_empty() {
        return Err(invalid(format!("machine '{}' has no thumbprint", m.name)));
    }
    for (what, items) in [
        ("environment", &m.environments),
        ("role", &m.roles),
        ("tenant", &m.tenants),
        ("tenant tag", &m.tenant_tags),
    ] {
        if items.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(format!(
                "machine '{}': a {what} cannot be empty",
                m.name
            )));
        }
    }
    Ok(())
}

async fn resolve_refs(conn: &mut SqliteConnection, m: &NewMachine) -> Result<MachineRefs> {
    const OP: &str = "checking a machine's environments, tenants and policy";
    let policy = m.policy.as_deref().unwrap_or(DEFAULT_POLICY);
    let policy_id: i64 = sqlx::query_scalar("SELECT id FROM machine_policies WHERE name = ?")
        .bind(policy)
        .fetch_optional(&mut *conn)
        .await
        .ctx(OP)?
        .ok_or_else(|| {
            invalid(format!(
                "machine policy '{policy}' does not exist; leave the policy out to use '{DEFAULT_POLICY}'"
            ))
        })?;
    let mut environment_ids = Vec::with_capacity(m.environments.len());
    for name in &m.environments {
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM environments WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .ctx(OP)?;
        let id = id.ok_or_else(|| {
            invalid(format!(
                "environment '{name}' does not exist; create it with `octopus environment create {}`",
                shell_word(name)
            ))
        })?;
        if !environment_ids.contains(&id) {
            environment_ids.push(id);
        }
    }
    let mut tenant_ids = Vec::with_capacity(m.tenants.len());
    for name in &m.tenants {
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .ctx(OP)?;
        let id = id.ok_or_else(|| {
            invalid(format!(
                "tenant '{name}' does not exist; create it with `octopus tenant create {}`",
                shell_word(name)
            ))
        })?;
        if !tenant_ids.contains(&id) {
            tenant_ids.push(id);
        }
    }
    Ok(MachineRefs {
        policy_id,
        environment_ids,
        tenant_ids,
    })
}

/// Writes a machine's rows in the join tables (after clearing them).
async fn write_links(
    conn: &mut SqliteConnection,
    machine_id: i64,
    m: &NewMachine,
    refs: &MachineRefs,
) -> Result<()> {
    const OP: &str = "saving a machine's environments, roles and tenants";
    for table in [
        "machine_environments",
        "machine_roles",
        "machine_tenants",
        "machine_tenant_tags",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE machine_id = ?"))
            .bind(machine_id)
            .execute(&mut *conn)
            .await
            .ctx(OP)?;
    }
    use serde_json::json;
    link(
        &mut *conn,
        "machine_environments",
        "environment_id",
        machine_id,
        json!(refs.environment_ids),
    )
    .await?;
    link(
        &mut *conn,
        "machine_roles",
        "role",
        machine_id,
        json!(m.roles),
    )
    .await?;
    link(
        &mut *conn,
        "machine_tenants",
        "tenant_id",
        machine_id,
        json!(refs.tenant_ids),
    )
    .await?;
    link(
        &mut *conn,
        "machine_tenant_tags",
        "tag",
        machine_id,
        json!(m.tenant_tags),
    )
    .await?;
    Ok(())
}

/// Links a machine to every value of a JSON array in one statement. `table` and
/// `column` are this module's constants, never input.
async fn link(
    conn: &mut sqlx::SqliteConnection,
    table: &str,
    column: &str,
    machine_id: i64,
    values: serde_json::Value,
) -> Result<()> {
    sqlx::query(&format!(
        "INSERT OR IGNORE INTO {table} (machine_id, {column}) SELECT ?, value FROM json_each(?)"
    ))
    .bind(machine_id)
    .bind(values.to_string())
    .execute(conn)
    .await
    .ctx("saving the machine's environments, roles and tenants")?;
    Ok(())
}

/// Thumbprints are stored in upper case, as `octo_tls::Thumbprint` prints them.
fn normal_thumbprint(t: &str) -> String {
    t.trim().to_ascii_uppercase()
}

async fn tenant_tags_of(
    conn: &mut SqliteConnection,
    tenant_id: Option<i64>,
) -> Result<HashMap<i64, Vec<String>>> {
    let rows = sqlx::query(
        "SELECT tenant_id, tag FROM tenant_tags WHERE ? IS NULL OR tenant_id = ? ORDER BY tenant_id, tag",
    )
    .bind(tenant_id)
    .bind(tenant_id)
    .fetch_all(&mut *conn)
    .await
    .ctx("loading tenant tags")?;
    let mut tags: HashMap<i64, Vec<String>> = HashMap::new();
    for row in &rows {
        tags.entry(get(row, "tenant_id")?)
            .or_default()
            .push(get(row, "tag")?);
    }
    Ok(tags)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    // Users and API keys.

    async fn create_user(
        &self,
        username: &str,
        display_name: &str,
        password_hash: Option<&str>,
        is_admin: bool,
    ) -> Result<User> {
        require_name("user", username)?;
        let row = sqlx::query(&format!(
            "INSERT INTO users (username, display_name, password_hash, is_admin, created_at) \
             VALUES (?, ?, ?, ?, ?) RETURNING {USER_COLUMNS}"
        ))
        .bind(username)
        .bind(display_name)
        .bind(password_hash)
        .bind(is_admin)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                conflict("user", username)
            } else {
                db_error("adding a user", &e)
            }
        })?;
        user_from_row(&row)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<(User, Option<String>)>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS}, password_hash FROM users WHERE username = ?"
        ))
        .bind(username)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up a user")?;
        row.map(|r| Ok((user_from_row(&r)?, get(&r, "password_hash")?)))
            .transpose()
    }

    async fn count_users(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .ctx("counting users")
    }

    async fn create_api_key(
        &self,
        user_id: i64,
        purpose: &str,
        key_sha256: &str,
        prefix: &str,
    ) -> Result<ApiKey> {
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (user_id, purpose, key_sha256, prefix, created_at) \
             VALUES (?, ?, ?, ?, ?) RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(user_id)
        .bind(purpose)
        .bind(key_sha256.to_ascii_lowercase())
        .bind(prefix)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                conflict("API key", prefix)
            } else if is_foreign_key_violation(&e) {
                not_found("user", format!("#{user_id}"))
            } else {
                db_error("adding an API key", &e)
            }
        })?;
        api_key_from_row(&row)
    }

    async fn authenticate_api_key(
        &self,
        key_sha256: &str,
        now: i64,
    ) -> Result<Option<(ApiKey, User)>> {
        const OP: &str = "checking an API key";
        let mut conn = self.pool.acquire().await.ctx(OP)?;
        let row = sqlx::query(&format!(
            "UPDATE api_keys SET last_used_at = ? WHERE key_sha256 = ? AND revoked = 0 RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(now)
        .bind(key_sha256.to_ascii_lowercase())
        .fetch_optional(&mut *conn)
        .await
        .ctx(OP)?;
        let Some(row) = row else { return Ok(None) };
        let key = api_key_from_row(&row)?;
        let user = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?"))
            .bind(key.user_id)
            .fetch_optional(&mut *conn)
            .await
            .ctx(OP)?;
        user.map(|u| Ok((key, user_from_row(&u)?))).transpose()
    }

    async fn list_api_keys(&self, user_id: Option<i64>) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE ? IS NULL OR user_id = ? ORDER BY id"
        ))
        .bind(user_id)
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .ctx("listing API keys")?;
        rows.iter().map(api_key_from_row).collect()
    }

    async fn revoke_api_key(&self, id: i64) -> Result<()> {
        let done = sqlx::query("UPDATE api_keys SET revoked = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await
            .ctx("revoking an API key")?;
        if done.rows_affected() == 0 {
            return Err(not_found("API key", format!("#{id}")));
        }
        Ok(())
    }

    // Environments and tenants.

    async fn create_environment(&self, name: &str, description: &str) -> Result<Environment> {
        require_name("environment", name)?;
        let row = sqlx::query(&format!(
            "INSERT INTO environments (name, description, created_at) VALUES (?, ?, ?) RETURNING {ENVIRONMENT_COLUMNS}"
        ))
        .bind(name)
        .bind(description)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                conflict("environment", name)
            } else {
                db_error("adding an environment", &e)
            }
        })?;
        environment_from_row(&row)
    }

    async fn list_environments(&self) -> Result<Vec<Environment>> {
        let rows = sqlx::query(&format!(
            "SELECT {ENVIRONMENT_COLUMNS} FROM environments ORDER BY name, id"
        ))
        .fetch_all(&self.pool)
        .await
        .ctx("listing environments")?;
        rows.iter().map(environment_from_row).collect()
    }

    async fn environment(&self, name: &str) -> Result<Option<Environment>> {
        let row = sqlx::query(&format!(
            "SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up an environment")?;
        row.as_ref().map(environment_from_row).transpose()
    }

    async fn delete_environment(&self, name: &str) -> Result<()> {
        const OP: &str = "deleting an environment";
        let mut tx = self.write_tx(OP).await?;
        let row = sqlx::query("SELECT id, name FROM environments WHERE name = ?")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?
            .ok_or_else(|| not_found("environment", name))?;
        let id: i64 = get(&row, "id")?;
        let stored_name: String = get(&row, "name")?;
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT m.name FROM machine_environments me JOIN machines m ON m.id = me.machine_id \
             WHERE me.environment_id = ? ORDER BY m.name",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await
        .ctx(OP)?;
        if !users.is_empty() {
            return Err(invalid(format!(
                "environment '{stored_name}' is used by {} machine(s): {}; move or delete them first",
                users.len(),
                name_list(&users)
            )));
        }
        sqlx::query("DELETE FROM environments WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_foreign_key_violation(&e) {
                    invalid(format!(
                        "environment '{stored_name}' is in use; move or delete its machines first"
                    ))
                } else {
                    db_error(OP, &e)
                }
            })?;
        tx.commit().await.ctx(OP)
    }

    async fn create_tenant(&self, name: &str, tags: &[String]) -> Result<Tenant> {
        const OP: &str = "adding a tenant";
        require_name("tenant", name)?;
        if tags.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(format!("tenant '{name}': a tag cannot be empty")));
        }
        let mut tx = self.write_tx(OP).await?;
        let row = sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES (?, ?) RETURNING id, name, created_at",
        )
        .bind(name)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                conflict("tenant", name)
            } else {
                db_error(OP, &e)
            }
        })?;
        let id: i64 = get(&row, "id")?;
        for tag in tags {
            sqlx::query("INSERT OR IGNORE INTO tenant_tags (tenant_id, tag) VALUES (?, ?)")
                .bind(id)
                .bind(tag)
                .execute(&mut *tx)
                .await
                .ctx(OP)?;
        }
        let tags = tenant_tags_of(&mut tx, Some(id))
            .await?
            .remove(&id)
            .unwrap_or_default();
        let tenant = Tenant {
            id,
            name: get(&row, "name")?,
            tags,
            created_at: get(&row, "created_at")?,
        };
        tx.commit().await.ctx(OP)?;
        Ok(tenant)
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        const OP: &str = "listing tenants";
        let mut tx = self.read_tx(OP).await?;
        let rows = sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name, id")
            .fetch_all(&mut *tx)
            .await
            .ctx(OP)?;
        let mut tags = tenant_tags_of(&mut tx, None).await?;
        tx.commit().await.ctx(OP)?;
        rows.iter()
            .map(|r| {
                let id: i64 = get(r, "id")?;
                Ok(Tenant {
                    id,
                    name: get(r, "name")?,
                    tags: tags.remove(&id).unwrap_or_default(),
                    created_at: get(r, "created_at")?,
                })
            })
            .collect()
    }

    // Machine policies.

    async fn policy(&self, name: &str) -> Result<Option<MachinePolicy>> {
        let row = sqlx::query(&format!(
            "SELECT {POLICY_COLUMNS} FROM machine_policies WHERE name = ?"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .ctx("looking up a machine policy")?;
        row.as_ref().map(policy_from_row).transpose()
    }

    // Machines.

    async fn create_machine(&self, m: &NewMachine) -> Result<Machine> {
        const OP: &str = "adding a machine";
        check_new_machine(m)?;
        let mut tx = self.write_tx(OP).await?;
        let existing: Option<i64> = sqlx::query_scalar("SELECT id FROM machines WHERE name = ?")
            .bind(&m.name)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?;
        if existing.is_some() {
            return Err(conflict("machine", &m.name));
        }
        let refs = resolve_refs(&mut tx, m).await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO machines (name, kind, uri, thumbprint, policy_id, worker_pool, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&m.name)
        .bind(kind_text(m.kind))
        .bind(&m.uri)
        .bind(normal_thumbprint(&m.thumbprint))
        .bind(refs.policy_id)
        .bind(&m.worker_pool)
        .bind(now_ms())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| if is_unique_violation(&e) { conflict("machine", &m.name) } else { db_error(OP, &e) })?;
        write_links(&mut tx, id, m, &refs).await?;
        let machine = query_machine(&mut tx, "WHERE m.id = ?", vec![Arg::Int(id)])
            .await?
            .ok_or_else(|| StoreError::Database(format!("{OP}: machine '{}' vanished", m.name)))?;
        tx.commit().await.ctx(OP)?;
        Ok(machine)
    }

    async fn replace_machine(&self, m: &NewMachine) -> Result<Machine> {
        const OP: &str = "replacing a machine";
        check_new_machine(m)?;
        let mut tx = self.write_tx(OP).await?;
        let id: i64 = sqlx::query_scalar("SELECT id FROM machines WHERE name = ?")
            .bind(&m.name)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?
            .ok_or_else(|| not_found("machine", &m.name))?;
        let refs = resolve_refs(&mut tx, m).await?;
        // A new registration: what was known about the old one's health no longer holds.
        sqlx::query(
            "UPDATE machines SET name = ?, kind = ?, uri = ?, thumbprint = ?, policy_id = ?, worker_pool = ?, \
             status = 'Unknown', status_reason = '', last_health_at = NULL, tentacle_version = NULL, \
             tool_version = NULL WHERE id = ?",
        )
        .bind(&m.name)
        .bind(kind_text(m.kind))
        .bind(&m.uri)
        .bind(normal_thumbprint(&m.thumbprint))
        .bind(refs.policy_id)
        .bind(&m.worker_pool)
        .bind(id)
        .execute(&mut *tx)
        .await
        .ctx(OP)?;
        write_links(&mut tx, id, m, &refs).await?;
        let machine = query_machine(&mut tx, "WHERE m.id = ?", vec![Arg::Int(id)])
            .await?
            .ok_or_else(|| StoreError::Database(format!("{OP}: machine '{}' vanished", m.name)))?;
        tx.commit().await.ctx(OP)?;
        Ok(machine)
    }

    async fn machine(&self, name: &str) -> Result<Option<Machine>> {
        const OP: &str = "looking up a machine";
        let mut tx = self.read_tx(OP).await?;
        let m = query_machine(
            &mut tx,
            "WHERE m.name = ?",
            vec![Arg::Text(name.to_string())],
        )
        .await?;
        tx.commit().await.ctx(OP)?;
        Ok(m)
    }

    async fn machine_by_id(&self, id: i64) -> Result<Option<Machine>> {
        const OP: &str = "looking up a machine";
        let mut tx = self.read_tx(OP).await?;
        let m = query_machine(&mut tx, "WHERE m.id = ?", vec![Arg::Int(id)]).await?;
        tx.commit().await.ctx(OP)?;
        Ok(m)
    }

    async fn machines_by_thumbprint(&self, thumbprint: &str) -> Result<Vec<Machine>> {
        const OP: &str = "looking up machines by thumbprint";
        let mut tx = self.read_tx(OP).await?;
        let ms = query_machines(
            &mut tx,
            "WHERE m.thumbprint = ?",
            vec![Arg::Text(normal_thumbprint(thumbprint))],
        )
        .await?;
        tx.commit().await.ctx(OP)?;
        Ok(ms)
    }

    async fn list_machines(&self, filter: &MachineFilter) -> Result<Vec<Machine>> {
        const OP: &str = "listing machines";
        let mut sql = String::from("WHERE 1 = 1");
        let mut args = Vec::new();
        if !filter.names.is_empty() {
            sql.push_str(" AND m.name COLLATE NOCASE IN (SELECT value FROM json_each(?))");
            args.push(Arg::Text(json_array(&filter.names)?));
        }
        if !filter.environments.is_empty() {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM machine_environments me JOIN environments e ON e.id = me.environment_id \
                 WHERE me.machine_id = m.id AND e.name COLLATE NOCASE IN (SELECT value FROM json_each(?)))",
            );
            args.push(Arg::Text(json_array(&filter.environments)?));
        }
        if !filter.roles.is_empty() {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM machine_roles r \
                 WHERE r.machine_id = m.id AND r.role COLLATE NOCASE IN (SELECT value FROM json_each(?)))",
            );
            args.push(Arg::Text(json_array(&filter.roles)?));
        }
        if !filter.tenants.is_empty() {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM machine_tenants mt JOIN tenants t ON t.id = mt.tenant_id \
                 WHERE mt.machine_id = m.id AND t.name COLLATE NOCASE IN (SELECT value FROM json_each(?)))",
            );
            args.push(Arg::Text(json_array(&filter.tenants)?));
        }
        let mut tx = self.read_tx(OP).await?;
        let ms = query_machines(&mut tx, &sql, args).await?;
        tx.commit().await.ctx(OP)?;
        Ok(ms)
    }

    async fn delete_machine(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM machines WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await
            .ctx("deleting a machine")?;
        if done.rows_affected() == 0 {
            return Err(not_found("machine", name));
        }
        Ok(())
    }

    async fn record_health(&self, machine_id: i64, h: &HealthUpdate) -> Result<()> {
        const OP: &str = "recording a health check";
        // A result older than the one stored (a slow check finishing late) is ignored;
        // versions are kept when a check could not learn them.
        let done = sqlx::query(
            "UPDATE machines SET status = ?, status_reason = ?, last_health_at = ?, \
             tentacle_version = COALESCE(?, tentacle_version), tool_version = COALESCE(?, tool_version) \
             WHERE id = ? AND (last_health_at IS NULL OR last_health_at <= ?)",
        )
        .bind(status_text(h.status))
        .bind(&h.reason)
        .bind(h.at)
        .bind(&h.tentacle_version)
        .bind(&h.tool_version)
        .bind(machine_id)
        .bind(h.at)
        .execute(&self.pool)
        .await
        .ctx(OP)?;
        if done.rows_affected() == 0 {
            let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM machines WHERE id = ?")
                .bind(machine_id)
                .fetch_optional(&self.pool)
                .await
                .ctx(OP)?;
            if exists.is_none() {
                return Err(not_found("machine", format!("#{machine_id}")));
            }
        }
        Ok(())
    }

    // Tasks.

    async fn create_task(
        &self,
        kind: &str,
        description: &str,
        arguments: &serde_json::Value,
        machine_ids: &[i64],
        now: i64,
    ) -> Result<Task> {
        const OP: &str = "adding a task";
        let arguments_text = serde_json::to_string(arguments)
            .map_err(|e| invalid(format!("the task's arguments: {e}")))?;
        let mut tx = self.write_tx(OP).await?;
        let seq: i64 = sqlx::query_scalar(
            "UPDATE counters SET value = value + 1 WHERE name = 'task' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await
        .ctx(OP)?;
        let id = format!("ServerTasks-{seq}");
        let row = sqlx::query(&format!(
            "INSERT INTO tasks (id, seq, kind, description, state, arguments, created_at) \
             VALUES (?, ?, ?, ?, 'Queued', ?, ?) RETURNING {TASK_COLUMNS}"
        ))
        .bind(&id)
        .bind(seq)
        .bind(kind)
        .bind(description)
        .bind(&arguments_text)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .ctx(OP)?;
        let task = task_from_row(&row)?;
        let mut seen = Vec::with_capacity(machine_ids.len());
        for &machine_id in machine_ids {
            if seen.contains(&machine_id) {
                continue;
            }
            seen.push(machine_id);
            let name: String = sqlx::query_scalar("SELECT name FROM machines WHERE id = ?")
                .bind(machine_id)
                .fetch_optional(&mut *tx)
                .await
                .ctx(OP)?
                .ok_or_else(|| {
                    invalid(format!("machine #{machine_id} does not exist (deleted?)"))
                })?;
            sqlx::query(
                "INSERT INTO task_steps (task_id, machine_id, machine_name, state, ticket) VALUES (?, ?, ?, 'Queued', ?)",
            )
            .bind(&id)
            .bind(machine_id)
            .bind(&name)
            .bind(ticket(&id, machine_id))
            .execute(&mut *tx)
            .await
            .ctx(OP)?;
        }
        tx.commit().await.ctx(OP)?;
        Ok(task)
    }

    async fn task(&self, id: &str) -> Result<Option<Task>> {
        let row = sqlx::query(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .ctx("looking up a task")?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn list_tasks(&self, limit: i64) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks ORDER BY seq DESC LIMIT ?"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("listing tasks")?;
        rows.iter().map(task_from_row).collect()
    }

    async fn unfinished_tasks(&self) -> Result<Vec<Task>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN {UNFINISHED_STATES} ORDER BY seq DESC"
        ))
        .fetch_all(&self.pool)
        .await
        .ctx("listing unfinished tasks")?;
        rows.iter().map(task_from_row).collect()
    }

    async fn set_task_state(
        &self,
        id: &str,
        state: TaskState,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        const OP: &str = "changing a task's state";
        let mut tx = self.write_tx(OP).await?;
        let current: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?
            .ok_or_else(|| not_found("task", id))?;
        let current = parse_state(&current)?;
        if current.is_final() {
            if current == state {
                return Ok(());
            }
            return Err(invalid(format!(
                "task {id} has already finished ({}); it cannot become {}",
                state_text(current),
                state_text(state)
            )));
        }
        // started_at is set once, when it starts executing; completed_at when it ends.
        sqlx::query(
            "UPDATE tasks SET state = ?, error = COALESCE(?, error), started_at = COALESCE(started_at, ?), \
             completed_at = ? WHERE id = ?",
        )
        .bind(state_text(state))
        .bind(error)
        .bind((state == TaskState::Executing).then_some(now))
        .bind(state.is_final().then_some(now))
        .bind(id)
        .execute(&mut *tx)
        .await
        .ctx(OP)?;
        tx.commit().await.ctx(OP)
    }

    async fn request_cancel(&self, id: &str) -> Result<()> {
        const OP: &str = "requesting a task's cancellation";
        let mut tx = self.write_tx(OP).await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?;
        if exists.is_none() {
            return Err(not_found("task", id));
        }
        // A finished task has nothing left to cancel.
        sqlx::query(&format!(
            "UPDATE tasks SET cancel_requested = 1 WHERE id = ? AND state IN {UNFINISHED_STATES}"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await
        .ctx(OP)?;
        tx.commit().await.ctx(OP)
    }

    async fn task_steps(&self, task_id: &str) -> Result<Vec<TaskStep>> {
        let rows = sqlx::query(&format!(
            "SELECT {STEP_COLUMNS} FROM task_steps WHERE task_id = ? ORDER BY machine_name COLLATE NOCASE, machine_id"
        ))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await
        .ctx("listing a task's steps")?;
        rows.iter().map(step_from_row).collect()
    }

    async fn update_step(&self, step: &TaskStep) -> Result<()> {
        // next_sequence only moves forward: append_log may have advanced it since
        // the caller read the step.
        let done = sqlx::query(
            "UPDATE task_steps SET state = ?, exit_code = ?, next_sequence = MAX(next_sequence, ?), error = ?, \
             started_at = ?, completed_at = ?, output_variables = ? WHERE task_id = ? AND machine_id = ?",
        )
        .bind(state_text(step.state))
        .bind(step.exit_code)
        .bind(step.next_sequence)
        .bind(&step.error)
        .bind(step.started_at)
        .bind(step.completed_at)
        .bind(serde_json::to_string(&step.output_variables).unwrap_or_else(|_| "{}".into()))
        .bind(&step.task_id)
        .bind(step.machine_id)
        .execute(&self.pool)
        .await
        .ctx("updating a task step")?;
        if done.rows_affected() == 0 {
            return Err(not_found(
                "task step",
                format!("{} on machine #{}", step.task_id, step.machine_id),
            ));
        }
        Ok(())
    }

    async fn append_log(&self, task_id: &str, lines: &[NewLogLine]) -> Result<()> {
        const OP: &str = "appending to a task's log";
        if lines.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx(OP).await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = ?")
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await
            .ctx(OP)?;
        if exists.is_none() {
            return Err(not_found("task", task_id));
        }
        let mut highest: HashMap<i64, i64> = HashMap::new();
        for line in lines {
            sqlx::query(
                "INSERT OR IGNORE INTO task_log (task_id, machine_id, sequence, timestamp, stream, text) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(task_id)
            .bind(line.machine_id)
            .bind(line.sequence)
            .bind(line.timestamp)
            .bind(&line.stream)
            .bind(&line.text)
            .execute(&mut *tx)
            .await
            .ctx(OP)?;
            if let (Some(machine_id), Some(sequence)) = (line.machine_id, line.sequence) {
                let h = highest.entry(machine_id).or_insert(sequence);
                *h = (*h).max(sequence);
            }
        }
        for (machine_id, sequence) in highest {
            sqlx::query(
                "UPDATE task_steps SET next_sequence = MAX(next_sequence, ?) WHERE task_id = ? AND machine_id = ?",
            )
            .bind(sequence.saturating_add(1))
            .bind(task_id)
            .bind(machine_id)
            .execute(&mut *tx)
            .await
            .ctx(OP)?;
        }
        tx.commit().await.ctx(OP)
    }

    async fn task_log(&self, task_id: &str, after_id: i64, limit: i64) -> Result<Vec<TaskLogLine>> {
        let rows = sqlx::query(
            "SELECT id, task_id, machine_id, sequence, timestamp, stream, text FROM task_log \
             WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(task_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .ctx("reading a task's log")?;
        rows.iter().map(log_line_from_row).collect()
    }

    async fn step_log(&self, task_id: &str, machine_id: i64) -> Result<Vec<TaskLogLine>> {
        let rows = sqlx::query(
            "SELECT id, task_id, machine_id, sequence, timestamp, stream, text FROM task_log \
             WHERE task_id = ? AND machine_id = ? ORDER BY id",
        )
        .bind(task_id)
        .bind(machine_id)
        .fetch_all(&self.pool)
        .await
        .ctx("reading a machine's part of a task's log")?;
        rows.iter().map(log_line_from_row).collect()
    }

    async fn put_package(
        &self,
        p: &NewPackage,
        replace: bool,
        now: i64,
    ) -> Result<(Package, Option<Package>)> {
        const OP: &str = "adding a package";
        require_name("package", &p.package_id)?;
        let mut tx = self.write_tx(OP).await?;
        let existing = sqlx::query(&format!(
            "SELECT {PACKAGE_COLUMNS} FROM packages WHERE package_id = ? AND version = ?"
        ))
        .bind(&p.package_id)
        .bind(&p.version)
        .fetch_optional(&mut *tx)
        .await
        .ctx(OP)?
        .as_ref()
        .map(package_from_row)
        .transpose()?;
        if existing.is_some() && !replace {
            return Err(conflict(
                "package",
                format!("{} {}", p.package_id, p.version),
            ));
        }
        let row = if let Some(old) = &existing {
            sqlx::query(&format!(
                "UPDATE packages SET format = ?, sha256 = ?, size = ?, file_name = ?, uploaded_at = ? \
                 WHERE id = ? RETURNING {PACKAGE_COLUMNS}"
            ))
            .bind(&p.format)
            .bind(&p.sha256)
            .bind(p.size)
            .bind(&p.file_name)
            .bind(now)
            .bind(old.id)
            .fetch_one(&mut *tx)
            .await
            .ctx(OP)?
        } else {
            sqlx::query(&format!(
                "INSERT INTO packages (package_id, version, format, sha256, size, file_name, uploaded_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {PACKAGE_COLUMNS}"
            ))
            .bind(&p.package_id)
            .bind(&p.version)
            .bind(&p.format)
            .bind(&p.sha256)
            .bind(p.size)
            .bind(&p.file_name)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .ctx(OP)?
        };
        let package = package_from_row(&row)?;
        tx.commit().await.ctx(OP)?;
        Ok((package, existing))
    }

    async fn package(&self, package_id: &str, version: &str) -> Result<Option<Package>> {
        sqlx::query(&format!(
            "SELECT {PACKAGE_COLUMNS} FROM packages WHERE package_id = ? AND version = ?"
        ))
        .bind(package_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .ctx("reading a package")?
        .as_ref()
        .map(package_from_row)
        .transpose()
    }

    async fn list_packages(&self, package_id: Option<&str>) -> Result<Vec<Package>> {
        let rows = match package_id {
            Some(id) => sqlx::query(&format!(
                "SELECT {PACKAGE_COLUMNS} FROM packages WHERE package_id = ? ORDER BY uploaded_at, id"
            ))
            .bind(id)
            .fetch_all(&self.pool)
            .await,
            None => sqlx::query(&format!(
                "SELECT {PACKAGE_COLUMNS} FROM packages ORDER BY package_id, uploaded_at, id"
            ))
            .fetch_all(&self.pool)
            .await,
        }
        .ctx("listing packages")?;
        rows.iter().map(package_from_row).collect()
    }

    async fn delete_package(&self, package_id: &str, version: &str) -> Result<Package> {
        let row = sqlx::query(&format!(
            "DELETE FROM packages WHERE package_id = ? AND version = ? RETURNING {PACKAGE_COLUMNS}"
        ))
        .bind(package_id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await
        .ctx("deleting a package")?;
        match row {
            Some(r) => package_from_row(&r),
            None => Err(not_found("package", format!("{package_id} {version}"))),
        }
    }

    async fn count_packages_with_sha256(&self, sha256: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM packages WHERE sha256 = ?")
            .bind(sha256)
            .fetch_one(&self.pool)
            .await
            .ctx("counting packages")
    }
}
