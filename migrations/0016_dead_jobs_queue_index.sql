-- 0016: the dead-letter table is indexed by queue.
--
-- The metrics' and `pgqueue stats`' per-queue dead counts read the whole dead-letter
-- table once per queue (no index held its queue): seconds per scrape with a few hundred
-- thousand dead jobs. Building the index holds off dead-lettering (not claims or
-- enqueues) for as long as it takes, about a second per million dead jobs.
CREATE INDEX dead_jobs_queue_idx ON pgqueue.dead_jobs (queue);
