-- 0003: isolate jobs rescued from a vanished worker.
--
-- When a worker process dies, every job it was running loses its lease; only one of them
-- may have killed it. The reaper requeues such jobs without counting the attempt the
-- crash cost them, and marks them `rescued`. A rescued job then runs alone in its worker
-- process (nothing else claimed beside it), so a job that kills its process again has no
-- neighbours to take down, and its attempts are counted from then on: a poison job still
-- reaches the dead-letter table after max_attempts, and its innocent neighbours lose
-- nothing and are not starved.
ALTER TABLE pgqueue.jobs ADD COLUMN rescued boolean NOT NULL DEFAULT false;

-- Rescued jobs waiting to run: a handful at most, claimed one at a time.
CREATE INDEX jobs_rescued_idx ON pgqueue.jobs (queue, priority, run_at, id)
    WHERE state = 'queued' AND rescued;
