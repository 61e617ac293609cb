-- What users think of what was said, and the training data operators bring in.
--
-- Every feedback-like row takes its event id from one sequence, so "what is new since the last
-- training round" is `event_id > watermark` across all of these tables. A row that changes
-- (a second thumbs replacing the first) draws a new event id: it is new again.
-- Writers hold `pg_advisory_xact_lock_shared(EVENTS_LOCK)` from before they draw an event id until
-- they commit; reading the watermark takes the lock exclusively for a moment, so no transaction
-- still in flight holds an id at or below a watermark that was handed out.

CREATE SEQUENCE feedback_events;

CREATE TABLE feedback (
    id             bigserial PRIMARY KEY,
    event_id       bigint NOT NULL DEFAULT nextval('feedback_events'),
    completion_id  bigint NOT NULL REFERENCES completions (id),
    author_key_id  bigint NOT NULL REFERENCES api_keys (id),
    kind           text NOT NULL CHECK (kind IN ('thumbs', 'rating', 'comment', 'correction')),
    value          smallint,                       -- thumbs: -1 | 1; rating: 1..7 (InstructGPT's Likert)
    text           text,                           -- comment, or the corrected answer
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- one current value per (completion, author, kind): a repeat replaces it
    UNIQUE (completion_id, author_key_id, kind),
    CHECK (CASE kind WHEN 'thumbs' THEN value IN (-1, 1) AND text IS NULL
                     WHEN 'rating' THEN value BETWEEN 1 AND 7 AND text IS NULL
                     ELSE value IS NULL AND text IS NOT NULL END)
);
CREATE INDEX feedback_event ON feedback (event_id);
CREATE INDEX feedback_kind_completion ON feedback (kind, completion_id);

CREATE TABLE rankings (
    id             bigserial PRIMARY KEY,
    event_id       bigint NOT NULL DEFAULT nextval('feedback_events'),
    request_id     bigint NOT NULL REFERENCES chat_requests (id),
    author_key_id  bigint NOT NULL REFERENCES api_keys (id),
    ordering       jsonb NOT NULL,                 -- choice indices best first, a list for a tie: [[2, 0], 1]
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, author_key_id)             -- one current ranking per response and author
);
CREATE INDEX rankings_event ON rankings (event_id);

CREATE TABLE preferences (
    id                      bigserial PRIMARY KEY,
    event_id                bigint NOT NULL DEFAULT nextval('feedback_events'),
    source                  text NOT NULL CHECK (source IN ('pairwise', 'import')),
    author_key_id           bigint NOT NULL REFERENCES api_keys (id),
    -- pairwise: two completions of the same prompt
    chosen_completion_id    bigint REFERENCES completions (id),
    rejected_completion_id  bigint REFERENCES completions (id),
    strength                double precision CHECK (strength BETWEEN 0 AND 1),
    -- import: the prompt (a conversation) and the two answers as text
    prompt                  jsonb,
    prompt_hash             text,
    chosen                  text,
    rejected                text,
    margin                  double precision NOT NULL DEFAULT 0,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CHECK (CASE source
           WHEN 'pairwise' THEN chosen_completion_id IS NOT NULL AND rejected_completion_id IS NOT NULL
                AND chosen_completion_id <> rejected_completion_id AND strength IS NOT NULL
                AND prompt IS NULL AND chosen IS NULL AND rejected IS NULL
           ELSE chosen_completion_id IS NULL AND rejected_completion_id IS NULL AND prompt IS NOT NULL
                AND prompt_hash IS NOT NULL AND chosen IS NOT NULL AND rejected IS NOT NULL END)
);
-- One current preference per author and pair of completions, whichever way round.
CREATE UNIQUE INDEX preferences_one_current ON preferences
    (author_key_id, least(chosen_completion_id, rejected_completion_id),
     greatest(chosen_completion_id, rejected_completion_id))
    WHERE source = 'pairwise';
-- The same imported pair twice is one pair (texts are hashed: long answers overflow a btree row).
CREATE UNIQUE INDEX preferences_import_once ON preferences (prompt_hash, md5(chosen), md5(rejected))
    WHERE source = 'import';
CREATE INDEX preferences_event ON preferences (event_id);
CREATE INDEX preferences_chosen ON preferences (chosen_completion_id);
CREATE INDEX preferences_rejected ON preferences (rejected_completion_id);

-- Imported demonstrations. Users' corrected answers stay in `feedback` and are derived from there.
CREATE TABLE demonstrations (
    id             bigserial PRIMARY KEY,
    event_id       bigint NOT NULL DEFAULT nextval('feedback_events'),
    author_key_id  bigint NOT NULL REFERENCES api_keys (id),
    prompt         jsonb NOT NULL,
    prompt_hash    text NOT NULL,
    completion     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX demonstrations_import_once ON demonstrations (prompt_hash, md5(completion));
CREATE INDEX demonstrations_event ON demonstrations (event_id);

-- A retried POST with the same Idempotency-Key returns the first answer instead of writing again.
-- The key is claimed and its response stored in the request's own transaction.
CREATE TABLE idempotency_keys (
    author_key_id  bigint NOT NULL REFERENCES api_keys (id),
    key            text NOT NULL,
    route          text NOT NULL,
    request_hash   text NOT NULL,                  -- sha256 of the route and the request body
    response       jsonb,                          -- set before the claiming transaction commits
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (author_key_id, key)
);
