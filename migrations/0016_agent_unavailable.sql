-- Why an agent takes no transfers for now, from its last heartbeat (e.g. S3
-- refused its credentials); NULL when it takes them.
ALTER TABLE agents ADD COLUMN unavailable TEXT;
