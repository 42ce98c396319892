-- Scheduling serves the servers served least recently first (never-served
-- ones before all others; `scheduler::servers_with_due_files`), so with many
-- servers each one gets its first file early instead of by chance. Set by
-- the claim, under the server row lock it already holds.
ALTER TABLE servers ADD COLUMN last_assigned_at TIMESTAMPTZ;
