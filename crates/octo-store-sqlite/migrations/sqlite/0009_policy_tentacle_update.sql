-- A machine policy's tentacle update behaviour: 'Manual' (a health check only
-- warns that an upgrade is available) or 'Always' (a health check that finds
-- an older tentacle starts an upgrade task for it).
ALTER TABLE machine_policies ADD COLUMN tentacle_update TEXT NOT NULL DEFAULT 'Manual'
    CHECK (tentacle_update IN ('Manual', 'Always'));
