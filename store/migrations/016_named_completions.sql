-- The completions a request names, by parallel arrays of response ids, choice indexes, owners (null:
-- anyone's) and the times the ids carry (null: any month), each found one with `i`, its place in the
-- arrays (from 1): what feedback and preferences judge, found in one place. A completion is found only
-- when its owner produced it; an id's time names the month read. SQL, so it is inlined into the query
-- that calls it and planned with it. Choice indexes come as numeric: an index past what an integer
-- holds names no completion (a 404), not a value the database cannot store.
CREATE FUNCTION named_completions(response_ids text[], choice_indexes numeric[], owners bigint[], ats timestamptz[])
RETURNS TABLE (i bigint, id bigint, request_id bigint, exchange_at timestamptz, choice_index int, response_id text,
               prompt_hash text, client_task text)
LANGUAGE sql STABLE AS $$
    SELECT e.i, c.id, c.request_id, c.request_created_at, c.choice_index, rq.response_id, rq.prompt_hash,
           rq.client_task
    FROM unnest(response_ids, choice_indexes, owners, ats) WITH ORDINALITY AS e(response_id, choice_index, owner, at, i)
    JOIN chat_requests rq ON rq.response_id = e.response_id AND (e.owner IS NULL OR rq.api_key_id = e.owner)
         AND rq.created_at BETWEEN coalesce(e.at, '-infinity') AND coalesce(e.at, 'infinity')
    JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
                      AND c.choice_index = e.choice_index
$$;
