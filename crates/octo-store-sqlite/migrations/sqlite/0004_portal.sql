-- What the portal edits: a machine can be disabled (no task or health check
-- reaches it), and environments keep the order people give them (sort_order,
-- set by 0003 to the creation order).
ALTER TABLE machines ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1));
CREATE INDEX environments_order ON environments (space_id, sort_order);
CREATE INDEX tasks_state ON tasks (space_id, state, seq);
