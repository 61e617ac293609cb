-- API keys, the model registry and its audit log, and the record of every exchange.

CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    key_hash    text NOT NULL UNIQUE,            -- sha256 of the key; the key itself is never stored
    prefix      text NOT NULL,                   -- first characters, so people can tell keys apart
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'operator')),
    rate_limit  integer,                         -- requests per minute; null = unlimited
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE training_runs (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL,                 -- bootstrap | round | sft | reward | ppo
    status        text NOT NULL CHECK (status IN ('running', 'succeeded', 'skipped', 'failed')),
    watermark     bigint,                        -- highest feedback event consumed
    config        jsonb NOT NULL DEFAULT '{}',
    metrics       jsonb NOT NULL DEFAULT '{}',
    curves        jsonb NOT NULL DEFAULT '{}',   -- per-step series, by metric name
    error         text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

CREATE TABLE model_versions (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL CHECK (kind IN ('policy', 'reward')),
    parent_id        bigint REFERENCES model_versions (id),
    reference_id     bigint REFERENCES model_versions (id),
    reward_model_id  bigint REFERENCES model_versions (id),
    path             text NOT NULL,
    content_hash     text NOT NULL,
    endpoint         text,                       -- remote engine: server that serves this version
    status           text NOT NULL CHECK (status IN
                         ('candidate', 'active', 'canary', 'archived', 'rejected', 'failed')),
    canary_fraction  real CHECK (canary_fraction > 0 AND canary_fraction < 1),
    training_run_id  bigint REFERENCES training_runs (id),
    metrics          jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    promoted_at      timestamptz,
    promoted_by      text
);
-- At most one active version of each kind: a promotion is one transaction that swaps them.
CREATE UNIQUE INDEX model_versions_one_active ON model_versions (kind) WHERE status = 'active';

CREATE TABLE promotions (
    id          bigserial PRIMARY KEY,
    version_id  bigint NOT NULL REFERENCES model_versions (id),
    action      text NOT NULL CHECK (action IN ('register', 'promote', 'rollback', 'canary', 'reject', 'fail')),
    actor       text NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE chat_requests (
    id                 bigserial PRIMARY KEY,
    response_id        text NOT NULL UNIQUE,
    api_key_id         bigint NOT NULL REFERENCES api_keys (id),
    user_field         text,                     -- OpenAI's `user`
    messages           jsonb NOT NULL,
    prompt_hash        text NOT NULL,            -- groups identical prompts across requests
    params             jsonb NOT NULL,           -- sampling parameters actually used
    model_version_id   bigint NOT NULL REFERENCES model_versions (id),
    stream             boolean NOT NULL,
    batch_rows         integer NOT NULL,         -- sequences in the generation batch it ran in
    prompt_tokens      integer NOT NULL,
    completion_tokens  integer NOT NULL,
    queue_ms           real NOT NULL,
    first_token_ms     real,
    total_ms           real NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_requests_prompt_hash ON chat_requests (prompt_hash);
CREATE INDEX chat_requests_created_at ON chat_requests (created_at);

CREATE TABLE completions (
    id                 bigserial PRIMARY KEY,
    request_id         bigint NOT NULL REFERENCES chat_requests (id),
    choice_index       integer NOT NULL,
    text               text NOT NULL,
    finish_reason      text NOT NULL CHECK (finish_reason IN ('stop', 'length', 'cancelled')),
    completion_tokens  integer NOT NULL,
    model_version_id   bigint NOT NULL REFERENCES model_versions (id),
    UNIQUE (request_id, choice_index)
);

-- What was said stays said: feedback and training data point at these rows.
CREATE FUNCTION completions_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'completions are immutable';
END $$;
CREATE TRIGGER completions_immutable BEFORE UPDATE ON completions
    FOR EACH ROW EXECUTE FUNCTION completions_immutable();
