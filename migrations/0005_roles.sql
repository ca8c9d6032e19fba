-- 0005: least-privilege group roles for producers and workers.
--
-- Two NOLOGIN group roles; grant one (or both) to the login role each process uses:
--   GRANT pgqueue_producer TO app_web;      -- code that enqueues and reads job status
--   GRANT pgqueue_worker   TO app_worker;   -- pgqueue-worker and pgqueue-reaper
--
-- pgqueue_producer: USAGE on schema pgqueue; EXECUTE on pgqueue.enqueue and
--   pgqueue.enqueue_many; INSERT into pgqueue.jobs on the producer columns only (id, task,
--   args, queue, priority, run_at, max_attempts, idempotency_key: a producer cannot
--   insert a job already running, finished or with attempts used); USAGE on the jobs id
--   sequence (enqueue_many draws ids from it); SELECT on pgqueue.jobs and
--   pgqueue.dead_jobs (status). No UPDATE or DELETE anywhere. The insert trigger's
--   function needs no grant: Postgres checks EXECUTE on a trigger function when the
--   trigger is created, not when it fires, and what it does (read the inserted rows,
--   pg_notify) needs no privilege.
-- pgqueue_worker: USAGE on schema pgqueue; SELECT, UPDATE, DELETE on pgqueue.jobs (claim,
--   heartbeat, outcomes, reaper requeue, dead-letter move, prune); SELECT, INSERT on
--   pgqueue.dead_jobs (the dead-letter move); SELECT on pgqueue.queues (paused queues);
--   SELECT, INSERT, UPDATE, DELETE on pgqueue.workers (registration, heartbeat, clean
--   exit, the reaper's stale-worker cleanup); EXECUTE on the internal functions its
--   statements call. No INSERT into jobs: a handler that enqueues follow-up jobs needs
--   pgqueue_producer too (grant both).
-- Neither role owns anything, has CREATE on the schema, or can ALTER, DROP or TRUNCATE.
-- Admin operations (pgqueue dead retry/purge, cancel, queue pause/resume, migrate) stay
-- with the schema owner.
--
-- Roles are cluster-wide: they are created only when missing (several databases of one
-- cluster may each run this migration, even at once); the grants are per database. If the
-- migrating role may not create roles, the migration still succeeds and warns: have a
-- superuser (or a CREATEROLE role that owns the schema) run this file again, it is
-- idempotent. Later migrations that add tables or functions these roles use must grant
-- on them too.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['pgqueue_producer', 'pgqueue_worker'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                -- Another database's migration created it just now.
                WHEN duplicate_object OR unique_violation THEN NULL;
                WHEN insufficient_privilege THEN
                    RAISE WARNING 'pgqueue: cannot create role %: %', r, SQLERRM
                        USING HINT = 'have a superuser run migrations/0005_roles.sql '
                                     'again (it is idempotent)';
            END;
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_producer') THEN
        GRANT USAGE ON SCHEMA pgqueue TO pgqueue_producer;
        GRANT EXECUTE ON FUNCTION
            pgqueue.enqueue(text, jsonb, text, integer, timestamptz, integer, text),
            pgqueue.enqueue_many(text[], jsonb[], text[], integer[], timestamptz[], integer[],
                                 text[])
            TO pgqueue_producer;
        GRANT INSERT (id, task, args, queue, priority, run_at, max_attempts, idempotency_key)
            ON pgqueue.jobs TO pgqueue_producer;
        GRANT SELECT ON pgqueue.jobs, pgqueue.dead_jobs TO pgqueue_producer;
        EXECUTE format('GRANT USAGE ON SEQUENCE %s TO pgqueue_producer',
                       pg_catalog.pg_get_serial_sequence('pgqueue.jobs', 'id'));
    END IF;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT USAGE ON SCHEMA pgqueue TO pgqueue_worker;
        GRANT EXECUTE ON FUNCTION
            pgqueue.backoff_delay(integer, double precision, double precision),
            pgqueue.history_entry(integer, text, timestamptz, double precision, text, text)
            TO pgqueue_worker;
        GRANT SELECT, UPDATE, DELETE ON pgqueue.jobs TO pgqueue_worker;
        GRANT SELECT, INSERT ON pgqueue.dead_jobs TO pgqueue_worker;
        GRANT SELECT ON pgqueue.queues TO pgqueue_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON pgqueue.workers TO pgqueue_worker;
    END IF;
END
$$;
