-- Values masked in a task's log that a step learned while it ran, as SQLite's
-- 0012_task_masks.sql. (0007 is left to other work of the same batch.)
CREATE TABLE task_masks (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id    text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    ciphertext text NOT NULL,
    UNIQUE (task_id, ciphertext)
);
