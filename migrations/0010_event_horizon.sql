-- WatchEvents delivers every file_events row exactly once although ids commit
-- out of order: each row records its transaction (xid8), and a watcher
-- delivers the rows of transactions below the current snapshot's xmin (all of
-- which have finished), window by window, in id order.
ALTER TABLE file_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX file_events_xid ON file_events (xid, id);
