-- Per-row retry state of the outbox, in Postgres (shared by every coordinator's
-- relay): a row the broker refused (NACK, or returned as unroutable) waits
-- until next_attempt_at with exponential backoff, and after the relay's
-- maximum attempts it is parked (parked_at) until an admin retries it. Rows
-- are offered in next_attempt_at order, so refused rows never hold back
-- routable ones however many there are.
ALTER TABLE outbox
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN parked_at timestamptz;
CREATE INDEX outbox_due ON outbox (next_attempt_at, id)
    WHERE published_at IS NULL AND parked_at IS NULL;
