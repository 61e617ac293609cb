-- The big tables partitioned by month (issue 19), so that old months can be dropped whole
-- (FEEDLOOP_RETENTION_DAYS, trainer/retention.py) and a lookup that knows its exchange's time
-- reads one month's indexes.
--
-- The partition key is the exchange's time: `chat_requests.created_at`, carried by its rows as
-- `completions.request_created_at`, `feedback.exchange_at` and `rankings.exchange_at`. So an
-- exchange, its choices and everything said about them live in the same month's partitions and
-- go together. Postgres wants every unique key of a partitioned table to hold the partition key,
-- so keys and foreign keys gain that time; it is fixed by the row a key names (a completion's
-- exchange has one time), so every uniqueness rule means what it meant before:
--   chat_requests  PK (id, created_at)          response_id unique (a trigger: across months too)
--   completions    PK (id, request_created_at)  FK (request_id, request_created_at)
--   feedback       PK (id, exchange_at)         one value per (completion, author, kind, exchange_at)
--   rankings       PK (id, exchange_at)         one ranking per (request, author, exchange_at)
-- Preferences (two completions, possibly of different months), imported demonstrations and the
-- stored training pairs stay unpartitioned: they are what operators bring in and what rounds
-- derive, far fewer than exchanges; pairwise preferences and stored pairs carry the times of the
-- exchanges on either side (`chosen_at`, `rejected_at`) for their foreign keys and for retention.
--
-- Months are UTC calendar months, named `<table>_pYYYY_MM`; `ensure_exchange_partitions` makes
-- them ahead of time (every migrate run calls it: store/db.py, and the trainer daily), and each
-- table has a DEFAULT partition, so a row of a month nobody made (a far-future or far-past time)
-- is still written, never refused.

CREATE FUNCTION partitioned_by_exchange() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$
    -- parents before children: the order partitions are made in (and dropped in reverse)
    SELECT ARRAY['chat_requests', 'completions', 'feedback', 'rankings']
$$;

-- The month partitions from the month of `since` through the month holding `upto`, where missing.
-- A month whose rows already went to a DEFAULT partition is left out with a warning (Postgres
-- refuses a partition whose rows the default holds); its rows stay where they are.
CREATE FUNCTION ensure_exchange_partitions(upto timestamptz DEFAULT now() + interval '3 months',
                                           since timestamptz DEFAULT now())
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    m timestamp := date_trunc('month', since AT TIME ZONE 'UTC');
    t text;
    made integer := 0;
    month_made integer;
BEGIN
    WHILE m <= upto AT TIME ZONE 'UTC' LOOP
        month_made := 0;
        BEGIN  -- one month at a time, all tables or none: a month's rows stay together
            FOREACH t IN ARRAY partitioned_by_exchange() LOOP
                IF to_regclass(format('%I', t || '_p' || to_char(m, 'YYYY_MM'))) IS NULL THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                   t || '_p' || to_char(m, 'YYYY_MM'), t, m AT TIME ZONE 'UTC',
                                   (m + interval '1 month') AT TIME ZONE 'UTC');
                    month_made := month_made + 1;
                END IF;
            END LOOP;
            made := made + month_made;
        EXCEPTION WHEN check_violation THEN
            RAISE WARNING 'no partitions for %: the default partitions hold rows of that month',
                to_char(m, 'YYYY-MM');
        END;
        m := m + interval '1 month';
    END LOOP;
    RETURN made;
END $$;

-- The month partitions wholly older than `horizon`, dropped oldest first (detached, then dropped:
-- no exchange is deleted row by row). What points at their exchanges from outside goes first, in
-- the same transaction: pairwise preferences with either side in the month, and the stored
-- training pairs built on them (a stored pair never names a completion that is gone; pairs
-- between two surviving exchanges stay, as the full derivation without the dropped rows gives
-- them). Counters (version_stats) are lifetime totals and keep what was dropped; event ids and
-- watermarks are untouched (nothing becomes new). DEFAULT partitions are never dropped.
-- Returns the months dropped ('YYYY_MM').
CREATE FUNCTION drop_exchange_partitions(horizon timestamptz) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    month text;
    lo timestamptz;
    hi timestamptz;
    t text;
    dropped text[] := '{}';
