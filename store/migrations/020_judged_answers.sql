-- The answers each prompt has had judged (a thumbs or a rating), so that re-judging a prompt reads
-- its most recently judged answers alone, each in its own month.
-- Measured on 1M exchanges over six months (bench/growth.py, a round of 2,000 events touching
-- 1,636 prompts): judged_completions (migration 018) found a touched prompt's answers by probing
-- the prompt_hash index of every month's chat_requests, 34,500 of the round's 221,000 pages for
-- exchanges that lie in one month, and then read every answer of the prompt, judged or not
-- (32,500 more), so a round grew with the months kept. Now each touched prompt's judged answers
-- come from one index (judged_answers_newest), and each answer is read by its id in its month.
--
-- Like training_pairs, it is derived by the roll-forward (store/derive.py refresh_pairs) from the
-- feedback past its watermark, never on the feedback path: `note_judged_answers` adds the answers
-- new thumbs and ratings name, with their latest such event, and the prompts they belong to are
-- the ones re-judged. An answer whose month retention drops goes with it
-- (store/queries/partitions.sql forget_dropped_judged_answers), and one left behind would join
-- to nothing.
--
-- A prompt's thumbs and rating pairs now come from its most recently judged answers, at most
-- judged_answers_per_prompt() of them. Every judged answer of a prompt was paired with every other,
-- so re-judging a prompt that thousands of people asked ("hello") read thousands of answers and
-- re-derived millions of pairs in every round that touched it: a round's cost grew with the
-- history of its most popular prompts. Ordered by their latest thumbs or rating, a new judgement
-- always pairs (its answer is the newest), with the answers judged just before it: the policy's
-- recent answers, which is what the reward model should rank.
CREATE TABLE judged_answers (
    prompt_hash    text NOT NULL,
    completion_id  bigint NOT NULL,
    at             timestamptz NOT NULL,  -- its exchange's time: the month it lies in
    event_id       bigint NOT NULL,       -- its latest thumbs or rating event, as the roll-forward last saw it
    PRIMARY KEY (prompt_hash, completion_id)
);
CREATE INDEX judged_answers_newest ON judged_answers (prompt_hash, event_id);  -- a prompt's newest, from the top
CREATE INDEX judged_answers_at ON judged_answers (at);  -- for retention

INSERT INTO judged_answers
SELECT rq.prompt_hash, c.id, c.request_created_at, max(f.event_id)
FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
     JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE f.kind IN ('thumbs', 'rating')
GROUP BY rq.prompt_hash, c.id, c.request_created_at;

CREATE FUNCTION judged_answers_per_prompt() RETURNS integer LANGUAGE sql IMMUTABLE AS $$ SELECT 128 $$;

