-- 0023: a job whose id pgqueue.dead_jobs already holds is dead-lettered under a new id.
--
-- Ids repeat after an explicit id in an INSERT or a sequence set back (a restore that
-- did not carry the sequence along). Moving such a job to the dead-letter table failed on
-- its primary key: the worker's move failed, the job ran again until its lease expired,
-- and the reaper could not move it either, so it stayed running, an operator's to clear.
-- Now the move gives it the next id of the jobs sequence that neither table holds, and
-- records the id it had in `original_id` (NULL for every other dead job), so that
-- `pgqueue status <its id>` still finds it and a worker checking whether a lost commit
-- landed finds its own entry.
--
-- Adding a nullable column without a default does not rewrite the table. Building the
-- partial index reads the dead-letter table once and holds off dead-lettering (not claims
-- or enqueues) meanwhile, about a second per million dead jobs (as 0016).
ALTER TABLE pgqueue.dead_jobs ADD COLUMN original_id bigint;
CREATE INDEX dead_jobs_original_id_idx ON pgqueue.dead_jobs (original_id)
    WHERE original_id IS NOT NULL;

-- The id a job dying now is stored under: its own, unless the dead-letter table holds it;
-- then the next value of the jobs sequence that neither table holds. Values are taken
-- from the sequence until one is free, so after a sequence was set back the first such
-- move walks past the ids the old dead jobs hold (and enqueues that follow get ids past
-- them too). Checking pgqueue.jobs as well means a revived dead job (`dead retry`) keeps
-- the id it is stored under. `batch` holds the ids the calling statement moves: a
-- function called from it sees that statement's own changes so far, and an id of the
-- batch deleted from pgqueue.jobs but not yet inserted into pgqueue.dead_jobs would look
-- free (Postgres moves each row before it looks at the next today; the argument guards
-- other plans). A job's own id cannot be taken by a concurrent move: only a move of that
-- job (whose row the caller holds locked) inserts it as its own, and a concurrent search
-- for a free id still sees the row in pgqueue.jobs until that move commits.
-- Each id walked past costs about 5 us (two primary-key probes and a nextval; a million
-- taken ids in a row took 4.5 s), all in the one statement that moves the job, and only
-- once: the sequence is past them. The moves call this only for an id the table holds
-- (a call costs more than a probe).
-- SECURITY DEFINER: taking a value from the sequence needs a grant on it that the roles
-- running workers and reapers would otherwise need for this rare move alone (a role
-- made after this migration, its DO block not run again, would fail the reaper's whole
-- dead-letter batch on the first such job, pass after pass). It reads two tables by id
-- and takes sequence values; every name in it is schema-qualified and search_path is
-- pinned. EXECUTE stays with PUBLIC (the default, as for pgqueue's other functions, none
-- of which is SECURITY DEFINER): calling it needs USAGE on schema pgqueue, which pgqueue
-- grants only its own roles, and what a caller gains, taking values from the sequence
-- and learning whether a dead id exists, pgqueue_producer has anyway.
CREATE FUNCTION pgqueue.dead_letter_id(job_id bigint, batch bigint[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    seq regclass := pg_catalog.pg_get_serial_sequence('pgqueue.jobs', 'id')::regclass;
    candidate bigint;
BEGIN
    IF seq IS NULL THEN
        RAISE EXCEPTION 'pgqueue: pgqueue.jobs.id has no sequence to take a new dead id from'
            USING ERRCODE = '55000';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgqueue.dead_jobs AS d WHERE d.id = job_id) THEN
        RETURN job_id;
    END IF;
    LOOP
        candidate := nextval(seq);
        IF NOT coalesce(candidate = ANY (batch), false)
           AND NOT EXISTS (SELECT 1 FROM pgqueue.dead_jobs AS d WHERE d.id = candidate)
           AND NOT EXISTS (SELECT 1 FROM pgqueue.jobs AS j WHERE j.id = candidate) THEN
            RETURN candidate;
        END IF;
    END LOOP;
END
$$;

COMMENT ON FUNCTION pgqueue.dead_letter_id(bigint, bigint[]) IS
    'pgqueue internal: the id a dying job is stored under in pgqueue.dead_jobs (its own '
    'unless that table holds it, then the next free id of the jobs sequence).';

-- Where PUBLIC may not run pgqueue's functions: roles made after this migration ran need
-- this block run again (README, "Least privilege").
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT EXECUTE ON FUNCTION pgqueue.dead_letter_id(bigint, bigint[]) TO pgqueue_worker;
    END IF;
END
$$;
