-- Packages in the built-in feed, and what deployments record per machine.

-- One row per package ID and version. The file lives under the data directory,
-- named by its SHA-256, so identical content is stored once.
CREATE TABLE packages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    package_id  TEXT    NOT NULL COLLATE NOCASE,
    -- Semantic version as given ("1.2.3", "2.0.0-beta.1"); the server picks
    -- "latest" by semantic-version order, not here.
    version     TEXT    NOT NULL,
    -- "zip" or "tar.gz".
    format      TEXT    NOT NULL CHECK (format IN ('zip', 'tar.gz')),
    -- Lower-case hex.
    sha256      TEXT    NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 0),
    -- Name the file was pushed with.
    file_name   TEXT    NOT NULL,
    uploaded_at INTEGER NOT NULL,
    UNIQUE (package_id, version)
);
CREATE INDEX packages_sha256 ON packages (sha256);

-- Output variables a machine's part of a task produced (JSON object name -> value).
ALTER TABLE task_steps ADD COLUMN output_variables TEXT NOT NULL DEFAULT '{}';
