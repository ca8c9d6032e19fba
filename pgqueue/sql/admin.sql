-- name: job_status
-- One job by id, from the jobs table or, if it died, from the dead-letter table. Its args
-- (as JSON text, decoded by the caller) only when asked: they may hold personal data.
-- Ids can repeat (an explicit id in an INSERT, a sequence set back): a job in
-- pgqueue.jobs comes first, then the dead job that died last under that id, including
-- one stored under a new id because the dead-letter table held its own (original_id,
-- migration 0023).
SELECT * FROM (
    SELECT id, queue, task, state::text AS state, attempts, max_attempts, priority, run_at,
           created_at, attempted_at, finished_at, lease_expires_at, leased_by,
           idempotency_key, errors, history, cancel_requested_at, NULL::text AS dead_reason,
           CASE WHEN %(with_args)s::boolean THEN args::text END AS args, rescued,
           NULL::bigint AS original_id, 0 AS rank
    FROM pgqueue.jobs WHERE id = %(id)s
    UNION ALL
    SELECT id, queue, task, 'dead', attempts, max_attempts, priority, run_at,
           created_at, attempted_at, died_at, NULL, NULL, idempotency_key, errors, history,
           NULL, reason, CASE WHEN %(with_args)s::boolean THEN args::text END,
           -- dead_jobs has no rescued column: the reaper's entry tells (it rescues every
           -- job whose lease expired, and dead-letters only rescued ones).
           EXISTS (SELECT 1 FROM jsonb_array_elements(history) AS e
                   WHERE e ->> 'outcome' = 'lease_expired'),
           original_id, 1
    FROM (SELECT * FROM pgqueue.dead_jobs WHERE id = %(id)s
          UNION ALL
          SELECT * FROM pgqueue.dead_jobs WHERE original_id = %(id)s) AS d
) AS found
ORDER BY rank, finished_at DESC
LIMIT 1;

-- name: set_statement_timeout
-- For this transaction: a statement running (or waiting for a lock) longer fails. Local,
-- not the session's: behind PgBouncer in transaction pooling mode a session setting
-- would stay on the server connection for whichever client gets it next.
SELECT set_config('statement_timeout', %(timeout)s, true);

-- name: disable_jit
-- For this transaction (see set_statement_timeout): the recursive CTEs of queue_stats are
-- estimated expensive on small or never-analysed tables, which triggers JIT compilation
-- (~0.4 s) for a ~1 ms query.
SET LOCAL jit = off;

