-- 0013: a queue name has no white space at either end.
--
-- pgqueue.enqueue (Python) refuses such a name, but a plain INSERT could store one: no
-- worker can serve it (`pgqueue-worker --queues` strips the names it is given, and the
-- Worker refuses a padded one), so its jobs waited forever without an error anywhere.
-- A plain INSERT of one now fails with this constraint's name. "White space" is what
-- Python's str.isspace() says it is, spelt out: the regex class \s follows the
-- database's locale and misses some of them (U+00A0, U+0085, U+001C..U+001F, and more
-- under ctype C). In a single-byte encoding the regex compares bytes, and 0x85 or 0xA0
-- are letters in some (WIN1251, WIN866, KOI8R): there only ASCII white space is refused,
-- and in LATIN1 its two others too.
--
-- A job already stored with such a queue stops the migration, naming its id: move it to
-- the queue it was meant for (or delete it), then migrate again. Nothing is changed for
-- you: a job that never ran could start the moment its queue is fixed. The table is
-- locked first, so that no such row can slip in between the check and the constraint;
-- the lock is held until the migration commits (the check and the constraint each read
-- the table once: 0.46 s for a million jobs on a 2-core machine). Waiting for that lock
-- behind an open transaction would make every statement on the table queue up behind
-- this one: after 5 s it gives up instead (run `pgqueue migrate` again).
SET LOCAL lock_timeout = '5s';
LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    space text := CASE getdatabaseencoding()
        WHEN 'UTF8' THEN
            '[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
        WHEN 'LATIN1' THEN '[\t-\r\x1c-\x20\x85\xa0]'
        ELSE '[\t-\r\x1c-\x20]'
    END;
    padded text := '^' || space || '|' || space || '$';
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs WHERE queue ~ padded ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a queue name with white space at an end', bad
            USING ERRCODE = '23514',
                  HINT = 'give them the queue they were meant for (UPDATE pgqueue.jobs SET'
                         ' queue = ''...'' WHERE id = ANY (...)) or delete them, then run'
                         ' pgqueue migrate again';
    END IF;
    EXECUTE format(
        'ALTER TABLE pgqueue.jobs ADD CONSTRAINT jobs_queue_trimmed_check CHECK (queue !~ %L)',
        padded);
END
$$;
