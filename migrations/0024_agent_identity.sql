-- An agent's identity is the (site, name) of its certificate: `agent-1` at two
-- sites is two agents. `agents.id` is that identity as one text, `site/name`
-- (a site has no `/`), and every column that names an agent holds it:
-- `files.lease_owner`, `files.post_action_agent`, `servers.poller_agent`.
ALTER TABLE agents DROP CONSTRAINT agents_pkey;
-- Rows made by a revocation ahead of the first connect carried no site.
UPDATE agents SET site = 'default' WHERE site = '';
ALTER TABLE agents ADD CONSTRAINT agents_site_named CHECK (site <> '');
ALTER TABLE agents ADD PRIMARY KEY (site, name);
ALTER TABLE agents ADD COLUMN id TEXT GENERATED ALWAYS AS (site || '/' || name) STORED;
CREATE UNIQUE INDEX agents_id ON agents (id);

-- Names recorded before: each agent name had one row, so the mapping is exact.
-- Only live leases matter (a finished file's lease_owner is history).
UPDATE files f SET lease_owner = a.id FROM agents a
    WHERE f.status = 'in_progress' AND f.lease_owner = a.name;
UPDATE files f SET post_action_agent = a.id FROM agents a WHERE f.post_action_agent = a.name;
UPDATE servers s SET poller_agent = a.id FROM agents a WHERE s.poller_agent = a.name;
