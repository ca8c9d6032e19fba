-- 0011: workers may read which migrations are applied. pgqueue-worker and pgqueue-reaper
-- compare pgqueue.schema_migrations with the migrations their own version ships: at
-- start they log which ones the database lacks (code upgraded, `pgqueue migrate` not
-- run yet) or which newer ones it has, and /healthz answers 503 while the database is
-- behind. The pgqueue_worker role of 0005 needs SELECT on the table for that; where the
-- role does not exist yet, running 0005 and then this file again grants it (both are
-- idempotent). A worker that may not read the table skips the comparison.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT SELECT ON pgqueue.schema_migrations TO pgqueue_worker;
    END IF;
END
$$;
