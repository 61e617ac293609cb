-- Training runs: queued, claimed, finished. Loaded once by store.sql; called through store/runs.py.

-- name: queue_training_run
-- An operator's request for a round now; a trainer claims it.
INSERT INTO training_runs (kind, status, config, trigger, requested_by, started_at)
VALUES (%(kind)s, 'queued', %(config)s, %(trigger)s, %(requested_by)s, NULL)
RETURNING *;

-- name: claim_queued_run
-- The oldest queued run, marked running by the trainer that takes it; replicas skip each other's.
UPDATE training_runs SET status = 'running', started_at = now()
WHERE id = (SELECT id FROM training_runs WHERE status = 'queued' ORDER BY id
            LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING *;

-- name: start_training_run
-- A run that starts now.
INSERT INTO training_runs (kind, status, config, trigger, requested_by, started_at)
VALUES (%(kind)s, 'running', %(config)s, %(trigger)s, %(requested_by)s, now())
RETURNING *;

-- name: fail_abandoned_runs
-- Runs left running by a process that died (called only while holding the round lock).
UPDATE training_runs SET status = 'failed', finished_at = now(),
       error = 'abandoned: the process running it stopped before it finished'
WHERE status = 'running'
RETURNING id;

-- name: set_run_version
-- The version a run produced.
UPDATE training_runs SET produced_version_id = %(version_id)s WHERE id = %(id)s;

-- name: last_round_watermark
-- Where the last completed round stopped reading feedback.
SELECT watermark FROM training_runs
WHERE kind = 'round' AND status IN ('succeeded', 'skipped') AND watermark IS NOT NULL
ORDER BY id DESC LIMIT 1;

-- name: list_training_runs
-- Round history, newest first.
SELECT * FROM training_runs ORDER BY id DESC LIMIT %(limit)s;

-- name: get_training_run
-- One run.
SELECT * FROM training_runs WHERE id = %(id)s;

-- name: finish_training_run
-- Close a training run with its outcome.
UPDATE training_runs
SET status = %(status)s, metrics = %(metrics)s, curves = %(curves)s, error = %(error)s,
    watermark = %(watermark)s, finished_at = now()
WHERE id = %(id)s
RETURNING *;

-- name: trained_round_watermarks
-- Where each round that trained stopped reading feedback, oldest first: a pair's age in rounds is
-- how many of these are at or above its event.
SELECT watermark FROM training_runs
WHERE kind = 'round' AND status = 'succeeded' AND watermark IS NOT NULL
ORDER BY watermark;
