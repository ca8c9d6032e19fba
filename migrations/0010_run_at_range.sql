-- 0010: run_at holds a time a worker can read back.
--
-- A plain INSERT could store run_at = 'infinity' or '-infinity', or a year past 9999:
-- Postgres takes them, Python's datetimes cannot. A claim that picked such a job
-- committed and then failed to decode its batch (the whole batch's jobs were orphaned
-- until the next heartbeat released them, and picked again), and `pgqueue stats` failed
-- with "cannot subtract infinite timestamps". The bounds leave a day's margin at either
-- end for the session's time zone; pgqueue.enqueue (Python) refuses the same values with
-- a ValidationError before sending anything. A job that breaks the range stops the
-- migration, naming its id; set its run_at to a real time and migrate again.
DO $$
DECLARE
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs
          WHERE NOT (run_at >= '0001-01-02 00:00:00+00' AND run_at <= '9999-12-30 00:00:00+00')
          ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a run_at no worker can read', bad
            USING ERRCODE = '23514',
                  HINT = 'give them a real time (UPDATE pgqueue.jobs SET run_at = now()'
                         ' WHERE id = ANY (...)), then run pgqueue migrate again';
    END IF;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_run_at_range
        CHECK (run_at >= '0001-01-02 00:00:00+00' AND run_at <= '9999-12-30 00:00:00+00');
