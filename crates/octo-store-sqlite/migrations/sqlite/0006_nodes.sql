-- Server nodes: one row per node name, written by the node's heartbeat
-- (octo_store::Store::node_heartbeat). The drain flag is set by an operator
-- (`octopus node drain`) and survives the node's restarts.
CREATE TABLE nodes (
    name          TEXT    NOT NULL PRIMARY KEY COLLATE NOCASE,
    started_at    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    draining      INTEGER NOT NULL DEFAULT 0 CHECK (draining IN (0, 1)),
    task_cap      INTEGER NOT NULL,
    running_tasks INTEGER NOT NULL DEFAULT 0,
    running_steps INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The node that runs a task (set when a node takes it; NULL before). A node
-- resumes only its own tasks, or those of a node gone offline.
ALTER TABLE tasks ADD COLUMN node TEXT COLLATE NOCASE;

-- Cluster-wide leases: a background job (scheduled health checks) runs on the
-- node holding its lease, which it renews; another takes it once it expires.
CREATE TABLE leases (
    name   TEXT    NOT NULL PRIMARY KEY,
    holder TEXT    NOT NULL COLLATE NOCASE,
    until  INTEGER NOT NULL
) WITHOUT ROWID;
