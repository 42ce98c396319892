-- Post-actions act on a file version, with the action in force when the
-- version was discovered, and retry with backoff when they fail.
--
-- files.post_action: the watch's post-action when the row was created (a
-- later change of the watch never reaches versions already discovered);
-- existing rows take their watch's current setting.
ALTER TABLE files ADD COLUMN post_action TEXT;
UPDATE files f SET post_action = w.post_action FROM watches w WHERE w.id = f.watch_id;
ALTER TABLE files
    ALTER COLUMN post_action SET DEFAULT 'keep',
    ALTER COLUMN post_action SET NOT NULL,
    ADD CONSTRAINT files_post_action_check
        CHECK (post_action IN ('keep', 'delete') OR post_action LIKE 'move:/%');

-- Retry state of a pending post-action: failed attempts so far, when the next
-- one is due, and the last error. post_action_result stays NULL while it is
-- pending; it is set once: 'done', 'refused: ...' or 'failed after N attempts: ...'.
ALTER TABLE files
    ADD COLUMN post_action_attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN post_action_next_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN post_action_error TEXT;

-- When ferry learned that this version is no longer on the server (deleted or
-- moved by its post-action, or the path held another version). The identity
-- (watch, path, size, mtime) is unique only among versions still present, so
-- the same bytes re-sent later (rsync -a, scp -p) are a new version.
ALTER TABLE files ADD COLUMN gone_at TIMESTAMPTZ;
DROP INDEX files_identity;
CREATE UNIQUE INDEX files_identity ON files (watch_id, path, size, mtime_unix)
    WHERE gone_at IS NULL;
CREATE INDEX files_post_action_due ON files (post_action_next_at)
    WHERE status = 'processed' AND post_action_result IS NULL AND post_action <> 'keep';
