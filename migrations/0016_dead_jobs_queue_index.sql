-- 0016: the dead-letter table is indexed by queue, and a queue name has no comma.
--
-- The metrics' and `pgqueue stats`' per-queue dead counts read the whole dead-letter
-- table once per queue (no index held its queue): seconds per scrape with a few hundred
-- thousand dead jobs. Building the index holds off dead-lettering (not claims or
-- enqueues) for as long as it takes, about a second per million dead jobs.
--
-- `pgqueue-worker --queues a,b` splits on commas, so a queue named with one could be
-- enqueued to (Python refuses it now) but no worker could serve it: its jobs waited
-- forever without an error anywhere. A plain INSERT of one now fails with this
-- constraint's name. A job already stored with such a queue stops the migration, naming
-- its id: give it the queue it was meant for (or delete it), then migrate again. The
-- table is locked first, so that no such row can slip in between the check and the
-- constraint (each reads the table once).
LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs WHERE strpos(queue, ',') > 0 ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a queue name with a comma, which no worker can serve', bad
            USING ERRCODE = '23514',
                  HINT = 'give them the queue they were meant for (UPDATE pgqueue.jobs SET'
                         ' queue = ''...'' WHERE id = ANY (...)) or delete them, then run'
                         ' pgqueue migrate again';
    END IF;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_queue_no_comma CHECK (strpos(queue, ',') = 0);
CREATE INDEX dead_jobs_queue_idx ON pgqueue.dead_jobs (queue);
