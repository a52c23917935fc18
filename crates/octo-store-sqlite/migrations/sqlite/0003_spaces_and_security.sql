-- Spaces, teams, roles, grants, the audit log, settings and task secrets.
--
-- Names become unique per space, which SQLite can only do by rebuilding tables.
-- sqlx runs this in a transaction with foreign keys on, so: the parents
-- (environments, tenants, machine_policies, machines) are renamed to
-- `<table>_old` (SQLite points the foreign keys of their children at the new
-- name), created anew and filled with every row (ids kept); then each child
-- table is rebuilt the same way so that it refers to the new parents, and only
-- then are the old tables dropped, when nothing refers to them any more.
-- Everything that exists moves to the space `Default` (id 1).

-- Spaces ---------------------------------------------------------------------

CREATE TABLE spaces (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    is_default  INTEGER NOT NULL DEFAULT 0 CHECK (is_default IN (0, 1)),
    created_at  INTEGER NOT NULL
);
-- Must match octo_api_types::DEFAULT_SPACE_ID.
INSERT INTO spaces (id, name, description, is_default, created_at)
VALUES (1, 'Default', 'The space of requests that name none', 1, CAST(strftime('%s', 'now') AS INTEGER) * 1000);

-- Parents: environments (with an order people choose), tenants, machine
-- policies (each space has its own "Default Machine Policy"), machines. -------

ALTER TABLE environments RENAME TO environments_old;
ALTER TABLE tenants RENAME TO tenants_old;
ALTER TABLE machine_policies RENAME TO machine_policies_old;
ALTER TABLE machines RENAME TO machines_old;

