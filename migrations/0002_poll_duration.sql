-- How long the last poll of a server took (steady-state poll cost, shown in health).
ALTER TABLE servers ADD COLUMN last_poll_duration_ms INTEGER;
