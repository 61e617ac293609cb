-- Feedback, imports, the one derivation of training data, and stats. Loaded once by store.sql;
-- called only through store/feedback.py and store/derive.py.

-- name: last_event_id
-- The highest event id drawn so far (0 before the first); sequences are read outside MVCC.
SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS event_id FROM feedback_events;

-- name: find_completion
-- A completion to judge (named_completions(), migration 016); finding it joins the event writers for the
-- rest of the transaction, saving a round trip.
SELECT n.*, pg_advisory_xact_lock_shared(%(lock)s) IS NULL AS joined
FROM named_completions(ARRAY[%(response_id)s::text], ARRAY[%(choice_index)s::numeric], ARRAY[%(owner)s::bigint],
                       ARRAY[%(at)s::timestamptz]) n;

-- name: find_request
-- A recorded request to rank and how many choices it has, when `owner` produced it (anyone's when null);
-- finding one joins the event writers for the rest of the transaction.
SELECT rq.id, rq.created_at AS exchange_at, rq.response_id,
       (SELECT count(*) FROM completions c WHERE c.request_id = rq.id AND c.request_created_at = rq.created_at) AS choices,
       rq.client_task, pg_advisory_xact_lock_shared(%(lock)s) IS NULL AS joined
FROM chat_requests rq
WHERE rq.response_id = %(response_id)s AND (%(owner)s::bigint IS NULL OR rq.api_key_id = %(owner)s::bigint)
  AND rq.created_at BETWEEN coalesce(%(at)s::timestamptz, '-infinity') AND coalesce(%(at)s::timestamptz, 'infinity');

-- name: claim_idempotency_key
-- Claim a key for this request; returns nothing when it was claimed before (waits for a claimer in flight).
INSERT INTO idempotency_keys (author_key_id, key, route, request_hash)
VALUES (%(author_key_id)s, %(key)s, %(route)s, %(request_hash)s)
ON CONFLICT (author_key_id, key) DO NOTHING
RETURNING key;

-- name: forget_idempotency_keys
-- Forget an author's keys older than the time they are remembered for (before claiming one).
DELETE FROM idempotency_keys
WHERE author_key_id = %(author_key_id)s AND created_at < now() - make_interval(secs => %(ttl_seconds)s);

-- name: get_idempotency_key
-- What the first request with this key was, and what it answered.
SELECT route, request_hash, response FROM idempotency_keys
WHERE author_key_id = %(author_key_id)s AND key = %(key)s;

-- name: save_idempotent_response
-- Store the answer to replay, in the claiming transaction.
UPDATE idempotency_keys SET response = %(response)s
WHERE author_key_id = %(author_key_id)s AND key = %(key)s;

-- name: record_feedback
-- A group of feedback events, as parallel arrays, in one statement (so on its own, one transaction and
-- one round trip): each event's completion found (named_completions(), migration 016) having joined the
-- event writers, and its value written unless it is a client's housekeeping call, one current value
-- per (completion, author, kind), rows locked in one order by every group. A changed value draws a new
-- event id; the same value again writes nothing. One row per event: no `completion_id` when there is no
-- such completion, `client_task` for a housekeeping call; else the row written or, unchanged, as it
-- stood (no `id` when a transaction this statement cannot see wrote it: read it again). The statement
-- is record_feedback_events() of migration 017, a function so that it keeps one generic plan.
SELECT * FROM record_feedback_events(%(lock)s, %(response_ids)s::text[], %(choice_indexes)s::numeric[],
                                     %(owners)s::bigint[], %(ats)s::timestamptz[], %(author_key_ids)s::bigint[],
                                     %(kinds)s::text[], %(values)s::smallint[], %(texts)s::text[]);

-- name: get_feedback
-- The current feedback of one kind by one author on one completion.
SELECT 'fb_' || f.id AS id, rq.response_id, c.choice_index, f.kind, f.value, f.text, f.author_key_id,
       f.created_at, f.updated_at
FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
     JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE f.completion_id = %(completion_id)s AND f.author_key_id = %(author_key_id)s AND f.kind = %(kind)s
  AND f.exchange_at = %(exchange_at)s;

-- name: upsert_ranking
-- One current ranking per (response, author); a changed order draws a new event id, an unchanged one returns nothing.
WITH saved AS (
    INSERT INTO rankings (request_id, exchange_at, author_key_id, ordering)
    VALUES (%(request_id)s, %(exchange_at)s, %(author_key_id)s, %(ordering)s)
    ON CONFLICT (request_id, author_key_id, exchange_at) DO UPDATE
    SET ordering = EXCLUDED.ordering, event_id = EXCLUDED.event_id, updated_at = now()
    WHERE rankings.ordering IS DISTINCT FROM EXCLUDED.ordering
    RETURNING *
)
SELECT 'rk_' || s.id AS id, rq.response_id, s.ordering AS "order", s.author_key_id, s.created_at, s.updated_at
FROM saved s JOIN chat_requests rq ON rq.id = s.request_id AND rq.created_at = s.exchange_at;

-- name: get_ranking
-- The current ranking by one author of one response.
SELECT 'rk_' || r.id AS id, rq.response_id, r.ordering AS "order", r.author_key_id, r.created_at, r.updated_at
FROM rankings r JOIN chat_requests rq ON rq.id = r.request_id AND rq.created_at = r.exchange_at
WHERE r.request_id = %(request_id)s AND r.author_key_id = %(author_key_id)s AND r.exchange_at = %(exchange_at)s;

-- name: upsert_preference
-- One current preference per (author, pair of completions) either way round; a change draws a new event id.
WITH saved AS (
    INSERT INTO preferences (source, author_key_id, chosen_completion_id, chosen_at, rejected_completion_id,
                             rejected_at, strength, margin)
    VALUES ('pairwise', %(author_key_id)s, %(chosen_id)s, %(chosen_at)s, %(rejected_id)s, %(rejected_at)s,
            %(strength)s, %(margin)s)
    ON CONFLICT (author_key_id, least(chosen_completion_id, rejected_completion_id),
                 greatest(chosen_completion_id, rejected_completion_id)) WHERE source = 'pairwise'
    DO UPDATE
    SET chosen_completion_id = EXCLUDED.chosen_completion_id, chosen_at = EXCLUDED.chosen_at,
        rejected_completion_id = EXCLUDED.rejected_completion_id, rejected_at = EXCLUDED.rejected_at,
        strength = EXCLUDED.strength,
        margin = EXCLUDED.margin, event_id = EXCLUDED.event_id, updated_at = now()
    WHERE (preferences.chosen_completion_id, preferences.strength)
          IS DISTINCT FROM (EXCLUDED.chosen_completion_id, EXCLUDED.strength)
    RETURNING *
)
SELECT 'pf_' || s.id AS id, s.source, s.author_key_id, s.strength, s.margin, s.created_at, s.updated_at,
       jsonb_build_object('response_id', crq.response_id, 'choice_index', cc.choice_index) AS chosen,
       jsonb_build_object('response_id', rrq.response_id, 'choice_index', rc.choice_index) AS rejected
FROM saved s
JOIN completions cc ON cc.id = s.chosen_completion_id AND cc.request_created_at = s.chosen_at
JOIN chat_requests crq ON crq.id = cc.request_id AND crq.created_at = cc.request_created_at
JOIN completions rc ON rc.id = s.rejected_completion_id AND rc.request_created_at = s.rejected_at
JOIN chat_requests rrq ON rrq.id = rc.request_id AND rrq.created_at = rc.request_created_at;

-- name: get_preference
-- The current preference by one author between two completions, either way round.
SELECT 'pf_' || p.id AS id, p.source, p.author_key_id, p.strength, p.margin, p.created_at, p.updated_at,
       jsonb_build_object('response_id', crq.response_id, 'choice_index', cc.choice_index) AS chosen,
       jsonb_build_object('response_id', rrq.response_id, 'choice_index', rc.choice_index) AS rejected
FROM preferences p
JOIN completions cc ON cc.id = p.chosen_completion_id AND cc.request_created_at = p.chosen_at
JOIN chat_requests crq ON crq.id = cc.request_id AND crq.created_at = cc.request_created_at
JOIN completions rc ON rc.id = p.rejected_completion_id AND rc.request_created_at = p.rejected_at
JOIN chat_requests rrq ON rrq.id = rc.request_id AND rrq.created_at = rc.request_created_at
WHERE p.source = 'pairwise' AND p.author_key_id = %(author_key_id)s
  AND least(p.chosen_completion_id, p.rejected_completion_id) = least(%(chosen_id)s::bigint, %(rejected_id)s::bigint)
  AND greatest(p.chosen_completion_id, p.rejected_completion_id) = greatest(%(chosen_id)s::bigint, %(rejected_id)s::bigint);

-- name: insert_imported_preferences
-- Imported pairs in one statement (a JSON array of rows); a pair imported before is skipped.
INSERT INTO preferences (source, author_key_id, prompt, prompt_hash, chosen, rejected, margin)
SELECT 'import', %(author_key_id)s::bigint, r.prompt, r.prompt_hash, r.chosen, r.rejected, r.margin
FROM jsonb_to_recordset(%(rows)s::jsonb)
     AS r(prompt jsonb, prompt_hash text, chosen text, rejected text, margin double precision)
ON CONFLICT (prompt_hash, md5(chosen), md5(rejected)) WHERE source = 'import' DO NOTHING
RETURNING id;

-- name: insert_imported_demonstrations
-- Imported demonstrations in one statement (a JSON array of rows); one imported before is skipped.
INSERT INTO demonstrations (author_key_id, prompt, prompt_hash, completion)
SELECT %(author_key_id)s::bigint, r.prompt, r.prompt_hash, r.completion
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r(prompt jsonb, prompt_hash text, completion text)
ON CONFLICT (prompt_hash, md5(completion)) DO NOTHING
RETURNING id;

-- name: list_feedback_on_request
-- Every current feedback row on the choices of one request.
SELECT 'fb_' || f.id AS id, rq.response_id, c.choice_index, f.kind, f.value, f.text, f.author_key_id,
       f.created_at, f.updated_at
FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
     JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE c.request_id = %(request_id)s AND f.exchange_at = %(exchange_at)s
ORDER BY c.choice_index, f.id;

-- name: list_rankings_on_request
-- Every current ranking of one request's choices.
SELECT 'rk_' || r.id AS id, rq.response_id, r.ordering AS "order", r.author_key_id, r.created_at, r.updated_at
FROM rankings r JOIN chat_requests rq ON rq.id = r.request_id AND rq.created_at = r.exchange_at
WHERE r.request_id = %(request_id)s AND r.exchange_at = %(exchange_at)s
ORDER BY r.id;

-- name: list_preferences_on_request
-- Every pairwise preference with one of this request's choices on either side.
SELECT 'pf_' || p.id AS id, p.source, p.author_key_id, p.strength, p.margin, p.created_at, p.updated_at,
       jsonb_build_object('response_id', crq.response_id, 'choice_index', cc.choice_index) AS chosen,
       jsonb_build_object('response_id', rrq.response_id, 'choice_index', rc.choice_index) AS rejected
FROM preferences p
JOIN completions cc ON cc.id = p.chosen_completion_id AND cc.request_created_at = p.chosen_at
JOIN chat_requests crq ON crq.id = cc.request_id AND crq.created_at = cc.request_created_at
JOIN completions rc ON rc.id = p.rejected_completion_id AND rc.request_created_at = p.rejected_at
JOIN chat_requests rrq ON rrq.id = rc.request_id AND rrq.created_at = rc.request_created_at
WHERE p.chosen_completion_id = ANY (ARRAY(SELECT id FROM completions
                                         WHERE request_id = %(request_id)s AND request_created_at = %(exchange_at)s))
   OR p.rejected_completion_id = ANY (ARRAY(SELECT id FROM completions
                                            WHERE request_id = %(request_id)s AND request_created_at = %(exchange_at)s))
ORDER BY p.id;

-- name: derive_explicit_pairs
-- Pairwise preferences and imported pairs with events in (after, upto], as given.
SELECT p.id, p.event_id, p.source, p.margin,
       coalesce(rq.messages, p.prompt) AS prompt, coalesce(rq.prompt_hash, p.prompt_hash) AS prompt_hash,
       coalesce(cc.text, p.chosen) AS chosen, coalesce(rc.text, p.rejected) AS rejected,
       p.chosen_completion_id AS chosen_id, p.rejected_completion_id AS rejected_id
FROM preferences p
LEFT JOIN completions cc ON cc.id = p.chosen_completion_id AND cc.request_created_at = p.chosen_at
LEFT JOIN chat_requests rq ON rq.id = cc.request_id AND rq.created_at = cc.request_created_at
LEFT JOIN completions rc ON rc.id = p.rejected_completion_id AND rc.request_created_at = p.rejected_at
WHERE p.event_id > %(after)s AND p.event_id <= %(upto)s
ORDER BY p.event_id;

-- name: derive_ranking_rows
-- Rankings with events in (after, upto], with the texts and ids of their response's choices in index order.
SELECT r.id, r.event_id, r.ordering, rq.messages AS prompt, rq.prompt_hash,
       array_agg(c.id ORDER BY c.choice_index) AS completion_ids,
       array_agg(c.text ORDER BY c.choice_index) AS texts
FROM rankings r
JOIN chat_requests rq ON rq.id = r.request_id AND rq.created_at = r.exchange_at
JOIN completions c ON c.request_id = r.request_id AND c.request_created_at = r.exchange_at
WHERE r.event_id > %(after)s AND r.event_id <= %(upto)s
GROUP BY r.id, r.exchange_at, rq.id, rq.created_at
ORDER BY r.event_id;

-- name: derive_thumbs_pairs
-- Thumbs pairs (the rule is thumbs_pairs() in migration 005) with their texts and prompt.
SELECT p.chosen_id, p.rejected_id, up.text AS chosen, down.text AS rejected, rq.messages AS prompt,
       rq.prompt_hash, p.event_id, p.feedback_ids
FROM thumbs_pairs(%(after)s, %(upto)s) p
JOIN completions up ON up.id = p.chosen_id JOIN completions down ON down.id = p.rejected_id
JOIN chat_requests rq ON rq.id = up.request_id
ORDER BY p.event_id, p.chosen_id, p.rejected_id;

-- name: derive_rating_pairs
-- Rating pairs (the rule is rating_pairs() in migration 005) with their texts and prompt.
SELECT p.chosen_id, p.rejected_id, hi.text AS chosen, lo.text AS rejected, rq.messages AS prompt,
       rq.prompt_hash, p.margin, p.event_id, p.feedback_ids
FROM rating_pairs(%(after)s, %(upto)s, %(rating_scale)s) p
JOIN completions hi ON hi.id = p.chosen_id JOIN completions lo ON lo.id = p.rejected_id
JOIN chat_requests rq ON rq.id = hi.request_id
ORDER BY p.event_id, p.chosen_id, p.rejected_id;

-- name: count_pairs
-- How many pairs the derivation yields for events in (after, upto], counted without building them.
SELECT ((SELECT count(*) FROM preferences WHERE event_id > %(after)s AND event_id <= %(upto)s)
      + (SELECT coalesce(sum(ranking_pair_count(ordering)), 0) FROM rankings
         WHERE event_id > %(after)s AND event_id <= %(upto)s)
      + (SELECT count(*) FROM thumbs_pairs(%(after)s, %(upto)s))
      + (SELECT count(*) FROM rating_pairs(%(after)s, %(upto)s, %(rating_scale)s)))::bigint AS n;

-- name: count_demonstrations
-- How many demonstrations (imports and corrections) have events in (after, upto].
SELECT (SELECT count(*) FROM demonstrations WHERE event_id > %(after)s AND event_id <= %(upto)s)
     + (SELECT count(*) FROM feedback WHERE kind = 'correction' AND event_id > %(after)s
        AND event_id <= %(upto)s) AS n;

-- name: derive_kto_rows
-- One row per completion whose thumbs (events <= upto) net up or down, new when any thumbs is newer than `after`.
WITH verdict AS (
    SELECT f.completion_id, f.exchange_at, sum(f.value) AS net, max(f.event_id) AS event_id,
           array_agg(f.id ORDER BY f.id) AS feedback_ids
    FROM feedback f
    WHERE f.kind = 'thumbs' AND f.event_id <= %(upto)s
    GROUP BY f.completion_id, f.exchange_at
    HAVING sum(f.value) <> 0
)
SELECT v.completion_id, v.net > 0 AS label, v.event_id, v.feedback_ids, c.text AS completion,
       rq.messages AS prompt, rq.prompt_hash
FROM verdict v JOIN completions c ON c.id = v.completion_id AND c.request_created_at = v.exchange_at
JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE v.event_id > %(after)s
ORDER BY v.event_id, v.completion_id;

-- name: derive_demonstrations
-- Imported demonstrations and users' corrected answers with events in (after, upto].
SELECT 'import' AS source, d.id, d.event_id, d.prompt, d.completion, NULL::bigint AS completion_id
FROM demonstrations d
WHERE d.event_id > %(after)s AND d.event_id <= %(upto)s
UNION ALL
SELECT 'correction', f.id, f.event_id, rq.messages, f.text, f.completion_id
FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
     JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE f.kind = 'correction' AND f.event_id > %(after)s AND f.event_id <= %(upto)s
ORDER BY event_id;

-- name: transaction_time
-- The caller's transaction's timestamp: what a write in it sets `updated_at` to (so a caller can tell a changed row).
SELECT now() AS now;

-- name: count_new_events
-- Feedback-like rows (every kind) with events in (after, upto], and when the oldest of them came.
SELECT count(*) AS n, min(created_at) AS oldest FROM (
    SELECT event_id, created_at FROM feedback
    UNION ALL SELECT event_id, created_at FROM rankings
    UNION ALL SELECT event_id, created_at FROM preferences
    UNION ALL SELECT event_id, created_at FROM demonstrations
) AS events
WHERE event_id > %(after)s AND event_id <= %(upto)s;
