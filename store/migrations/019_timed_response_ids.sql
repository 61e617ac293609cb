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

CREATE FUNCTION response_id_at_its_time() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.created_at IS DISTINCT FROM response_id_time(NEW.response_id) THEN
        RAISE check_violation USING MESSAGE = format('response id %s carries the time %s; it is recorded at that time',
                                                     NEW.response_id, response_id_time(NEW.response_id));
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER chat_requests_response_id_once ON chat_requests;
CREATE TRIGGER chat_requests_response_id_once BEFORE INSERT ON chat_requests
    FOR EACH ROW WHEN (response_id_time(NEW.response_id) IS NULL) EXECUTE FUNCTION response_id_once();
CREATE TRIGGER chat_requests_response_id_at_its_time BEFORE INSERT ON chat_requests
    FOR EACH ROW WHEN (response_id_time(NEW.response_id) IS NOT NULL) EXECUTE FUNCTION response_id_at_its_time();
