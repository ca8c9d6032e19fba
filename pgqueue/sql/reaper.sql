-- name: requeue_expired
-- Requeues running jobs whose lease expired. A job that was not running alone (not
-- `rescued`) is requeued at once without counting the attempt its worker's death cost it,
-- and marked rescued so that its next run is alone (migration 0003). A rescued job's
-- attempt counts: it is requeued with backoff if it has attempts left. Jobs whose
-- cancellation was requested are cancelled (run_at left as it was). A batch at a time, SKIP LOCKED so several
-- reapers never act on the same row; the UPDATE re-checks the expiry on the locked row,
-- so a heartbeat that landed in between wins.
-- Returns each job's lost attempt (ran_attempt) and whether it counted. Every job it
-- requeues is rescued, which the workers' claim leaves to their check for rescued jobs:
-- the payload ' rescued <queue>' (no queue name starts with a space, migration 0013)
-- makes them check at once, not at their next poll.
-- %(regained_at)s: when this reaper got its database back (a new connection after a lost
-- one), or NULL; %(outage_seconds)s: how long it was without it (since its last good
-- pass). After an outage longer than a worker's heartbeat interval, the jobs of that
-- worker (registered in pgqueue.workers) whose leases ran out during the outage are left
-- to it for three of its heartbeats from then. An outage of the database (or of the
-- reaper's link to it) longer than the lease let every lease run out, and says nothing of
-- whether the workers live; those that do extend their leases at their next beat
-- (extend_leases takes an expired lease the reaper has not acted on). Without the wait
-- the reaper's first pass requeued every job in flight as rescued, each then run alone,
-- and the fleet crawled. A shorter outage cannot have cost a worker its beats, and a
-- lease that ran out before the outage, while the reaper had the database, is its
-- worker's death's: nothing waits for those (a connection lost again and again, to an
-- idle timeout say, cannot hold a dead worker's jobs for good).
WITH expired AS MATERIALIZED (
    SELECT j.id, j.attempts AS ran_attempt, j.rescued AS counted FROM pgqueue.jobs AS j
    WHERE j.state = 'running' AND j.lease_expires_at < now()
      AND (NOT j.rescued OR j.attempts < j.max_attempts OR j.cancel_requested_at IS NOT NULL)
      AND NOT EXISTS (
          SELECT 1 FROM pgqueue.workers AS w
          WHERE w.id = j.leased_by
            AND %(outage_seconds)s::float8 > w.heartbeat_seconds
            AND j.lease_expires_at > %(regained_at)s::timestamptz
                                     - make_interval(secs => %(outage_seconds)s::float8)
            AND now() < %(regained_at)s::timestamptz
                        + make_interval(secs => 3 * w.heartbeat_seconds))
    LIMIT %(batch_size)s
    FOR NO KEY UPDATE SKIP LOCKED
), updated AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                     ELSE 'cancelled' END::pgqueue.job_state,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempts = CASE WHEN j.rescued THEN j.attempts ELSE j.attempts - 1 END,
        rescued = true,
        run_at = CASE WHEN j.cancel_requested_at IS NOT NULL THEN j.run_at
                      WHEN j.rescued
                      THEN now() + pgqueue.backoff_delay(j.attempts, %(backoff_base_seconds)s,
                                                         %(backoff_max_seconds)s)
                      ELSE now() END,
        lease_token = NULL,
        lease_expires_at = NULL,
        errors = j.errors || jsonb_build_array(jsonb_build_object(
            'attempt', j.attempts, 'at', now(), 'worker', j.leased_by, 'kind', 'lease_expired',
            'counted', j.rescued,
            'error', 'lease expired: its worker stopped heartbeating (crashed, killed or cut off)')),
        history = j.history || pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, NULL, 'lease_expired',
            'lease expired: its worker stopped heartbeating (crashed, killed or cut off)')
    FROM expired
    WHERE j.id = expired.id AND j.lease_expires_at < now()
    RETURNING j.id, j.task, j.queue, j.attempts, j.leased_by, j.state, j.run_at,
              expired.ran_attempt, expired.counted
)
SELECT u.id, u.task, u.queue, u.attempts, u.leased_by, u.state::text AS state,
       u.ran_attempt, u.counted
FROM updated AS u, LATERAL (SELECT pgqueue.wake(' rescued ' || u.queue)) AS n;

