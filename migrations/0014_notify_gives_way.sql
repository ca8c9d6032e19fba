-- 0014: pgqueue's notifications give way before Postgres' NOTIFY queue fills.
--
-- Postgres keeps every notification until the slowest listening session of the server
-- has read it; a listener that stops reading (a LISTEN session left in an open
-- transaction, a frozen process) makes the queue grow, and once it is full (8 GB) every
-- transaction that notifies fails at commit. For pgqueue that was every enqueue (the
-- insert trigger notifies), a worker's retries and releases, the reaper's requeues.
-- A notification only wakes workers sooner (they poll anyway), so from here on each of
-- pgqueue's notifications is sent only while the queue is less full than the setting
-- `pgqueue.notify_max_queue_usage` (a fraction, 0.5 when unset): past it, jobs are found
-- by the workers' poll (`--poll-interval`) and nothing fails. Postgres starts warning in
-- its log at 50%. Set it per database, role or transaction:
--   ALTER DATABASE app SET pgqueue.notify_max_queue_usage = 0.2;
-- 0 sends none; 1 sends them until the queue is full (as before 0014).
-- A value that is not a plain decimal number counts as unset: a typo must not make the
-- worker's and the reaper's statements fail.
--
-- pgqueue.wake(queue) is what every pgqueue statement that makes jobs runnable now calls
-- instead of pg_notify('pgqueue_jobs', queue); it is internal, not an API. The insert
-- trigger checks the queue's usage once per statement.

CREATE FUNCTION pgqueue.notify_max_queue_usage() RETURNS double precision
LANGUAGE plpgsql STABLE AS $$
DECLARE
    raw text := btrim(coalesce(current_setting('pgqueue.notify_max_queue_usage', true), ''),
                      E' \t\n\r\f\x0b');
BEGIN
    IF raw ~ '^([0-9]{1,15}(\.[0-9]{0,15})?|\.[0-9]{1,15})$' THEN
        RETURN raw::double precision;
    END IF;
    RETURN 0.5;
END
$$;
COMMENT ON FUNCTION pgqueue.notify_max_queue_usage() IS 'pgqueue internal, not an API.';

-- Whether pgqueue's statements may notify now: the NOTIFY queue is less full than the
-- limit. Reading the queue's usage takes a lock global to the server, and the queue takes
-- hours to fill, so the answer is kept for the session (in the setting
-- pgqueue.notify_room_cache, with the limit it was read under) and read again on about
-- one call in a hundred, at once when the limit changes. notify_room_read() reads it.
CREATE FUNCTION pgqueue.notify_room_read() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    room boolean := pg_notification_queue_usage() < pgqueue.notify_max_queue_usage();
BEGIN
    PERFORM set_config('pgqueue.notify_room_cache',
                       coalesce(current_setting('pgqueue.notify_max_queue_usage', true), '')
                       || CASE WHEN room THEN ':t' ELSE ':f' END, false);
    RETURN room;
END
$$;
COMMENT ON FUNCTION pgqueue.notify_room_read() IS 'pgqueue internal, not an API.';

CREATE FUNCTION pgqueue.notify_room() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    limit_text text := coalesce(current_setting('pgqueue.notify_max_queue_usage', true), '');
    cached text := current_setting('pgqueue.notify_room_cache', true);
BEGIN
    IF cached IN (limit_text || ':t', limit_text || ':f') AND random() >= 0.01 THEN
        RETURN cached = limit_text || ':t';
    END IF;
    RETURN pgqueue.notify_room_read();
END
$$;
COMMENT ON FUNCTION pgqueue.notify_room() IS 'pgqueue internal, not an API.';

CREATE FUNCTION pgqueue.wake(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pgqueue.notify_room() THEN
        PERFORM pg_notify('pgqueue_jobs', queue);
    END IF;
END
$$;
COMMENT ON FUNCTION pgqueue.wake(text) IS 'pgqueue internal, not an API.';

-- As 0009's, asking pgqueue.notify_room() (or its kept answer) once per statement.
CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    max_bytes bigint := coalesce(
        nullif(current_setting('pgqueue.max_args_bytes', true), '')::bigint, 1048576);
    -- Read as Postgres reads a boolean: any case, surrounding white space ignored.
    notify_setting text := lower(btrim(
        coalesce(current_setting('pgqueue.notify_inserts', true), ''), E' \t\n\r\f\x0b'));
    -- pgqueue.notify_room()'s answer kept for the session, read here without calling it:
    -- a nested PL/pgSQL call on every enqueue cost measurably more CPU.
    limit_text text := coalesce(current_setting('pgqueue.notify_max_queue_usage', true), '');
    cached text := current_setting('pgqueue.notify_room_cache', true);
    too_big record;
BEGIN
    SELECT n.task, octet_length(n.args::text) AS bytes INTO too_big
    FROM new_jobs AS n
    WHERE octet_length(n.args::text) > max_bytes
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgqueue: args of a % job are % bytes, over the limit of % bytes',
            too_big.task, too_big.bytes, max_bytes
            USING ERRCODE = '54000',
                  HINT = 'raise the limit with the setting pgqueue.max_args_bytes';
    END IF;
    -- Unset (or empty), and Postgres' spellings of true and false with their prefixes.
    IF notify_setting IN ('', 'on', 't', 'tr', 'tru', 'true', 'y', 'ye', 'yes', '1') THEN
        IF (CASE WHEN cached IN (limit_text || ':t', limit_text || ':f') AND random() >= 0.01
                 THEN cached = limit_text || ':t' ELSE pgqueue.notify_room_read() END) THEN
            PERFORM pg_notify('pgqueue_jobs', q.queue)
            FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'queued') AS q;
        END IF;
    ELSIF notify_setting NOT IN ('off', 'of', 'f', 'fa', 'fal', 'fals', 'false', 'n', 'no', '0')
    THEN
        -- Refused rather than read as on or off: a typo must not change wake-ups silently.
        RAISE EXCEPTION 'pgqueue: the setting pgqueue.notify_inserts is %, not on or off',
            quote_literal(current_setting('pgqueue.notify_inserts', true))
            USING ERRCODE = '22023',
                  HINT = 'set pgqueue.notify_inserts to on (the default) or off'
                         ' (or true/false, yes/no, 1/0)';
    END IF;
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT EXECUTE ON FUNCTION pgqueue.wake(text), pgqueue.notify_room(),
            pgqueue.notify_room_read(), pgqueue.notify_max_queue_usage() TO pgqueue_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_producer') THEN
        GRANT EXECUTE ON FUNCTION pgqueue.notify_room(), pgqueue.notify_room_read(),
            pgqueue.notify_max_queue_usage() TO pgqueue_producer;
    END IF;
END
$$;
