-- 0021: a job that snoozes again and again (a handler polling with `raise Snooze(60)`)
-- no longer grows its history without end. Every snooze appended an entry, and every
-- snooze rewrote the whole array: after a week of one a minute, some 10,000 entries
-- (megabytes of jsonb in one row) rewritten each minute. A snooze does not count an
-- attempt, so nothing else bounded them.
--
-- pgqueue.history_with_snooze(history, entry) appends a snooze's entry (a one-element
-- array, as pgqueue.history_entry makes it). Once the history holds 50 entries or more,
-- it drops the oldest snoozed entries, keeping the newest 50 (the new one included), and
-- the new entry says how many snoozes were dropped so far (`snoozes_dropped`, counted
-- over the job's life: the largest value in the history is the total), so that
-- `pgqueue status` still counts every run. Every other entry stays: counted attempts are
-- bounded by max_attempts, releases and orphans by what happens to workers. A short
-- history costs one length check. `history` is any JSON to the table (a plain INSERT may
-- set it): one that is not an array is appended to as before, and entries that are not
-- objects, or a `snoozes_dropped` that is not a number, are kept and never counted.
CREATE FUNCTION pgqueue.history_with_snooze(history jsonb, entry jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(history) IS DISTINCT FROM 'array' THEN history || entry
        WHEN jsonb_array_length(history) < 50 THEN history || entry
        ELSE (
            SELECT coalesce(jsonb_agg(h.e ORDER BY h.n) FILTER (WHERE h.keep), '[]'::jsonb)
                   || CASE WHEN bool_and(h.keep) THEN entry
                      ELSE jsonb_build_array((entry -> 0) || jsonb_build_object(
                          'snoozes_dropped',
                          coalesce(max(CASE WHEN jsonb_typeof(h.e -> 'snoozes_dropped') = 'number'
                                            THEN (h.e ->> 'snoozes_dropped')::numeric END), 0)
                          + count(*) FILTER (WHERE NOT h.keep)))
                      END
            FROM (SELECT t.e, t.n,
                         t.e ->> 'outcome' IS DISTINCT FROM 'snoozed'
                         OR count(*) FILTER (WHERE t.e ->> 'outcome' = 'snoozed')
                                OVER (ORDER BY t.n DESC) < 50 AS keep
                  FROM jsonb_array_elements(history) WITH ORDINALITY AS t(e, n)) AS h)
    END
$$;

COMMENT ON FUNCTION pgqueue.history_with_snooze(jsonb, jsonb) IS
    'pgqueue internal: history || entry for a snooze, keeping the newest 50 snoozed entries.';

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgqueue_worker') THEN
        GRANT EXECUTE ON FUNCTION pgqueue.history_with_snooze(jsonb, jsonb) TO pgqueue_worker;
    END IF;
END
$$;
