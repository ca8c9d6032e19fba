-- name: claim_jobs
-- Claims up to %(limit)s due jobs from the given queues for one worker, in one statement:
-- marks them running, counts the attempt, sets a fresh lease token and expiry.
-- Per queue, a LATERAL index scan of jobs_claim_idx (shaped like the ORDER BY) with
-- FOR NO KEY UPDATE SKIP LOCKED, so concurrent claimers never wait on or take each other's
-- rows (NO KEY: the lock the UPDATE takes anyway, which a foreign key's KEY SHARE lock on
-- a queued job, from a row being inserted that references it, does not block);
-- MATERIALIZED keeps the planner from updating more rows than the limit. Rows locked by
-- the per-queue scans but cut by the outer LIMIT are unlocked when the statement commits.
-- The UPDATE matches on id alone: every picked row is locked by this statement and was
-- rechecked as queued when locked, so nothing can change it in between; a state check
-- there would let a generic plan scan the whole queued set for every picked id.
WITH picked AS MATERIALIZED (
    SELECT c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= now()
          -- Rescued jobs run alone (claim_rescued_job); they are few, so filtering them
          -- on the heap rows the claim visits anyway costs next to nothing.
          AND NOT j.rescued
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
        FOR NO KEY UPDATE SKIP LOCKED
    ) AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM pgqueue.queues AS p WHERE p.name = q.name AND p.paused_at IS NOT NULL)
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
)
UPDATE pgqueue.jobs AS j
SET state = 'running',
    -- Saturates at the integer's top: a plain INSERT may give any count, and an overflow
    -- here would fail every claim of the job's queue.
    attempts = j.attempts + (j.attempts < 2147483647)::int,
    lease_token = gen_random_uuid(),
    leased_by = %(worker_id)s,
    attempted_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts, j.run_at,
          j.created_at, j.lease_token, j.lease_expires_at,
          j.cancel_requested_at IS NOT NULL AS cancel_requested, j.attempted_at;

-- name: claim_jobs_many
-- claim_jobs for a worker serving several queues, locking no more rows than it claims
-- unless other claims hold the ones it meant to take. claim_jobs locks up to %(limit)s
-- rows in each queue before the outer LIMIT keeps %(limit)s of them: a worker serving 50
-- queues at --concurrency 1000 locked up to 50,000 rows (a WAL record each) per claim.
-- Here the first step (seen) reads each queue's first %(limit)s due jobs without locking
-- them and keeps the %(limit)s first of all, which says how many to take from each queue
-- and from which job on; the second (picked) takes that many from each queue, from
-- there, locked, with SKIP LOCKED. The first step cannot tell the rows other claims in
-- flight hold (or a job changed since the snapshot) from free ones, so the second may
-- come back short of what the first saw: the third (more) then takes the rest as
-- claim_jobs does, from every queue with SKIP LOCKED, leaving out the rows picked (this
-- statement's own locks do not make them skipped). A claim short of its limit thus still
-- means no free due job was left, which the worker's idle wait relies on (it sleeps to
-- its next poll). The third step costs nothing when the second was not short (LIMIT 0).
WITH seen AS MATERIALIZED (
    SELECT q.name, c.priority, c.run_at, c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= now()
          AND NOT j.rescued
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
    ) AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM pgqueue.queues AS p WHERE p.name = q.name AND p.paused_at IS NOT NULL)
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
), shares AS MATERIALIZED (
    -- Per queue: how many, and the first job seen, where the second scan starts (a
    -- queue drained fast has a long run of claimed jobs' index entries before it, which
    -- the first scan has walked through once already).
    SELECT f.name, f.priority, f.run_at, f.id, f.n
    FROM (
        SELECT s.name, s.priority, s.run_at, s.id, count(*) OVER w AS n,
               row_number() OVER (w ORDER BY s.priority, s.run_at, s.id) AS rank
        FROM seen AS s
        WINDOW w AS (PARTITION BY s.name)
    ) AS f
    WHERE f.rank = 1
), picked AS MATERIALIZED (
    SELECT c.id
    FROM shares AS s
    CROSS JOIN LATERAL (
        SELECT j.id
        FROM pgqueue.jobs AS j
        WHERE j.queue = s.name AND j.state = 'queued' AND j.run_at <= now()
          AND (j.priority, j.run_at, j.id) >= (s.priority, s.run_at, s.id)
          AND NOT j.rescued
        ORDER BY j.priority, j.run_at, j.id
        LIMIT s.n
        FOR NO KEY UPDATE SKIP LOCKED
    ) AS c
    -- Never more: tells the planner so (it cannot see through LIMIT s.n), for the
    -- UPDATE's lookup of each picked id by primary key.
    LIMIT %(limit)s
), short AS MATERIALIZED (
    SELECT (SELECT count(*) FROM seen) - (SELECT count(*) FROM picked) AS n
), more AS MATERIALIZED (
    SELECT c.id
    FROM short AS s
    CROSS JOIN unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= now()
          AND NOT j.rescued
          AND j.id <> ALL (ARRAY(SELECT p.id FROM picked AS p))
        ORDER BY j.priority, j.run_at, j.id
        LIMIT s.n
        FOR NO KEY UPDATE SKIP LOCKED
    ) AS c
    WHERE s.n > 0
      AND NOT EXISTS (
        SELECT 1 FROM pgqueue.queues AS p WHERE p.name = q.name AND p.paused_at IS NOT NULL)
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
), taken AS (
    SELECT p.id FROM picked AS p
    UNION ALL
    (SELECT m.id FROM more AS m LIMIT (SELECT s.n FROM short AS s))
)
UPDATE pgqueue.jobs AS j
SET state = 'running',
    attempts = j.attempts + (j.attempts < 2147483647)::int,
    lease_token = gen_random_uuid(),
    leased_by = %(worker_id)s,
    attempted_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM taken