BEGIN
    -- writers lock these tables in this order (a chat: requests, then completions): so do we
    LOCK TABLE chat_requests, completions, feedback, rankings IN ACCESS EXCLUSIVE MODE;
    PERFORM set_config('feedloop.uncounted', 'on', true);  -- see count_preference
    FOR month IN
        SELECT substring(c.relname FROM '_p(\d{4}_\d{2})$')
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'chat_requests'::regclass AND c.relname ~ '_p\d{4}_\d{2}$'
        ORDER BY 1
    LOOP
        lo := to_date(month, 'YYYY_MM')::timestamp AT TIME ZONE 'UTC';
        hi := (to_date(month, 'YYYY_MM') + interval '1 month') AT TIME ZONE 'UTC';
        EXIT WHEN hi > horizon;
        DELETE FROM training_pairs
        WHERE least(chosen_at, rejected_at) < hi
          AND (chosen_at >= lo AND chosen_at < hi OR rejected_at >= lo AND rejected_at < hi);
        DELETE FROM preferences
        WHERE source = 'pairwise' AND least(chosen_at, rejected_at) < hi
          AND (chosen_at >= lo AND chosen_at < hi OR rejected_at >= lo AND rejected_at < hi);
        FOR t IN SELECT x FROM unnest(partitioned_by_exchange()) WITH ORDINALITY AS u(x, n) ORDER BY n DESC LOOP
            IF to_regclass(format('%I', t || '_p' || month)) IS NOT NULL THEN
                EXECUTE format('ALTER TABLE %I DETACH PARTITION %I', t, t || '_p' || month);
                EXECUTE format('DROP TABLE %I', t || '_p' || month);
            END IF;
        END LOOP;
        dropped := dropped || month;
    END LOOP;
    RETURN dropped;
END $$;

-- --- the tables, rebuilt partitioned, with their rows --------------------------------------

DROP VIEW training_pair_rows;  -- rebuilt below on the new tables
ALTER TABLE chat_requests RENAME TO chat_requests_before_013;
ALTER TABLE completions RENAME TO completions_before_013;
ALTER TABLE feedback RENAME TO feedback_before_013;
ALTER TABLE rankings RENAME TO rankings_before_013;
-- the id sequences outlive the old tables: each new table draws from its old sequence
ALTER SEQUENCE chat_requests_id_seq OWNED BY NONE;
ALTER SEQUENCE completions_id_seq OWNED BY NONE;
ALTER SEQUENCE feedback_id_seq OWNED BY NONE;
ALTER SEQUENCE rankings_id_seq OWNED BY NONE;

-- LIKE ... INCLUDING DEFAULTS, CONSTRAINTS: the same columns, defaults (ids, event ids) and checks
CREATE TABLE chat_requests (LIKE chat_requests_before_013 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);
CREATE TABLE completions (LIKE completions_before_013 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                          request_created_at timestamptz NOT NULL)
    PARTITION BY RANGE (request_created_at);
CREATE TABLE feedback (LIKE feedback_before_013 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                       exchange_at timestamptz NOT NULL)
    PARTITION BY RANGE (exchange_at);
CREATE TABLE rankings (LIKE rankings_before_013 INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
                       exchange_at timestamptz NOT NULL)
    PARTITION BY RANGE (exchange_at);
CREATE TABLE chat_requests_default PARTITION OF chat_requests DEFAULT;
CREATE TABLE completions_default PARTITION OF completions DEFAULT;
CREATE TABLE feedback_default PARTITION OF feedback DEFAULT;
CREATE TABLE rankings_default PARTITION OF rankings DEFAULT;
SELECT ensure_exchange_partitions(since => least(now(), (SELECT min(created_at) FROM chat_requests_before_013)));

-- rows first, keys and indexes after (built once per partition instead of row by row)
INSERT INTO chat_requests SELECT * FROM chat_requests_before_013;
INSERT INTO completions SELECT c.*, rq.created_at
FROM completions_before_013 c JOIN chat_requests_before_013 rq ON rq.id = c.request_id;
INSERT INTO feedback SELECT f.*, rq.created_at
FROM feedback_before_013 f JOIN completions_before_013 c ON c.id = f.completion_id
JOIN chat_requests_before_013 rq ON rq.id = c.request_id;
INSERT INTO rankings SELECT r.*, rq.created_at
FROM rankings_before_013 r JOIN chat_requests_before_013 rq ON rq.id = r.request_id;

