-- 0025: a task name of white space alone is refused on every path; pgqueue.enqueue and
-- pgqueue.enqueue_many say what is wrong with a job they refuse.
--
-- jobs_task_check refused a task name matching '^\s*$', and the regex class \s follows
-- the database's locale: names made only of U+00A0, U+0085 or U+001C..U+001F (and more
-- under ctype C) were stored. Python refuses them (no registry can hold one), so no
-- worker could run such a job: it was retried as an unknown task, 20 attempts over
-- about 8 hours by default, then dead-lettered. White space is spelt out as in 0013
-- (what Python's str.isspace() says it is), with 0013's limits: in a single-byte
-- encoding the regex compares bytes, so outside UTF8 and LATIN1 only ASCII white space
-- is refused (0xA0 is a letter in some). Jobs already dead with such a task are not
-- checked: `pgqueue dead retry` names one it cannot move back. A job already stored with such a task
-- stops the migration, naming its id: delete it (no worker can run it), then migrate
-- again. The table is locked first, so that no such row can slip in between the check
-- and the constraint (each reads the table once, as 0013's did: 0.46 s for a million
-- jobs on a 2-core machine).
--
-- The functions refused bad input only through the table's constraints, whose messages
-- name a constraint and dump the row; a priority outside smallint's range failed with
-- a bare `smallint out of range`, naming no column. They now check first and name the
-- argument (and, in enqueue_many, the element) and the rule, with the SQLSTATE the
-- INSERT raises for that fault (23514 check_violation, 22003 numeric_value_out_of_range)
-- and the constraint it stands for, so that code catching those errors keeps working.
-- A NULL task is left to the INSERT's 23502, as before. Input with several faults may
-- be refused for another of them than before: the checks run before the INSERT, in
-- their own order (priority, args, max_attempts, run_at; enqueue_many's elements in
-- input order), and the INSERT's constraints (task, queue, key) after them. A plain INSERT still
-- reports the constraint itself (the README lists what each one means). Python's
-- producers check all of this before sending, so the checks cost them only the few
-- comparisons each call makes.
LOCK TABLE pgqueue.jobs IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    space text := CASE getdatabaseencoding()
        WHEN 'UTF8' THEN
            '[\t-\r\x1c-\x20\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]'
        WHEN 'LATIN1' THEN '[\t-\r\x1c-\x20\x85\xa0]'
        ELSE '[\t-\r\x1c-\x20]'
    END;
    blank text := '^' || space || '*$';
    bad bigint[];
BEGIN
    SELECT array_agg(id ORDER BY id) INTO bad
    FROM (SELECT id FROM pgqueue.jobs WHERE task ~ blank ORDER BY id LIMIT 20) AS b;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgqueue: jobs % have a task name of white space alone, which no'
                        ' worker can run', bad
            USING ERRCODE = '23514',
                  HINT = 'delete them (DELETE FROM pgqueue.jobs WHERE id = ANY (...)), then'
                         ' run pgqueue migrate again';
    END IF;
    EXECUTE format(
        'ALTER TABLE pgqueue.jobs ADD CONSTRAINT jobs_task_not_blank CHECK (task !~ %L)',
        blank);
END
$$;

-- As 0001's, checking its arguments first.
CREATE OR REPLACE FUNCTION pgqueue.enqueue(
    task text,
    args jsonb DEFAULT '{}'::jsonb,
    queue text DEFAULT 'default',
    priority integer DEFAULT 0,
    run_at timestamptz DEFAULT now(),
    max_attempts integer DEFAULT 20,
    idempotency_key text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF enqueue.task IS NULL THEN
        NULL;  -- the INSERT's not-null violation (23502), as before
    ELSIF enqueue.priority NOT BETWEEN -32768 AND 32767 THEN
        RAISE EXCEPTION 'pgqueue.enqueue: priority must be from -32768 to 32767, not %',
                        enqueue.priority
            USING ERRCODE = '22003';
    ELSIF jsonb_typeof(enqueue.args) <> 'object' THEN
        RAISE EXCEPTION 'pgqueue.enqueue: args must be a JSON object, not a JSON %',
                        jsonb_typeof(enqueue.args)
            USING ERRCODE = '23514', SCHEMA = 'pgqueue', TABLE = 'jobs',
                  CONSTRAINT = 'jobs_args_check',
                  HINT = 'pass the handler''s keyword arguments as an object: {"to": "a@b.c"}';
    ELSIF enqueue.max_attempts < 1 THEN
        RAISE EXCEPTION 'pgqueue.enqueue: max_attempts must be at least 1, not %',
                        enqueue.max_attempts
            USING ERRCODE = '23514', SCHEMA = 'pgqueue', TABLE = 'jobs',
                  CONSTRAINT = 'jobs_max_attempts_check';
    ELSIF enqueue.run_at NOT BETWEEN '0001-01-02 00:00:00+00' AND '9999-12-30 00:00:00+00' THEN
        RAISE EXCEPTION 'pgqueue.enqueue: run_at must lie between 0001-01-02 and 9999-12-30'
                        ' UTC, not %', enqueue.run_at
            USING ERRCODE = '23514', SCHEMA = 'pgqueue', TABLE = 'jobs',
                  CONSTRAINT = 'jobs_run_at_range';
    END IF;
    IF idempotency_key IS NULL THEN
        INSERT INTO pgqueue.jobs AS j (task, args, queue, priority, run_at, max_attempts)
        VALUES (enqueue.task, coalesce(enqueue.args, '{}'::jsonb),
                coalesce(enqueue.queue, 'default'), coalesce(enqueue.priority, 0),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.max_attempts, 20))
        RETURNING j.id INTO new_id;
        RETURN new_id;
    END IF;
    -- ON CONFLICT DO NOTHING, then a fresh statement (and so a fresh snapshot) to read
    -- the holder: a holder committed by a concurrent transaction is visible to it. The
    -- loop covers a holder that was pruned in between.
    LOOP
        INSERT INTO pgqueue.jobs AS j
            (task, args, queue, priority, run_at, max_attempts, idempotency_key)
        VALUES (enqueue.task, coalesce(enqueue.args, '{}'::jsonb),
                coalesce(enqueue.queue, 'default'), coalesce(enqueue.priority, 0),
                coalesce(enqueue.run_at, now()), coalesce(enqueue.max_attempts, 20),
                enqueue.idempotency_key)
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING j.id INTO new_id;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
        SELECT j.id INTO new_id FROM pgqueue.jobs AS j
        WHERE j.idempotency_key = enqueue.idempotency_key;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
    END LOOP;
END
$$;

-- As 0017's, checking the elements first (the first one refused is named, counted from
-- 1 as Postgres' arrays are).
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
    refused record;
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
    -- The first element refused, in input order: what is wrong with it, its SQLSTATE and
    -- the constraint it stands for (NULL elements take the defaults, which pass). A
    -- NULL task is left to the INSERT's not-null violation (23502), as before.
    IF array_position(tasks, NULL) IS NULL THEN
        SELECT CASE
                   WHEN t.priority NOT BETWEEN -32768 AND 32767 THEN
                       format('priorities[%s] must be from -32768 to 32767, not %s', t.k,
                              t.priority)
                   WHEN jsonb_typeof(t.args) <> 'object' THEN
                       format('args[%s] must be a JSON object, not a JSON %s', t.k,
                              jsonb_typeof(t.args))
                   WHEN t.max_attempts < 1 THEN
                       format('max_attempts[%s] must be at least 1, not %s', t.k,
                              t.max_attempts)
                   ELSE
                       format('run_ats[%s] must lie between 0001-01-02 and 9999-12-30 UTC,'
                              ' not %s', t.k, t.run_at)
               END AS message,
               CASE
                   WHEN t.priority NOT BETWEEN -32768 AND 32767 THEN ''
                   WHEN jsonb_typeof(t.args) <> 'object' THEN 'jobs_args_check'
                   WHEN t.max_attempts < 1 THEN 'jobs_max_attempts_check'
                   ELSE 'jobs_run_at_range'
               END AS constraint_name
            INTO refused
        FROM unnest(args, priorities, run_ats, max_attempts)
            WITH ORDINALITY AS t(args, priority, run_at, max_attempts, k)
        WHERE jsonb_typeof(t.args) <> 'object'
           OR t.priority NOT BETWEEN -32768 AND 32767
           OR t.max_attempts < 1
           OR t.run_at NOT BETWEEN '0001-01-02 00:00:00+00' AND '9999-12-30 00:00:00+00'
        ORDER BY t.k
        LIMIT 1;
        IF refused.message IS NOT NULL THEN
            IF refused.constraint_name = '' THEN
                RAISE EXCEPTION 'pgqueue.enqueue_many: %', refused.message
                    USING ERRCODE = '22003';
            END IF;
            RAISE EXCEPTION 'pgqueue.enqueue_many: %', refused.message
                USING ERRCODE = '23514', SCHEMA = 'pgqueue', TABLE = 'jobs',
                      CONSTRAINT = refused.constraint_name;
        END IF;
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