CREATE TABLE environments (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id    INTEGER NOT NULL REFERENCES spaces (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL COLLATE NOCASE,
    description TEXT    NOT NULL DEFAULT '',
    sort_order  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    UNIQUE (space_id, name)
);
INSERT INTO environments (id, space_id, name, description, sort_order, created_at)
SELECT id, 1, name, description, id, created_at FROM environments_old;

CREATE TABLE tenants (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id   INTEGER NOT NULL REFERENCES spaces (id) ON DELETE CASCADE,
    name       TEXT    NOT NULL COLLATE NOCASE,
    created_at INTEGER NOT NULL,
    UNIQUE (space_id, name)
);
INSERT INTO tenants (id, space_id, name, created_at) SELECT id, 1, name, created_at FROM tenants_old;

CREATE TABLE machine_policies (
    id                      INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id                INTEGER NOT NULL REFERENCES spaces (id) ON DELETE CASCADE,
    name                    TEXT    NOT NULL COLLATE NOCASE,
    health_check_interval_s INTEGER NOT NULL CHECK (health_check_interval_s > 0),
    health_check_timeout_s  INTEGER NOT NULL CHECK (health_check_timeout_s > 0),
    polling_wait_s          INTEGER NOT NULL CHECK (polling_wait_s > 0),
    UNIQUE (space_id, name)
);
INSERT INTO machine_policies (id, space_id, name, health_check_interval_s, health_check_timeout_s, polling_wait_s)
SELECT id, 1, name, health_check_interval_s, health_check_timeout_s, polling_wait_s FROM machine_policies_old;

CREATE TABLE machines (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id         INTEGER NOT NULL REFERENCES spaces (id) ON DELETE RESTRICT,
    name             TEXT    NOT NULL COLLATE NOCASE,
    kind             TEXT    NOT NULL CHECK (kind IN ('Listening', 'Polling')),
    uri              TEXT    NOT NULL,
    thumbprint       TEXT    NOT NULL COLLATE NOCASE,
    policy_id        INTEGER NOT NULL REFERENCES machine_policies (id) ON DELETE RESTRICT,
    worker_pool      TEXT,
    status           TEXT    NOT NULL DEFAULT 'Unknown'
                     CHECK (status IN ('Unknown', 'Healthy', 'Unhealthy', 'Unavailable')),
    status_reason    TEXT    NOT NULL DEFAULT '',
    last_health_at   INTEGER,
    tentacle_version TEXT,
    tool_version     TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (space_id, name)
);
INSERT INTO machines (id, space_id, name, kind, uri, thumbprint, policy_id, worker_pool, status,
                      status_reason, last_health_at, tentacle_version, tool_version, created_at)
SELECT id, 1, name, kind, uri, thumbprint, policy_id, worker_pool, status,
       status_reason, last_health_at, tentacle_version, tool_version, created_at FROM machines_old;

-- Children, rebuilt to refer to the new parents. --------------------------------

ALTER TABLE machine_environments RENAME TO machine_environments_old;
ALTER TABLE machine_roles RENAME TO machine_roles_old;
ALTER TABLE machine_tenants RENAME TO machine_tenants_old;
ALTER TABLE machine_tenant_tags RENAME TO machine_tenant_tags_old;
ALTER TABLE tenant_tags RENAME TO tenant_tags_old;

CREATE TABLE machine_environments (
    machine_id     INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE RESTRICT,
    PRIMARY KEY (machine_id, environment_id)
) WITHOUT ROWID;
INSERT INTO machine_environments SELECT machine_id, environment_id FROM machine_environments_old;

CREATE TABLE machine_roles (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (machine_id, role)
) WITHOUT ROWID;
INSERT INTO machine_roles SELECT machine_id, role FROM machine_roles_old;

CREATE TABLE machine_tenants (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    tenant_id  INTEGER NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    PRIMARY KEY (machine_id, tenant_id)
) WITHOUT ROWID;
INSERT INTO machine_tenants SELECT machine_id, tenant_id FROM machine_tenants_old;

CREATE TABLE machine_tenant_tags (
    machine_id INTEGER NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    tag        TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (machine_id, tag)
) WITHOUT ROWID;
INSERT INTO machine_tenant_tags SELECT machine_id, tag FROM machine_tenant_tags_old;

CREATE TABLE tenant_tags (
    tenant_id INTEGER NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    tag       TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (tenant_id, tag)
) WITHOUT ROWID;
INSERT INTO tenant_tags SELECT tenant_id, tag FROM tenant_tags_old;

-- Nothing refers to the old tables now: drop them, children first.
DROP TABLE machine_environments_old;
DROP TABLE machine_roles_old;
DROP TABLE machine_tenants_old;
DROP TABLE machine_tenant_tags_old;
DROP TABLE tenant_tags_old;
DROP TABLE machines_old;
DROP TABLE machine_policies_old;
DROP TABLE tenants_old;
DROP TABLE environments_old;

CREATE INDEX machines_thumbprint ON machines (thumbprint);
CREATE INDEX machines_policy ON machines (policy_id);
CREATE INDEX machines_space ON machines (space_id, name);
CREATE INDEX machine_environments_environment ON machine_environments (environment_id, machine_id);
CREATE INDEX machine_roles_role ON machine_roles (role, machine_id);
CREATE INDEX machine_tenants_tenant ON machine_tenants (tenant_id, machine_id);

-- Packages: the same ID and version may exist in several spaces -----------------

ALTER TABLE packages RENAME TO packages_old;
CREATE TABLE packages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id    INTEGER NOT NULL REFERENCES spaces (id) ON DELETE CASCADE,
    package_id  TEXT    NOT NULL COLLATE NOCASE,
    version     TEXT    NOT NULL,
    format      TEXT    NOT NULL CHECK (format IN ('zip', 'tar.gz')),
    sha256      TEXT    NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    file_name   TEXT    NOT NULL,
    uploaded_at INTEGER NOT NULL,
    UNIQUE (space_id, package_id, version)
);
INSERT INTO packages (id, space_id, package_id, version, format, sha256, size, file_name, uploaded_at)
SELECT id, 1, package_id, version, format, sha256, size, file_name, uploaded_at FROM packages_old;
DROP TABLE packages_old;
CREATE INDEX packages_sha256 ON packages (sha256);

