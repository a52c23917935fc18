-- Package content in the database (issue 16: several server nodes share the
-- database and nothing else), chunked and content-addressed.
--
-- One row per content. While it is written it is pending: `sha256` is NULL,
-- so no reader finds it (readers look content up by SHA-256 only). Completing
-- it sets `sha256` and `size` in one transaction, once every chunk is written
-- and the hash of what was written matched. A push that died leaves a pending
-- row (with `node` and `started_at`), removed by that node's next start or,
-- from any node, once it is a day old.
CREATE TABLE package_contents (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Lower-case hex; NULL while pending.
    sha256      TEXT    UNIQUE,
    size        INTEGER NOT NULL DEFAULT 0 CHECK (size >= 0),
    -- Bytes per chunk (every chunk but the last is this long).
    chunk_size  INTEGER NOT NULL CHECK (chunk_size > 0),
    -- The node writing it, and when it started (pending rows).
    node        TEXT    NOT NULL,
    started_at  INTEGER NOT NULL
);
CREATE INDEX package_contents_pending ON package_contents (node, started_at)
    WHERE sha256 IS NULL;

-- The content's bytes, in order: chunk `idx` holds bytes
-- [idx * chunk_size, (idx + 1) * chunk_size).
CREATE TABLE package_chunks (
    content_id INTEGER NOT NULL REFERENCES package_contents (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL CHECK (idx >= 0),
    data       BLOB    NOT NULL,
    PRIMARY KEY (content_id, idx)
);