WHERE j.id = taken.id
RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts, j.run_at,
          j.created_at, j.lease_token, j.lease_expires_at,
          j.cancel_requested_at IS NOT NULL AS cancel_requested, j.attempted_at;

-- name: claim_rescued_job
-- Claims one rescued job (see migration 0003) for a worker that has nothing else running;
-- the worker then claims nothing more until it is done. Same shape as claim_jobs, over
-- jobs_rescued_idx.
WITH picked AS MATERIALIZED (
    SELECT c.id
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.run_at <= now()
          AND j.rescued
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 1
        FOR NO KEY UPDATE SKIP LOCKED
    ) AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM pgqueue.queues AS p WHERE p.name = q.name AND p.paused_at IS NOT NULL)
    ORDER BY c.priority, c.run_at, c.id
    LIMIT 1
)
UPDATE pgqueue.jobs AS j
SET state = 'running',
    -- Saturates at the integer's top: a plain INSERT may give any count, and an overflow
    -- here would fail every claim of the job's queue.
    attempts = j.attempts + (j.attempts < 2147483647)::int,
    lease_token = gen_random_uuid(),
    leased_by = %(worker_id)s,
    attempted_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.queue, j.task, j.args, j.priority, j.attempts, j.max_attempts, j.run_at,
          j.created_at, j.lease_token, j.lease_expires_at,
          j.cancel_requested_at IS NOT NULL AS cancel_requested, j.attempted_at;

