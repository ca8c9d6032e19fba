-- 0017: keyed batches take their keys in one order; pgqueue.max_args_bytes takes a size
-- with a unit; a finished job always says when it finished.
--
-- pgqueue.enqueue_many inserted its rows in input order, so two batches holding the same
-- idempotency keys in different orders could each wait for a key the other had taken:
-- one of them failed with a deadlock (its whole transaction aborted). The rows now go
-- in by key (each call takes its keys in the same order); ids still come back in input
-- order. Batches spread over several statements of a transaction can still deadlock:
-- that order is the caller's.
--
-- `pgqueue.max_args_bytes` is read as pg_size_bytes() reads a size: a number of bytes,
-- or with a unit of bytes, kB, MB, GB or TB (`'256kB'`, any case; a fraction is
-- rounded). Anything else, less than one byte or more than a bigint holds, fails every
-- insert with an error naming the setting, where it failed with `invalid input syntax
-- for type bigint`, or refused every job ('0', '-1').
--
-- A job inserted as succeeded or cancelled without a finished_at (a plain INSERT) was
-- never pruned: the pruner goes by finished_at. Such a row is now refused
-- (jobs_finished_at_check). Rows stored before get the migration's time, so they are
-- pruned a retention after it. The constraint is added NOT VALID (no scan of the table
-- while it is locked): every row satisfies it once the UPDATE below ran under that lock,
-- and 0018 validates it under a weaker lock.

CREATE OR REPLACE FUNCTION pgqueue.enqueue_many(
    tasks text[],
    args jsonb[],
    queues text[],
    priorities integer[],
    run_ats timestamptz[],
    max_attempts integer[],
    idempotency_keys text[]
) RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    n integer := cardinality(tasks);
    ids bigint[];
    keyed boolean;
    bad text;
BEGIN
    IF tasks IS NULL OR array_ndims(tasks) > 1 THEN
        RAISE EXCEPTION 'pgqueue.enqueue_many: tasks must be a one-dimensional array'
            USING ERRCODE = '22023';
    END IF;
    SELECT a.name INTO bad
    FROM (VALUES ('args', array_ndims(args), cardinality(args)),
                 ('queues', array_ndims(queues), cardinality(queues)),
                 ('priorities', array_ndims(priorities), cardinality(priorities)),
                 ('run_ats', array_ndims(run_ats), cardinality(run_ats)),
                 ('max_attempts', array_ndims(max_attempts), cardinality(max_attempts)),
                 ('idempotency_keys', array_ndims(idempotency_keys),
                  cardinality(idempotency_keys)))
        AS a(name, ndims, len)
    WHERE a.len IS DISTINCT FROM n OR a.ndims > 1
    LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue.enqueue_many: % must be a one-dimensional array of % elements,'
                        ' as many as tasks', bad, n
            USING ERRCODE = '22023',
                  HINT = 'a NULL element takes the column''s default; a NULL array is refused';
    END IF;
    IF n = 0 THEN
        RETURN ARRAY[]::bigint[];
    END IF;
    -- Ids are drawn first so the result can be returned in input order (bigint[] is
    -- fixed-width: subscripting it is cheap).
    SELECT array_agg(nextval((SELECT pg_get_serial_sequence('pgqueue.jobs', 'id')::regclass)))
        INTO ids FROM generate_series(1, n);
    -- By key (rows without one keep their input order, after the keyed ones): every
    -- call waits for the keys it shares with another in the same order.
    INSERT INTO pgqueue.jobs
        (id, task, args, queue, priority, run_at, max_attempts, idempotency_key)
    SELECT ids[t.k], t.task, coalesce(t.args, '{}'::jsonb), coalesce(t.queue, 'default'),
           coalesce(t.priority, 0), coalesce(t.run_at, now()), coalesce(t.max_attempts, 20),
           t.key
    FROM unnest(tasks, args, queues, priorities, run_ats, max_attempts, idempotency_keys)
        WITH ORDINALITY AS t(task, args, queue, priority, run_at, max_attempts, key, k)
    ORDER BY t.key, t.k
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    SELECT bool_or(key IS NOT NULL) INTO keyed FROM unnest(idempotency_keys) AS key;
    IF keyed THEN
        -- Keys already held (or repeated in this batch): the holder's id, via
        -- pgqueue.enqueue's race-safe lookup.
        SELECT array_agg(
                   CASE WHEN t.key IS NULL OR EXISTS (
                            SELECT 1 FROM pgqueue.jobs AS j WHERE j.id = ids[t.k])
                        THEN ids[t.k]
                        ELSE pgqueue.enqueue(t.task, t.args, t.queue, t.priority, t.run_at,
                                             t.max_attempts, t.key)
                   END ORDER BY t.k)
            INTO ids
        FROM unnest(tasks, args, queues, priorities, run_ats, max_attempts, idempotency_keys)
            WITH ORDINALITY AS t(task, args, queue, priority, run_at, max_attempts, key, k);
    END IF;
    RETURN ids;
