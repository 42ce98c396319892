-- File counts by server and status, kept without reading `files`: `/metrics`
-- and `GetStatus` cost the same at 100 M rows as at 1,000.
--
-- Every change of a count is appended to `file_count_deltas` by the statement
-- that makes it (no row is updated in place, so concurrent transactions never
-- wait for each other here): inserted and deleted `files` rows by the
-- statement triggers below, status changes by the one statement that moves
-- files (`transitions.rs`). A coordinator folds the deltas into `file_counts`
-- every few seconds (`counts.rs`); a count is `file_counts` plus the deltas
-- not folded yet.
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

-- The counts of the rows already there (the only full count of `files`).
LOCK TABLE files IN SHARE MODE;
INSERT INTO file_counts (server_id, status, n)
    SELECT server_id, status, count(*) FROM files GROUP BY server_id, status;
