-- The scheduler reads the servers with due files page by page in serving
-- order (least recently served first, never-served ones as if served at the
-- epoch, ties by id; `scheduler::servers_with_due_files`). This index gives
-- that order, so a page stops after the servers it needs: before, every
-- round checked every server of the site for due files (1,000 servers cost
-- about 6 ms of Postgres per round, and a round runs per batch of results).
CREATE INDEX servers_serve_order
    ON servers (site, (COALESCE(last_assigned_at, '1970-01-01 00:00:00+00'::timestamptz)), id)
    WHERE enabled AND deleted_at IS NULL;
