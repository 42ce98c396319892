-- Revoked agents: refused at connect, their live streams closed by whichever
-- coordinator holds them (on the agent's next heartbeat at the latest).
-- A name can be revoked before it ever connected (a leaked certificate).
ALTER TABLE agents
    ADD COLUMN revoked_at timestamptz,
    ADD COLUMN revoked_by text;
