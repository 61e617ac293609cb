-- API keys and their rate-limit windows. Loaded once by store.sql; called through store/keys.py.

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

-- name: get_api_keys_by_hashes
-- The live keys among these hashes (one query for many concurrent requests' keys).
SELECT key_hash, id, prefix, name, role, rate_limit, created_at, revoked_at
FROM api_keys WHERE key_hash = ANY(%(key_hashes)s::text[]) AND revoked_at IS NULL;

-- name: list_api_keys
-- One page of keys, newest first, revoked ones included: ids below `before` (null: from the newest).
SELECT id, prefix, name, role, rate_limit, created_at, revoked_at
FROM api_keys WHERE %(before)s::bigint IS NULL OR id < %(before)s
ORDER BY id DESC LIMIT %(limit)s;

-- name: get_live_api_key
-- A live key by id, locked for revoking.
SELECT id, prefix, name, role, rate_limit, created_at, revoked_at
FROM api_keys WHERE id = %(id)s AND revoked_at IS NULL FOR UPDATE;

-- name: revoke_api_key
-- Revoke a live key; returns nothing when there is no such live key.
UPDATE api_keys SET revoked_at = now()
WHERE id = %(id)s AND revoked_at IS NULL
RETURNING id, prefix, name, role, rate_limit, created_at, revoked_at;

-- name: count_live_operator_keys
-- How many operator keys can still be used.
SELECT count(*) AS n FROM api_keys WHERE role = 'operator' AND revoked_at IS NULL;

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

-- name: ensure_external_author
-- The author row for one person of another system (feedback imported from it): made once, revoked
-- from birth so it can never sign in (its hash is no key's digest either); its id either way.
WITH made AS (
    INSERT INTO api_keys (key_hash, prefix, name, role, revoked_at)
    VALUES (%(key_hash)s, 'import', %(name)s, 'user', now())
    ON CONFLICT (key_hash) DO NOTHING
    RETURNING id
)
SELECT id FROM made UNION ALL SELECT id FROM api_keys WHERE key_hash = %(key_hash)s;
