-- Work across nodes, as SQLite's 0010_cluster_work.sql.

-- Which node holds a polling tentacle's connection: one row per subscription
-- and node (a tentacle behind a round-robin balancer may hold connections to
-- several). Written by the node when the first connection of the subscription
-- arrives and when its last one closes; a node's rows are cleared when it
-- starts, and those of an offline node are ignored (nodes.last_seen).
CREATE TABLE polling_presence (
    subscription_id text   NOT NULL,
    node            citext COLLATE "C" NOT NULL,
    since           bigint NOT NULL,
    PRIMARY KEY (subscription_id, node)
);
CREATE INDEX polling_presence_node ON polling_presence (node);

-- The node a task's node handed a step to, because that node holds the
-- step's polling tentacle (NULL: the task's own node runs it).
ALTER TABLE task_steps ADD COLUMN node citext COLLATE "C";
CREATE INDEX task_steps_node ON task_steps (node) WHERE node IS NOT NULL;
