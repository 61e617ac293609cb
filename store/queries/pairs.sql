-- The stored training pairs (migration 012): rolled forward from the rows past their watermark,
-- read by event, counted, and read as a recent window. Called only through store/derive.py.

-- name: lock_pairs_state
-- The stored pairs' watermark, locked until the transaction ends: one roll-forward at a time.
SELECT watermark FROM training_pairs_state FOR UPDATE;

-- name: without_jit
-- No JIT compiling for the rest of the transaction: the roll-forward and the stored pairs' texts
-- probe each row's month with subqueries, which JIT compiles over and over (measured: 65 s instead
-- of 13 ms for 200 rankings; store/derive.py `_without_jit`).
SELECT set_config('jit', 'off', true);

-- name: set_pairs_watermark
-- The stored pairs are now those judged at this watermark.
UPDATE training_pairs_state SET watermark = %(upto)s;

-- name: forget_explicit_pairs
-- Stored pairs of preferences that changed since `after` (re-derived next).
DELETE FROM training_pairs WHERE preference_id IN (SELECT id FROM preferences WHERE event_id > %(after)s);

-- name: store_explicit_pairs
-- Pairwise preferences and imported pairs with events in (after, upto], as given. (What a pair needs
-- of its completions is read per pair in its month: see training_pair_rows, migration 013.)
INSERT INTO training_pairs (pair_key, source, grp, event_id, judged_at, prompt_hash, chosen_completion_id,
                            rejected_completion_id, chosen_at, rejected_at, preference_id, versions, margin, origin)
SELECT 'preference:' || p.id, p.source, 'preference:' || p.id, p.event_id, p.updated_at,
       coalesce((SELECT rq.prompt_hash FROM completions c
                 JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
                 WHERE c.id = p.chosen_completion_id AND c.request_created_at = p.chosen_at), p.prompt_hash),
       p.chosen_completion_id, p.rejected_completion_id, p.chosen_at, p.rejected_at, p.id,
       sides((SELECT model_version_id FROM completions WHERE id = p.chosen_completion_id AND request_created_at = p.chosen_at),
             (SELECT model_version_id FROM completions WHERE id = p.rejected_completion_id AND request_created_at = p.rejected_at)),
       p.margin,
       jsonb_build_object('event_id', p.event_id, 'preference', p.id)
       || CASE WHEN p.chosen_completion_id IS NULL THEN '{}'::jsonb
          ELSE jsonb_build_object('completions', jsonb_build_array(p.chosen_completion_id, p.rejected_completion_id)) END
FROM preferences p
WHERE p.event_id > %(after)s AND p.event_id <= %(upto)s;

-- name: forget_ranking_pairs
-- Stored pairs of rankings that changed since `after` (re-derived next).
DELETE FROM training_pairs WHERE ranking_id IN (SELECT id FROM rankings WHERE event_id > %(after)s);

-- name: store_ranking_pairs
-- Rankings with events in (after, upto]: a pair for every two choices in different tiers, best first
-- (ranking_pairs, migration 013); the exchange's prompt and choices (id, version) read in its month,
-- once per ranking (MATERIALIZED: inlined, each use of `choices` would read them again).
WITH ranked AS MATERIALIZED (
    SELECT r.id, r.event_id, r.updated_at, r.exchange_at, r.ordering,
           (SELECT prompt_hash FROM chat_requests WHERE id = r.request_id AND created_at = r.exchange_at) AS prompt_hash,
           ARRAY(SELECT ARRAY[c.id, c.model_version_id] FROM completions c
                 WHERE c.request_id = r.request_id AND c.request_created_at = r.exchange_at
                 ORDER BY c.choice_index) AS choices
    FROM rankings r
    WHERE r.event_id > %(after)s AND r.event_id <= %(upto)s
)
INSERT INTO training_pairs (pair_key, source, grp, event_id, judged_at, prompt_hash, chosen_completion_id,
                            rejected_completion_id, chosen_at, rejected_at, ranking_id, versions, margin, origin)
SELECT 'ranking:' || r.id || ':' || rp.better || '>' || rp.worse, 'ranking', 'ranking:' || r.id, r.event_id,
       r.updated_at, r.prompt_hash, r.choices[rp.better + 1][1], r.choices[rp.worse + 1][1], r.exchange_at,
       r.exchange_at, r.id, sides(r.choices[rp.better + 1][2], r.choices[rp.worse + 1][2]), 0,
       jsonb_build_object('event_id', r.event_id, 'ranking', r.id, 'choices', jsonb_build_array(rp.better, rp.worse),
                          'completions', jsonb_build_array(r.choices[rp.better + 1][1], r.choices[rp.worse + 1][1]))
FROM ranked r CROSS JOIN LATERAL ranking_pairs(r.ordering) rp;

