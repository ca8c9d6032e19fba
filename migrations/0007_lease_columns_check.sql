-- 0007: the lease columns are set exactly while a job runs, each on its own.
--
-- 0001's jobs_lease_check says "running <=> token and expiry both set", which still lets
-- a row that is not running keep one of the two (say, after a hand-written UPDATE). The
-- worker's lease-fenced statements match on (id, lease_token) alone (see the comment in
-- pgqueue/sql/worker.sql), so a token must never sit on a row that is not running, and a
-- heartbeat must never give such a row an expiry. Existing rows are checked when the
-- constraints are validated; a row that breaks them stops the migration, naming the
-- constraint.
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_lease_token_check
        CHECK ((state = 'running') = (lease_token IS NOT NULL)) NOT VALID,
    ADD CONSTRAINT jobs_lease_expires_check
        CHECK ((state = 'running') = (lease_expires_at IS NOT NULL)) NOT VALID;
ALTER TABLE pgqueue.jobs VALIDATE CONSTRAINT jobs_lease_token_check;
ALTER TABLE pgqueue.jobs VALIDATE CONSTRAINT jobs_lease_expires_check;