-- name: rescued_waiting
-- Whether a rescued job is due in one of the given (unpaused) queues: a worker that sees
-- one stops claiming until it is idle, then takes it alone (no starvation). And the now()
-- it looked at: a rescued job that falls due after it is seconds_until_due's.
-- drain_in: seconds until this worker's turn to drain for one (<= 0: now). The live
-- workers serving a job's queue take turns, one every %(stagger_seconds)s from the time
-- the job fell due, the first chosen by the job's id: one busy worker drains for it at
-- once, not every worker of the queue, and the next follows only if the job still waits
-- (the first may be running a long job, stopping, or dead and not yet gone from
-- pgqueue.workers). An idle worker takes the job whatever its turn. A worker not in that
-- list (its row not written yet, or stale) has turn 0: it drains at once, as all did.
WITH due AS MATERIALIZED (
    SELECT d.id, d.queue, d.run_at
    FROM unnest(%(queues)s::text[]) AS q(name)
    CROSS JOIN LATERAL (
        SELECT j.id, j.queue, j.run_at
        FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.rescued AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id
        LIMIT 10
    ) AS d
    WHERE NOT EXISTS (SELECT 1 FROM pgqueue.queues AS p
                      WHERE p.name = q.name AND p.paused_at IS NOT NULL)
),
fleet AS MATERIALIZED (
    -- Workers that beat within two intervals (the reaper removes rows after three). In
    -- the primary key's order, so that the plan reads the table by that index: a worker's
    -- sessions price sequential scans out, and a plan that has to make one costs enough
    -- to be JIT-compiled (about 0.5 s for a 0.3 ms query).
    SELECT w.id, w.queues
    FROM pgqueue.workers AS w
    WHERE w.last_heartbeat_at > now() - make_interval(secs => 2 * w.heartbeat_seconds)
    ORDER BY w.id
),
-- Per queue with a due job: how many live workers serve it, and this worker's place
-- among them by id (listed: whether it is one of them). Counted once per queue from the
-- workers' queues unnested, not once per due job over every worker's array: that cost
-- due jobs x workers x queues, about 2 s a call with 40 workers serving 1,000 queues
-- after they all died at once (found by a review; 1.1 s -> 0.18 s with 60 workers, 1,000
-- queues and 600 due jobs). MATERIALIZED: the generic plan expects one due job and
-- would count again for each.
places AS MATERIALIZED (
    SELECT s.queue, count(*) AS n,
           count(*) FILTER (WHERE s.id < %(worker_id)s::text) AS pos,
           bool_or(s.id = %(worker_id)s::text) AS listed
    FROM (SELECT DISTINCT f.id, fq.queue
          FROM fleet AS f CROSS JOIN LATERAL unnest(f.queues) AS fq(queue)) AS s
    WHERE s.queue IN (SELECT d.queue FROM due AS d)
    GROUP BY s.queue
),
turns AS (
    SELECT d.run_at,
           CASE WHEN p.listed THEN mod(p.pos - mod(d.id, p.n) + p.n, p.n) END AS turn
    FROM due AS d LEFT JOIN places AS p ON p.queue = d.queue
)
SELECT count(*) > 0 AS waiting,
       min(extract(epoch FROM t.run_at - now())
           + coalesce(t.turn, 0) * %(stagger_seconds)s::float8)::float8 AS drain_in,
       now() AS checked_at
FROM turns AS t;

