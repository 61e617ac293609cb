-- Each version names where it is served: `endpoint` (from 001; NULL: FEEDLOOP_REMOTE_URL) and
-- `model_id`, the name that server is asked for (NULL: FEEDLOOP_REMOTE_MODEL, else the checkpoint's
-- path, which on-demand servers load by name). An operator's change of either is audited as
-- 'retarget'.

ALTER TABLE model_versions ADD COLUMN model_id text;

ALTER TABLE promotions DROP CONSTRAINT promotions_action_check;
ALTER TABLE promotions ADD CONSTRAINT promotions_action_check
    CHECK (action IN ('register', 'promote', 'rollback', 'canary', 'reject', 'fail', 'retarget'));
