-- Model versions and the audit log of what served when. Loaded once by store.sql; called through
-- store/registry.py.

-- name: insert_model_version
-- Register a checkpoint as a model version.
INSERT INTO model_versions (kind, parent_id, reference_id, reward_model_id, path, content_hash,
                            endpoint, model_id, status, training_run_id, metrics)
VALUES (%(kind)s, %(parent_id)s, %(reference_id)s, %(reward_model_id)s, %(path)s, %(content_hash)s,
        %(endpoint)s, %(model_id)s, %(status)s, %(training_run_id)s, %(metrics)s)
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

-- name: set_version_target
-- Where a version is served: its endpoint and the model id that server is asked for (NULL: the defaults).
UPDATE model_versions SET endpoint = %(endpoint)s, model_id = %(model_id)s WHERE id = %(id)s
RETURNING *;

-- name: insert_promotion
-- Append to the audit log of what served when.
INSERT INTO promotions (version_id, action, actor, reason)
VALUES (%(version_id)s, %(action)s, %(actor)s, %(reason)s)
RETURNING *;

-- name: list_activations
-- Versions of a kind in the order they became active, newest first (the audit log's view).
SELECT p.version_id, p.action, p.actor, p.created_at
FROM promotions p JOIN model_versions v ON v.id = p.version_id
WHERE v.kind = %(kind)s AND p.action IN ('promote', 'rollback')
ORDER BY p.id DESC LIMIT %(limit)s;

-- name: archive_active
-- Step the active version of a kind down (part of a promotion's transaction).
UPDATE model_versions SET status = 'archived' WHERE kind = %(kind)s AND status = 'active'
RETURNING *;

-- name: list_promotions
-- The audit log, newest first.
SELECT * FROM promotions ORDER BY id DESC LIMIT %(limit)s;

-- name: find_version_by_path
-- The versions registered from this checkpoint directory with this content hash, newest first.
SELECT * FROM model_versions WHERE path = %(path)s AND content_hash = %(content_hash)s ORDER BY id DESC;

-- name: lock_version
-- One version, locked for a status change.
SELECT * FROM model_versions WHERE id = %(id)s FOR UPDATE;
