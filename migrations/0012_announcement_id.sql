-- The announcement id: the AMQP message_id consumers deduplicate on. It was the
-- file row id, which a restore of an older dump rewinds (the sequence goes back,
-- and new versions are announced with ids consumers already saw and drop). A
-- random UUID per file version, kept in the row, is never handed out twice:
-- rows that exist keep theirs (including re-publishes of an outbox row), rows
-- created after a restore get new ones. Existing rows get one each here.
ALTER TABLE files ADD COLUMN announcement_id UUID NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX files_announcement_id ON files (announcement_id);
