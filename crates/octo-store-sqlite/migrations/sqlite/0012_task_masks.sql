-- Values masked in a task's log that a step learned while it ran (output
-- variables a script marked sensitive), encrypted with the master key like
-- task_secrets. Every node writing the task's log masks them, and a task
-- resumed after a restart or taken over by another node masks them too.
-- (0011 is left to other work of the same batch.)
CREATE TABLE task_masks (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    ciphertext TEXT NOT NULL,
    UNIQUE (task_id, ciphertext)
);