-- name: seconds_until_due
-- Seconds until the earliest run_at of a queued job in the given queues that is in the
-- future or fell due in the last %(lookback_seconds)s (NULL if none), on the database's
-- clock, so an idle worker sleeps exactly until then. The worker passes the time since it
-- sent its last claim: a job that fell due after that claim's now() and before this
-- statement's was in neither, and waited for the next poll; it comes back as negative
-- seconds (claim again now). Older due jobs are left out (locked by another worker's
-- claim), and so are due rescued jobs (claimed alone, on their own check). A loose index
-- scan: one index descent per distinct priority of each queue, never a scan of the
-- whole backlog of future jobs.
-- rescued_seconds is the same for the earliest of those that is rescued, among the next
-- job of each priority (a rescued job behind another of its priority comes up once that
-- one is claimed): the claim leaves it to the worker's check for rescued jobs, which the
-- worker then makes when it falls due. It also counts, as negative seconds (check again
-- now), a rescued job that fell due after %(rescued_since)s, the now() of the worker's
-- last check (NULL: none made): that check did not see it, and the claim leaves it out.
-- One that fell due before was the check's to see (taken, or locked by another worker's
-- claim): counting it would make an idle worker spin. (One due before the check's now()
-- but committed after the check read the table is left to its notification, which this
-- version's reaper and CLI send, or to the poll.) This part reads the queue's queued
-- rescued jobs in jobs_rescued_idx (run_at comes after priority there): they are few,
-- each a job whose worker died under it.
SELECT extract(epoch FROM min(n.run_at) FILTER (WHERE NOT n.fell_due) - now())::float8
           AS seconds,
       extract(epoch FROM min(n.run_at) FILTER (WHERE n.rescued) - now())::float8
           AS rescued_seconds
FROM (SELECT u.name FROM unnest(%(queues)s::text[]) AS u(name)
      WHERE NOT EXISTS (SELECT 1 FROM pgqueue.queues AS p
                        WHERE p.name = u.name AND p.paused_at IS NOT NULL)) AS q
CROSS JOIN LATERAL (
    WITH RECURSIVE prio AS (
        (SELECT j.priority FROM pgqueue.jobs AS j
         WHERE j.queue = q.name AND j.state = 'queued'
         ORDER BY j.priority LIMIT 1)
        UNION ALL
        SELECT (SELECT j.priority FROM pgqueue.jobs AS j
                WHERE j.queue = q.name AND j.state = 'queued' AND j.priority > prio.priority
                ORDER BY j.priority LIMIT 1)
        FROM prio WHERE prio.priority IS NOT NULL
    )
    SELECT f.run_at, f.rescued, false AS fell_due
    FROM prio
    CROSS JOIN LATERAL (
        SELECT j.run_at, j.rescued FROM pgqueue.jobs AS j
        WHERE j.queue = q.name AND j.state = 'queued' AND j.priority = prio.priority
          AND j.run_at > now() - make_interval(secs => %(lookback_seconds)s)
          AND (j.run_at > now() OR NOT j.rescued)
        ORDER BY j.run_at LIMIT 1) AS f
    WHERE prio.priority IS NOT NULL
    UNION ALL
    SELECT min(j.run_at), true, true FROM pgqueue.jobs AS j
    WHERE j.queue = q.name AND j.state = 'queued' AND j.rescued
      AND j.run_at <= now() AND j.run_at > %(rescued_since)s::timestamptz
) AS n;

-- The lease-fenced statements below match rows on (id, lease_token) and nothing else:
-- a token is only ever set on a running row (CHECK jobs_lease_token_check, migration
-- 0007), and a new claim sets a new one, so the token alone proves "still running under
-- this lease". Adding
-- `state = 'running'` would be redundant and harmful: it lets the planner scan
-- jobs_running_idx and join the whole running set against every id of the batch, which a
-- prepared statement's generic plan does as soon as statistics say few jobs run
-- (tests/test_queries.py guards the plans).

-- name: extend_leases
-- Heartbeat: extends the leases of all the jobs one worker holds, in one statement.
-- Only rows still running under the token this worker got at claim time change; a job
-- missing from the result has been taken away (lease lost). An expired lease that the
-- reaper has not acted on yet is extended: the worker is alive after all.
-- Rows another session has locked are skipped, not waited for: one row lock (an open
-- transaction's SELECT ... FOR UPDATE) held all the leases of the worker back, past
-- their expiry if it lasted. Such a row, still under this worker's token as far as the
-- statement's snapshot shows, comes back with extended = false (try again next beat; a
-- row whose lease was taken just after the snapshot shows so too, and is found lost at
-- the next beat). FOR NO KEY UPDATE, the lock the UPDATE itself takes: it does not
-- conflict with the KEY SHARE locks of foreign keys that reference a running job.
-- Each row comes back with its token: a worker can hold two attempts of one job (its
-- claim undone by a crash under --async-commit while the first run goes on, then claimed
-- again), and only the one whose token matches was extended.
WITH held AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS h(id, token)
), free AS MATERIALIZED (
    SELECT j.id
    FROM held AS h
    JOIN pgqueue.jobs AS j ON j.id = h.id AND j.lease_token = h.token
    FOR NO KEY UPDATE OF j SKIP LOCKED
), extended AS (
    UPDATE pgqueue.jobs AS j
    SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
    FROM free AS f
    WHERE j.id = f.id
    RETURNING j.id, j.lease_token, j.cancel_requested_at IS NOT NULL AS cancel_requested
)
SELECT e.id, e.lease_token AS token, e.cancel_requested, true AS extended FROM extended AS e
UNION ALL
SELECT h.id, h.token, false, false
FROM held AS h
JOIN pgqueue.jobs AS j ON j.id = h.id AND j.lease_token = h.token
WHERE NOT EXISTS (SELECT 1 FROM free AS f WHERE f.id = h.id);

-- name: complete_jobs
-- Marks jobs succeeded and records the attempt in their history, each only if still
-- running under the given lease token; returns the ids that changed (a missing id means
-- the lease was lost).
UPDATE pgqueue.jobs AS j
SET state = 'succeeded', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
    history = j.history || pgqueue.history_entry(
        j.attempts, j.leased_by, j.attempted_at, c.duration, 'succeeded')
FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(durations)s::float8[])
    AS c(id, token, duration)
WHERE j.id = c.id AND j.lease_token = c.token
RETURNING j.id, j.state::text AS state;

