-- File counts by server and status, kept without reading `files`: `/metrics`
-- and `GetStatus` cost the same at 100 M rows as at 1,000.
--
-- Every change of a count is appended to `file_count_deltas` by the triggers
-- below, in the transaction that makes it (no row is updated in place, so
-- concurrent transactions never wait for each other here): statement
-- triggers for inserted and deleted `files` rows, a row trigger for a changed
-- status (it fires only when the status or server changes), whatever
-- statement makes the change. A coordinator folds the deltas into
-- `file_counts` every few seconds (`counts.rs`); a count is `file_counts`
-- plus the deltas not folded yet.
CREATE TABLE file_counts (
    server_id BIGINT NOT NULL,
    status    TEXT NOT NULL,
    n         BIGINT NOT NULL,
    PRIMARY KEY (server_id, status)
);
CREATE TABLE file_count_deltas (
    server_id BIGINT NOT NULL,
    status    TEXT NOT NULL,
    n         BIGINT NOT NULL
);

CREATE FUNCTION ferry_count_inserted_files() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO file_count_deltas (server_id, status, n)
        SELECT server_id, status, count(*) FROM inserted GROUP BY server_id, status;
    RETURN NULL;
END $$;
CREATE TRIGGER files_count_inserted AFTER INSERT ON files
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION ferry_count_inserted_files();

CREATE FUNCTION ferry_count_deleted_files() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO file_count_deltas (server_id, status, n)
        SELECT server_id, status, -count(*) FROM deleted GROUP BY server_id, status;
    RETURN NULL;
END $$;
CREATE TRIGGER files_count_deleted AFTER DELETE ON files
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION ferry_count_deleted_files();

CREATE FUNCTION ferry_count_moved_file() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO file_count_deltas (server_id, status, n)
        VALUES (OLD.server_id, OLD.status, -1), (NEW.server_id, NEW.status, 1);
    RETURN NULL;
END $$;
CREATE TRIGGER files_count_moved AFTER UPDATE OF status, server_id ON files
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status OR OLD.server_id IS DISTINCT FROM NEW.server_id)
    EXECUTE FUNCTION ferry_count_moved_file();

-- The counts of the rows already there (the only full count of `files`).
LOCK TABLE files IN SHARE MODE;
INSERT INTO file_counts (server_id, status, n)
    SELECT server_id, status, count(*) FROM files GROUP BY server_id, status;
