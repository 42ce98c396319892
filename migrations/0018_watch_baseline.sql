-- A watch added with "skip existing files" takes a baseline: the files its
-- first listing finds are recorded as `skipped` (never transferred, never
-- announced, retryable by an admin), later files flow normally. The flag is
-- set at creation and cleared in the transaction that records the last batch
-- of the baseline listing.
ALTER TABLE watches ADD COLUMN baseline_pending BOOLEAN NOT NULL DEFAULT false;

ALTER TABLE files DROP CONSTRAINT files_status_check;
ALTER TABLE files ADD CONSTRAINT files_status_check
    CHECK (status IN ('new', 'in_progress', 'uploaded', 'processed', 'error', 'failed', 'lost', 'skipped'));
