-- A round's thumbs and rating pairs, read in proportion to the prompts its new feedback touched.
-- Measured on 1M exchanges over six months, a round of 2,000 events (bench/growth.py):
-- * joined with the prompts list (migration 014), the planner was free to hash the list and scan
--   every exchange of every month against it, and it did whenever the list ran to a few hundred
--   prompts (1.3 s of a 3.3 s round). Each prompt now probes the prompt_hash index of each month
--   for its own exchanges (LATERAL, with OFFSET 0 so the planner keeps it a per-prompt probe).
-- * the thumbs and the rating rule each read those answers and probed their feedback, and the
--   stored pairs then looked each side up again by id alone for its time and version: a probe of
--   every month. Now one function reads the answers once, with each one's time and version, judges
--   the asked kinds from the same feedback rows and hands each pair its sides' times and versions.
-- The full derivation (prompts null) reads everything, as before; the rules are unchanged, and
-- thumbs_pairs_of and rating_pairs_of keep their signatures.
DROP FUNCTION judged_completions(text[]);
CREATE FUNCTION judged_completions(prompts text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text, version bigint) LANGUAGE sql STABLE AS $$
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash, c.model_version_id
    FROM chat_requests rq JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
    WHERE prompts IS NULL
    UNION ALL
    SELECT a.id, a.request_created_at, a.text, p.hash, a.model_version_id
    FROM (SELECT DISTINCT unnest(prompts) AS hash) p
    CROSS JOIN LATERAL (
        SELECT c.id, c.request_created_at, c.text, c.model_version_id
        FROM chat_requests rq
             JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
        WHERE rq.prompt_hash = p.hash
        OFFSET 0
    ) a
$$;

-- A judged answer now carries its exchange's time and its policy version.
ALTER TYPE judged_completion ADD ATTRIBUTE at timestamptz, ADD ATTRIBUTE version bigint;

-- The rules, for the kinds asked ('thumbs', 'rating'): thumbs pair an answer with a positive net
-- against one with a negative net (margin 0), ratings pair a higher mean over a lower one (margin:
-- the difference over the scale); in both the two texts differ, and a pair's event and time are
-- its later side's.
CREATE FUNCTION judged_pairs_of(prompts text[], upto bigint, scale double precision, kinds text[])
RETURNS TABLE (source text, chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz, chosen_at timestamptz,
               rejected_at timestamptz, versions bigint[])
LANGUAGE sql STABLE AS $$
    WITH judged AS (
        SELECT f.kind, s.prompt_hash,
               (s.id, CASE f.kind WHEN 'thumbs' THEN sum(f.value) ELSE avg(f.value) END, max(f.event_id),
                array_agg(f.id ORDER BY f.id), max(f.updated_at), s.text, s.at, s.version)::judged_completion AS c
        FROM feedback f JOIN judged_completions(prompts) s ON s.id = f.completion_id AND s.at = f.exchange_at
        WHERE f.kind = ANY (kinds) AND f.event_id <= upto
        GROUP BY f.kind, s.id, s.prompt_hash, s.text, s.at, s.version
    ), per_prompt AS (  -- a prompt's answers gathered before they are paired (migration 014)
        SELECT j.kind, j.prompt_hash, array_agg(j.c) AS answers FROM judged j GROUP BY j.kind, j.prompt_hash
    )
    SELECT p.kind, a.completion_id, b.completion_id, p.prompt_hash,
           CASE p.kind WHEN 'rating' THEN ((a.score - b.score) / scale)::double precision ELSE 0 END,
           greatest(a.event_id, b.event_id), a.feedback_ids || b.feedback_ids, greatest(a.judged_at, b.judged_at),
           a.at, b.at, sides(a.version, b.version)
    FROM per_prompt p, unnest(p.answers) a, unnest(p.answers) b
    WHERE a.text <> b.text
      AND CASE p.kind WHEN 'thumbs' THEN a.score > 0 AND b.score < 0 ELSE a.score > b.score END
$$;

CREATE OR REPLACE FUNCTION thumbs_pairs_of(prompts text[], upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, event_id bigint,
               feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT j.chosen_id, j.rejected_id, j.prompt_hash, j.event_id, j.feedback_ids, j.judged_at
    FROM judged_pairs_of(prompts, upto, 1, '{thumbs}') j
$$;

CREATE OR REPLACE FUNCTION rating_pairs_of(prompts text[], upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT j.chosen_id, j.rejected_id, j.prompt_hash, j.margin, j.event_id, j.feedback_ids, j.judged_at
    FROM judged_pairs_of(prompts, upto, scale, '{rating}') j
$$;
