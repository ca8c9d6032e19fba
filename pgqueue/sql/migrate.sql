-- name: lock_migrations
-- Serialises concurrent migrators: a session advisory lock, held until unlock_migrations.
-- Waited for without limit, whatever lock_timeout the role or database sets (a second
-- migrator failed with a bare "lock timeout"): the other migrator ends, each of its
-- migrations bounded by its own lock timeout (set_migration_lock_timeout). SET LOCAL:
-- for this wait alone (the two statements are one implicit transaction), not for the
-- session's later statements.
SET LOCAL lock_timeout = 0;
SELECT pg_advisory_lock(hashtext('pgqueue.migrate'));

-- name: unlock_migrations
SELECT pg_advisory_unlock(hashtext('pgqueue.migrate'));

-- name: create_migrations_table
-- The record of applied migrations; created before the first migration runs. The schema
-- only where it is missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
-- when the schema exists, which its owner, upgrading it, may lack.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = 'pgqueue') THEN
        CREATE SCHEMA pgqueue;
    END IF;
END
$$;
CREATE TABLE IF NOT EXISTS pgqueue.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migration_records
-- What `pgqueue migrate` checks checksums against and `pgqueue migrate --status` shows.
SELECT version, name, checksum, applied_at FROM pgqueue.schema_migrations ORDER BY version;

-- name: applied_versions
-- What pgqueue-worker and pgqueue-reaper compare with the migrations they ship.
SELECT version FROM pgqueue.schema_migrations ORDER BY version;

-- name: set_migration_lock_timeout
-- For the migration's own transaction: how long its statements wait for a lock (0: no
-- limit) before the migration fails, instead of queueing every statement on the table
-- behind it for as long as some open transaction holds the table.
SELECT set_config('lock_timeout', %(lock_timeout)s, true);

-- name: record_migration
INSERT INTO pgqueue.schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s);