-- name: note_judged_answers
-- The answers with a thumbs or rating whose event is past `after`, noted in judged_answers with
-- their latest such event (migration 020); returns their prompts, whose judged pairs may
-- have changed (none counted when `after` is 0: the first roll-forward re-judges every prompt).
WITH judged AS (
    SELECT rq.prompt_hash, c.id, c.request_created_at, max(f.event_id) AS event_id
    FROM feedback f JOIN completions c ON c.id = f.completion_id AND c.request_created_at = f.exchange_at
         JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
    WHERE f.event_id > %(after)s AND f.kind IN ('thumbs', 'rating')
    GROUP BY rq.prompt_hash, c.id, c.request_created_at
), noted AS (
    INSERT INTO judged_answers AS j (prompt_hash, completion_id, at, event_id) SELECT * FROM judged
    ON CONFLICT (prompt_hash, completion_id) DO UPDATE SET event_id = greatest(j.event_id, EXCLUDED.event_id)
)
SELECT coalesce(array_agg(DISTINCT prompt_hash) FILTER (WHERE %(after)s > 0), '{}') AS prompts FROM judged;

-- name: forget_judged_pairs
-- Stored thumbs and rating pairs of these prompts (re-derived next).
DELETE FROM training_pairs WHERE source IN ('thumbs', 'rating') AND prompt_hash = ANY (%(prompts)s);

-- name: forget_all_judged_pairs
-- Every stored thumbs and rating pair (the first roll-forward re-derives them all).
DELETE FROM training_pairs WHERE source IN ('thumbs', 'rating');

-- name: store_judged_pairs
-- Thumbs and rating pairs of these prompts judged at `upto` (the rules: judged_pairs_of, migration 018).
INSERT INTO training_pairs (pair_key, source, grp, event_id, judged_at, prompt_hash, chosen_completion_id,
                            rejected_completion_id, chosen_at, rejected_at, versions, margin, origin)
SELECT j.source || ':' || j.chosen_id || '>' || j.rejected_id, j.source, j.source || ':' || j.chosen_id || '>' || j.rejected_id,
       j.event_id, j.judged_at, j.prompt_hash, j.chosen_id, j.rejected_id, j.chosen_at, j.rejected_at, j.versions,
       j.margin, jsonb_build_object('event_id', j.event_id, 'feedback', to_jsonb(j.feedback_ids),
                                    'completions', jsonb_build_array(j.chosen_id, j.rejected_id))
FROM judged_pairs_of(%(prompts)s, %(upto)s, %(rating_scale)s, '{thumbs,rating}') j;

-- name: stored_pairs
-- Stored pairs newer than `after`, with their texts, in event order.
SELECT * FROM training_pair_rows WHERE event_id > %(after)s ORDER BY event_id, pair_key;

-- name: pair_window
-- The newest `limit` stored pairs (all when null) up to `upto`, judged since `since` (any time when
-- null), newest first; whole groups: a ranking's pairs share their event, and ties on it are kept.
-- Pairs of one event come in key order, so a round trains on them in the same order every time.
SELECT * FROM (
    SELECT * FROM training_pair_rows
    WHERE event_id <= %(upto)s AND (%(since)s::timestamptz IS NULL OR judged_at >= %(since)s::timestamptz)
    ORDER BY event_id DESC
    FETCH FIRST coalesce(%(limit)s::bigint, 9223372036854775807) ROWS WITH TIES
) window_ ORDER BY event_id DESC, pair_key;

-- name: count_stored_pairs
-- How many stored pairs are newer than `after`.
SELECT count(*) AS n FROM training_pairs WHERE event_id > %(after)s;

-- name: count_stored_pairs_by_version
-- Stored pairs newer than `after` per policy version: once for each version on either side.
SELECT v AS id, count(*)::bigint AS pairs
FROM training_pairs tp CROSS JOIN LATERAL unnest(tp.versions) AS v
WHERE tp.event_id > %(after)s
GROUP BY v;

-- name: version_stats
-- Per policy version, the counters the triggers of migration 012 keep, summed over their shards.
SELECT mv.id, mv.status,
       coalesce(sum(s.requests), 0)::bigint AS requests, coalesce(sum(s.completions), 0)::bigint AS completions,
       coalesce(sum(s.thumbs), 0)::bigint AS thumbs, coalesce(sum(s.rating), 0)::bigint AS rating,
       coalesce(sum(s.comment), 0)::bigint AS comment, coalesce(sum(s.correction), 0)::bigint AS correction,
       coalesce(sum(s.ranking), 0)::bigint AS ranking, coalesce(sum(s.preference), 0)::bigint AS preference,
       coalesce(sum(s.thumbs_up), 0)::bigint AS thumbs_up, coalesce(sum(s.thumbs_down), 0)::bigint AS thumbs_down,
       (sum(s.rating_sum)::double precision / nullif(sum(s.rating), 0)) AS mean_rating,
       coalesce(sum(s.arena_wins), 0)::bigint AS wins, coalesce(sum(s.arena_losses), 0)::bigint AS losses
FROM model_versions mv LEFT JOIN version_stats s ON s.version_id = mv.id
WHERE mv.kind = 'policy'
GROUP BY mv.id
ORDER BY mv.id;
