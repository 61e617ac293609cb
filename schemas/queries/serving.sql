-- Keys, the model registry, training runs and exchanges. Loaded once by schemas.db.load_queries.

-- name: insert_api_key
-- Store a new key (its hash only) and return the row.
INSERT INTO api_keys (key_hash, prefix, name, role, rate_limit)
VALUES (%(key_hash)s, %(prefix)s, %(name)s, %(role)s, %(rate_limit)s)
ON CONFLICT (key_hash) DO NOTHING
RETURNING id, prefix, name, role, rate_limit, created_at, revoked_at;

-- name: get_api_key_by_hash
-- The live key with this hash, if any.
SELECT id, prefix, name, role, rate_limit, created_at, revoked_at
FROM api_keys WHERE key_hash = %(key_hash)s AND revoked_at IS NULL;

-- name: list_api_keys
-- Every key, newest first, revoked ones included.
SELECT id, prefix, name, role, rate_limit, created_at, revoked_at
FROM api_keys ORDER BY id DESC;

-- name: revoke_api_key
-- Revoke a live key; returns nothing when there is no such live key.
UPDATE api_keys SET revoked_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id, prefix, name, role, rate_limit, created_at, revoked_at;

-- name: count_live_operator_keys
-- How many operator keys can still be used.
SELECT count(*) AS n FROM api_keys WHERE role = 'operator' AND revoked_at IS NULL;

-- name: insert_model_version
-- Register a checkpoint as a model version.
INSERT INTO model_versions (kind, parent_id, reference_id, reward_model_id, path, content_hash,
                            endpoint, status, training_run_id, metrics)
VALUES (%(kind)s, %(parent_id)s, %(reference_id)s, %(reward_model_id)s, %(path)s, %(content_hash)s,
        %(endpoint)s, %(status)s, %(training_run_id)s, %(metrics)s)
RETURNING *;

-- name: get_model_version
-- One version by id.
SELECT * FROM model_versions WHERE id = %(id)s;

-- name: get_active_version
-- The active version of a kind, if any.
SELECT * FROM model_versions WHERE kind = %(kind)s AND status = 'active';

-- name: list_serving_versions
-- The policy versions that take traffic: the active one and any canaries.
SELECT * FROM model_versions WHERE kind = 'policy' AND status IN ('active', 'canary') ORDER BY id;

-- name: list_model_versions
-- The registry, newest first.
SELECT * FROM model_versions ORDER BY id DESC;

-- name: set_version_status
-- Move a version to a status (the caller holds the transaction that keeps one active per kind).
UPDATE model_versions
SET status = %(status)s, canary_fraction = %(canary_fraction)s,
    promoted_at = CASE WHEN %(status)s IN ('active', 'canary') THEN now() ELSE promoted_at END,
    promoted_by = CASE WHEN %(status)s IN ('active', 'canary') THEN %(actor)s ELSE promoted_by END
WHERE id = %(id)s
RETURNING *;

-- name: insert_promotion
-- Append to the audit log of what served when.
INSERT INTO promotions (version_id, action, actor, reason)
VALUES (%(version_id)s, %(action)s, %(actor)s, %(reason)s)
RETURNING *;

-- name: insert_chat_request
-- Record one chat request with what was used to answer it.
INSERT INTO chat_requests (response_id, api_key_id, user_field, messages, prompt_hash, params,
                           model_version_id, stream, batch_rows, prompt_tokens, completion_tokens,
                           queue_ms, first_token_ms, total_ms)
VALUES (%(response_id)s, %(api_key_id)s, %(user_field)s, %(messages)s, %(prompt_hash)s, %(params)s,
        %(model_version_id)s, %(stream)s, %(batch_rows)s, %(prompt_tokens)s, %(completion_tokens)s,
        %(queue_ms)s, %(first_token_ms)s, %(total_ms)s)
RETURNING id;

-- name: insert_completion
-- Record one choice of a chat request.
INSERT INTO completions (request_id, choice_index, text, finish_reason, completion_tokens,
                         model_version_id)
VALUES (%(request_id)s, %(choice_index)s, %(text)s, %(finish_reason)s, %(completion_tokens)s,
        %(model_version_id)s);

-- name: get_chat_request
-- One recorded request by its response id.
SELECT * FROM chat_requests WHERE response_id = %(response_id)s;

-- name: list_completions
-- The choices of one recorded request, in index order.
SELECT choice_index, text, finish_reason, completion_tokens, model_version_id
FROM completions WHERE request_id = %(request_id)s ORDER BY choice_index;

-- name: recent_conversations
-- What users asked lately: each distinct prompt once, newest first (PPO's prompts).
SELECT messages FROM (
    SELECT DISTINCT ON (prompt_hash) prompt_hash, messages, created_at
    FROM chat_requests ORDER BY prompt_hash, created_at DESC
) latest ORDER BY created_at DESC LIMIT %(limit)s;

-- name: take_rate_limited_request
-- Count one request in this minute's window unless the window is full (no row back then), and
-- drop this key's windows older than an hour.
WITH old AS (
    DELETE FROM api_key_usage
    WHERE key_id = %(key_id)s AND window_start < date_trunc('minute', now()) - interval '1 hour'
)
INSERT INTO api_key_usage AS u (key_id, window_start, requests)
VALUES (%(key_id)s, date_trunc('minute', now()), 1)
ON CONFLICT (key_id, window_start) DO UPDATE SET requests = u.requests + 1
    WHERE u.requests < %(rate_limit)s
RETURNING requests;

