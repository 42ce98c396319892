-- Bytes done of the running transfer, from the agent's progress reports (they
-- also renew the lease). Counted only for the assignment that reported them:
-- progress_token is the fencing token of that assignment, so a new attempt
-- starts at 0 without the claim having to reset anything.
ALTER TABLE files ADD COLUMN bytes_done BIGINT NOT NULL DEFAULT 0;
ALTER TABLE files ADD COLUMN progress_token BIGINT;
