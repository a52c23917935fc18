-- What the last health check learned about a machine besides its versions:
-- its operating system ("linux Debian 12 x86_64") and the free space in the
-- tentacle's home, for the portal's target page.
ALTER TABLE machines ADD COLUMN os TEXT;
ALTER TABLE machines ADD COLUMN free_bytes INTEGER;