ALTER TABLE preferences ADD COLUMN chosen_at timestamptz, ADD COLUMN rejected_at timestamptz;
UPDATE preferences p SET chosen_at = cc.request_created_at, rejected_at = rc.request_created_at
FROM completions cc, completions rc
WHERE cc.id = p.chosen_completion_id AND rc.id = p.rejected_completion_id;
ALTER TABLE training_pairs ADD COLUMN chosen_at timestamptz, ADD COLUMN rejected_at timestamptz;
UPDATE training_pairs tp SET chosen_at = cc.request_created_at, rejected_at = rc.request_created_at
FROM completions cc, completions rc
WHERE cc.id = tp.chosen_completion_id AND rc.id = tp.rejected_completion_id;

DROP TABLE rankings_before_013, feedback_before_013, completions_before_013, chat_requests_before_013 CASCADE;
ALTER SEQUENCE chat_requests_id_seq OWNED BY chat_requests.id;
ALTER SEQUENCE completions_id_seq OWNED BY completions.id;
ALTER SEQUENCE feedback_id_seq OWNED BY feedback.id;
ALTER SEQUENCE rankings_id_seq OWNED BY rankings.id;

ALTER TABLE chat_requests
    ADD PRIMARY KEY (id, created_at),
    ADD CONSTRAINT chat_requests_response_id_key UNIQUE (response_id, created_at),
    ADD FOREIGN KEY (api_key_id) REFERENCES api_keys (id),
    ADD FOREIGN KEY (model_version_id) REFERENCES model_versions (id);
CREATE INDEX chat_requests_prompt_hash ON chat_requests (prompt_hash);
CREATE INDEX chat_requests_created_at ON chat_requests (created_at);
CREATE INDEX chat_requests_client_ref ON chat_requests (client_ref) WHERE client_ref IS NOT NULL;

ALTER TABLE completions
    ADD PRIMARY KEY (id, request_created_at),
    ADD CONSTRAINT completions_request_id_choice_index_key UNIQUE (request_id, choice_index, request_created_at),
    ADD FOREIGN KEY (request_id, request_created_at) REFERENCES chat_requests (id, created_at),
    ADD FOREIGN KEY (model_version_id) REFERENCES model_versions (id);

ALTER TABLE feedback
    ADD PRIMARY KEY (id, exchange_at),
    ADD CONSTRAINT feedback_one_current UNIQUE (completion_id, author_key_id, kind, exchange_at),
    ADD FOREIGN KEY (completion_id, exchange_at) REFERENCES completions (id, request_created_at),
    ADD FOREIGN KEY (author_key_id) REFERENCES api_keys (id);
CREATE INDEX feedback_event ON feedback (event_id);
CREATE INDEX feedback_kind_completion ON feedback (kind, completion_id);

ALTER TABLE rankings
    ADD PRIMARY KEY (id, exchange_at),
    ADD CONSTRAINT rankings_one_current UNIQUE (request_id, author_key_id, exchange_at),
    ADD FOREIGN KEY (request_id, exchange_at) REFERENCES chat_requests (id, created_at),
    ADD FOREIGN KEY (author_key_id) REFERENCES api_keys (id);
CREATE INDEX rankings_event ON rankings (event_id);

-- MATCH FULL: a pairwise side names its completion and that completion's exchange time, or neither
ALTER TABLE preferences
    ADD FOREIGN KEY (chosen_completion_id, chosen_at) REFERENCES completions (id, request_created_at) MATCH FULL,
    ADD FOREIGN KEY (rejected_completion_id, rejected_at) REFERENCES completions (id, request_created_at) MATCH FULL;
-- retention finds what points into a month it drops
CREATE INDEX preferences_exchange_at ON preferences (least(chosen_at, rejected_at)) WHERE source = 'pairwise';
CREATE INDEX training_pairs_exchange_at ON training_pairs (least(chosen_at, rejected_at));