-- name: queue_stats
-- Per queue: ready, scheduled and running counts, age of the oldest ready job, jobs
-- finished in the last minute (NULL unless %(with_finished)s), dead jobs, paused. The
-- jobs finished in the last minute are read once, for all queues (finished_recently:
-- they name queues that have no other job, too). Counted once per queue, as before, they
-- were read once per queue (no index leads with queue and finished_at): at 10,000
-- jobs/s over 40 queues that took the refresh past its 5 s limit, and `pgqueue stats`
-- with 20 queues under load from 1.6 to 5.9-10 s (a review's 3,000,000-job table). The
-- metrics' gauges still leave the count out (no gauge uses it).
-- Stays cheap with millions of jobs:
-- distinct queues by loose index scans of jobs_claim_idx and dead_jobs_queue_idx (0016),
-- counts by index scans of the partial indexes and of dead_jobs_queue_idx (each read
-- once), the oldest ready job by one index descent per priority.
WITH RECURSIVE queued_queues AS (
    (SELECT j.queue FROM pgqueue.jobs AS j WHERE j.state = 'queued' ORDER BY j.queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM pgqueue.jobs AS j
            WHERE j.state = 'queued' AND j.queue > qq.queue ORDER BY j.queue LIMIT 1)
    FROM queued_queues AS qq WHERE qq.queue IS NOT NULL
), dead_queues AS (
    (SELECT d.queue FROM pgqueue.dead_jobs AS d ORDER BY d.queue LIMIT 1)
    UNION ALL
    SELECT (SELECT d.queue FROM pgqueue.dead_jobs AS d
            WHERE d.queue > dq.queue ORDER BY d.queue LIMIT 1)
    FROM dead_queues AS dq WHERE dq.queue IS NOT NULL
), running AS MATERIALIZED (
    -- Once for all queues: per queue it read every running job's row once per queue.
    SELECT j.queue, count(*) AS n FROM pgqueue.jobs AS j WHERE j.state = 'running'
    GROUP BY j.queue
), finished_recently AS MATERIALIZED (
    SELECT j.queue, count(*) AS n FROM pgqueue.jobs AS j
    WHERE j.state IN ('succeeded', 'cancelled') AND j.finished_at > now() - interval '1 minute'
    GROUP BY j.queue
), names AS (
    SELECT queue AS name FROM queued_queues WHERE queue IS NOT NULL
    UNION SELECT name FROM pgqueue.queues WHERE paused_at IS NOT NULL
    UNION SELECT queue FROM running
    UNION SELECT queue FROM dead_queues WHERE queue IS NOT NULL
    UNION SELECT queue FROM finished_recently
)
SELECT n.name AS queue, q.ready, q.scheduled, coalesce(r.n, 0) AS running,
       (SELECT extract(epoch FROM now() - min(o.run_at))::float8
        FROM (WITH RECURSIVE prio AS (
                  (SELECT j.priority FROM pgqueue.jobs AS j
                   WHERE j.queue = n.name AND j.state = 'queued' ORDER BY j.priority LIMIT 1)
                  UNION ALL
                  SELECT (SELECT j.priority FROM pgqueue.jobs AS j
                          WHERE j.queue = n.name AND j.state = 'queued'
                            AND j.priority > prio.priority
                          ORDER BY j.priority LIMIT 1)
                  FROM prio WHERE prio.priority IS NOT NULL)
              SELECT (SELECT j.run_at FROM pgqueue.jobs AS j
                      WHERE j.queue = n.name AND j.state = 'queued'
                        AND j.priority = prio.priority
                      ORDER BY j.run_at LIMIT 1) AS run_at
              FROM prio WHERE prio.priority IS NOT NULL) AS o
        WHERE o.run_at <= now()) AS oldest_ready_age_seconds,
       CASE WHEN %(with_finished)s THEN coalesce(f.n, 0) END AS finished_last_minute,
       (SELECT count(*) FROM pgqueue.dead_jobs AS d WHERE d.queue = n.name) AS dead,
       coalesce((SELECT p.paused_at IS NOT NULL FROM pgqueue.queues AS p
                 WHERE p.name = n.name), false) AS paused
FROM names AS n
-- Ready and scheduled in one read of the queue's part of jobs_claim_idx (two counts read
-- it twice: run_at follows priority in the index, so neither bounds its range).
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.run_at <= now()) AS ready,
           count(*) FILTER (WHERE j.run_at > now()) AS scheduled
    FROM pgqueue.jobs AS j WHERE j.queue = n.name AND j.state = 'queued'
) AS q
LEFT JOIN running AS r ON r.queue = n.name
LEFT JOIN finished_recently AS f ON f.queue = n.name
ORDER BY n.name;

-- name: recent_queue_stats
-- queue_stats' rows as the last process to count stored them (migration 0022), if taken
-- less than %(max_age)s seconds ago, with their age. Counts stored "in the future" (the
-- server's clock was set back) are not recent: they would be used until the clock
-- caught up, the gauges frozen.
SELECT s.queues, extract(epoch FROM now() - s.taken_at)::float8 AS age_seconds
FROM pgqueue.queue_stats_snapshot AS s
WHERE s.taken_at > now() - make_interval(secs => %(max_age)s)
  AND s.taken_at <= now() + interval '1 second';

-- name: lock_queue_stats
-- The right to count for everyone (see recent_queue_stats), until this transaction ends;
-- waits while another process counts (its result is then recent).
SELECT pg_advisory_xact_lock(hashtext('pgqueue.queue_stats'));

-- name: save_queue_stats
-- Stores the counts this transaction took (queue_stats) for the other processes.
INSERT INTO pgqueue.queue_stats_snapshot AS s (only_row, taken_at, queues)
VALUES (true, now(), %(queues)s)
ON CONFLICT (only_row) DO UPDATE SET taken_at = excluded.taken_at, queues = excluded.queues;

-- name: queue_finished_counts
-- Per queue: succeeded and cancelled jobs still retained (the reaper prunes them after
-- its --retention-seconds). For `pgqueue stats` only, not the metrics: it reads every
-- retained finished row (no index holds their queue), which a scrape must not.
SELECT j.queue,
       count(*) FILTER (WHERE j.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE j.state = 'cancelled') AS cancelled
FROM pgqueue.jobs AS j
WHERE j.state IN ('succeeded', 'cancelled')
GROUP BY j.queue;

-- name: notify_queue_usage
-- The fraction of Postgres' NOTIFY queue in use (one queue for the whole server). It
-- grows while a listening session does not read (a long transaction, a frozen process);
-- past pgqueue.notify_max_queue_usage pgqueue's statements stop notifying (migration
-- 0014), and full, it fails every other transaction that notifies.
SELECT pg_notification_queue_usage() AS usage;

