-- A chat's write probed every month's response-id index (response_id_once, migration 013): six
-- old months cost a 10M-exchange history 24 of a chat's 84 page reads, and the probe grows with
-- every month kept. A response id that carries its time (schemas.openai.completion_id, the only
-- ids the API makes) is written in that time's month (store/queries/exchanges.sql), and the unique
-- (response_id, created_at) index says it is there once; so such an id must be written at its
-- time, and only an id without one (a client's, or one older than timed ids) probes every month.

-- When a response id says it was made (schemas.openai.completion_time); null when it does not.
CREATE FUNCTION response_id_time(response_id text) RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN response_id ~ '^chatcmpl-[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}$'
           THEN 'epoch'::timestamptz
                + ('x' || lpad(substr(response_id, 10, 12), 16, '0'))::bit(64)::bigint * interval '1 millisecond'
           END
$$;

CREATE OR REPLACE FUNCTION response_id_once() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    made timestamptz := response_id_time(NEW.response_id);
BEGIN
    IF made IS NOT NULL THEN
        IF NEW.created_at IS DISTINCT FROM made THEN
            RAISE check_violation USING MESSAGE = format(
                'response id %s carries the time %s; it is recorded at that time', NEW.response_id, made);
        END IF;
        RETURN NEW;  -- once in its month, by the unique index: so once
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('feedloop.response_id'), hashtext(NEW.response_id));
    IF EXISTS (SELECT 1 FROM chat_requests WHERE response_id = NEW.response_id) THEN
        RAISE unique_violation USING MESSAGE = format('response id %s is recorded already', NEW.response_id);
    END IF;
    RETURN NEW;
END $$;
