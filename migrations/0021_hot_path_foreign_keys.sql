-- The tables every file version writes to carry no foreign keys any more:
-- `files` (server, watch), `file_events` and `outbox` (file). A foreign key
-- is a per-row trigger that runs `SELECT ... FOR KEY SHARE` on the parent
-- row; while 100,000 discovered files were recorded these checks were about
-- a third of Postgres's CPU (perf, discovery bench), and every status change
-- paid one more for its history row.
--
-- What keeps the references whole instead:
-- - ferry writes these rows only with ids it read from the parent rows in
--   the same statement or transaction (discovery joins the live watch and
--   server; history and outbox rows come from the `RETURNING` of the files
--   rows they describe);
-- - retention deletes a file with its history and outbox rows in one
--   statement, and deletes nothing else of a file that is kept;
-- - servers and watches are never deleted (soft delete, `deleted_at`), which
--   the triggers below now enforce for hand-written SQL too.
ALTER TABLE files DROP CONSTRAINT files_server_id_fkey, DROP CONSTRAINT files_watch_id_fkey;
ALTER TABLE file_events DROP CONSTRAINT file_events_file_id_fkey;
ALTER TABLE outbox DROP CONSTRAINT outbox_file_id_fkey;

CREATE FUNCTION ferry_soft_delete_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'rows of % are never deleted: set deleted_at instead (file rows refer to them)',
        TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER servers_soft_delete_only BEFORE DELETE OR TRUNCATE ON servers
    FOR EACH STATEMENT EXECUTE FUNCTION ferry_soft_delete_only();
CREATE TRIGGER watches_soft_delete_only BEFORE DELETE OR TRUNCATE ON watches
    FOR EACH STATEMENT EXECUTE FUNCTION ferry_soft_delete_only();