-- name: retry_jobs
-- Puts failed jobs back in the queue after their backoff, appending the attempt's error
-- and history entry, each only if still running under the given lease token. The attempt
-- stays counted. A job whose cancellation was requested is cancelled instead of retried.
-- Notifies each queue (Postgres folds identical notifications in one transaction) so
-- idle workers recompute when to wake up; for a rescued job, with the payload that has
-- them check for rescued jobs (' rescued <queue>', as the reaper's requeue sends).
WITH updated AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                     ELSE 'cancelled' END::pgqueue.job_state,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        -- A cancelled job never runs again: its run_at stays (as the reaper leaves it).
        run_at = CASE WHEN j.cancel_requested_at IS NULL
                      THEN now() + make_interval(secs => r.delay_seconds) ELSE j.run_at END,
        lease_token = NULL,
        lease_expires_at = NULL,
        errors = j.errors || jsonb_build_array(r.error),
        history = j.history || pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, r.duration,
            CASE WHEN j.cancel_requested_at IS NULL THEN 'retried' ELSE 'failed' END,
            r.error->>'error')
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(delays)s::float8[],
                %(errors)s::jsonb[], %(durations)s::float8[])
        AS r(id, token, delay_seconds, error, duration)
    WHERE j.id = r.id AND j.lease_token = r.token
    RETURNING j.id, j.queue, j.state, j.rescued
)
SELECT u.id, u.state::text AS state
FROM updated AS u,
     LATERAL (SELECT pgqueue.wake(CASE WHEN u.rescued THEN ' rescued ' || u.queue
                                       ELSE u.queue END)) AS n;

-- name: snooze_jobs
-- Reschedules jobs that asked to run later, without counting the attempt (attempts goes
-- back down by the one the claim added), each only if still running under its token.
-- A job whose cancellation was requested is cancelled instead. The history keeps the
-- newest 50 snoozes (0021): a job polling by snoozing would grow it without end.
-- Notifies as retry_jobs does.
WITH updated AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                     ELSE 'cancelled' END::pgqueue.job_state,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempts = j.attempts - 1,
        run_at = CASE WHEN j.cancel_requested_at IS NULL
                      THEN now() + make_interval(secs => s.delay_seconds) ELSE j.run_at END,
        lease_token = NULL,
        lease_expires_at = NULL,
        history = pgqueue.history_with_snooze(j.history, pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, s.duration, 'snoozed'))
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(delays)s::float8[],
                %(durations)s::float8[]) AS s(id, token, delay_seconds, duration)
    WHERE j.id = s.id AND j.lease_token = s.token
    RETURNING j.id, j.queue, j.state, j.rescued
)
SELECT u.id, u.state::text AS state
FROM updated AS u,
     LATERAL (SELECT pgqueue.wake(CASE WHEN u.rescued THEN ' rescued ' || u.queue
                                       ELSE u.queue END)) AS n;

-- name: release_jobs
-- Graceful shutdown: returns unfinished jobs to the queue, runnable now, without counting
-- the attempt, each only if still running under its token; wakes the other workers (for
-- a rescued job, with the payload that makes them check for rescued jobs at once, as the
-- reaper's requeue does). A job whose cancellation was requested is cancelled instead.
WITH updated AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                     ELSE 'cancelled' END::pgqueue.job_state,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempts = j.attempts - 1,
        run_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL,
        history = j.history || pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, r.duration, 'released')
    FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(durations)s::float8[])
        AS r(id, token, duration)
    WHERE j.id = r.id AND j.lease_token = r.token
    RETURNING j.id, j.queue, j.state, j.rescued
)
SELECT u.id, u.state::text AS state
FROM updated AS u,
     LATERAL (SELECT pgqueue.wake(CASE WHEN u.rescued THEN ' rescued ' || u.queue
                                       ELSE u.queue END)) AS n;

