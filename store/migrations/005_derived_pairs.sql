-- The judged-pair rules as SQL functions, so deriving pairs, counting them and counting them per
-- version all read the same rule (store/derive.py's module doc says the rules in words).

-- Completions whose thumbs (all authors, events <= upto) net up, against completions of the same
-- prompt that net down, with different texts; a pair is new when any of its thumbs is newer than
-- `after`.
CREATE FUNCTION thumbs_pairs(after bigint, upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, event_id bigint, feedback_ids bigint[])
LANGUAGE sql STABLE AS $$
    WITH verdict AS (
        SELECT f.completion_id, sum(f.value) AS net, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids
        FROM feedback f
        WHERE f.kind = 'thumbs' AND f.event_id <= upto
        GROUP BY f.completion_id
        HAVING sum(f.value) <> 0
    ), judged AS (
        SELECT v.*, c.text, rq.prompt_hash
        FROM verdict v JOIN completions c ON c.id = v.completion_id JOIN chat_requests rq ON rq.id = c.request_id
    )
    SELECT up.completion_id, down.completion_id, greatest(up.event_id, down.event_id),
           up.feedback_ids || down.feedback_ids
    FROM judged up JOIN judged down ON down.prompt_hash = up.prompt_hash
    WHERE up.net > 0 AND down.net < 0 AND up.text <> down.text
      AND greatest(up.event_id, down.event_id) > after
$$;

-- Completions of the same prompt with different mean ratings (all authors, events <= upto) and
-- different texts: the higher is chosen, margin = difference / scale; new when any rating is newer
-- than `after`.
CREATE FUNCTION rating_pairs(after bigint, upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, margin double precision, event_id bigint,
               feedback_ids bigint[])
LANGUAGE sql STABLE AS $$
    WITH score AS (
        SELECT f.completion_id, avg(f.value) AS mean, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids
        FROM feedback f
        WHERE f.kind = 'rating' AND f.event_id <= upto
        GROUP BY f.completion_id
    ), judged AS (
        SELECT s.*, c.text, rq.prompt_hash
        FROM score s JOIN completions c ON c.id = s.completion_id JOIN chat_requests rq ON rq.id = c.request_id
    )
    SELECT hi.completion_id, lo.completion_id, ((hi.mean - lo.mean) / scale)::double precision,
           greatest(hi.event_id, lo.event_id), hi.feedback_ids || lo.feedback_ids
    FROM judged hi JOIN judged lo ON lo.prompt_hash = hi.prompt_hash
    WHERE hi.mean > lo.mean AND hi.text <> lo.text
      AND greatest(hi.event_id, lo.event_id) > after
$$;

-- Pairs a ranking yields: every two choices in different tiers, K(K-1)/2 without ties
-- (schemas.records.ranking_pair_count is the same count in Python).
CREATE FUNCTION ranking_pair_count(ordering jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT ((sum(size) * sum(size) - sum(size * size)) / 2)::bigint
    FROM (SELECT CASE jsonb_typeof(tier) WHEN 'array' THEN jsonb_array_length(tier) ELSE 1 END AS size
          FROM jsonb_array_elements(ordering) AS tier) tiers
$$;
