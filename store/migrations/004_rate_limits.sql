-- Per-key request counts in fixed one-minute windows, for keys with a `rate_limit`. In Postgres,
-- not in a replica's memory, so the limit holds across every serving replica.

CREATE TABLE api_key_usage (
    key_id        bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    window_start  timestamptz NOT NULL,          -- the minute counted
    requests      integer NOT NULL,
    PRIMARY KEY (key_id, window_start)
);
