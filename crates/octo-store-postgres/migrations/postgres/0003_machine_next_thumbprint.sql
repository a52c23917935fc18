-- Certificate rotation, as SQLite's 0007_machine_next_thumbprint.sql: the
-- certificate a tentacle is moving to, accepted beside `thumbprint` until the
-- tentacle presents it; then it becomes `thumbprint` and this is cleared.
ALTER TABLE machines ADD COLUMN next_thumbprint citext COLLATE "C";
CREATE INDEX machines_next_thumbprint ON machines (next_thumbprint);
