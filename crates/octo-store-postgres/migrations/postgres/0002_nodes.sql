-- Server nodes, as SQLite's 0006_nodes.sql: one row per node name, written by
-- the node's heartbeat; the drain flag is the operator's and survives restarts.
CREATE TABLE nodes (
    name          citext  COLLATE "C" NOT NULL PRIMARY KEY,
    started_at    bigint  NOT NULL,
    last_seen     bigint  NOT NULL,
    draining      boolean NOT NULL DEFAULT false,
    task_cap      bigint  NOT NULL,
    running_tasks bigint  NOT NULL DEFAULT 0,
    running_steps bigint  NOT NULL DEFAULT 0
);

-- The node that runs a task (set when a node takes it; NULL before). A node
-- resumes only its own tasks, or those of a node gone offline.
ALTER TABLE tasks ADD COLUMN node citext COLLATE "C";

-- Cluster-wide leases: a background job (scheduled health checks) runs on the
-- node holding its lease, which it renews; another takes it once it expires.
CREATE TABLE leases (
    name   text   PRIMARY KEY,
    holder citext COLLATE "C" NOT NULL,
    until  bigint NOT NULL
);
