-- 0009: the insert trigger's notification can be turned off with the setting
-- `pgqueue.notify_inserts` (on when unset). Postgres serialises the commits of
-- transactions that sent a notification (PreCommit_Notify takes a lock global to the
-- server and holds it until the commit completes, WAL flush included), so transactions
-- that enqueue commit one after another, never together. Where producers' commit rate
-- matters more than pick-up latency, turn it off for a database, a role or one
-- transaction:
--   ALTER DATABASE app SET pgqueue.notify_inserts = off;
--   ALTER ROLE importer SET pgqueue.notify_inserts = off;
--   SET LOCAL pgqueue.notify_inserts = off;
-- Workers then find those jobs by polling (`pgqueue-worker --poll-interval`). The
-- payload limit of 0004 is checked either way; nothing else changes. A value that is not
-- one of Postgres' boolean spellings makes every insert statement fail (error 22023).
CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    max_bytes bigint := coalesce(
        nullif(current_setting('pgqueue.max_args_bytes', true), '')::bigint, 1048576);
    -- Read as Postgres reads a boolean: any case, surrounding white space ignored.
    notify_setting text := lower(btrim(
        coalesce(current_setting('pgqueue.notify_inserts', true), ''), E' \t\n\r\f\x0b'));
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
        PERFORM pg_notify('pgqueue_jobs', q.queue)
        FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'queued') AS q;
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
COMMENT ON FUNCTION pgqueue.notify_inserted() IS 'pgqueue internal, not an API.';