-- A response id names one exchange, ever: recording one twice (a spool drained again after a
-- commit whose answer was lost: service/recording.py) is refused as a duplicate. The unique index
-- holds the partition key, so it only says so within a month; this says it across months. Writers
-- of one id queue on a transaction lock on it (the two-key space, apart from store/locks.py's),
-- so the second sees the first's committed row; the check is one probe of each month's index.
CREATE FUNCTION response_id_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('feedloop.response_id'), hashtext(NEW.response_id));
    IF EXISTS (SELECT 1 FROM chat_requests WHERE response_id = NEW.response_id) THEN
        RAISE unique_violation USING MESSAGE = format('response id %s is recorded already', NEW.response_id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER chat_requests_response_id_once BEFORE INSERT ON chat_requests
    FOR EACH ROW EXECUTE FUNCTION response_id_once();

CREATE TRIGGER completions_immutable BEFORE UPDATE ON completions
    FOR EACH ROW EXECUTE FUNCTION completions_immutable();

-- --- counters: each row's version looked up in its own month ---------------------------------

CREATE TRIGGER chat_requests_counted AFTER INSERT ON chat_requests
    FOR EACH ROW EXECUTE FUNCTION count_chat_request();
CREATE TRIGGER completions_counted AFTER INSERT ON completions
    FOR EACH ROW EXECUTE FUNCTION count_completion();

-- A completion's version, looked up in its own month (the counters' triggers).
CREATE FUNCTION completion_version(completion bigint, at timestamptz) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT model_version_id FROM completions WHERE id = completion AND request_created_at = at
$$;

-- The pairs a ranking yields, (better, worse) choice indices: every two choices in different tiers.
-- PL/pgSQL with ROWS: the planner takes a ranking for the few pairs it has (inlined, it would guess
-- 100 tiers of 100 choices and plan, and JIT-compile, for a million pairs).
CREATE FUNCTION ranking_pairs(ordering jsonb) RETURNS TABLE (better int, worse int)
LANGUAGE plpgsql IMMUTABLE ROWS 3 AS $$
BEGIN
    RETURN QUERY
    WITH placed AS (
        SELECT t.rank, m.choice::int AS choice
        FROM jsonb_array_elements(ordering) WITH ORDINALITY AS t(tier, rank)
        CROSS JOIN LATERAL jsonb_array_elements_text(CASE jsonb_typeof(t.tier) WHEN 'array' THEN t.tier
                                                     ELSE jsonb_build_array(t.tier) END) AS m(choice)
    )
    SELECT b.choice, w.choice FROM placed b JOIN placed w ON w.rank > b.rank;
END $$;

DROP FUNCTION count_feedback_row(bigint, text, smallint, int);
CREATE FUNCTION count_feedback_row(completion bigint, at timestamptz, kind text, value smallint, sign int)
RETURNS void LANGUAGE sql AS $$
    SELECT bump_version_stats(completion_version(completion, at),
        d_thumbs => CASE WHEN kind = 'thumbs' THEN sign ELSE 0 END,
        d_thumbs_up => CASE WHEN kind = 'thumbs' AND value > 0 THEN sign ELSE 0 END,
        d_thumbs_down => CASE WHEN kind = 'thumbs' AND value < 0 THEN sign ELSE 0 END,
        d_rating => CASE WHEN kind = 'rating' THEN sign ELSE 0 END,
        d_rating_sum => CASE WHEN kind = 'rating' THEN sign * value ELSE 0 END,
        d_comment => CASE WHEN kind = 'comment' THEN sign ELSE 0 END,
        d_correction => CASE WHEN kind = 'correction' THEN sign ELSE 0 END)
$$;

