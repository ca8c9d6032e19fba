-- 0013: a queue name has no white space at either end.
--
-- pgqueue.enqueue (Python) refuses such a name, but a plain INSERT could store one: no
-- worker can serve it (`pgqueue-worker --queues` strips the names it is given, and the
-- Worker refuses a padded one), so its jobs waited forever without an error anywhere.
-- A plain INSERT of one now fails with this constraint's name. A job already stored with
-- such a queue stops the migration, naming its id: move it to the queue it was meant
-- for (or delete it), then migrate again. Nothing is changed for you: a job that never
-- ran could start the moment its queue is fixed.
DO $$
DECLARE
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs WHERE queue ~ '^\s|\s$' ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a queue name with white space at an end', bad
            USING ERRCODE = '23514',
                  HINT = 'name the queue they were meant for (UPDATE pgqueue.jobs SET queue ='
                         ' btrim(queue, E'' \t\n\r\f\v'') WHERE id = ANY (...)) or delete them,'
                         ' then run pgqueue migrate again';
    END IF;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_queue_trimmed_check CHECK (queue !~ '^\s|\s$') NOT VALID;
ALTER TABLE pgqueue.jobs VALIDATE CONSTRAINT jobs_queue_trimmed_check;
