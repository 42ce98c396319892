-- A transfer lease that expires while its agent is still connected gets one
-- more lease period before it is reaped (an outage of the coordinators'
-- database stops progress renewals but not transfers): the fencing token that
-- was given that grace, so each assignment gets it at most once.
ALTER TABLE files ADD COLUMN lease_graced_token BIGINT;
