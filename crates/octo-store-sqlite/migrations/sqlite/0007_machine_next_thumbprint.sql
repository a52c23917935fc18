-- Certificate rotation (tentacle rotate-certificate): a certificate the tentacle is
-- moving to, accepted beside `thumbprint` until the tentacle presents it; then it
-- becomes `thumbprint` and this is cleared.
ALTER TABLE machines ADD COLUMN next_thumbprint TEXT;
