-- A history event's time is when it was written, not when its transaction
-- began: a claim that waited for the server lock must not appear to precede
-- the release it waited for (ordering the history by time then reproduces
-- the order the invariants were checked in).
ALTER TABLE file_events ALTER COLUMN at SET DEFAULT clock_timestamp();
