-- The exchange tables' month partitions (migration 013). Loaded once by store.sql; called through
-- store/partitions.py.

-- name: ensure_partitions
-- Make the month partitions from this month through `months_ahead` months from now, where missing.
SELECT ensure_exchange_partitions(upto => now() + make_interval(months => %(months_ahead)s)) AS made;

-- name: drop_partitions_before
-- Drop the month partitions wholly older than `horizon`, with the preferences and stored pairs that point into them.
SELECT drop_exchange_partitions(%(horizon)s) AS dropped;

-- name: forget_dropped_judged_answers
-- The judged answers (migration 020) older than `horizon` whose exchange is gone with its month.
DELETE FROM judged_answers j
WHERE j.at < %(horizon)s
  AND NOT EXISTS (SELECT 1 FROM completions c WHERE c.id = j.completion_id AND c.request_created_at = j.at);

-- name: list_partitions
-- The partitions of the exchange tables, with the rows each holds (estimates: statistics, not a count).
SELECT parent.relname AS "table", child.relname AS partition, child.reltuples::bigint AS rows
FROM pg_inherits i JOIN pg_class parent ON parent.oid = i.inhparent JOIN pg_class child ON child.oid = i.inhrelid
WHERE parent.relname = ANY (partitioned_by_exchange())
ORDER BY 1, 2;
