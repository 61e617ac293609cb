-- A version marked failed (its checkpoint did not match its hash, say) can be restored once its
-- files are verified again: the audit log records that as `restore`.

ALTER TABLE promotions DROP CONSTRAINT promotions_action_check;
ALTER TABLE promotions ADD CONSTRAINT promotions_action_check
    CHECK (action IN ('register', 'promote', 'rollback', 'canary', 'reject', 'fail', 'retarget', 'restore'));
