-- 0015: created_at holds a time a worker can read back, as 0010 made run_at.
--
-- created_at defaults to now(), but a plain INSERT may give it: 'infinity', '-infinity'
-- or a year past 9999 went in, and Python's datetimes cannot hold them. A claim that
-- picked such a job committed and then failed to decode its whole batch: every job in
-- it was orphaned, rescued and run alone, and the culprit ended in the dead-letter table
-- as if its worker had died. The bounds are 0010's. A job that breaks them stops the
-- migration, naming its id; set its created_at to a real time and migrate again.
DO $$
DECLARE
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs
          WHERE NOT (created_at >= '0001-01-02 00:00:00+00'
                     AND created_at <= '9999-12-30 00:00:00+00')
          ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a created_at no worker can read', bad
            USING ERRCODE = '23514',
                  HINT = 'give them a real time (UPDATE pgqueue.jobs SET created_at = now()'
                         ' WHERE id = ANY (...)), then run pgqueue migrate again';
    END IF;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_created_at_range
        CHECK (created_at >= '0001-01-02 00:00:00+00'
               AND created_at <= '9999-12-30 00:00:00+00');
