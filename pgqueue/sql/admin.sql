-- name: job_status
-- One job by id, from the jobs table or, if it died, from the dead-letter table.
SELECT id, queue, task, state::text AS state, attempts, max_attempts, priority, run_at,
       created_at, attempted_at, finished_at, lease_expires_at, leased_by, idempotency_key,
       errors, NULL::text AS dead_reason
FROM pgqueue.jobs WHERE id = %(id)s
UNION ALL
SELECT id, queue, task, 'dead', attempts, max_attempts, priority, run_at,
       created_at, attempted_at, died_at, NULL, NULL, idempotency_key, errors, reason
FROM pgqueue.dead_jobs WHERE id = %(id)s;
