//! Rows as a database returns them, and the records they become.
//!
//! Each row struct reads itself from any engine's row ([`Columns`], by
//! column name) and names its columns once ([`Row::COLUMNS`], for `SELECT`
//! and `RETURNING`). Lists that hang off a row (a tenant's tags, a team's
//! members) come as [`ListRow`]s, filled in by the store; a machine's lists
//! come with its row, as JSON arrays ([`MachineWithListsRow`]).

use std::collections::HashMap;

use crate::machines::MachineList;
use crate::sql::{Col, Column, Columns};
use crate::text::TextEnum;
use crate::{
    ApiKey, AuditEvent, EndpointKind, Environment, Grant, HealthStatus, Machine, MachinePolicy,
    Node, NodeState, Package, PackageContent, Permission, Result, Role, Space, StepRef, StoreError,
    Task, TaskLogLine, TaskState, TaskStep, Team, Tenant, TentacleUpdate, User,
};

/// A row that becomes one of the API's records.
pub trait Row: Sized {
    /// The record.
    type Record;
    /// The columns to select, in SQL.
    const COLUMNS: &'static str;
    /// The row, from an engine's row (its columns by name).
    fn from_columns(row: &dyn Columns) -> Result<Self>;
    /// The record; a database error when the row holds what this version cannot read.
    fn into_record(self) -> Result<Self::Record>;
}

