-- The answers each prompt has had judged (a thumbs or a rating), so that re-judging a prompt reads
-- those answers alone, each in its own month.
-- Measured on 1M exchanges over six months (bench/growth.py, a round of 2,000 events touching
-- 1,636 prompts): judged_completions (migration 018) found a touched prompt's answers by probing
-- the prompt_hash index of every month's chat_requests, 34,500 of the round's 221,000 pages for
-- exchanges that lie in one month, and then read every answer of the prompt, judged or not
-- (32,500 more), so a round grew with the months kept. Now each touched prompt's judged answers
-- come from one index (judged_answers_pkey), and each answer is read by its id in its month.
--
-- Like training_pairs, it is derived by the roll-forward (store/derive.py refresh_pairs) from the
-- feedback past its watermark, never on the feedback path: `note_judged_answers` adds the answers
-- new thumbs and ratings name, and the prompts they belong to are the ones re-judged. Rows are never
-- updated (a completion's prompt and time are fixed); an answer whose month retention drops goes
-- with it (store/queries/partitions.sql forget_dropped_judged_answers), and one left behind would
-- join to nothing.
CREATE TABLE judged_answers (
    prompt_hash    text NOT NULL,
    completion_id  bigint NOT NULL,
    at             timestamptz NOT NULL,  -- its exchange's time: the month it lies in
    PRIMARY KEY (prompt_hash, completion_id)
);
CREATE INDEX judged_answers_at ON judged_answers (at);  -- for retention

INSERT INTO judged_answers
SELECT DISTINCT rq.prompt_hash, c.id, c.request_created_at
FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
     JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE f.kind IN ('thumbs', 'rating');

-- The same rows as before, for all prompts (null) or these: now from judged_answers. Only judged
-- answers ever paired (judged_pairs_of joins each to its feedback), so leaving the rest unread
-- changes no pair. Each prompt probes the index alone, and each answer its month (LATERAL with
-- OFFSET 0, as in migration 018: `= ANY (prompts)` may be planned as a scan, migration 014).
CREATE OR REPLACE FUNCTION judged_completions(prompts text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text, version bigint) LANGUAGE sql STABLE AS $$
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash, c.model_version_id
    FROM chat_requests rq JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
    WHERE prompts IS NULL
    UNION ALL
    SELECT a.id, a.request_created_at, a.text, p.hash, a.model_version_id
    FROM (SELECT DISTINCT unnest(prompts) AS hash) p
    CROSS JOIN LATERAL (
        SELECT c.id, c.request_created_at, c.text, c.model_version_id
        FROM judged_answers j JOIN completions c ON c.id = j.completion_id AND c.request_created_at = j.at
        WHERE j.prompt_hash = p.hash
        OFFSET 0
    ) a
$$;

-- Two indexes nothing reads any more, written with every chat and every feedback:
-- * chat_requests (prompt_hash) served judged_completions' per-prompt probe, now judged_answers'.
--   Its keys are random, so at 10M exchanges each chat's insert dirtied a leaf page that was
--   rarely still in Postgres's buffers.
-- * feedback (kind, completion_id): with two kinds asked, a probe of it is two descents of a
--   month's index (6.6 pages an answer at 1M), where the unique (completion_id, author_key_id,
--   kind, exchange_at) key finds a completion's feedback in one.
DROP INDEX chat_requests_prompt_hash;
DROP INDEX feedback_kind_completion;
