-- Advisory locks and notifications. Loaded once by store.sql; called only through store/locks.py,
-- which names every lock key and channel.

-- name: try_lock
-- Take a session-level lock unless another session holds it.
SELECT pg_try_advisory_lock(%(key)s) AS locked;

-- name: lock
-- Take a session-level lock, waiting for it.
SELECT pg_advisory_lock(%(key)s);

-- name: unlock
-- Release a session-level lock.
SELECT pg_advisory_unlock(%(key)s);

-- name: lock_for_transaction
-- Take a lock held until the caller's transaction ends.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: share_for_transaction
-- Take the shared side of a lock until the caller's transaction ends.
SELECT pg_advisory_xact_lock_shared(%(key)s);

-- name: notify
-- Tell every listener on a channel; Postgres delivers it when the transaction commits.
SELECT pg_notify(%(channel)s, %(payload)s);
