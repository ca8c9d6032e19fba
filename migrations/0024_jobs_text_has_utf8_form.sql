-- 0024: in a database whose encoding is not UTF8, a job whose text has no UTF-8 form is
-- refused when it is written.
--
-- Workers read jobs as UTF-8 (their sessions' client encoding). In a SQL_ASCII database
-- the server stores whatever bytes it is given and checks them only on the way out; in
-- WIN1252 some bytes (0x81, 0x8D, 0x8F, 0x90, 0x9D) have no Unicode character. A row
-- holding such text in its task, queue, args or idempotency key made every claim of its
-- queue fail, for good: the claim reads the row and fails as a whole, nothing was
-- dead-lettered, and every job behind it waited until an operator deleted that row. A
-- plain INSERT from another language stored one; so did enqueue() on a connection whose
-- client encoding a SQL_ASCII server does not convert from.
--
-- Such a row is now refused when inserted (COPY and pgqueue.enqueue included) or when
-- those columns are updated, with error 22021 (character_not_in_repertoire), which
-- aborts the producer's transaction as any refused statement does. The check is the
-- conversion a worker's session makes when it reads the row. In a UTF8 database, nearly
-- every one, nothing is created and no enqueue pays for it; elsewhere each row costs a
-- conversion of its text and a subtransaction (for the error's message).
DO $$
BEGIN
    IF pg_catalog.current_setting('server_encoding') = 'UTF8' THEN
        RETURN;
    END IF;
    BEGIN
        PERFORM pg_catalog.convert_to('a', 'UTF8');
    EXCEPTION WHEN undefined_function OR feature_not_supported THEN
        -- No conversion to UTF8 at all (MULE_INTERNAL): no session of a worker, whose
        -- client encoding is UTF8, works here, and the check would refuse every job.
        RETURN;
    END;
    CREATE FUNCTION pgqueue.jobs_text_check() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $f$
    BEGIN
        BEGIN
            PERFORM convert_to(NEW.task, 'UTF8'), convert_to(NEW.queue, 'UTF8'),
                    convert_to(NEW.args::text, 'UTF8'),
                    convert_to(NEW.idempotency_key, 'UTF8');
        EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
            RAISE EXCEPTION 'pgqueue: the job''s task, queue, args or idempotency key holds'
                ' text with no UTF-8 form; workers read jobs as UTF-8 and could never'
                ' claim it'
                USING ERRCODE = '22021', DETAIL = SQLERRM,
                      HINT = CASE current_setting('server_encoding')
                                 WHEN 'SQL_ASCII' THEN 'send the text as valid UTF-8'
                                 ELSE 'send text that has a Unicode form'
                             END;
        END;
        RETURN NEW;
    END
    $f$;
    CREATE TRIGGER jobs_text_check
        BEFORE INSERT OR UPDATE OF task, queue, args, idempotency_key ON pgqueue.jobs
        FOR EACH ROW EXECUTE FUNCTION pgqueue.jobs_text_check();
END
$$;