-- The thumbs and ratings (of `kinds`) up to `upto` that a prompt's pairs are made from, with their
-- answers: for every prompt (null) or these. Migration 018 read every answer of the listed
-- prompts, judged or not, by probing every month's prompt_hash index, and joined their feedback
-- as the planner chose (at 1M, for a round's 1,785 prompts, it chose to hash all million rows).
-- All prompts: each judged answer's latest judgement ranked within its prompt, all in one pass.
-- Listed prompts, each by itself (LATERAL: `= ANY (prompts)` may be planned as a scan, migration
-- 014): the newest answers noted up to `upto` (an event noted up to `upto` is the answer's latest
-- then), and those noted past it, whose latest event up to `upto` is read from their feedback
-- (judged again since, or not judged yet then); every answer not read ranks below the newest read.
-- Each answer is then read by its id in its month, and its feedback by its key.
DROP FUNCTION judged_completions(text[]);
CREATE FUNCTION judged_feedback(prompts text[], upto bigint, kinds text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text, version bigint, kind text, value smallint,
               event_id bigint, feedback_id bigint, updated_at timestamptz) LANGUAGE sql STABLE AS $$
    SELECT r.id, r.at, r.text, r.prompt_hash, r.version, f.kind, f.value, f.event_id, f.id, f.updated_at
    FROM (
        SELECT c.id, c.request_created_at AS at, c.text, rq.prompt_hash, c.model_version_id AS version,
               row_number() OVER (PARTITION BY rq.prompt_hash ORDER BY e.event_id DESC) AS newest
        FROM (SELECT f.completion_id, f.exchange_at, max(f.event_id) AS event_id FROM feedback f
              WHERE prompts IS NULL AND f.kind IN ('thumbs', 'rating') AND f.event_id <= upto
              GROUP BY f.completion_id, f.exchange_at) e
        JOIN completions c ON c.id = e.completion_id AND c.request_created_at = e.exchange_at
        JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
        WHERE prompts IS NULL
    ) r
    JOIN feedback f ON f.completion_id = r.id AND f.exchange_at = r.at
    WHERE prompts IS NULL AND r.newest <= judged_answers_per_prompt() AND f.kind = ANY (kinds) AND f.event_id <= upto
    UNION ALL
    SELECT a.id, a.request_created_at, a.text, p.hash, a.model_version_id, f.kind, f.value, f.event_id, f.id,
           f.updated_at
    FROM (SELECT DISTINCT unnest(prompts) AS hash) p
    CROSS JOIN LATERAL (
        SELECT n.completion_id, n.at FROM (
            (SELECT j.completion_id, j.at, j.event_id FROM judged_answers j
             WHERE j.prompt_hash = p.hash AND j.event_id <= upto
             ORDER BY j.event_id DESC LIMIT judged_answers_per_prompt())
            UNION ALL
            SELECT j.completion_id, j.at,
                   (SELECT max(f.event_id) FROM feedback f
                    WHERE f.completion_id = j.completion_id AND f.exchange_at = j.at
                      AND f.kind IN ('thumbs', 'rating') AND f.event_id <= upto)
            FROM judged_answers j WHERE j.prompt_hash = p.hash AND j.event_id > upto
        ) n (completion_id, at, event_id)
        WHERE n.event_id IS NOT NULL
        ORDER BY n.event_id DESC
        LIMIT judged_answers_per_prompt()
    ) newest
    CROSS JOIN LATERAL (  -- one row (LIMIT 1 tells the planner so, where it counts one a month)
        SELECT c.id, c.request_created_at, c.text, c.model_version_id
        FROM completions c WHERE c.id = newest.completion_id AND c.request_created_at = newest.at
        LIMIT 1
    ) a
    CROSS JOIN LATERAL (  -- OFFSET 0: probed per answer, never hashed whole
        SELECT f.kind, f.value, f.event_id, f.id, f.updated_at FROM feedback f
        WHERE f.completion_id = a.id AND f.exchange_at = a.request_created_at
          AND f.kind = ANY (kinds) AND f.event_id <= upto
        OFFSET 0
    ) f
$$;

-- The rules of migration 018, over that feedback.
CREATE OR REPLACE FUNCTION judged_pairs_of(prompts text[], upto bigint, scale double precision, kinds text[])
RETURNS TABLE (source text, chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz, chosen_at timestamptz,
               rejected_at timestamptz, versions bigint[])
LANGUAGE sql STABLE AS $$
    WITH judged AS (
        SELECT j.kind, j.prompt_hash,
               (j.id, CASE j.kind WHEN 'thumbs' THEN sum(j.value) ELSE avg(j.value) END, max(j.event_id),
                array_agg(j.feedback_id ORDER BY j.feedback_id), max(j.updated_at), j.text, j.at,
                j.version)::judged_completion AS c
        FROM judged_feedback(prompts, upto, kinds) j
        GROUP BY j.kind, j.id, j.prompt_hash, j.text, j.at, j.version
    ), per_prompt AS (
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

-- Two indexes nothing reads any more, written with every chat and every feedback:
-- * chat_requests (prompt_hash) served judged_completions' per-prompt probe, now judged_answers'.
--   Its keys are random, so at 10M exchanges each chat's insert dirtied a leaf page that was
--   rarely still in Postgres's buffers.
-- * feedback (kind, completion_id): with two kinds asked, a probe of it is two descents of a
--   month's index (6.6 pages an answer at 1M), where the unique (completion_id, author_key_id,
--   kind, exchange_at) key finds a completion's feedback in one.
DROP INDEX chat_requests_prompt_hash;
DROP INDEX feedback_kind_completion;
