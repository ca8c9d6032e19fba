-- Queries of pgqueue.testing.drain: a real worker runs the jobs; these tell when it is
-- done and what happened. For tests, not for production (they scan a queue's jobs).

-- name: drain_outstanding
-- Jobs of these queues the drain still waits for: runnable now (with_scheduled: queued,
-- whenever due) in a queue not paused, or running under the drain's worker (an outcome
-- not written yet). With with_scheduled, a retry written between drain_schedule_now and
-- this statement is due later, and still counts.
SELECT count(*) AS n
FROM pgqueue.jobs AS j
WHERE j.queue = ANY(%(queues)s::text[])
  AND ((j.state = 'queued' AND (j.run_at <= now() OR %(with_scheduled)s::boolean)
        AND NOT EXISTS (SELECT 1 FROM pgqueue.queues AS q
                        WHERE q.name = j.queue AND q.paused_at IS NOT NULL))
       OR (j.state = 'running' AND j.leased_by = %(worker_id)s));

-- name: drain_schedule_now
-- drain(with_scheduled=True): queued jobs of these queues due later (scheduled, or
-- waiting out a retry's backoff or a snooze) become due now; each queue with such a job
-- is notified, as an insert would (a rescued job, which the worker's claim leaves out, as
-- run_now notifies it: on the payload the worker makes its check for rescued jobs). Paused
-- queues are left alone.
WITH moved AS (
    UPDATE pgqueue.jobs AS j
    SET run_at = now()
    WHERE j.state = 'queued' AND j.run_at > now() AND j.queue = ANY(%(queues)s::text[])
      AND NOT EXISTS (SELECT 1 FROM pgqueue.queues AS q
                      WHERE q.name = j.queue AND q.paused_at IS NOT NULL)
    RETURNING j.queue, j.rescued
)
SELECT DISTINCT m.queue
FROM (SELECT DISTINCT queue, rescued FROM moved) AS m,
     LATERAL (SELECT pgqueue.wake(CASE WHEN m.rescued THEN ' rescued ' || m.queue
                                       ELSE m.queue END)) AS n;

-- name: drain_outcomes
-- Every attempt the drain's worker ended, in the order it ended them, from either table.
SELECT id, task, attempt, outcome, error
FROM (
    SELECT j.id, j.task, (h.e ->> 'attempt')::int AS attempt, h.e ->> 'outcome' AS outcome,
           h.e ->> 'error' AS error, h.e ->> 'ended_at' AS ended_at, h.n
    FROM pgqueue.jobs AS j, jsonb_array_elements(j.history) WITH ORDINALITY AS h(e, n)
    WHERE j.queue = ANY(%(queues)s::text[]) AND h.e ->> 'worker' = %(worker_id)s
    UNION ALL
    -- A job stored under a new dead id (0023) is reported under the id it was enqueued as.
    SELECT coalesce(d.original_id, d.id), d.task, (h.e ->> 'attempt')::int,
           h.e ->> 'outcome', h.e ->> 'error', h.e ->> 'ended_at', h.n
    FROM pgqueue.dead_jobs AS d, jsonb_array_elements(d.history) WITH ORDINALITY AS h(e, n)
    WHERE d.queue = ANY(%(queues)s::text[]) AND h.e ->> 'worker' = %(worker_id)s
) AS entries
ORDER BY ended_at::timestamptz, id, n;
