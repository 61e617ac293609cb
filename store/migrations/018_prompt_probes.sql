-- A round's judged pairs read the answers to the prompts its new feedback touched. Joined with
-- the prompts list (migration 014), the planner was free to hash the list and scan every exchange
-- of every month against it, and it did whenever the list ran to a few hundred prompts: a round of
-- 2,000 new events read all 1M exchanges of a six-month history (1.3 s of its 3.3 s), so a round's
-- time grew with the history. Each prompt now probes the prompt_hash index of each month for its
-- own exchanges (LATERAL, with OFFSET 0 so the planner keeps it a per-prompt probe): the work is
-- the touched prompts' answers, whatever the history's length. The full derivation (no list)
-- reads everything, as before.
CREATE OR REPLACE FUNCTION judged_completions(prompts text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text) LANGUAGE sql STABLE AS $$
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash
    FROM chat_requests rq JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
    WHERE prompts IS NULL
    UNION ALL
    SELECT a.id, a.request_created_at, a.text, p.hash
    FROM (SELECT DISTINCT unnest(prompts) AS hash) p
    CROSS JOIN LATERAL (
        SELECT c.id, c.request_created_at, c.text
        FROM chat_requests rq
             JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
        WHERE rq.prompt_hash = p.hash
        OFFSET 0
    ) a
$$;