CREATE OR REPLACE FUNCTION count_feedback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM count_feedback_row(OLD.completion_id, OLD.exchange_at, OLD.kind, OLD.value, -1);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM count_feedback_row(NEW.completion_id, NEW.exchange_at, NEW.kind, NEW.value, 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER feedback_counted AFTER INSERT OR DELETE OR UPDATE OF completion_id, kind, value ON feedback
    FOR EACH ROW EXECUTE FUNCTION count_feedback();

CREATE OR REPLACE FUNCTION count_ranking() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM bump_version_stats((SELECT model_version_id FROM chat_requests
                                    WHERE id = OLD.request_id AND created_at = OLD.exchange_at), d_ranking => -1);
    ELSE
        PERFORM bump_version_stats((SELECT model_version_id FROM chat_requests
                                    WHERE id = NEW.request_id AND created_at = NEW.exchange_at), d_ranking => 1);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER rankings_counted AFTER INSERT OR DELETE ON rankings
    FOR EACH ROW EXECUTE FUNCTION count_ranking();

DROP FUNCTION count_preference_row(bigint, bigint, int);
CREATE FUNCTION count_preference_row(chosen bigint, chosen_at timestamptz, rejected bigint,
                                     rejected_at timestamptz, sign int)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    winner bigint := completion_version(chosen, chosen_at);
    loser bigint := completion_version(rejected, rejected_at);
    duel int := CASE WHEN winner <> loser THEN sign ELSE 0 END;
BEGIN
    PERFORM bump_version_stats(winner, d_preference => sign, d_arena_wins => duel);
    PERFORM bump_version_stats(loser, d_preference => duel, d_arena_losses => duel);
END $$;

-- Retention's deletes (feedloop.uncounted set in its transaction) leave the lifetime counters be,
-- as the partitions it drops do: stats count what each version served and was told, ever.
CREATE OR REPLACE FUNCTION count_preference() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('feedloop.uncounted', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' AND OLD.source = 'pairwise' THEN
        PERFORM count_preference_row(OLD.chosen_completion_id, OLD.chosen_at, OLD.rejected_completion_id,
                                     OLD.rejected_at, -1);
    END IF;
    IF TG_OP <> 'DELETE' AND NEW.source = 'pairwise' THEN
        PERFORM count_preference_row(NEW.chosen_completion_id, NEW.chosen_at, NEW.rejected_completion_id,
                                     NEW.rejected_at, 1);
    END IF;
    RETURN NULL;
END $$;

-- --- the pair rules and the stored pairs' view, each row joined within its own month -----------

-- The completions the judged-pair rules start from: every one (prompts null) or those of these
-- prompts, each with its exchange's time. (Where exchanges are excluded from training, say so here.)
CREATE FUNCTION judged_completions(prompts text[])
RETURNS TABLE (id bigint, at timestamptz, text text, prompt_hash text) LANGUAGE sql STABLE AS $$
    SELECT c.id, c.request_created_at, c.text, rq.prompt_hash
    FROM chat_requests rq JOIN completions c ON c.request_id = rq.id AND c.request_created_at = rq.created_at
    WHERE prompts IS NULL OR rq.prompt_hash = ANY (prompts)
$$;

CREATE OR REPLACE FUNCTION thumbs_pairs_of(prompts text[], upto bigint)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, event_id bigint,
               feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (SELECT * FROM judged_completions(prompts)), verdict AS (
        SELECT f.completion_id, sum(f.value) AS net, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id AND s.at = f.exchange_at
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

CREATE OR REPLACE FUNCTION rating_pairs_of(prompts text[], upto bigint, scale double precision)
RETURNS TABLE (chosen_id bigint, rejected_id bigint, prompt_hash text, margin double precision,
               event_id bigint, feedback_ids bigint[], judged_at timestamptz)
LANGUAGE sql STABLE AS $$
    WITH in_scope AS (SELECT * FROM judged_completions(prompts)), score AS (
        SELECT f.completion_id, avg(f.value) AS mean, max(f.event_id) AS event_id,
               array_agg(f.id ORDER BY f.id) AS feedback_ids, max(f.updated_at) AS judged_at
        FROM feedback f JOIN in_scope s ON s.id = f.completion_id AND s.at = f.exchange_at
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

-- A stored pair's texts are read per pair, each in its month (scalar subqueries: an index probe
-- of one month each, as run-time pruning leaves it). Joins would let the planner, which costs a
-- probe as one of every month (it does not count the months pruning skips), rather hash every
-- month of completions for a round's few hundred new pairs.
CREATE VIEW training_pair_rows AS
SELECT tp.*,
       coalesce((SELECT rq.messages FROM completions c
                 JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
                 WHERE c.id = tp.chosen_completion_id AND c.request_created_at = tp.chosen_at), p.prompt) AS prompt,
       coalesce((SELECT c.text FROM completions c
                 WHERE c.id = tp.chosen_completion_id AND c.request_created_at = tp.chosen_at), p.chosen) AS chosen,
       coalesce((SELECT c.text FROM completions c
                 WHERE c.id = tp.rejected_completion_id AND c.request_created_at = tp.rejected_at), p.rejected) AS rejected
FROM training_pairs tp
LEFT JOIN preferences p ON p.id = tp.preference_id AND p.source = 'import';

ANALYZE chat_requests, completions, feedback, rankings, preferences, training_pairs;