-- name: notify_limit_ignored
-- Where pgqueue.notify_max_queue_usage is set to a value migration 0014's notify_room()
-- cannot read (it then counts as unset, 0.5, rather than failing a statement over a
-- typo): this session's value, and each ALTER DATABASE / ALTER ROLE setting that applies
-- in this database (producers' sessions read those, not only this one). No row when
-- every one is unset, blank or readable. The pattern and the trimming are notify_room()'s
-- (tests/test_queries.py keeps them in step).
SELECT source, value
FROM (
    SELECT 0 AS rank, 'this session' AS source,
           current_setting('pgqueue.notify_max_queue_usage', true) AS value
    UNION ALL
    SELECT 1,
           -- ALTER ROLE ALL IN DATABASE is stored as ALTER DATABASE is (role 0).
           CASE WHEN s.setrole = 0 AND s.setdatabase = 0 THEN 'ALTER ROLE ALL'
                WHEN s.setrole = 0 THEN 'ALTER DATABASE ' || quote_ident(current_database())
                WHEN s.setdatabase = 0 THEN 'ALTER ROLE ' || quote_ident(r.rolname)
                ELSE 'ALTER ROLE ' || quote_ident(r.rolname) || ' IN DATABASE '
                     || quote_ident(current_database())
           END,
           substr(c.entry, strpos(c.entry, '=') + 1)
    FROM pg_db_role_setting AS s
    LEFT JOIN pg_roles AS r ON r.oid = s.setrole
    CROSS JOIN LATERAL unnest(s.setconfig) AS c(entry)
    WHERE s.setdatabase IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
      AND lower(split_part(c.entry, '=', 1)) = 'pgqueue.notify_max_queue_usage'
) AS found
WHERE btrim(coalesce(value, ''), E' \t\n\r\f\x0b') <> ''
  AND btrim(value, E' \t\n\r\f\x0b')
      !~ '^[+]?([0-9]{1,15}([.][0-9]{0,15})?|[.][0-9]{1,15})([eE][-+]?[0-9]{1,2})?$'
ORDER BY rank, source;

-- name: list_workers
-- Registered workers, most recent first, with seconds since their last heartbeat.
SELECT id, host, pid, queues, concurrency, running, version, started_at, last_heartbeat_at,
       extract(epoch FROM now() - last_heartbeat_at)::float8 AS heartbeat_age_seconds
FROM pgqueue.workers
ORDER BY started_at DESC, id;

-- name: queue_service
-- For `pgqueue status` of a queued job: is its queue paused, and does a live worker
-- (one that beat within three of its heartbeat intervals, as the reaper judges) serve it?
SELECT EXISTS (SELECT 1 FROM pgqueue.queues AS q
               WHERE q.name = %(queue)s AND q.paused_at IS NOT NULL) AS paused,
       EXISTS (SELECT 1 FROM pgqueue.workers AS w
               WHERE %(queue)s = ANY (w.queues)
                 AND w.last_heartbeat_at
                     > now() - make_interval(secs => 3 * w.heartbeat_seconds)) AS served;

-- name: list_jobs
-- Jobs, newest first, filtered by state, queue and task when given (NULL = any).
-- leased_by and started_at (when the attempt under way began) only while running: a
-- requeued job keeps its last worker's name and attempt's start in the row.
SELECT id, queue, task, state::text AS state, attempts, max_attempts, priority, run_at,
       created_at, finished_at, CASE WHEN state = 'running' THEN leased_by END AS leased_by,
       CASE WHEN state = 'running' THEN attempted_at END AS started_at
FROM pgqueue.jobs
WHERE (%(state)s::pgqueue.job_state IS NULL OR state = %(state)s::pgqueue.job_state)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  -- The next page (--before): its ids are below the last one shown.
  AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: list_running_jobs
-- list_jobs for the running state: read through jobs_running_idx (the running set is
-- bounded by the workers' concurrency), then sorted. list_jobs' ORDER BY id DESC LIMIT
-- walked the primary key from the newest job down past every newer queued or finished
-- one: with a backlog of millions, seconds, when an operator most wants to see what runs.
WITH running AS MATERIALIZED (
    SELECT id, queue, task, state::text AS state, attempts, max_attempts, priority, run_at,
           created_at, finished_at, leased_by, attempted_at AS started_at
    FROM pgqueue.jobs
    WHERE state = 'running'
      AND (%(queue)s::text IS NULL OR queue = %(queue)s)
      AND (%(task)s::text IS NULL OR task = %(task)s)
      AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
)
SELECT * FROM running ORDER BY id DESC LIMIT %(limit)s;

-- name: list_dead
-- Dead jobs, most recently dead first, filtered by queue and task when given;
-- original_id is set for a job stored under a new id (migration 0023).
SELECT id, original_id, queue, task, attempts, max_attempts, reason, died_at,
       errors->-1->>'error' AS last_error
FROM pgqueue.dead_jobs
WHERE (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
ORDER BY died_at DESC, id DESC
LIMIT %(limit)s;

-- name: get_dead
-- One dead job with everything it carries; args as text, which store.get_dead decodes
-- (args Python cannot decode are why some jobs are dead: they must still show).
SELECT id, queue, task, args::text AS args, priority, attempts, max_attempts, run_at,
       idempotency_key,
       created_at, attempted_at, errors, history, reason, died_at, original_id
FROM pgqueue.dead_jobs WHERE id = %(id)s;

-- name: dead_ids_by_original
-- The dead jobs stored under a new id because the dead-letter table held their own
-- (migration 0023), for each of these ids: so that `dead show` and `dead retry`, given
-- the id a job was enqueued as, can name the dead id they take.
SELECT original_id, array_agg(id ORDER BY id) AS dead_ids
FROM pgqueue.dead_jobs
WHERE original_id = ANY (%(ids)s::bigint[])
GROUP BY original_id;

-- name: retry_dead
-- Moves dead jobs back to the queue with fresh attempts, atomically (the delete and the
-- inserts are one statement), runnable now, and wakes each of their queues' workers
-- itself (the insert trigger's notification is the same one, which Postgres sends once;
-- with pgqueue.notify_inserts off the trigger sends none, and `dead retry` is not an
-- enqueue that setting is for). Their
-- errors and history stay. A revived job keeps its idempotency key unless a job in
-- pgqueue.jobs holds it (committed, or inserted concurrently) or an older job of the same
-- batch takes it back: then it comes back without its key rather than failing the move
-- (two dead jobs can share a key: the first one's death freed it for the second). It
-- keeps its id too, unless pgqueue.jobs holds that id (ids repeat after an explicit id
-- in an INSERT or a sequence reset): then it comes back under the next id of the jobs
-- sequence, or, where that one is taken too (a sequence set back), stays dead, rather
-- than failing the move of the whole batch.
-- Selects by ids, or by filters (NULL = any) when ids is NULL, at most %(limit)s rows per
-- call, in id order, only ids above %(after_id)s and up to %(upto_id)s when given: `dead
-- retry --all` walks the table once, from the ids that were there when it started, so a
-- job it revived that dies again meanwhile (same id, behind it) is not revived twice.
-- Returns each revived job's dead id and its id in pgqueue.jobs (with the idempotency key
-- it came back without, if it had to), and the picked jobs left dead (job_id NULL).
WITH picked AS MATERIALIZED (
    SELECT x.id,
           CASE WHEN EXISTS (SELECT 1 FROM pgqueue.jobs AS t WHERE t.id = x.id)
                THEN nextval(pg_catalog.pg_get_serial_sequence('pgqueue.jobs', 'id')::regclass)
                ELSE x.id END AS job_id
    FROM pgqueue.dead_jobs AS x
    WHERE (%(ids)s::bigint[] IS NULL OR x.id = ANY (%(ids)s::bigint[]))
      AND (%(queue)s::text IS NULL OR x.queue = %(queue)s)
      AND (%(task)s::text IS NULL OR x.task = %(task)s)
      AND (%(reason)s::text IS NULL OR x.reason = %(reason)s)
      AND (%(after_id)s::bigint IS NULL OR x.id > %(after_id)s::bigint)
      AND (%(upto_id)s::bigint IS NULL OR x.id <= %(upto_id)s::bigint)
    ORDER BY x.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), usable AS MATERIALIZED (
    -- A new id must be free in both tables (a dead id, revived later, would collide).
    SELECT p.id, p.job_id FROM picked AS p
    WHERE p.job_id = p.id
       OR (NOT EXISTS (SELECT 1 FROM pgqueue.jobs AS t WHERE t.id = p.job_id)
           AND NOT EXISTS (SELECT 1 FROM pgqueue.dead_jobs AS o WHERE o.id = p.job_id))
), moved AS (
    DELETE FROM pgqueue.dead_jobs AS d
    USING usable AS u
    WHERE d.id = u.id
    RETURNING d.*, u.job_id
), revived AS (
    SELECT m.*, row_number() OVER (PARTITION BY m.idempotency_key ORDER BY m.id) AS nth
    FROM moved AS m
), keyed AS (
    INSERT INTO pgqueue.jobs AS j
        (id, queue, task, args, priority, state, attempts, max_attempts, run_at,
         idempotency_key, created_at, errors, history)
    SELECT r.job_id, r.queue, r.task, r.args, r.priority, 'queued', 0, r.max_attempts, now(),
           r.idempotency_key, r.created_at, r.errors, r.history
    FROM revived AS r
    WHERE r.idempotency_key IS NOT NULL AND r.nth = 1
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING j.id
), unkeyed AS (
    INSERT INTO pgqueue.jobs AS j
        (id, queue, task, args, priority, state, attempts, max_attempts, run_at,
         idempotency_key, created_at, errors, history)
    SELECT r.job_id, r.queue, r.task, r.args, r.priority, 'queued', 0, r.max_attempts, now(),
           NULL, r.created_at, r.errors, r.history
    FROM revived AS r
    WHERE r.job_id NOT IN (SELECT k.id FROM keyed AS k)
    RETURNING j.id
), woken AS (
    SELECT pgqueue.wake(q.queue) FROM (SELECT DISTINCT m.queue FROM moved AS m) AS q
)
SELECT p.id, u.job_id,
       CASE WHEN r.idempotency_key IS NOT NULL
                 AND NOT EXISTS (SELECT 1 FROM keyed AS k WHERE k.id = u.job_id)
            THEN r.idempotency_key END AS dropped_key
FROM picked AS p
LEFT JOIN usable AS u ON u.id = p.id
LEFT JOIN revived AS r ON r.id = p.id
CROSS JOIN (SELECT count(*) FROM woken) AS w
ORDER BY p.id;

-- name: purge_dead
-- Deletes dead jobs that died more than %(older_than_seconds)s ago (all when NULL),
-- filtered by queue and task when given, at most %(limit)s per call, in id order, above
-- %(after_id)s and up to %(upto_id)s when given (as retry_dead: one walk, it ends).
DELETE FROM pgqueue.dead_jobs AS d
WHERE d.id IN (
    SELECT x.id FROM pgqueue.dead_jobs AS x
    WHERE (%(older_than_seconds)s::float8 IS NULL
           OR x.died_at < now() - make_interval(secs => %(older_than_seconds)s::float8))
      AND (%(queue)s::text IS NULL OR x.queue = %(queue)s)
      AND (%(task)s::text IS NULL OR x.task = %(task)s)
      AND (%(reason)s::text IS NULL OR x.reason = %(reason)s)
      AND (%(after_id)s::bigint IS NULL OR x.id > %(after_id)s::bigint)
      AND (%(upto_id)s::bigint IS NULL OR x.id <= %(upto_id)s::bigint)
    ORDER BY x.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED)
RETURNING d.id;

-- name: count_dead
-- How many dead jobs `dead purge` would delete with these filters (`--dry-run`).
SELECT count(*) AS n FROM pgqueue.dead_jobs AS x
WHERE (%(older_than_seconds)s::float8 IS NULL
       OR x.died_at < now() - make_interval(secs => %(older_than_seconds)s::float8))
  AND (%(queue)s::text IS NULL OR x.queue = %(queue)s)
  AND (%(task)s::text IS NULL OR x.task = %(task)s)
  AND (%(reason)s::text IS NULL OR x.reason = %(reason)s);

-- name: max_dead_id
-- Where `dead retry --all` and `dead purge` stop: the highest id in the table when they
-- start (NULL when it is empty).
SELECT max(id) AS id FROM pgqueue.dead_jobs;

-- name: cancel_job
-- Cancels a job: a queued one becomes cancelled now; a running one is flagged
-- (cancel_requested_at), which its worker's heartbeat hands to the handler and which
-- keeps a failed attempt from being retried. Returns nothing for a job that is neither.
-- The worker running it is told to beat at once, on the wake-up channel: the payload
-- ' cancel <worker id>' starts with a space, which no queue name can (migration 0013).
WITH cancelled AS (
    UPDATE pgqueue.jobs AS j
    SET state = CASE WHEN j.state = 'queued' THEN 'cancelled'::pgqueue.job_state
                     ELSE j.state END,
        finished_at = CASE WHEN j.state = 'queued' THEN now() ELSE j.finished_at END,
        cancel_requested_at = coalesce(j.cancel_requested_at, now())
    WHERE j.id = %(id)s AND j.state IN ('queued', 'running')
    RETURNING j.id, j.state, j.leased_by
), told AS (
    SELECT pgqueue.wake(' cancel ' || c.leased_by)
    FROM cancelled AS c
    -- A NOTIFY payload must be under 8000 bytes: a worker id too long for one waits
    -- for its worker's next beat rather than failing the cancel.
    WHERE c.state = 'running' AND octet_length(c.leased_by) < 7900
)
SELECT c.id, c.state::text AS state FROM cancelled AS c, (SELECT count(*) FROM told) AS t;

-- name: run_now
-- Makes queued jobs due now (a retry waiting out its backoff, a snoozed or scheduled
-- job; one already due keeps its place), and notifies each of their queues as an insert
-- would (a rescued job with the payload the reaper's requeue sends). Returns the ids
-- moved, and whether their queue is paused; jobs in any other state are left alone.
WITH moved AS (
    UPDATE pgqueue.jobs AS j SET run_at = LEAST(j.run_at, now())
    WHERE j.id = ANY(%(ids)s::bigint[]) AND j.state = 'queued'
    RETURNING j.id, j.queue, j.rescued
), notified AS (
    SELECT pgqueue.wake(p.payload)
    FROM (SELECT DISTINCT CASE WHEN m.rescued THEN ' rescued ' || m.queue ELSE m.queue END
              AS payload
          FROM moved AS m) AS p
)
SELECT m.id, m.queue,
       EXISTS (SELECT 1 FROM pgqueue.queues AS q
               WHERE q.name = m.queue AND q.paused_at IS NOT NULL) AS paused
FROM moved AS m, (SELECT count(*) FROM notified) AS n ORDER BY m.id;

-- name: pause_queue
-- Pauses a queue: workers claim nothing more from it (running jobs finish). A queue
-- paused already keeps the time it was paused; `newly` says which it was.
INSERT INTO pgqueue.queues AS q (name, paused_at) VALUES (%(name)s, now())
ON CONFLICT (name) DO UPDATE
SET paused_at = coalesce(q.paused_at, now()), updated_at = now()
RETURNING q.name, q.paused_at, q.paused_at = now() AS newly;

-- name: resume_queue
-- Resumes a paused queue and wakes its workers at once, also to check for rescued jobs
-- (their own payload, as the reaper's requeue sends: the claim leaves them to that
-- check). Returns no row when the queue was not paused (a name that was never paused
-- gets no row in pgqueue.queues).
WITH resumed AS (
    UPDATE pgqueue.queues AS q SET paused_at = NULL, updated_at = now()
    WHERE q.name = %(name)s AND q.paused_at IS NOT NULL
    RETURNING q.name
)
SELECT r.name
FROM resumed AS r,
     LATERAL (SELECT pgqueue.wake(r.name), pgqueue.wake(' rescued ' || r.name)) AS n;

-- name: queue_in_use
-- Whether a queue has jobs waiting, running or dead, or a live worker serving it: a
-- pause of a queue that has none of these is likely a typo. The claim index and the
-- running set for the hot table; the dead-letter table and the workers are read whole
-- when nothing matches (an admin command, not a hot path).
SELECT EXISTS (SELECT 1 FROM pgqueue.jobs WHERE queue = %(name)s AND state = 'queued')
    OR EXISTS (SELECT 1 FROM pgqueue.jobs WHERE queue = %(name)s AND state = 'running')
    OR EXISTS (SELECT 1 FROM pgqueue.workers WHERE %(name)s = ANY (queues))
    OR EXISTS (SELECT 1 FROM pgqueue.dead_jobs WHERE queue = %(name)s) AS in_use;

-- name: schema_ready
-- For /healthz: the database answers and the pgqueue schema is migrated.
SELECT to_regclass('pgqueue.jobs') IS NOT NULL AS ready;
