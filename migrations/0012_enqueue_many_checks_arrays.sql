-- 0012: pgqueue.enqueue_many refuses arrays that do not line up, instead of enqueueing
-- what it could make of them. 0006/0008 returned no ids and enqueued nothing when tasks
-- was empty or NULL whatever the other arrays held, took a whole NULL array as that
-- column's defaults (the length check compared NULL), and flattened a two-dimensional
-- array into jobs. Now tasks must be a one-dimensional array, and every other array
-- one-dimensional with as many elements (error 22023, naming it); a NULL element still
-- takes its column's default. Nothing else changes.
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
    INSERT INTO pgqueue.jobs
        (id, task, args, queue, priority, run_at, max_attempts, idempotency_key)
    SELECT ids[t.k], t.task, coalesce(t.args, '{}'::jsonb), coalesce(t.queue, 'default'),
           coalesce(t.priority, 0), coalesce(t.run_at, now()), coalesce(t.max_attempts, 20),
           t.key
    FROM unnest(tasks, args, queues, priorities, run_ats, max_attempts, idempotency_keys)
        WITH ORDINALITY AS t(task, args, queue, priority, run_at, max_attempts, key, k)
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
