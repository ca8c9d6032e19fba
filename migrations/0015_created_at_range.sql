-- 0015: created_at holds a time a worker can read back, as 0010 made run_at.
--
-- created_at defaults to now(), but a plain INSERT may give it: 'infinity', '-infinity'
-- or a year past 9999 went in, and Python's datetimes cannot hold them. A claim that
-- picked such a job committed and then failed to decode its whole batch: every job in
-- it was orphaned, rescued and run alone, and the culprit ended in the dead-letter table
-- as if its worker had died. The bounds are 0010's, on both tables (`pgqueue dead retry`
-- moves a dead job's created_at back into pgqueue.jobs). A job that breaks them stops
-- the migration, naming its table and id; set its created_at to a real time and migrate
-- again.
DO $$
DECLARE
    bad bigint[];
    tab text;
BEGIN
    FOREACH tab IN ARRAY ARRAY['jobs', 'dead_jobs'] LOOP
        EXECUTE format(
            'SELECT array_agg(id ORDER BY id) FROM (SELECT id FROM pgqueue.%I'
            ' WHERE NOT (created_at >= %L AND created_at <= %L) ORDER BY id LIMIT 20) AS b',
            tab, '0001-01-02 00:00:00+00', '9999-12-30 00:00:00+00')
        INTO bad;
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'pgqueue: % % have a created_at no worker can read', tab, bad
                USING ERRCODE = '23514',
                      HINT = format('give them a real time (UPDATE pgqueue.%I SET created_at'
                                    ' = now() WHERE id = ANY (...)), then run pgqueue'
                                    ' migrate again', tab);
        END IF;
    END LOOP;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_created_at_range
        CHECK (created_at >= '0001-01-02 00:00:00+00'
               AND created_at <= '9999-12-30 00:00:00+00');
ALTER TABLE pgqueue.dead_jobs
    ADD CONSTRAINT dead_jobs_created_at_range
        CHECK (created_at >= '0001-01-02 00:00:00+00'
               AND created_at <= '9999-12-30 00:00:00+00');
