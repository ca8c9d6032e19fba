-- name: try_lock_migrations
-- lock_migrations' lock if it is free (held until unlock_migrations); else who holds it:
-- a session advisory lock on one bigint key is listed with its high half in classid and
-- its low half in objid.
SELECT pg_try_advisory_lock(hashtext('pgqueue.migrate')) AS acquired,
       (SELECT l.pid FROM pg_catalog.pg_locks AS l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                            WHERE d.datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint)
              = hashtext('pgqueue.migrate')::bigint
          AND l.pid <> pg_backend_pid()
        LIMIT 1) AS holder;

-- name: lock_migrations
-- Serialises concurrent migrators: a session advisory lock, held until unlock_migrations.
-- Waited for without limit, whatever lock_timeout or statement_timeout the role or
-- database sets (a second migrator failed with a bare "lock timeout", or "canceling
-- statement due to statement timeout"): the other migrator ends, each of its migrations
-- bounded by its own lock timeout (set_migration_lock_timeout). SET LOCAL: for this wait
-- alone (the statements are one implicit transaction), not for the session's later
-- statements.
SET LOCAL lock_timeout = 0;
SET LOCAL statement_timeout = 0;
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
-- behind it for as long as some open transaction holds the table. No statement timeout:
-- one the role or database sets for its application's queries cancelled a migration
-- that reads a big table (0013 on 500,000 jobs under 100 ms).
SELECT set_config('lock_timeout', %(lock_timeout)s, true),
       set_config('statement_timeout', '0', true);

-- name: record_migration
INSERT INTO pgqueue.schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s);

-- name: update_migration_checksum
-- A migration recorded with an earlier text that differs in comments alone (see
-- migrate.SAME_SCHEMA_CHECKSUMS): the record takes the shipped text's checksum.
UPDATE pgqueue.schema_migrations SET checksum = %(checksum)s WHERE version = %(version)s;

-- name: lock_holders
-- For a migration that gave up waiting for its lock: the oldest open transactions that
-- hold a lock on one of pgqueue's tables (the usual blocker is a session idle in a
-- transaction that read or wrote one), so that its error can name them.
SELECT a.pid, a.state, extract(epoch FROM now() - a.xact_start)::float8 AS xact_seconds
FROM pg_catalog.pg_stat_activity AS a
WHERE a.xact_start IS NOT NULL
  AND a.pid IN (SELECT l.pid
                FROM pg_catalog.pg_locks AS l
                JOIN pg_catalog.pg_class AS c ON c.oid = l.relation
                JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
                WHERE l.granted AND n.nspname = 'pgqueue' AND l.pid <> pg_backend_pid()
                  -- This database's (a copy from a template has the same oids).
                  AND l.database = (SELECT d.oid FROM pg_catalog.pg_database AS d
                                    WHERE d.datname = current_database()))
ORDER BY a.xact_start
LIMIT 3;
