-- 0013: a queue name has no white space at either end.
--
-- pgqueue.enqueue (Python) refuses such a name, but a plain INSERT could store one: no
-- worker can serve it (`pgqueue-worker --queues` strips the names it is given, and the
-- Worker refuses a padded one), so its jobs waited forever without an error anywhere.
-- A plain INSERT of one now fails with this constraint's name. "White space" is what
-- Python's str.isspace() says it is, spelt out: the regex class \s follows the
-- database's locale and misses some of them (U+00A0, U+0085, U+001C..U+001F, and more
-- under ctype C), which enqueue() refuses and no worker could name.
--
-- A job already stored with such a queue stops the migration, naming its id: move it to
-- the queue it was meant for (or delete it), then migrate again. Nothing is changed for
-- you: a job that never ran could start the moment its queue is fixed. The table is
-- locked first, so that no such row can slip in between the check and the constraint
-- (adding the constraint holds that lock until the migration commits anyway).
LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs
          WHERE queue ~ '^[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
          ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a queue name with white space at an end', bad
            USING ERRCODE = '23514',
                  HINT = 'give them the queue they were meant for (UPDATE pgqueue.jobs SET'
                         ' queue = ''...'' WHERE id = ANY (...)) or delete them, then run'
                         ' pgqueue migrate again';
    END IF;
END
$$;
ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_queue_trimmed_check CHECK (
        queue !~ '^[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]$'
    );
