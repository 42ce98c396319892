-- The claim takes a server's due files oldest first
-- (`WHERE server_id = $1 AND status IN ('new', 'error') AND next_attempt_at <= now()
--  ORDER BY next_attempt_at, id LIMIT n`): without this index every claim
-- sorted all of the server's due rows, so the per-file cost grew with the
-- backlog. The same index answers "which servers have due files".
CREATE INDEX files_server_due ON files (server_id, next_attempt_at, id)
    WHERE status IN ('new', 'error');
