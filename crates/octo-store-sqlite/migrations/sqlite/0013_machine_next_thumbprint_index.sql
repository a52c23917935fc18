-- Every connection a tentacle opens asks whether it presents a machine's next
-- certificate (the end of a rotation). Without an index that question read
-- every machine: with 5,000 polling tentacles reconnecting, 5,000 scans of
-- 5,000 rows holding the write lock. Few machines are ever mid-rotation, so
-- the index holds only those (PostgreSQL's 0003 indexes the column too).
CREATE INDEX machines_next_thumbprint ON machines (next_thumbprint)
    WHERE next_thumbprint IS NOT NULL;
