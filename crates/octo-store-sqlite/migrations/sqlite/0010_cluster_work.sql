-- Work across nodes. A single SQLite node never hands work to another, so
-- these stay empty; they keep the schema the same as PostgreSQL's
-- (0006_cluster_work.sql) for the shared SQL.

-- Which node holds a polling tentacle's connection (one row per subscription
-- and node).
CREATE TABLE polling_presence (
    subscription_id TEXT    NOT NULL,
    node            TEXT    NOT NULL COLLATE NOCASE,
    since           INTEGER NOT NULL,
    PRIMARY KEY (subscription_id, node)
);
CREATE INDEX polling_presence_node ON polling_presence (node);

-- The node a task's node handed a step to (NULL: the task's own node runs it).
ALTER TABLE task_steps ADD COLUMN node TEXT COLLATE NOCASE;
CREATE INDEX task_steps_node ON task_steps (node) WHERE node IS NOT NULL;
