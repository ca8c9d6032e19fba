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
-- by the workers' poll (`--poll-interval`). Set it for a database, a role (new sessions
-- read it) or a session:
--   ALTER DATABASE app SET pgqueue.notify_max_queue_usage = 0.2;
-- 0 sends none; 1 sends them until the queue is full (as before 0014). A value that is
-- not a plain non-negative decimal (at most 15 digits either side of the point, an
-- optional exponent of at most two digits) counts as unset: a typo must not make the
-- worker's and the reaper's statements fail.
--
-- Reading the queue's usage takes a lock global to the server (and moves the queue's
-- tail), and the queue takes hours to fill, so a session keeps the answer for the
-- second of its transaction's start (rounded), with the limit it was read under, in the
-- setting pgqueue.notify_room_cache: a session reads it about once a second, and again
-- at once when the limit changes. A rollback (a failed commit too) takes that setting
-- back to an older second's answer, which is then read again.
--
-- pgqueue.wake(queue) is what every pgqueue statement that makes jobs runnable now calls
-- instead of pg_notify('pgqueue_jobs', queue); pgqueue.notify_room() answers whether it
-- may notify. Both are internal, not an API. The insert trigger carries its own copy of
-- notify_room() (the enqueue's hot path; and a producer needs no grant for it).
-- Where the pgqueue_worker role is created after this ran (0005), running the DO block
-- at the end of this file again grants it what it needs.

CREATE OR REPLACE FUNCTION pgqueue.notify_room() RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    limit_text text := btrim(
        coalesce(current_setting('pgqueue.notify_max_queue_usage', true), ''), E' \t\n\r\f\x0b');
    room_key text := limit_text || '@' || extract(epoch FROM now())::bigint;
    cached text := current_setting('pgqueue.notify_room_cache', true);
    room boolean;
BEGIN
    IF cached IN (room_key || ':t', room_key || ':f') THEN
        RETURN cached = room_key || ':t';
    END IF;
    -- At most 15 digits either side of the point and a two-digit exponent: every value
    -- the pattern lets through casts without an error. No backslash in the pattern: a
    -- session with standard_conforming_strings off would read the literal otherwise.
    room := pg_notification_queue_usage() <
        CASE WHEN limit_text ~ '^[+]?([0-9]{1,15}([.][0-9]{0,15})?|[.][0-9]{1,15})([eE][-+]?[0-9]{1,2})?$'
             THEN limit_text::double precision ELSE 0.5 END;
    PERFORM set_config('pgqueue.notify_room_cache',
                       room_key || CASE WHEN room THEN ':t' ELSE ':f' END, false);
    RETURN room;
END
$$;
COMMENT ON FUNCTION pgqueue.notify_room() IS 'pgqueue internal, not an API.';

CREATE OR REPLACE FUNCTION pgqueue.wake(queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF pgqueue.notify_room() THEN
        PERFORM pg_notify('pgqueue_jobs', queue);
    END IF;
END
$$;
COMMENT ON FUNCTION pgqueue.wake(text) IS 'pgqueue internal, not an API.';

-- As 0009's, notifying only where pgqueue.notify_room() (copied in) says so.
CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    max_bytes bigint := coalesce(
        nullif(current_setting('pgqueue.max_args_bytes', true), '')::bigint, 1048576);
    -- Read as Postgres reads a boolean: any case, surrounding white space ignored.
    notify_setting text := lower(btrim(
        coalesce(current_setting('pgqueue.notify_inserts', true), ''), E' \t\n\r\f\x0b'));
    limit_text text;
    room_key text;
    cached text;
    room boolean;
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
        -- pgqueue.notify_room(), kept in step with it.
        limit_text := btrim(coalesce(current_setting('pgqueue.notify_max_queue_usage', true),
                                     ''), E' \t\n\r\f\x0b');
        room_key := limit_text || '@' || extract(epoch FROM now())::bigint;
        cached := current_setting('pgqueue.notify_room_cache', true);
        IF cached IN (room_key || ':t', room_key || ':f') THEN
            room := cached = room_key || ':t';
        ELSE
            room := pg_notification_queue_usage() <
                CASE WHEN limit_text ~ '^[+]?([0-9]{1,15}([.][0-9]{0,15})?|[.][0-9]{1,15})([eE][-+]?[0-9]{1,2})?$'
                     THEN limit_text::double precision ELSE 0.5 END;
            PERFORM set_config('pgqueue.notify_room_cache',
                               room_key || CASE WHEN room THEN ':t' ELSE ':f' END, false);
        END IF;
        IF room THEN
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
        GRANT EXECUTE ON FUNCTION pgqueue.wake(text), pgqueue.notify_room() TO pgqueue_worker;
    END IF;
END
$$;
