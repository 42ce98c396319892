-- What each agent was given, so that what it reports can be checked against it.
-- The object location of the current assignment (set when the task is built):
-- a success report naming another location is a failed attempt.
ALTER TABLE files ADD COLUMN assigned_bucket TEXT;
ALTER TABLE files ADD COLUMN assigned_key TEXT;
-- The agent the pending post-action was last sent to: only its answer counts.
ALTER TABLE files ADD COLUMN post_action_agent TEXT;
