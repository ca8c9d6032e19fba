-- 0022: the database-wide gauges are computed once per interval for the whole fleet, not
-- once per process. Every worker's /metrics serves them (and every reaper's); each ran
-- the per-queue counts itself, and those counts read index entries in proportion to the
-- jobs waiting (some 0.2 s with a million, a second with five): a fleet of N workers
-- cost the database N times that per scrape interval.
--
-- pgqueue.queue_stats_snapshot holds the last result (one row): a process refreshing
-- its gauges reads it if it is young enough; otherwise the one process that gets a
-- transaction-level advisory lock runs the counts and stores them, and the others read
-- the row they find, or count themselves when there is none recent enough. UNLOGGED:
-- a cache, rewritten every few seconds, that need not survive a crash (it is then
-- empty, and the next refresh fills it) nor be replicated.
CREATE UNLOGGED TABLE pgqueue.queue_stats_snapshot (
    only_row  boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    taken_at  timestamptz NOT NULL,
    -- queue_stats' rows, as a JSON array of objects (queue, ready, scheduled, running,
    -- oldest_ready_age_seconds, finished_last_minute, dead, paused).
    queues    jsonb NOT NULL
);

COMMENT ON TABLE pgqueue.queue_stats_snapshot IS
    'pgqueue internal, not an API: the last per-queue counts, shared by the processes'
    ' serving /metrics.';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT SELECT, INSERT, UPDATE ON pgqueue.queue_stats_snapshot TO pgqueue_worker;
    END IF;
END
$$;
