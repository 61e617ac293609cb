-- Readiness. Loaded once by store.sql; called through store/db.py.

-- name: ping
-- The database answers.
SELECT 1 AS ok;
