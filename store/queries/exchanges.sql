-- Chat requests and their completions. Loaded once by store.sql; called through store/exchanges.py.

-- name: insert_exchange
-- Record one chat request and all its choices in one statement: one round trip, and many of them
-- pipelined in one transaction when exchanges are written in groups. The choices come as parallel
-- arrays; each is written in its request's month (`request_created_at` is the request's time). The
-- request's time is the one its response id carries (schemas.openai.completion_id), now for an id without.
WITH request AS (
    INSERT INTO chat_requests (response_id, api_key_id, user_field, messages, prompt_hash, params,
                               model_version_id, stream, batch_rows, prompt_tokens, completion_tokens,
                               queue_ms, first_token_ms, total_ms, client_ref, client_chat_id, client_task,
                               created_at)
    VALUES (%(response_id)s, %(api_key_id)s, %(user_field)s, %(messages)s, %(prompt_hash)s, %(params)s,
            %(model_version_id)s, %(stream)s, %(batch_rows)s, %(prompt_tokens)s, %(completion_tokens)s,
            %(queue_ms)s, %(first_token_ms)s, %(total_ms)s, %(client_ref)s, %(client_chat_id)s, %(client_task)s,
            coalesce(%(created_at)s::timestamptz, now()))
    RETURNING id, created_at
)
INSERT INTO completions (request_id, request_created_at, choice_index, text, finish_reason, completion_tokens,
                         model_version_id, tool_calls, logprobs)
SELECT request.id, request.created_at, c.choice_index, c.text, c.finish_reason, c.completion_tokens,
       c.model_version_id, c.tool_calls, c.logprobs
FROM request, unnest(%(choice_index)s::int[], %(text)s::text[], %(finish_reason)s::text[],
                     %(choice_tokens)s::int[], %(choice_version_id)s::bigint[], %(tool_calls)s::jsonb[],
                     %(logprobs)s::jsonb[])
    AS c(choice_index, text, finish_reason, completion_tokens, model_version_id, tool_calls, logprobs);

-- name: get_chat_request
-- One recorded request by its response id (and the time the id carries, when it carries one: one month read).
SELECT * FROM chat_requests WHERE response_id = %(response_id)s
  AND created_at BETWEEN coalesce(%(at)s::timestamptz, '-infinity') AND coalesce(%(at)s::timestamptz, 'infinity');

-- name: list_completions
-- The choices of one recorded request (of its month), in index order.
SELECT choice_index, text, finish_reason, completion_tokens, model_version_id, tool_calls, logprobs
FROM completions WHERE request_id = %(request_id)s AND request_created_at = %(exchange_at)s ORDER BY choice_index;

-- name: recent_conversations
-- What users asked lately: each distinct prompt once, newest first, among the newest `scan` requests
-- (PPO's prompts; read backwards along the primary key, so the history's length costs nothing). A
-- client's housekeeping calls (a non-empty client task: titles, tags, follow-ups) are not users' questions.
SELECT messages FROM (
    SELECT DISTINCT ON (prompt_hash) prompt_hash, messages, id
    FROM (SELECT prompt_hash, messages, id FROM chat_requests
          WHERE client_task IS NULL ORDER BY id DESC LIMIT %(scan)s) recent
    ORDER BY prompt_hash, id DESC
) latest ORDER BY id DESC LIMIT %(limit)s;

-- name: find_client_exchange
-- The user's-turn exchange a client named by its own id for the answer (newest first when a client
-- sent one id twice, a retry), with the client's conversation id.
SELECT response_id, client_chat_id FROM chat_requests
WHERE client_ref = %(client_ref)s AND client_task IS NULL
ORDER BY id DESC LIMIT 1;

-- name: requests_per_version
-- How many chat requests each version answered.
SELECT model_version_id AS id, count(*) AS requests FROM chat_requests GROUP BY model_version_id;

-- name: list_chat_requests
-- Recorded requests newest first, before a cursor request and of one version when asked, with their feedback counted.
SELECT rq.response_id, rq.api_key_id, rq.user_field AS "user", rq.model_version_id, rq.stream,
       rq.completion_tokens, rq.created_at, jsonb_array_length(rq.messages) AS turns,
       left(coalesce((SELECT m.value->>'content' FROM jsonb_array_elements(rq.messages) WITH ORDINALITY AS m(value, i)
                      WHERE m.value->>'role' = 'user' ORDER BY m.i DESC LIMIT 1), ''), 200) AS prompt,
       (SELECT count(*) FROM completions c WHERE c.request_id = rq.id AND c.request_created_at = rq.created_at) AS choices,
       jsonb_build_object(
           'thumbs_up', fb.thumbs_up, 'thumbs_down', fb.thumbs_down, 'rating', fb.rating,
           'comment', fb.comment, 'correction', fb.correction,
           'ranking', (SELECT count(*) FROM rankings r WHERE r.request_id = rq.id AND r.exchange_at = rq.created_at),
           'preference', (SELECT count(DISTINCT p.id) FROM preferences p JOIN completions c
                          ON c.id IN (p.chosen_completion_id, p.rejected_completion_id)
                          WHERE c.request_id = rq.id AND c.request_created_at = rq.created_at)) AS feedback
FROM chat_requests rq
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE f.kind = 'thumbs' AND f.value > 0) AS thumbs_up,
           count(*) FILTER (WHERE f.kind = 'thumbs' AND f.value < 0) AS thumbs_down,
           count(*) FILTER (WHERE f.kind = 'rating') AS rating,
           count(*) FILTER (WHERE f.kind = 'comment') AS comment,
           count(*) FILTER (WHERE f.kind = 'correction') AS correction
    FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
    WHERE c.request_id = rq.id AND c.request_created_at = rq.created_at AND f.exchange_at = rq.created_at
) fb
WHERE (%(before_id)s::bigint IS NULL OR rq.id < %(before_id)s)
  AND (%(version_id)s::bigint IS NULL OR rq.model_version_id = %(version_id)s)
ORDER BY rq.id DESC
LIMIT %(limit)s;
