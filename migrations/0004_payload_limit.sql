-- 0004: refuse oversized job payloads at enqueue, whatever the path (pgqueue.enqueue,
-- pgqueue.enqueue_many, a plain INSERT, COPY).
--
-- The limit is the setting `pgqueue.max_args_bytes` (bytes of the args' JSON text),
-- 1 MiB when unset; change it per database with
--   ALTER DATABASE app SET pgqueue.max_args_bytes = '262144';
-- The check rides on the statement-level insert trigger that already reads the inserted
-- rows to notify workers: an oversized row aborts the whole statement, so nothing is
-- written.
CREATE OR REPLACE FUNCTION pgqueue.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    max_bytes bigint := coalesce(
        nullif(current_setting('pgqueue.max_args_bytes', true), '')::bigint, 1048576);
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
    PERFORM pg_notify('pgqueue_jobs', q.queue)
    FROM (SELECT DISTINCT queue FROM new_jobs WHERE state = 'queued') AS q;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgqueue.notify_inserted() IS 'pgqueue internal, not an API.';
