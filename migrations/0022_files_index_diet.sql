-- Less work per new file version, measured on the 100,000-file discovery
-- bench, where index insertion was half of Postgres's CPU:
-- - `files.path` compares bytewise (collation "C"). It is matched for
--   equality (the identity index) and never sorted for people; under the
--   database's default collation every comparison in `files_identity` went
--   through strcoll. The identity of a version is unchanged: byte-equal
--   paths are equal in any deterministic collation.
-- - `files_due` goes: it has the same rows as `files_server_due`
--   (`new`/`error`), and every query for due files names its server.
ALTER TABLE files ALTER COLUMN path TYPE TEXT COLLATE "C";
DROP INDEX files_due;
