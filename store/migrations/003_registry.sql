-- Training runs can be asked for (by an operator through the API) before a trainer takes them,
-- and say who or what started them.

ALTER TABLE training_runs DROP CONSTRAINT training_runs_status_check;
ALTER TABLE training_runs ADD CONSTRAINT training_runs_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'skipped', 'failed'));
ALTER TABLE training_runs ADD COLUMN trigger text NOT NULL DEFAULT 'schedule';  -- schedule | operator | cli
ALTER TABLE training_runs ADD COLUMN requested_by text;
ALTER TABLE training_runs ADD COLUMN produced_version_id bigint REFERENCES model_versions (id);
ALTER TABLE training_runs ALTER COLUMN started_at DROP NOT NULL;
ALTER TABLE training_runs ADD COLUMN created_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX training_runs_status ON training_runs (status);

CREATE INDEX promotions_version ON promotions (version_id);