-- name: release_orphans
-- Jobs running under this worker's name that it does not hold: a claim whose reply was
-- lost with its connection (committed, never started here), or, with --async-commit, an
-- outcome that a Postgres crash undid. They go back to the queue now, without counting
-- the attempt (as release_jobs does; a cancel-requested one is cancelled), instead of
-- waiting for their lease to expire and then running alone as if their worker had died.
-- The worker runs this while none of its own claims is in flight, passing the tokens of
-- every job it holds (and of outcomes the database refused: left to the reaper). A job
-- orphaned twice in a row (its last history entry says so: it never ran in between) is
-- left to the reaper too, which counts the attempt and runs it alone: a claim that keeps
-- failing after its commit (say, a row the worker cannot decode) must not loop uncounted.
-- Locked with SKIP LOCKED and rechecked by the lock, like the claim; found through
-- jobs_running_idx.
WITH orphans AS MATERIALIZED (
    SELECT j.id
    FROM pgqueue.jobs AS j
    WHERE j.state = 'running' AND j.leased_by = %(worker_id)s::text
      AND NOT EXISTS (SELECT 1 FROM unnest(%(keep)s::uuid[]) AS k(token)
                      WHERE k.token = j.lease_token)
      AND (j.history -> -1 ->> 'outcome') IS DISTINCT FROM 'orphaned'
    FOR NO KEY UPDATE SKIP LOCKED
), updated AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.cancel_requested_at IS NULL THEN 'queued'
                     ELSE 'cancelled' END::pgqueue.job_state,
        finished_at = CASE WHEN j.cancel_requested_at IS NULL THEN NULL ELSE now() END,
        attempts = greatest(j.attempts - 1, 0),
        run_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL,
        history = j.history || pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, NULL, 'orphaned')
    FROM orphans AS o
    WHERE j.id = o.id
    RETURNING j.id, j.queue, j.state, j.rescued
)
SELECT u.id, u.state::text AS state
FROM updated AS u,
     LATERAL (SELECT pgqueue.wake(CASE WHEN u.rescued THEN ' rescued ' || u.queue
                                       ELSE u.queue END)) AS n;

-- name: dead_letter_jobs
-- Moves jobs to pgqueue.dead_jobs with their error history plus this attempt's error and
-- history entry, atomically (one statement: the delete and the insert commit together),
-- each only if still running under the given lease token. A job whose cancellation was
-- requested is cancelled instead (it stays in pgqueue.jobs, so `dead retry` cannot revive
-- it by accident). Returns each changed id with the state it ended in, and a dead job's
-- id in pgqueue.dead_jobs: its own, unless that table held it (ids repeat after an
-- explicit id in an INSERT or a sequence set back), then a new one (migration 0023).
-- The rows are locked first and both branches go by what the lock saw: an operator's
-- cancel committing while this statement waits for the row would otherwise leave it to
-- neither (the UPDATE's snapshot saw no cancel; the DELETE's recheck of the new row
-- version saw one), and the job would wait for its lease to expire.
WITH batch AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(errors)s::jsonb[],
                         %(reasons)s::text[], %(durations)s::float8[])
        AS d(id, token, error, reason, duration)
), locked AS MATERIALIZED (
    SELECT j.id, b.error, b.reason, b.duration, j.cancel_requested_at IS NOT NULL AS cancel
    FROM batch AS b
    JOIN pgqueue.jobs AS j ON j.id = b.id AND j.lease_token = b.token
    FOR UPDATE OF j
), cancelled AS (
    UPDATE pgqueue.jobs AS j
    SET state = 'cancelled', finished_at = now(), lease_token = NULL, lease_expires_at = NULL,
        errors = j.errors || jsonb_build_array(l.error),
        history = j.history || pgqueue.history_entry(
            j.attempts, j.leased_by, j.attempted_at, l.duration, 'failed', l.error->>'error')
    FROM locked AS l
    WHERE j.id = l.id AND l.cancel
    RETURNING j.id
), moved AS (
    DELETE FROM pgqueue.jobs AS j
    USING locked AS l
    WHERE j.id = l.id AND NOT l.cancel
    RETURNING j.*, l.error AS last_error, l.reason AS dead_reason, l.duration AS last_duration
), named AS MATERIALIZED (
    -- The function only where the id is taken (a call costs more than the probe). OFFSET
    -- 0 keeps the probe one primary-key lookup per row: without it the planner may hash
    -- the whole dead-letter table once per statement instead (a sequential scan).
    SELECT m.*,
           CASE WHEN EXISTS (SELECT 1 FROM pgqueue.dead_jobs AS t WHERE t.id = m.id OFFSET 0)
                THEN pgqueue.dead_letter_id(m.id, ARRAY(SELECT l.id FROM locked AS l))
                ELSE m.id END AS dead_id
    FROM moved AS m
), inserted AS (
    INSERT INTO pgqueue.dead_jobs AS d
        (id, original_id, queue, task, args, priority, attempts, max_attempts, run_at,
         idempotency_key, created_at, attempted_at, errors, reason, history)
    SELECT dead_id, CASE WHEN dead_id <> id THEN id END, queue, task, args, priority,
           attempts, max_attempts, run_at, idempotency_key,
           created_at, attempted_at, errors || jsonb_build_array(last_error), dead_reason,
           history || pgqueue.history_entry(
               attempts, leased_by, attempted_at, last_duration, 'dead', last_error->>'error')
    FROM named
    RETURNING coalesce(d.original_id, d.id) AS id, d.id AS dead_id
)
SELECT id, 'dead' AS state, dead_id FROM inserted
UNION ALL
SELECT id, 'cancelled' AS state, NULL FROM cancelled;