-- Tasks belong to a space; the environments of their machines are kept for
-- environment-scoped permissions (JSON array of names). -------------------------

ALTER TABLE tasks ADD COLUMN space_id INTEGER NOT NULL DEFAULT 1 REFERENCES spaces (id) ON DELETE CASCADE;
ALTER TABLE tasks ADD COLUMN environments TEXT NOT NULL DEFAULT '[]';
CREATE INDEX tasks_space ON tasks (space_id, seq);

-- Secret values of a task's variables, encrypted with the server's master key.
CREATE TABLE task_secrets (
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    ciphertext TEXT NOT NULL,
    PRIMARY KEY (task_id, name)
) WITHOUT ROWID;

-- Users, keys, teams, roles, grants -------------------------------------------

ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1));
-- A login's session key: it expires after a time without use.
ALTER TABLE api_keys ADD COLUMN session INTEGER NOT NULL DEFAULT 0 CHECK (session IN (0, 1));

-- A team is in one space, or outside any (space_id NULL).
CREATE TABLE teams (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id    INTEGER REFERENCES spaces (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL COLLATE NOCASE,
    description TEXT    NOT NULL DEFAULT '',
    built_in    INTEGER NOT NULL DEFAULT 0 CHECK (built_in IN (0, 1)),
    created_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX teams_name ON teams (COALESCE(space_id, 0), name);

CREATE TABLE team_members (
    team_id INTEGER NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (team_id, user_id)
) WITHOUT ROWID;
CREATE INDEX team_members_user ON team_members (user_id, team_id);

-- Custom roles (the built-in ones are defined by the server, not stored).
CREATE TABLE roles (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    -- JSON array of permission names.
    permissions TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL
);

-- A role given to a team in one space (or every space: space_id NULL),
-- optionally narrowed to environments and tenants. Deleting a scoped
-- environment or tenant is refused (RESTRICT): an emptied scope would widen.
CREATE TABLE grants (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    team_id    INTEGER NOT NULL REFERENCES teams (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL COLLATE NOCASE,
    space_id   INTEGER REFERENCES spaces (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);
CREATE INDEX grants_team ON grants (team_id);

CREATE TABLE grant_environments (
    grant_id       INTEGER NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    environment_id INTEGER NOT NULL REFERENCES environments (id) ON DELETE RESTRICT,
    PRIMARY KEY (grant_id, environment_id)
) WITHOUT ROWID;
CREATE INDEX grant_environments_environment ON grant_environments (environment_id);

CREATE TABLE grant_tenants (
    grant_id  INTEGER NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    tenant_id INTEGER NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    PRIMARY KEY (grant_id, tenant_id)
) WITHOUT ROWID;
CREATE INDEX grant_tenants_tenant ON grant_tenants (tenant_id);

-- The built-in team of administrators; users who were administrators join it.
-- Must match octo_store::ADMINISTRATORS_TEAM and the server's role name.
INSERT INTO teams (id, space_id, name, description, built_in, created_at)
VALUES (1, NULL, 'Octopus Administrators', 'System administrators in every space', 1,
        CAST(strftime('%s', 'now') AS INTEGER) * 1000);
INSERT INTO grants (team_id, role, space_id, created_at)
VALUES (1, 'System administrator', NULL, CAST(strftime('%s', 'now') AS INTEGER) * 1000);
INSERT INTO team_members (team_id, user_id) SELECT 1, id FROM users WHERE is_admin = 1;

-- The audit log. No foreign keys: it outlives users and spaces. -----------------

CREATE TABLE audit_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    user_id   INTEGER,
    username  TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    action    TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    object    TEXT    NOT NULL,
    space_id  INTEGER,
    space     TEXT,
    details   TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX audit_events_space ON audit_events (space_id, id);
CREATE INDEX audit_events_user ON audit_events (user_id, id);

-- Server settings (e.g. the master key's fingerprint). --------------------------

CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

