-- 0019: pgqueue.dead_jobs has the job's `state` column, as pgqueue.jobs does: always
-- 'dead' (a row of the dead-letter table is a dead job), so that code reading a job from
-- either table finds a state column (text here: the jobs table's enum has no 'dead').
-- Every writer of dead_jobs names its columns and gets the default.
--
-- A constant default is stored once in the catalog (no rewrite of the table). The CHECK
-- is added NOT VALID, so that this migration does not read the whole table under its
-- ACCESS EXCLUSIVE lock (which would hold off every dead-lettering meanwhile); it still
-- holds for every row written from now on, and 0020 validates it apart.
ALTER TABLE pgqueue.dead_jobs ADD COLUMN state text NOT NULL DEFAULT 'dead';
ALTER TABLE pgqueue.dead_jobs
    ADD CONSTRAINT dead_jobs_state_check CHECK (state = 'dead') NOT VALID;
