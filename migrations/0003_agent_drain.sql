-- Operator drain (AdminService.DrainAgent): the agent keeps its stream but
-- gets no poll leases and no transfers.
ALTER TABLE agents ADD COLUMN draining BOOLEAN NOT NULL DEFAULT FALSE;
-- Transfer rate from the agent's last heartbeat.
ALTER TABLE agents ADD COLUMN bytes_per_sec BIGINT NOT NULL DEFAULT 0;