/// A row struct whose fields are the columns, and its [`Row`] impl. Without
/// `by`, every field is the record's field of the same name; with `by f`, the
/// function `f` makes the record.
macro_rules! row {
    (@columns $first:ident $(, $rest:ident)*) => {
        concat!(stringify!($first) $(, ", ", stringify!($rest))*)
    };
    (@struct $(#[$attr:meta])* $row:ident { $($field:ident: $ty:ty),+ }) => {
        $(#[$attr])*
        #[derive(Debug)]
        pub struct $row {
            $(pub $field: $ty),+
        }
    };
    (@read $row:ident { $($field:ident),+ }) => {
        fn from_columns(row: &dyn Columns) -> Result<Self> {
            Ok($row { $($field: Column::column(row, Col::Name(stringify!($field)))?),+ })
        }
    };
    ($(#[$attr:meta])* $row:ident => $record:ident { $($field:ident: $ty:ty),+ $(,)? }) => {
        row!(@struct $(#[$attr])* $row { $($field: $ty),+ });

        impl Row for $row {
            type Record = $record;
            const COLUMNS: &'static str = row!(@columns $($field),+);
            row!(@read $row { $($field),+ });
            fn into_record(self) -> Result<$record> {
                Ok($record { $($field: self.$field),+ })
            }
        }
    };
    ($(#[$attr:meta])* $row:ident => $record:ident by $into:ident { $($field:ident: $ty:ty),+ $(,)? }) => {
        row!(@struct $(#[$attr])* $row { $($field: $ty),+ });

        impl Row for $row {
            type Record = $record;
            const COLUMNS: &'static str = row!(@columns $($field),+);
            row!(@read $row { $($field),+ });
            fn into_record(self) -> Result<$record> {
                $into(self)
            }
        }
    };
}

/// Whether `users` holds the System administrator role in every space, with
/// no environment or tenant narrowing it (SQL, true or false).
macro_rules! is_system_administrator {
    () => {
        concat!(
            "EXISTS (SELECT 1 FROM team_members tm JOIN grants g ON g.team_id = tm.team_id \
             WHERE tm.user_id = users.id AND g.role = '",
            "System administrator",
            "' AND g.space_id IS NULL \
             AND NOT EXISTS (SELECT 1 FROM grant_environments ge WHERE ge.grant_id = g.id) \
             AND NOT EXISTS (SELECT 1 FROM grant_tenants gt WHERE gt.grant_id = g.id))"
        )
    };
}

/// The columns of [`UserRow`].
macro_rules! user_columns {
    () => {
        concat!(
            "users.id AS id, users.username AS username, users.display_name AS display_name, (",
            is_system_administrator!(),
            ") AS is_admin, users.disabled AS disabled, users.created_at AS created_at"
        )
    };
}

/// SQL: whether `users` (the table in the query) holds the System
/// administrator role in every space, unnarrowed.
pub const IS_SYSTEM_ADMINISTRATOR: &str = is_system_administrator!();

/// A `users` row (not its password hash), with whether the user holds the
/// System administrator role in every space: select [`Row::COLUMNS`] `FROM users`.
#[derive(Debug)]
pub struct UserRow {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub is_admin: bool,
    pub disabled: bool,
    pub created_at: i64,
}

impl Row for UserRow {
    type Record = User;
    const COLUMNS: &'static str = user_columns!();
    row!(@read UserRow { id, username, display_name, is_admin, disabled, created_at });
    fn into_record(self) -> Result<User> {
        Ok(User {
            id: self.id,
            username: self.username,
            display_name: self.display_name,
            is_admin: self.is_admin,
            disabled: self.disabled,
            created_at: self.created_at,
        })
    }
}

row! {
    /// An `api_keys` row (never the key's hash).
    ApiKeyRow => ApiKey {
        id: i64, user_id: i64, purpose: String, prefix: String, created_at: i64,
        last_used_at: Option<i64>, revoked: bool, session: bool,
    }
}

row! {
    /// An `environments` row.
    EnvironmentRow => Environment {
        id: i64, space_id: i64, name: String, description: String, created_at: i64,
    }
}

row! {
    /// A `machine_policies` row.
    PolicyRow => MachinePolicy by policy {
        id: i64, space_id: i64, name: String, health_check_interval_s: i64, health_check_timeout_s: i64,
        polling_wait_s: i64, tentacle_update: String,
    }
}

fn policy(r: PolicyRow) -> Result<MachinePolicy> {
    Ok(MachinePolicy {
        id: r.id,
        space_id: r.space_id,
        name: r.name,
        health_check_interval_s: r.health_check_interval_s,
        health_check_timeout_s: r.health_check_timeout_s,
        polling_wait_s: r.polling_wait_s,
        tentacle_update: TentacleUpdate::from_text(&r.tentacle_update)?,
    })
}

row! {
    /// A `packages` row.
    PackageRow => Package {
        id: i64, space_id: i64, package_id: String, version: String, format: String, sha256: String, size: i64,
        file_name: String, uploaded_at: i64,
    }
}

row! {
    /// A complete `package_contents` row.
    PackageContentRow => PackageContent { id: i64, sha256: String, size: i64, chunk_size: i64 }
}

row! {
    /// A `task_log` row.
    LogLineRow => TaskLogLine {
        id: i64, task_id: String, machine_id: Option<i64>, sequence: Option<i64>, timestamp: i64,
        stream: String, text: String,
    }
}

/// A `users` row with its password hash (to sign in).
#[derive(Debug)]
pub struct UserWithHashRow {
    pub user: UserRow,
    pub password_hash: Option<String>,
}

impl Row for UserWithHashRow {
    type Record = (User, Option<String>);
    const COLUMNS: &'static str =
        concat!(user_columns!(), ", users.password_hash AS password_hash");
    fn from_columns(row: &dyn Columns) -> Result<Self> {
        Ok(UserWithHashRow {
            user: UserRow::from_columns(row)?,
            password_hash: Column::column(row, Col::Name("password_hash"))?,
        })
    }
    fn into_record(self) -> Result<Self::Record> {
        Ok((self.user.into_record()?, self.password_hash))
    }
}

/// An `api_keys` row with its user's (`api_keys` joined with `users`): an
/// API request's credentials in one read.
#[derive(Debug)]
pub struct ApiKeyWithUserRow {
    pub key: ApiKeyRow,
    pub user: UserRow,
}

impl Row for ApiKeyWithUserRow {
    type Record = (ApiKey, User);
    const COLUMNS: &'static str = concat!(
        "api_keys.id AS key_id, api_keys.purpose AS key_purpose, api_keys.prefix AS key_prefix, \
         api_keys.created_at AS key_created_at, api_keys.last_used_at AS key_last_used_at, \
         api_keys.revoked AS key_revoked, api_keys.session AS key_session, ",
        user_columns!()
    );
    fn from_columns(row: &dyn Columns) -> Result<Self> {
        let user = UserRow::from_columns(row)?;
        let key = ApiKeyRow {
            id: Column::column(row, Col::Name("key_id"))?,
            user_id: user.id,
            purpose: Column::column(row, Col::Name("key_purpose"))?,
            prefix: Column::column(row, Col::Name("key_prefix"))?,
            created_at: Column::column(row, Col::Name("key_created_at"))?,
            last_used_at: Column::column(row, Col::Name("key_last_used_at"))?,
            revoked: Column::column(row, Col::Name("key_revoked"))?,
            session: Column::column(row, Col::Name("key_session"))?,
        };
        Ok(ApiKeyWithUserRow { key, user })
    }
    fn into_record(self) -> Result<Self::Record> {
        Ok((self.key.into_record()?, self.user.into_record()?))
    }
}

row! {
    /// A `tenants` row; its tags are [`ListRow`]s of `tenant_tags`.
    TenantRow => Tenant by tenant { id: i64, space_id: i64, name: String, created_at: i64 }
}

fn tenant(r: TenantRow) -> Result<Tenant> {
    Ok(Tenant {
        id: r.id,
        space_id: r.space_id,
        name: r.name,
        tags: Vec::new(),
        created_at: r.created_at,
    })
}

row! {
    /// A `tasks` row; `arguments` is JSON text.
    TaskRow => Task by task {
        id: String, space_id: i64, environments: String, kind: String, description: String, state: String, arguments: String,
        error: Option<String>, cancel_requested: bool, created_at: i64, started_at: Option<i64>,
        completed_at: Option<i64>,
    }
}

fn task(r: TaskRow) -> Result<Task> {
    let arguments = serde_json::from_str(&r.arguments).map_err(|e| {
        StoreError::Database(format!("reading the arguments of task {}: {e}", r.id))
    })?;
    let environments = serde_json::from_str(&r.environments).map_err(|e| {
        StoreError::Database(format!("reading the environments of task {}: {e}", r.id))
    })?;
    Ok(Task {
        state: TaskState::from_text(&r.state)?,
        arguments,
        environments,
        space_id: r.space_id,
        id: r.id,
        kind: r.kind,
        description: r.description,
        error: r.error,
        cancel_requested: r.cancel_requested,
        created_at: r.created_at,
        started_at: r.started_at,
        completed_at: r.completed_at,
    })
}

row! {
    /// A `task_steps` row; `output_variables` is a JSON object's text.
    StepRow => TaskStep by step {
        task_id: String, machine_id: i64, machine_name: String, state: String, ticket: String,
        exit_code: Option<i32>, next_sequence: i64, error: Option<String>,
        started_at: Option<i64>, completed_at: Option<i64>, output_variables: String,
    }
}

fn step(r: StepRow) -> Result<TaskStep> {
    let output_variables = serde_json::from_str(&r.output_variables).map_err(|e| {
        StoreError::Database(format!(
            "a task step's output variables are not valid JSON: {e}"
        ))
    })?;
    Ok(TaskStep {
        state: TaskState::from_text(&r.state)?,
        output_variables,
        task_id: r.task_id,
        machine_id: r.machine_id,
        machine_name: r.machine_name,
        ticket: r.ticket,
        exit_code: r.exit_code,
        next_sequence: r.next_sequence,
        error: r.error,
        started_at: r.started_at,
        completed_at: r.completed_at,
    })
}

/// A `machines` row joined to its policy's name: select [`Row::COLUMNS`]
/// [`MachineRow::FROM`]. Its lists come with it in a
/// [`MachineWithListsRow`].
#[derive(Debug)]
pub struct MachineRow {
    pub id: i64,
    pub space_id: i64,
    pub name: String,
    pub kind: String,
    pub uri: String,
    pub thumbprint: String,
    pub next_thumbprint: Option<String>,
    pub policy: String,
    pub worker_pool: Option<String>,
    pub status: String,
    pub status_reason: String,
    pub last_health_at: Option<i64>,
    pub tentacle_version: Option<String>,
    pub tool_version: Option<String>,
    pub os: Option<String>,
    pub free_bytes: Option<i64>,
    pub disabled: bool,
    pub created_at: i64,
}

impl MachineRow {
    /// The tables the columns come from: `machines m` and `machine_policies p`.
    pub const FROM: &'static str = "FROM machines m JOIN machine_policies p ON p.id = m.policy_id";
}

impl Row for MachineRow {
    type Record = Machine;
    const COLUMNS: &'static str =
        "m.id, m.space_id, m.name, m.kind, m.uri, m.thumbprint, m.next_thumbprint, p.name AS policy, m.worker_pool, \
         m.status, m.status_reason, m.last_health_at, m.tentacle_version, m.tool_version, m.os, m.free_bytes, \
         m.disabled, \
         m.created_at";
    row!(@read MachineRow { id, space_id, name, kind, uri, thumbprint, next_thumbprint, policy, worker_pool, status, status_reason, last_health_at, tentacle_version, tool_version, os, free_bytes, disabled, created_at });

    fn into_record(self) -> Result<Machine> {
        Ok(Machine {
            kind: EndpointKind::from_text(&self.kind)?,
            status: HealthStatus::from_text(&self.status)?,
            environments: Vec::new(),
            roles: Vec::new(),
            tenants: Vec::new(),
            tenant_tags: Vec::new(),
            id: self.id,
            space_id: self.space_id,
            name: self.name,
            uri: self.uri,
            thumbprint: self.thumbprint,
            next_thumbprint: self.next_thumbprint,
            policy: self.policy,
            worker_pool: self.worker_pool,
            status_reason: self.status_reason,
            last_health_at: self.last_health_at,
            tentacle_version: self.tentacle_version,
            tool_version: self.tool_version,
            os: self.os,
            free_bytes: self.free_bytes,
            disabled: self.disabled,
            created_at: self.created_at,
        })
    }
}

row! {
    /// A `spaces` row.
    SpaceRow => Space { id: i64, name: String, description: String, is_default: bool, created_at: i64 }
}

row! {
    /// A `roles` row (a custom role); `permissions` is a JSON array of names.
    RoleRow => Role by role { name: String, description: String, permissions: String }
}

fn role(r: RoleRow) -> Result<Role> {
    let names: Vec<String> = serde_json::from_str(&r.permissions).map_err(|e| {
        StoreError::Database(format!("reading the permissions of role '{}': {e}", r.name))
    })?;
    // A name this version does not know (written by a newer one) grants nothing.
    let permissions = names.iter().filter_map(|n| Permission::parse(n)).collect();
    Ok(Role {
        name: r.name,
        description: r.description,
        built_in: false,
        permissions,
    })
}

row! {
    /// A `nodes` row; its state is worked out from the time now.
    NodeRow => Node by node {
        name: String, started_at: i64, last_seen: i64, draining: bool, task_cap: i64,
        running_tasks: i64, running_steps: i64,
    }
}

#[allow(clippy::unnecessary_wraps)] // The row macro's conversions return Result.
fn node(r: NodeRow) -> Result<Node> {
    Ok(Node {
        state: NodeState::at(crate::now_ms(), r.last_seen, r.draining),
        name: r.name,
        started_at: r.started_at,
        last_seen: r.last_seen,
        draining: r.draining,
        task_cap: r.task_cap,
        running_tasks: r.running_tasks,
        running_steps: r.running_steps,
    })
}

row! {
    /// A step's key, from `task_steps`.
    StepRefRow => StepRef { task_id: String, machine_id: i64 }
}

row! {
    /// An `audit_events` row.
    AuditRow => AuditEvent {
        id: i64, at: i64, user_id: Option<i64>, username: String, source: String, action: String,
        kind: String, object: String, space_id: Option<i64>, space: Option<String>, details: String,
    }
}

/// A `teams` row with its space's name: select [`Row::COLUMNS`] [`TeamRow::FROM`].
/// Its members and grants are filled in by the engine.
#[derive(Debug)]
pub struct TeamRow {
    pub id: i64,
    pub space_id: Option<i64>,
    pub space: Option<String>,
    pub name: String,
    pub description: String,
    pub built_in: bool,
}

impl TeamRow {
    /// The tables the columns come from: `teams t` and `spaces s`.
    pub const FROM: &'static str = "FROM teams t LEFT JOIN spaces s ON s.id = t.space_id";
}

impl Row for TeamRow {
    type Record = Team;
    const COLUMNS: &'static str =
        "t.id AS id, t.space_id AS space_id, s.name AS space, t.name AS name, \
         t.description AS description, t.built_in AS built_in";
    row!(@read TeamRow { id, space_id, space, name, description, built_in });
    fn into_record(self) -> Result<Team> {
        Ok(Team {
            id: self.id,
            name: self.name,
            description: self.description,
            space_id: self.space_id,
            space: self.space,
            built_in: self.built_in,
            members: Vec::new(),
            grants: Vec::new(),
        })
    }
}

/// A `grants` row with its space's name: select [`Row::COLUMNS`] [`GrantRow::FROM`].
/// Its environments and tenants are filled in by the engine.
#[derive(Debug)]
pub struct GrantRow {
    pub id: i64,
    pub team_id: i64,
    pub role: String,
    pub space_id: Option<i64>,
    pub space: Option<String>,
}

impl GrantRow {
    /// The tables the columns come from: `grants g` and `spaces s`.
    pub const FROM: &'static str = "FROM grants g LEFT JOIN spaces s ON s.id = g.space_id";
}

impl Row for GrantRow {
    type Record = (i64, Grant);
    const COLUMNS: &'static str =
        "g.id AS id, g.team_id AS team_id, g.role AS role, g.space_id AS space_id, s.name AS space";
    row!(@read GrantRow { id, team_id, role, space_id, space });
    fn into_record(self) -> Result<(i64, Grant)> {
        Ok((
            self.team_id,
            Grant {
                id: self.id,
                role: self.role,
                space_id: self.space_id,
                space: self.space,
                environments: Vec::new(),
                tenants: Vec::new(),
            },
        ))
    }
}

/// One value of a list that belongs to a row: a tenant's tag, a machine's role.
/// Select the owner's id `AS owner` and the value `AS value`.
#[derive(Debug)]
pub struct ListRow {
    pub owner: i64,
    pub value: String,
}

impl Row for ListRow {
    type Record = ListRow;
    const COLUMNS: &'static str = "owner, value";
    row!(@read ListRow { owner, value });
    fn into_record(self) -> Result<ListRow> {
        Ok(self)
    }
}

/// A machine with its lists: [`MachineRow`]'s columns, then
/// [`crate::machines::MachineList::columns`] (which depend on the engine, so
/// that [`Row::COLUMNS`] holds only the first).
#[derive(Debug)]
pub struct MachineWithListsRow {
    pub machine: MachineRow,
    /// The JSON array of each list, in the order of `MachineList::ALL`.
    pub lists: [String; 4],
}

impl Row for MachineWithListsRow {
    type Record = Machine;
    const COLUMNS: &'static str = MachineRow::COLUMNS;

    fn from_columns(row: &dyn Columns) -> Result<Self> {
        let machine = MachineRow::from_columns(row)?;
        let mut lists: [String; 4] = Default::default();
        for (list, json) in MachineList::ALL.iter().zip(lists.iter_mut()) {
            *json = Column::column(row, Col::Name(list.column_name()))?;
        }
        Ok(Self { machine, lists })
    }

    fn into_record(self) -> Result<Machine> {
        let mut machine = self.machine.into_record()?;
        for (list, json) in MachineList::ALL.into_iter().zip(&self.lists) {
            list.set(&mut machine, json)?;
        }
        Ok(machine)
    }
}

/// A task's secret value (with its name) or mask (without), as
/// [`crate::Store::task_secrets_and_masks`] reads them.
#[derive(Debug)]
pub struct SecretOrMaskRow {
    pub name: Option<String>,
    pub ciphertext: String,
}

impl Row for SecretOrMaskRow {
    type Record = SecretOrMaskRow;
    const COLUMNS: &'static str = "name, ciphertext";
    row!(@read SecretOrMaskRow { name, ciphertext });
    fn into_record(self) -> Result<SecretOrMaskRow> {
        Ok(self)
    }
}

/// A pair of text columns (a name and a value), selected by the query itself.
impl Row for (String, String) {
    type Record = (String, String);
    const COLUMNS: &'static str = "name, value";
    fn from_columns(row: &dyn Columns) -> Result<Self> {
        Ok((
            Column::column(row, Col::Index(0))?,
            Column::column(row, Col::Index(1))?,
        ))
    }
    fn into_record(self) -> Result<(String, String)> {
        Ok(self)
    }
}

/// The values by owner, each list in the order of the rows.
pub fn group(rows: Vec<ListRow>) -> HashMap<i64, Vec<String>> {
    let mut lists: HashMap<i64, Vec<String>> = HashMap::new();
    for row in rows {
        lists.entry(row.owner).or_default().push(row.value);
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_the_fields_in_order() {
        assert!(UserRow::COLUMNS.starts_with("users.id AS id, users.username AS username"));
        assert!(UserWithHashRow::COLUMNS.starts_with(UserRow::COLUMNS));
        assert_eq!(
            ApiKeyRow::COLUMNS,
            "id, user_id, purpose, prefix, created_at, last_used_at, revoked, session"
        );
        assert_eq!(
            StepRow::COLUMNS,
            "task_id, machine_id, machine_name, state, ticket, exit_code, next_sequence, error, \
             started_at, completed_at, output_variables"
        );
        assert_eq!(TenantRow::COLUMNS, "id, space_id, name, created_at");
    }

    #[test]
    fn the_administrator_role_is_the_one_the_server_names() {
        assert!(IS_SYSTEM_ADMINISTRATOR.contains(&format!("'{}'", crate::SYSTEM_ADMINISTRATOR)));
    }

    #[test]
    fn rows_that_cannot_be_read_are_database_errors() {
        let row = TaskRow {
            id: "ServerTasks-1".into(),
            space_id: 1,
            environments: "[]".into(),
            kind: "Script".into(),
            description: String::new(),
            state: "Queued".into(),
            arguments: "{".into(),
            error: None,
            cancel_requested: false,
            created_at: 0,
            started_at: None,
            completed_at: None,
        };
        let err = row.into_record().err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e
                    .starts_with("database error: reading the arguments of task ServerTasks-1: ")),
            "{err:?}"
        );
    }
}
