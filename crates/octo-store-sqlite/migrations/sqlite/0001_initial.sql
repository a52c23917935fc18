-- The server's store, first schema.
--
-- Conventions: ids are INTEGER row ids (AUTOINCREMENT, so a deleted row's id is
-- never handed out again) except task ids, which are text ("ServerTasks-<n>");
-- times are Unix milliseconds; names compare case-insensitively (COLLATE NOCASE);
-- booleans are 0/1. sqlx runs this file inside a transaction: no BEGIN/COMMIT here.

-- Users and API keys ---------------------------------------------------------

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    display_name  TEXT    NOT NULL,
    -- argon2 PHC string; NULL for users who sign in with API keys only.
    password_hash TEXT,
    is_admin      INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at    INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose      TEXT    NOT NULL,
    -- SHA-256 of the key, lower-case hex; the key itself is never stored.
    key_sha256   TEXT    NOT NULL UNIQUE,
    prefix       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked      INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- Environments and tenants ---------------------------------------------------

CREATE TABLE environments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);

CREATE TABLE tenants (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE tenant_tags (
    tenant_id INTEGER NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    tag       TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (tenant_id, tag)
) WITHOUT ROWID;

-- Machine policies -------------------------------------------------------------

CREATE TABLE machine_policies (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    name                   TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    health_check_interval_s INTEGER NOT NULL CHECK (health_check_interval_s > 0),
    health_check_timeout_s INTEGER NOT NULL CHECK (health_check_timeout_s > 0),
    polling_wait_s         INTEGER NOT NULL CHECK (polling_wait_s > 0)
);

-- Must match octo_store::DEFAULT_POLICY.
INSERT INTO machine_policies (name, health_check_interval_s, health_check_timeout_s, polling_wait_s)
VALUES ('Default Machine Policy', 3600, 60, 120);

-- Machines ---------------------------------------------------------------------

CREATE TABLE machines (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    kind             TEXT    NOT NULL CHECK (kind IN ('Listening', 'Polling')),
    uri              TEXT    NOT NULL,
    -- SHA-256 of the tentacle's certificate, 64 upper-case hex.
    thumbprint       TEXT    NOT NULL COLLATE NOCASE,
    policy_id        INTEGER NOT NULL REFERENCES machine_policies (id) ON DELETE RESTRICT,
    -- Set for workers.
    worker_pool      TEXT,
    status           TEXT    NOT NULL DEFAULT 'Unknown'
                     CHECK (status IN ('Unknown', 'Healthy', 'Unhealthy', 'Unavailable')),
    status_reason    TEXT    NOT NULL DEFAULT '',
    last_health_at   INTEGER,
    tentacle_version TEXT,
    tool_version     TEXT,
    created_at       INTEGER NOT NULL
);
CREATE INDEX machines_thumbprint ON machines (thumbprint);
CREATE INDEX machines_policy ON machines (policy_id);

-- Deleting an environment or tenant that machines use is refused (RESTRICT);
-- deleting a machine takes its rows here with it (CASCADE).
CREATE TABLE machine_environments (
    machine_id     INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE RESTRICT,
    PRIMARY KEY (machine_id, environment_id)
) WITHOUT ROWID;
CREATE INDEX machine_environments_environment ON machine_environments (environment_id, machine_id);

CREATE TABLE machine_roles (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (machine_id, role)
) WITHOUT ROWID;
CREATE INDEX machine_roles_role ON machine_roles (role, machine_id);

CREATE TABLE machine_tenants (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    tenant_id  INTEGER NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    PRIMARY KEY (machine_id, tenant_id)
) WITHOUT ROWID;
CREATE INDEX machine_tenants_tenant ON machine_tenants (tenant_id, machine_id);

CREATE TABLE machine_tenant_tags (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    tag        TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (machine_id, tag)
) WITHOUT ROWID;

-- Tasks ------------------------------------------------------------------------

-- Named counters; 'task' numbers ServerTasks-<n>. Never goes back, even when
-- tasks are deleted.
CREATE TABLE counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('task', 0);

CREATE TABLE tasks (
    -- "ServerTasks-<seq>".
    id               TEXT    PRIMARY KEY,
    seq              INTEGER NOT NULL UNIQUE,
    kind             TEXT    NOT NULL,
    description      TEXT    NOT NULL,
    state            TEXT    NOT NULL
                     CHECK (state IN ('Queued', 'Executing', 'Success', 'Failed', 'Canceled')),
    -- JSON.
    arguments        TEXT    NOT NULL DEFAULT 'null',
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER
);
-- Only unfinished tasks are looked up by state (resume after restart).
CREATE INDEX tasks_unfinished ON tasks (seq) WHERE state IN ('Queued', 'Executing');

-- One machine's part of a task. No foreign key on machine_id: the history
-- outlives the machine, which is why its name is copied here.
CREATE TABLE task_steps (
    task_id       TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    machine_id    INTEGER NOT NULL,
    machine_name  TEXT    NOT NULL,
    state         TEXT    NOT NULL
                  CHECK (state IN ('Queued', 'Executing', 'Success', 'Failed', 'Canceled')),
    ticket        TEXT    NOT NULL UNIQUE,
    exit_code     INTEGER,
    -- The next tentacle log sequence not yet stored (tentacle sequences start at 0).
    next_sequence INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    started_at    INTEGER,
    completed_at  INTEGER,
    PRIMARY KEY (task_id, machine_id)
) WITHOUT ROWID;
CREATE INDEX task_steps_machine ON task_steps (machine_id);

-- id is global and only grows, so "lines of task T after id N" pages through a
-- task's log. (task_id, machine_id, sequence) is unique so that a resumed stream
-- re-sending lines stores them once; server lines have NULL machine_id and
-- sequence, and SQLite treats NULLs as distinct, so they never collide.
CREATE TABLE task_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT    NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    machine_id INTEGER,
    sequence   INTEGER,
    timestamp  INTEGER NOT NULL,
    stream     TEXT    NOT NULL,
    text       TEXT    NOT NULL,
    UNIQUE (task_id, machine_id, sequence)
);
CREATE INDEX task_log_task ON task_log (task_id, id);
