-- What a chat client says about each exchange (headers on the chat request, service/routes/chat.py):
-- its own id for the answer (Open WebUI: the assistant message id its feedback later names), its
-- conversation id, and its task kind (empty for a user's turn; Open WebUI sends title_generation,
-- tags_generation, follow_up_generation... for its own housekeeping calls, which are never trained
-- on: see store/queries/feedback.sql `find_completion` and exchanges.sql `recent_conversations`).
-- Plain ADD COLUMN / CREATE INDEX: both reach every partition when the table is partitioned.
ALTER TABLE chat_requests
    ADD COLUMN IF NOT EXISTS client_ref text,
    ADD COLUMN IF NOT EXISTS client_chat_id text,
    ADD COLUMN IF NOT EXISTS client_task text;
-- Feedback importers find an exchange by the client's id for it.
CREATE INDEX IF NOT EXISTS chat_requests_client_ref ON chat_requests (client_ref) WHERE client_ref IS NOT NULL;