-- name: recorded_outcomes
-- After a write whose COMMIT may have been lost with its connection, the retry finds some
-- jobs fenced off: did the first try land (the row's token was cleared by this worker's
-- own outcome), or was the lease really lost? An attempt's outcome is recorded when the
-- job's history (in pgqueue.jobs or pgqueue.dead_jobs) has this worker's entry for that
-- claim: same worker, same started_at (the claim's attempted_at; attempt numbers can
-- repeat after a snooze, a release or a requeue) and a duration (the reaper's entry for
-- an expired lease has none). Returns each recorded id with the state that write left it
-- in, as far as the worker's logs care: 'cancelled' if it cancelled the job, else the
-- entry's outcome ('dead' from the dead-letter table), and the id a dead job is stored
-- under.
WITH o AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(started_ats)s::timestamptz[])
        AS o(id, started_at)
), found AS (
    SELECT o.id, NULL::bigint AS dead_id, h.e ->> 'outcome' AS outcome,
           -- Snooze and release end a cancel-requested job as cancelled with their own
           -- outcome in the entry: the row tells, if nothing happened to it since (an
           -- operator's later cancel would have set finished_at after the entry ended).
           (h.n = jsonb_array_length(j.history) AND j.state = 'cancelled'
            AND j.finished_at <= (h.e ->> 'ended_at')::timestamptz) AS cancelled
    FROM o
    JOIN pgqueue.jobs AS j ON j.id = o.id
    CROSS JOIN LATERAL jsonb_array_elements(j.history) WITH ORDINALITY AS h(e, n)
    WHERE h.e ->> 'worker' = %(worker_id)s::text AND h.e ? 'duration'
      AND (h.e ->> 'started_at')::timestamptz = o.started_at
    UNION ALL
    SELECT o.id, d.id, h.e ->> 'outcome', false
    FROM o
    -- One primary-key lookup per id (LIMIT 1 keeps the planner from turning this into a
    -- hash join over the whole dead-letter table in a generic plan), and one by
    -- original_id for a job stored under a new id (0023: the table held its own).
    CROSS JOIN LATERAL (
        (SELECT d.id, d.history FROM pgqueue.dead_jobs AS d WHERE d.id = o.id LIMIT 1)
        UNION ALL
        (SELECT d.id, d.history FROM pgqueue.dead_jobs AS d
         WHERE d.original_id = o.id LIMIT 100)
    ) AS d
    CROSS JOIN LATERAL jsonb_array_elements(d.history) AS h(e)
    WHERE h.e ->> 'worker' = %(worker_id)s::text AND h.e ? 'duration'
      AND (h.e ->> 'started_at')::timestamptz = o.started_at
)
SELECT id,
       CASE WHEN outcome = 'failed' OR cancelled THEN 'cancelled' ELSE outcome END AS state,
       dead_id
FROM found;

-- name: register_worker
-- Registers this worker process, or refreshes its row (last heartbeat, running jobs);
-- an upsert, so a worker whose row the reaper removed during an outage comes back.
INSERT INTO pgqueue.workers AS w
    (id, host, pid, queues, concurrency, running, heartbeat_seconds, version)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(concurrency)s, %(running)s,
        %(heartbeat_seconds)s, %(version)s)
ON CONFLICT (id) DO UPDATE
SET running = excluded.running, last_heartbeat_at = now();

-- name: deregister_worker
-- Removes this worker's row on a clean exit.
DELETE FROM pgqueue.workers WHERE id = %(id)s;
