-- The judged-pair rules (migration 013) read the completions of a list of prompts. Written as
-- `prompt_hash = ANY (prompts)`, Postgres compares every row with every element when the array is
-- a parameter (it hashes only constant arrays), and past a few hundred prompts the planner scans
-- all exchanges with that filter: rows x prompts. The first roll-forward of a 10k-exchange
-- history took 14 s and of 30k 67 s. Joined with the distinct prompts instead, they are hashed,
-- or each probes the prompt_hash index when they are few: time linear in what is read.
CREATE OR REPLACE FUNCTION judged_completions(prompts text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text) LANGUAGE sql STABLE AS $$
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash
    FROM chat_requests rq JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
    WHERE prompts IS NULL
    UNION ALL
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash
    FROM (SELECT DISTINCT unnest(prompts) AS hash) p
         JOIN chat_requests rq ON rq.prompt_hash = p.hash
         JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
$$;

-- The rules then pair a prompt's judged completions with each other. The planner cannot count
-- the completions in scope (it guesses two: it multiplies the selectivities of the two-column
-- exchange join), so it joined them to anything by nested loop: the self-join on prompt_hash
-- compared every judged completion with every other, of any prompt (11 million comparisons for
-- a 10k-exchange history), and the verdicts were joined back to the completions the same way.
-- Now each completion's prompt and text travel with its verdict, and a prompt's completions are
-- gathered before they are paired: no join is left for a bad guess to make quadratic.
CREATE TYPE judged_completion AS (
    completion_id bigint, score numeric, event_id bigint, feedback_ids bigint[],
    judged_at timestamptz, text text
);

CREATE OR REPLACE FUNCTION thumbs_pairs_of(prompts text[], upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, event_id bigint,
               feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (SELECT * FROM judged_completions(prompts)), verdict AS (
        SELECT f.completion_id, s.prompt_hash, s.text, sum(f.value) AS net, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id AND s.at = f.exchange_at
        WHERE f.kind = 'thumbs' AND f.event_id <= upto
        GROUP BY f.completion_id, s.prompt_hash, s.text  -- the last two: the completion's own
        HAVING sum(f.value) <> 0
    ), per_prompt AS (
        SELECT v.prompt_hash,
               array_agg((v.completion_id, v.net, v.event_id, v.feedback_ids, v.judged_at, v.text)::judged_completion)
                   FILTER (WHERE v.net > 0) AS ups,
               array_agg((v.completion_id, v.net, v.event_id, v.feedback_ids, v.judged_at, v.text)::judged_completion)
                   FILTER (WHERE v.net < 0) AS downs
        FROM verdict v
        GROUP BY v.prompt_hash
    )
    SELECT up.completion_id, down.completion_id, p.prompt_hash, greatest(up.event_id, down.event_id),
           up.feedback_ids || down.feedback_ids, greatest(up.judged_at, down.judged_at)
    FROM per_prompt p, unnest(p.ups) up, unnest(p.downs) down
    WHERE up.text <> down.text
$$;

CREATE OR REPLACE FUNCTION rating_pairs_of(prompts text[], upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (SELECT * FROM judged_completions(prompts)), score AS (
        SELECT f.completion_id, s.prompt_hash, s.text, avg(f.value) AS mean, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id AND s.at = f.exchange_at
        WHERE f.kind = 'rating' AND f.event_id <= upto
        GROUP BY f.completion_id, s.prompt_hash, s.text
    ), per_prompt AS (
        SELECT sc.prompt_hash,
               array_agg((sc.completion_id, sc.mean, sc.event_id, sc.feedback_ids, sc.judged_at, sc.text)::judged_completion)
                   AS rated
        FROM score sc
        GROUP BY sc.prompt_hash
    )
    SELECT hi.completion_id, lo.completion_id, p.prompt_hash, ((hi.score - lo.score) / scale)::double precision,
           greatest(hi.event_id, lo.event_id), hi.feedback_ids || lo.feedback_ids,
           greatest(hi.judged_at, lo.judged_at)
    FROM per_prompt p, unnest(p.rated) hi, unnest(p.rated) lo
    WHERE hi.score > lo.score AND hi.text <> lo.text
$$;
