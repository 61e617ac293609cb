-- Holding up as the record grows: training pairs kept as they are derived, so a round reads only
-- what is new, and per-version counters kept as rows are written, so stats read aggregates.

-- The judged-pair rules, for every prompt (prompts null) or only the prompts a round touched.
-- 005's thumbs_pairs/rating_pairs now read these, so there is one rule for each source.
-- (Where exchanges are excluded from training, say so in `in_scope`: every rule starts there.)
CREATE FUNCTION thumbs_pairs_of(prompts text[], upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, event_id bigint,
               feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (
        SELECT c.id, c.text, rq.prompt_hash
        FROM chat_requests rq JOIN completions c ON c.request_id = rq.id
        WHERE prompts IS NULL OR rq.prompt_hash = ANY (prompts)
    ), verdict AS (
        SELECT f.completion_id, sum(f.value) AS net, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id
        WHERE f.kind = 'thumbs' AND f.event_id <= upto
        GROUP BY f.completion_id
        HAVING sum(f.value) <> 0
    ), judged AS (
        SELECT v.*, s.text, s.prompt_hash FROM verdict v JOIN in_scope s ON s.id = v.completion_id
    )
    SELECT up.completion_id, down.completion_id, up.prompt_hash, greatest(up.event_id, down.event_id),
           up.feedback_ids || down.feedback_ids, greatest(up.judged_at, down.judged_at)
    FROM judged up JOIN judged down ON down.prompt_hash = up.prompt_hash
    WHERE up.net > 0 AND down.net < 0 AND up.text <> down.text
$$;

CREATE FUNCTION rating_pairs_of(prompts text[], upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (
        SELECT c.id, c.text, rq.prompt_hash
        FROM chat_requests rq JOIN completions c ON c.request_id = rq.id
        WHERE prompts IS NULL OR rq.prompt_hash = ANY (prompts)
    ), score AS (
        SELECT f.completion_id, avg(f.value) AS mean, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id
        WHERE f.kind = 'rating' AND f.event_id <= upto
        GROUP BY f.completion_id
    ), judged AS (
        SELECT sc.*, s.text, s.prompt_hash FROM score sc JOIN in_scope s ON s.id = sc.completion_id
    )
    SELECT hi.completion_id, lo.completion_id, hi.prompt_hash, ((hi.mean - lo.mean) / scale)::double precision,
           greatest(hi.event_id, lo.event_id), hi.feedback_ids || lo.feedback_ids,
           greatest(hi.judged_at, lo.judged_at)
    FROM judged hi JOIN judged lo ON lo.prompt_hash = hi.prompt_hash
    WHERE hi.mean > lo.mean AND hi.text <> lo.text
$$;

CREATE OR REPLACE FUNCTION thumbs_pairs(after bigint, upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, event_id bigint, feedback_ids bigint[])
LANGUAGE sql STABLE AS $$
    SELECT p.chosen_id, p.rejected_id, p.event_id, p.feedback_ids FROM thumbs_pairs_of(NULL, upto) p
    WHERE p.event_id > after
$$;

CREATE OR REPLACE FUNCTION rating_pairs(after bigint, upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, margin double precision, event_id bigint,
               feedback_ids bigint[])
LANGUAGE sql STABLE AS $$
    SELECT p.chosen_id, p.rejected_id, p.margin, p.event_id, p.feedback_ids
    FROM rating_pairs_of(NULL, upto, scale) p
    WHERE p.event_id > after
$$;

-- The versions a pair compares, each once.
CREATE FUNCTION sides(a bigint, b bigint) RETURNS bigint[] LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN a IS NULL THEN '{}'::bigint[] WHEN a = b THEN ARRAY[a] ELSE ARRAY[a, b] END
$$;

-- Every derived pair as of `training_pairs_state.watermark`: exactly what the full derivation
-- gives at that watermark. A round rolls it forward from the rows past it (store/derive.py).
CREATE TABLE training_pairs (
    pair_key                text PRIMARY KEY,   -- preference:ID | ranking:ID:I>J | thumbs:C>D | rating:C>D
    source                  text NOT NULL CHECK (source IN ('pairwise', 'import', 'ranking', 'thumbs', 'rating')),
    grp                     text NOT NULL,      -- pairs of one group train together (one ranking's)
    event_id                bigint NOT NULL,    -- the newest event of its source rows
    judged_at               timestamptz NOT NULL, -- when the newest of them was written: its age
    prompt_hash             text NOT NULL,
    chosen_completion_id    bigint,             -- null for imports, whose texts are on the preference
    rejected_completion_id  bigint,
    preference_id           bigint,             -- pairwise and import
    ranking_id              bigint,
    versions                bigint[] NOT NULL,  -- the policy versions on either side (none for imports)
    margin                  double precision NOT NULL,
    origin                  jsonb NOT NULL
);
CREATE INDEX training_pairs_event ON training_pairs (event_id);
CREATE INDEX training_pairs_prompt ON training_pairs (prompt_hash) WHERE source IN ('thumbs', 'rating');
CREATE INDEX training_pairs_preference ON training_pairs (preference_id) WHERE preference_id IS NOT NULL;
CREATE INDEX training_pairs_ranking ON training_pairs (ranking_id) WHERE ranking_id IS NOT NULL;

CREATE TABLE training_pairs_state (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    watermark  bigint NOT NULL DEFAULT 0
);
INSERT INTO training_pairs_state DEFAULT VALUES;

-- Per-version counters, written by triggers with the rows they count. Each backend adds to its
-- own shard row, so concurrent writers never wait on one hot row; stats sum the shards.
CREATE TABLE version_stats (
    version_id    bigint NOT NULL,
    shard         integer NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    completions   bigint NOT NULL DEFAULT 0,
    thumbs        bigint NOT NULL DEFAULT 0,
    thumbs_up     bigint NOT NULL DEFAULT 0,
    thumbs_down   bigint NOT NULL DEFAULT 0,
    rating        bigint NOT NULL DEFAULT 0,
    rating_sum    bigint NOT NULL DEFAULT 0,
    comment       bigint NOT NULL DEFAULT 0,
    correction    bigint NOT NULL DEFAULT 0,
    ranking       bigint NOT NULL DEFAULT 0,
    preference    bigint NOT NULL DEFAULT 0,
    arena_wins    bigint NOT NULL DEFAULT 0,
    arena_losses  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (version_id, shard)
);

CREATE FUNCTION bump_version_stats(version bigint, d_requests int DEFAULT 0, d_completions int DEFAULT 0,
    d_thumbs int DEFAULT 0, d_thumbs_up int DEFAULT 0, d_thumbs_down int DEFAULT 0, d_rating int DEFAULT 0,
    d_rating_sum int DEFAULT 0, d_comment int DEFAULT 0, d_correction int DEFAULT 0, d_ranking int DEFAULT 0,
    d_preference int DEFAULT 0, d_arena_wins int DEFAULT 0, d_arena_losses int DEFAULT 0)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO version_stats AS s VALUES (version, pg_backend_pid() % 16, d_requests, d_completions,
        d_thumbs, d_thumbs_up, d_thumbs_down, d_rating, d_rating_sum, d_comment, d_correction, d_ranking,
        d_preference, d_arena_wins, d_arena_losses)
    ON CONFLICT (version_id, shard) DO UPDATE SET
        requests = s.requests + d_requests, completions = s.completions + d_completions,
        thumbs = s.thumbs + d_thumbs, thumbs_up = s.thumbs_up + d_thumbs_up,
        thumbs_down = s.thumbs_down + d_thumbs_down, rating = s.rating + d_rating,
        rating_sum = s.rating_sum + d_rating_sum, comment = s.comment + d_comment,
        correction = s.correction + d_correction, ranking = s.ranking + d_ranking,
        preference = s.preference + d_preference, arena_wins = s.arena_wins + d_arena_wins,
        arena_losses = s.arena_losses + d_arena_losses
$$;

CREATE FUNCTION count_chat_request() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_version_stats(NEW.model_version_id, d_requests => 1);
    RETURN NULL;
END $$;
CREATE TRIGGER chat_requests_counted AFTER INSERT ON chat_requests
    FOR EACH ROW EXECUTE FUNCTION count_chat_request();

CREATE FUNCTION count_completion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_version_stats(NEW.model_version_id, d_completions => 1);
    RETURN NULL;
END $$;
CREATE TRIGGER completions_counted AFTER INSERT ON completions
    FOR EACH ROW EXECUTE FUNCTION count_completion();

-- One feedback row counted (sign 1) or uncounted (-1) for the version of its completion.
CREATE FUNCTION count_feedback_row(completion bigint, kind text, value smallint, sign int)
RETURNS void LANGUAGE sql AS $$
    SELECT bump_version_stats((SELECT model_version_id FROM completions WHERE id = completion),
        d_thumbs => CASE WHEN kind = 'thumbs' THEN sign ELSE 0 END,
        d_thumbs_up => CASE WHEN kind = 'thumbs' AND value > 0 THEN sign ELSE 0 END,
        d_thumbs_down => CASE WHEN kind = 'thumbs' AND value < 0 THEN sign ELSE 0 END,
        d_rating => CASE WHEN kind = 'rating' THEN sign ELSE 0 END,
        d_rating_sum => CASE WHEN kind = 'rating' THEN sign * value ELSE 0 END,
        d_comment => CASE WHEN kind = 'comment' THEN sign ELSE 0 END,
        d_correction => CASE WHEN kind = 'correction' THEN sign ELSE 0 END)
$$;

CREATE FUNCTION count_feedback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM count_feedback_row(OLD.completion_id, OLD.kind, OLD.value, -1);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM count_feedback_row(NEW.completion_id, NEW.kind, NEW.value, 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER feedback_counted AFTER INSERT OR DELETE OR UPDATE OF completion_id, kind, value ON feedback
    FOR EACH ROW EXECUTE FUNCTION count_feedback();

CREATE FUNCTION count_ranking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bump_version_stats((SELECT model_version_id FROM chat_requests
                                WHERE id = CASE TG_OP WHEN 'DELETE' THEN OLD.request_id ELSE NEW.request_id END),
                               d_ranking => CASE TG_OP WHEN 'DELETE' THEN -1 ELSE 1 END);
    RETURN NULL;
END $$;
CREATE TRIGGER rankings_counted AFTER INSERT OR DELETE ON rankings
    FOR EACH ROW EXECUTE FUNCTION count_ranking();

-- A pairwise preference counts once for each version on either side, and is an arena vote when
-- the two sides are different versions.
CREATE FUNCTION count_preference_row(chosen bigint, rejected bigint, sign int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    winner bigint := (SELECT model_version_id FROM completions WHERE id = chosen);
    loser bigint := (SELECT model_version_id FROM completions WHERE id = rejected);
    duel int := CASE WHEN winner <> loser THEN sign ELSE 0 END;
BEGIN
    PERFORM bump_version_stats(winner, d_preference => sign, d_arena_wins => duel);
    PERFORM bump_version_stats(loser, d_preference => duel, d_arena_losses => duel);
END $$;

CREATE FUNCTION count_preference() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' AND OLD.source = 'pairwise' THEN
        PERFORM count_preference_row(OLD.chosen_completion_id, OLD.rejected_completion_id, -1);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.source = 'pairwise' THEN
        PERFORM count_preference_row(NEW.chosen_completion_id, NEW.rejected_completion_id, 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER preferences_counted
    AFTER INSERT OR DELETE OR UPDATE OF chosen_completion_id, rejected_completion_id ON preferences
    FOR EACH ROW EXECUTE FUNCTION count_preference();

-- What was recorded before the counters existed, counted once (shard -1).
INSERT INTO version_stats (version_id, shard, requests)
SELECT model_version_id, -1, count(*) FROM chat_requests GROUP BY 1;
INSERT INTO version_stats AS s (version_id, shard, completions)
SELECT model_version_id, -1, count(*) FROM completions GROUP BY 1
ON CONFLICT (version_id, shard) DO UPDATE SET completions = EXCLUDED.completions;
SELECT count_feedback_row(completion_id, kind, value, 1) FROM feedback;
SELECT bump_version_stats(rq.model_version_id, d_ranking => 1)
FROM rankings r JOIN chat_requests rq ON rq.id = r.request_id;
SELECT count_preference_row(chosen_completion_id, rejected_completion_id, 1)
FROM preferences WHERE source = 'pairwise';

-- A stored pair with its texts and prompt (an import's are on its preference row).
CREATE VIEW training_pair_rows AS
SELECT tp.*, coalesce(rq.messages, p.prompt) AS prompt, coalesce(cc.text, p.chosen) AS chosen,
       coalesce(rc.text, p.rejected) AS rejected
FROM training_pairs tp
LEFT JOIN completions cc ON cc.id = tp.chosen_completion_id
LEFT JOIN chat_requests rq ON rq.id = cc.request_id
LEFT JOIN completions rc ON rc.id = tp.rejected_completion_id
LEFT JOIN preferences p ON p.id = tp.preference_id AND p.source = 'import';
-- Imports are few among preferences: reading pairs finds theirs without reading the rest.
CREATE INDEX preferences_imports ON preferences (id) WHERE source = 'import';
