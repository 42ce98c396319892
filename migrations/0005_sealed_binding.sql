-- How servers.secret_ciphertext is sealed:
--   1: nonce || AES-256-GCM ciphertext, no associated data (before this migration);
--   2: 0x02 || nonce || ciphertext, with the server id, hostname, port, username,
--      host-key fingerprint and site as associated data (coordinator/src/secrets.rs).
-- SQL cannot encrypt: every coordinator re-seals format-1 rows as format 2 when
-- it starts (registry::reseal_legacy), and opens only format 2 for agents.
-- The default is what a writer that does not know this column produces.
ALTER TABLE servers
    ADD COLUMN secret_format SMALLINT NOT NULL DEFAULT 1 CHECK (secret_format IN (1, 2));
