-- 0002: what operators need: attempt history, cancellation, paused queues, live workers.

-- One object per finished attempt, whatever its outcome:
-- {attempt, worker, started_at, ended_at, duration, outcome, error}. Appended by the same
-- statement that records the outcome, so it costs no extra round trip. Tracebacks stay
-- in `errors` (failures only).
ALTER TABLE pgqueue.jobs ADD COLUMN history jsonb NOT NULL DEFAULT '[]'::jsonb;
ALTER TABLE pgqueue.dead_jobs ADD COLUMN history jsonb NOT NULL DEFAULT '[]'::jsonb;

-- Set by `pgqueue cancel` on a running job: the handler can see it (the heartbeat brings
-- it to the worker), and the job is not retried when its attempt fails.
ALTER TABLE pgqueue.jobs ADD COLUMN cancel_requested_at timestamptz;

-- Queues an operator has paused: workers claim nothing from them until resumed. A queue
-- needs no row here to exist; rows are created by pause/resume.
CREATE TABLE pgqueue.queues (
    name        text PRIMARY KEY,
    paused_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queues_name_check CHECK (char_length(name) BETWEEN 1 AND 128)
);

COMMENT ON TABLE pgqueue.queues IS 'pgqueue queue settings (paused or not).';

-- Live workers: registered at start, refreshed by every heartbeat, removed on clean exit;
-- the reaper removes those whose heartbeat is stale.
CREATE TABLE pgqueue.workers (
    id                 text PRIMARY KEY,
    host               text NOT NULL,
    pid                integer NOT NULL,
    queues             text[] NOT NULL,
    concurrency        integer NOT NULL,
    running            integer NOT NULL DEFAULT 0,
    -- The reaper counts a worker as gone after three missed heartbeats.
    heartbeat_seconds  double precision NOT NULL,
    version            text NOT NULL,
    started_at         timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE pgqueue.workers IS 'pgqueue live worker processes (not an API; read it through pgqueue workers).';

-- One attempt's history entry, as a one-element array to append to `history`
-- (pgqueue internal, not an API).
CREATE FUNCTION pgqueue.history_entry(
    attempt integer,
    worker text,
    started_at timestamptz,
    duration double precision,
    outcome text,
    error text DEFAULT NULL
) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
        'attempt', attempt, 'worker', worker, 'started_at', started_at,
        'ended_at', statement_timestamp(), 'duration', duration, 'outcome', outcome,
        'error', error)))
$$;
