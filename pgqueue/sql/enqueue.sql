-- The producer statements below run on the caller's connection and name their result
-- column pgqueue_job_id(s), which store._check_ours reads: behind a pooler in transaction
-- mode, a statement psycopg prepared under a name another client also used runs that
-- client's statement instead (its result, and its writes, are not ours).

-- name: enqueue_job
-- Enqueues one job through pgqueue.enqueue (one round trip, in the caller's transaction);
-- an idempotency key already held returns the holder's id and inserts nothing. A delay
-- is added to the database's clock, not the producer's, as of this statement
-- (statement_timestamp()): from the transaction's start (now()), a job enqueued late in
-- a long transaction was due before it was committed. No delay (NULL): due at now(), as
-- the column's default and COPY make it, so that the jobs of one transaction keep their
-- order whichever statement enqueued them (the claim orders by run_at before id).
-- Every parameter is cast: a caller's connection may adapt Python ints as numeric (a
-- psycopg option), and a function call, unlike an INSERT, finds no candidate for numeric
-- arguments.
SELECT pgqueue.enqueue(
    %(task)s::text, %(args)s::jsonb, %(queue)s::text, %(priority)s::int,
    coalesce(%(run_at)s::timestamptz,
             statement_timestamp() + make_interval(secs => %(delay_seconds)s::float8), now()),
    %(max_attempts)s::int, %(idempotency_key)s::text) AS pgqueue_job_id;

-- name: insert_job
-- Enqueues one job without an idempotency key: the INSERT pgqueue.enqueue would run,
-- sent directly (one round trip, in the caller's transaction). Calling the PL/pgSQL
-- function instead cost Postgres about 10 us more CPU per job (125 vs 135 us, measured
-- from the backend's /proc stat over 2,000 statements; see issue 5's notes). Positional
-- parameters: task, args, queue, priority, run_at, delay_seconds, max_attempts. A delay
-- (or none) as in enqueue_job.
INSERT INTO pgqueue.jobs (task, args, queue, priority, run_at, max_attempts)
VALUES (%s, %s::jsonb, %s, %s,
        coalesce(%s::timestamptz, statement_timestamp() + make_interval(secs => %s::float8),
                 now()), %s)
RETURNING id AS pgqueue_job_id;

-- name: insert_job_with_defaults
-- As insert_job, for a job that takes the columns' defaults for priority (0),
-- max_attempts (20) and run_at (now()), the common case: fewer parameters for the
-- client to adapt and for Postgres to bind and evaluate (tests/test_enqueue.py checks
-- the defaults match Python's). Positional parameters: task, args, queue.
INSERT INTO pgqueue.jobs (task, args, queue) VALUES (%s, %s::jsonb, %s)
RETURNING id AS pgqueue_job_id;

-- name: enqueue_jobs
-- Enqueues many jobs in one round trip through pgqueue.enqueue_many; ids in input order.
-- Delays (or none) as in enqueue_job.
SELECT pgqueue.enqueue_many(
    %(tasks)s::text[], %(args)s::jsonb[], %(queues)s::text[], %(priorities)s::int[],
    ARRAY(SELECT coalesce(t.run_at,
                          statement_timestamp() + make_interval(secs => t.delay_seconds),
                          now())
          FROM unnest(%(run_ats)s::timestamptz[], %(delays)s::float8[])
              WITH ORDINALITY AS t(run_at, delay_seconds, k)
          ORDER BY t.k),
    %(max_attempts)s::int[], %(idempotency_keys)s::text[]) AS pgqueue_job_ids;

-- name: reserve_job_ids
-- Draws %(n)s job ids from the jobs id sequence, for a COPY that must report its ids in
-- input order (COPY cannot return them). The sequence is looked up once, in the scalar
-- subquery (an InitPlan): written as nextval(pg_get_serial_sequence(...)) the lookup and
-- its text-to-regclass cast ran for every id, about 8 us each (50,000 ids: 385 ms -> 41 ms).
SELECT array_agg(nextval((SELECT pg_get_serial_sequence('pgqueue.jobs', 'id')::regclass)))
    AS pgqueue_job_ids
FROM generate_series(1, %(n)s);

-- name: copy_jobs
-- Bulk enqueue without idempotency keys: COPY into pgqueue.jobs (about 3x faster than the
-- INSERT in pgqueue.enqueue_many). The statement-level insert trigger still runs once:
-- one notification per queue, the payload size check.
COPY pgqueue.jobs (id, task, args, queue, priority, run_at, max_attempts) FROM STDIN;

-- name: copy_jobs_with_defaults
-- As copy_jobs, for a batch whose every job takes the columns' defaults for priority (0),
-- max_attempts (20) and run_at (now()): fewer columns for Postgres to parse, about 20%
-- less of its time per row (tests/test_enqueue.py checks the defaults match Python's).
COPY pgqueue.jobs (id, task, args, queue) FROM STDIN;