END
$$;

-- As 0014's, reading pgqueue.max_args_bytes as a size.
CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    max_text text := btrim(
        coalesce(current_setting('pgqueue.max_args_bytes', true), ''), E' \t\n\r\f\x0b');
    max_bytes bigint;
    size_parts text[];
    size numeric;
    -- Read as Postgres reads a boolean: any case, surrounding white space ignored.
    notify_setting text := lower(btrim(
        coalesce(current_setting('pgqueue.notify_inserts', true), ''), E' \t\n\r\f\x0b'));
    limit_text text;
    room_key text;
    cached text;
    room boolean;
    too_big record;
BEGIN
    IF max_text = '' THEN
        max_bytes := 1048576;
    ELSE
        -- Computed here in numeric rather than by pg_size_bytes(), which aborts with its
        -- own message on what it cannot read and overflows on a huge value; no
        -- backslash in the pattern (see 0014).
        size_parts := regexp_match(lower(max_text),
            '^([0-9]{1,15}([.][0-9]{0,6})?)[[:space:]]*(bytes|kb|mb|gb|tb)?$');
        IF size_parts IS NOT NULL THEN
            size := round(size_parts[1]::numeric * CASE size_parts[3]
                WHEN 'kb' THEN 1024 WHEN 'mb' THEN 1048576 WHEN 'gb' THEN 1073741824
                WHEN 'tb' THEN 1099511627776 ELSE 1 END);
            IF size BETWEEN 1 AND 9223372036854775807 THEN
                max_bytes := size;
            END IF;
        END IF;
    END IF;
    IF max_bytes IS NULL THEN
        RAISE EXCEPTION 'pgqueue: the setting pgqueue.max_args_bytes is %, not a size from one'
                        ' byte to 8 EB', quote_literal(current_setting('pgqueue.max_args_bytes', true))
            USING ERRCODE = '22023',
                  HINT = 'set pgqueue.max_args_bytes to a number of bytes, or with a unit'
                         ' (bytes, kB, MB, GB, TB), e.g. 262144 or ''256kB''; unset, 1MB';
    END IF;
    SELECT n.task, octet_length(n.args::text) AS bytes INTO too_big
    FROM new_jobs AS n
    WHERE octet_length(n.args::text) > max_bytes
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgqueue: args of a % job are % bytes, over the limit of % bytes',
            too_big.task, too_big.bytes, max_bytes
            USING ERRCODE = '54000',
                  HINT = 'raise the limit with the setting pgqueue.max_args_bytes';
    END IF;
    -- Unset (or empty), and Postgres' spellings of true and false with their prefixes.
    IF notify_setting IN ('', 'on', 't', 'tr', 'tru', 'true', 'y', 'ye', 'yes', '1') THEN
        -- pgqueue.notify_room(), kept in step with it.
        limit_text := btrim(coalesce(current_setting('pgqueue.notify_max_queue_usage', true),
                                     ''), E' \t\n\r\f\x0b');
        room_key := limit_text || '@' || extract(epoch FROM now())::bigint;
        cached := current_setting('pgqueue.notify_room_cache', true);
        IF cached IN (room_key || ':t', room_key || ':f') THEN
            room := cached = room_key || ':t';
        ELSE
            room := pg_notification_queue_usage() <
                CASE WHEN limit_text ~ '^[+]?([0-9]{1,15}([.][0-9]{0,15})?|[.][0-9]{1,15})([eE][-+]?[0-9]{1,2})?$'
                     THEN limit_text::double precision ELSE 0.5 END;
            PERFORM set_config('pgqueue.notify_room_cache',
                               room_key || CASE WHEN room THEN ':t' ELSE ':f' END, false);
        END IF;
        IF room THEN
            PERFORM pg_notify('pgqueue_jobs', q.queue)
            FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'queued') AS q;
        END IF;
    ELSIF notify_setting NOT IN ('off', 'of', 'f', 'fa', 'fal', 'fals', 'false', 'n', 'no', '0')
    THEN
        -- Refused rather than read as on or off: a typo must not change wake-ups silently.
        RAISE EXCEPTION 'pgqueue: the setting pgqueue.notify_inserts is %, not on or off',
            quote_literal(current_setting('pgqueue.notify_inserts', true))
            USING ERRCODE = '22023',
                  HINT = 'set pgqueue.notify_inserts to on (the default) or off'
                         ' (or true/false, yes/no, 1/0)';
    END IF;
    RETURN NULL;
END
$$;

ALTER TABLE pgqueue.jobs
    ADD CONSTRAINT jobs_finished_at_check
        CHECK (state NOT IN ('succeeded', 'cancelled') OR finished_at IS NOT NULL) NOT VALID;
UPDATE pgqueue.jobs SET finished_at = now()
WHERE state IN ('succeeded', 'cancelled') AND finished_at IS NULL;
