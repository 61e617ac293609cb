-- What a choice carried besides its text (issue 20): the tool calls parsed from it (OpenAI's
-- `tool_calls`, arguments as JSON strings; its finish reason is then `tool_calls`) and, when the
-- request asked for them, each token's log-probability under the distribution it was drawn from
-- (OpenAI's `logprobs.content` entries, plus the token `id`).

ALTER TABLE completions ADD COLUMN IF NOT EXISTS tool_calls jsonb;
ALTER TABLE completions ADD COLUMN IF NOT EXISTS logprobs jsonb;
ALTER TABLE completions DROP CONSTRAINT IF EXISTS completions_finish_reason_check;
ALTER TABLE completions ADD CONSTRAINT completions_finish_reason_check
    CHECK (finish_reason IN ('stop', 'length', 'cancelled', 'tool_calls'));