-- name: dead_letter_expired
-- Moves rescued running jobs (they ran alone) whose lease expired and whose attempts are
-- used up to the dead-letter table (reason 'lease_expired'), atomically, a batch at a
-- time. A job whose id the dead-letter table already holds is stored under a new one
-- (pgqueue.dead_letter_id, migration 0023), its own in original_id. Returns each job's
-- id and the id it is stored under. No ORDER BY, as requeue_expired, whose
-- %(regained_at)s wait applies here too (else a job would be dead-lettered while its
-- worker finishes it). %(skip)s: jobs the database refused to move on an earlier try (a
-- foreign key to pgqueue.jobs that forbids the delete, a trigger of the user's): the
-- reaper leaves them out for a while, so that they do not fail every batch
-- (reaper.Reaper._refusable). %(only)s: this job alone (or NULL), to find which job of a
-- refused batch the database refuses (the expired CTE reads the running jobs' index
-- either way).
WITH expired AS MATERIALIZED (
    SELECT j.id FROM pgqueue.jobs AS j
    WHERE j.state = 'running' AND j.lease_expires_at < now() AND j.attempts >= j.max_attempts
      AND j.rescued AND j.cancel_requested_at IS NULL
      AND j.id <> ALL (%(skip)s::bigint[])
      AND (%(only)s::bigint IS NULL OR j.id = %(only)s::bigint)
      AND NOT EXISTS (
          SELECT 1 FROM pgqueue.workers AS w
          WHERE w.id = j.leased_by
            AND %(outage_seconds)s::float8 > w.heartbeat_seconds
            AND j.lease_expires_at > %(regained_at)s::timestamptz
                                     - make_interval(secs => %(outage_seconds)s::float8)
            AND now() < %(regained_at)s::timestamptz
                        + make_interval(secs => 3 * w.heartbeat_seconds))
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM pgqueue.jobs AS j
    USING expired
    WHERE j.id = expired.id AND j.lease_expires_at < now()
    RETURNING j.*
), named AS MATERIALIZED (
    -- The function only where the id is taken (a call costs more than the probe). OFFSET
    -- 0 keeps the probe one primary-key lookup per row: without it the planner may hash
    -- the whole dead-letter table once per statement instead (a sequential scan).
    SELECT m.*,
           CASE WHEN EXISTS (SELECT 1 FROM pgqueue.dead_jobs AS t WHERE t.id = m.id OFFSET 0)
                THEN pgqueue.dead_letter_id(m.id, ARRAY(SELECT e.id FROM expired AS e))
                ELSE m.id END AS dead_id
    FROM moved AS m
)
INSERT INTO pgqueue.dead_jobs AS d
    (id, original_id, queue, task, args, priority, attempts, max_attempts, run_at,
     idempotency_key, created_at, attempted_at, errors, reason, history)
SELECT dead_id, CASE WHEN dead_id <> id THEN id END, queue, task, args, priority, attempts,
       max_attempts, run_at, idempotency_key, created_at, attempted_at,
       errors || jsonb_build_array(jsonb_build_object(
           'attempt', attempts, 'at', now(), 'worker', leased_by, 'kind', 'lease_expired',
           'counted', true,
           'error', 'lease expired: its worker stopped heartbeating (crashed, killed or cut off)')),
       'lease_expired',
       history || pgqueue.history_entry(
           attempts, leased_by, attempted_at, NULL, 'lease_expired',
           'lease expired: its worker stopped heartbeating (crashed, killed or cut off)')
FROM named
RETURNING coalesce(d.original_id, d.id) AS id, d.id AS dead_id, d.task, d.queue, d.attempts;

-- name: dead_letter_candidates
-- The jobs dead_letter_expired would move (not locked): after the database refused a
-- batch, the reaper moves them one at a time to find the ones it refuses.
SELECT j.id FROM pgqueue.jobs AS j
WHERE j.state = 'running' AND j.lease_expires_at < now() AND j.attempts >= j.max_attempts
  AND j.rescued AND j.cancel_requested_at IS NULL
  AND j.id <> ALL (%(skip)s::bigint[])
  AND NOT EXISTS (
      SELECT 1 FROM pgqueue.workers AS w
      WHERE w.id = j.leased_by
        AND %(outage_seconds)s::float8 > w.heartbeat_seconds
        AND j.lease_expires_at > %(regained_at)s::timestamptz
                                 - make_interval(secs => %(outage_seconds)s::float8)
        AND now() < %(regained_at)s::timestamptz + make_interval(secs => 3 * w.heartbeat_seconds)
  )
LIMIT %(batch_size)s;

-- name: prune_finished
-- Deletes succeeded and cancelled jobs finished more than %(retention_seconds)s ago, a
-- batch at a time (jobs_finished_idx), freeing their idempotency keys. %(skip)s: jobs
-- the database refused to delete on an earlier try, as for dead_letter_expired.
-- Planner trap: `DELETE ... WHERE id IN (subquery)` is planned as a hash semi-join over a
-- sequential scan of the whole table once the batch is large; an id array from a
-- materialised batch makes it primary-key lookups.
WITH batch AS MATERIALIZED (
    SELECT f.id FROM pgqueue.jobs AS f
    WHERE f.state IN ('succeeded', 'cancelled')
      AND f.finished_at < now() - make_interval(secs => %(retention_seconds)s)
      AND f.id <> ALL (%(skip)s::bigint[])
    ORDER BY f.finished_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM pgqueue.jobs AS j
WHERE j.id = ANY (ARRAY(SELECT id FROM batch))
RETURNING j.id;

-- name: prune_candidates
-- The jobs prune_finished would delete (not locked), for the reaper to delete one at a
-- time (prune_job) after the database refused a batch.
SELECT f.id FROM pgqueue.jobs AS f
WHERE f.state IN ('succeeded', 'cancelled')
  AND f.finished_at < now() - make_interval(secs => %(retention_seconds)s)
  AND f.id <> ALL (%(skip)s::bigint[])
ORDER BY f.finished_at
LIMIT %(batch_size)s;

-- name: prune_job
-- One job of prune_candidates, if it is still finished and past its retention, and no
-- other session holds it locked (SKIP LOCKED, as every statement of a pass: one waited
-- for the transaction that held the row).
DELETE FROM pgqueue.jobs AS j
WHERE j.id = (SELECT f.id FROM pgqueue.jobs AS f
              WHERE f.id = %(id)s AND f.state IN ('succeeded', 'cancelled')
                AND f.finished_at < now() - make_interval(secs => %(retention_seconds)s)
              FOR UPDATE SKIP LOCKED)
RETURNING j.id;

-- name: delete_stale_workers
-- Forgets workers that missed three heartbeats in a row (they died without deregistering).
-- Rows another session holds locked wait for the next pass (SKIP LOCKED, as every other
-- statement of a pass): waiting on them failed the pass under a lock timeout, and the
-- retries backed off, spreading out the requeues. Not while requeue_expired waits for the
-- workers after this reaper got its database back (%(regained_at)s): their beats stopped
-- in the outage too, and a row deleted would end that wait for their jobs.
DELETE FROM pgqueue.workers AS w
USING (SELECT s.id FROM pgqueue.workers AS s
       WHERE s.last_heartbeat_at < now() - make_interval(secs => 3 * s.heartbeat_seconds)
         AND NOT coalesce(%(outage_seconds)s::float8 > s.heartbeat_seconds
                          -- fresh when the reaper lost the database
                          AND s.last_heartbeat_at
                              >= %(regained_at)s::timestamptz
                                 - make_interval(secs => %(outage_seconds)s::float8)
                                 - make_interval(secs => 3 * s.heartbeat_seconds)
                          AND now() < %(regained_at)s::timestamptz
                                      + make_interval(secs => 3 * s.heartbeat_seconds), false)
       FOR UPDATE SKIP LOCKED) AS stale
WHERE w.id = stale.id
RETURNING w.id, w.host, w.pid;

-- name: try_reaper_leadership
-- Reapers embedded in workers (`pgqueue-worker --reaper`) take part only while they hold
-- this session lock, so that one of them reaps at a time: it is released when the
-- holder's connection ends (a crash, a cut) and the next to ask takes it over. Taken at
-- most once per connection. Standalone reapers do not ask.
-- Also the server process: a holder checks each pass that its session is still the one
-- that took the lock (reaper_backend_pid); a different one means a pooler in between.
SELECT pg_try_advisory_lock(hashtext('pgqueue.reaper')) AS leader, pg_backend_pid() AS pid;

-- name: reaper_backend_pid
SELECT pg_backend_pid() AS pid;

-- name: database_now
-- The server's clock: when a reaper got its database back (requeue_expired's
-- regained_at).
SELECT now() AS now;

-- name: standby_check
-- For an embedded reaper standing by, whether to reap anyway. overdue: a running job's
-- lease expired longer ago than the leader, reaping every pass, would have let it. stalled:
-- the session holding the lead (in this database) has been idle, or in one statement,
-- longer than stall_seconds (a frozen process keeps its session and lock: nothing would
-- be pruned or forgotten): reap too, as standalone reapers do beside each other. NULL:
-- no holder, or one this role cannot see (without pg_read_all_stats a role sees only its
-- own role's sessions): reap too.
SELECT
    EXISTS (
        SELECT 1 FROM pgqueue.jobs AS j
        WHERE j.state = 'running'
          AND j.lease_expires_at < now() - make_interval(secs => %(grace_seconds)s)
    ) AS overdue,
    (
        SELECT now() - a.state_change > make_interval(secs => %(stall_seconds)s)
        FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext('pgqueue.reaper')::bigint
        LIMIT 1
    ) AS stalled;
