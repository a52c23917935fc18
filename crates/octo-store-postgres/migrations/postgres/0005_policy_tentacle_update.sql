-- A machine policy's tentacle update behaviour, as SQLite's
-- 0009_policy_tentacle_update.sql: 'Manual' (a health check only warns) or
-- 'Always' (a health check that finds an older tentacle upgrades it).
ALTER TABLE machine_policies ADD COLUMN tentacle_update text NOT NULL DEFAULT 'Manual'
    CHECK (tentacle_update IN ('Manual', 'Always'));
