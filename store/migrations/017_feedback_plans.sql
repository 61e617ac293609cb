-- A feedback group's statement (the record_feedback query until now) as a PL/pgSQL function that
-- keeps one generic plan. As a prepared statement, Postgres planned it afresh on every call once
-- the history spanned a few months: a generic plan cannot know how many events the arrays hold
-- (it assumes 10) and counts an index probe in every month's partition for each, so it looked
-- dearer than a custom plan and was never chosen, and a custom plan of this join over every month
-- takes 5-6 ms to make (bench/growth.py: feedback p50 2.3x slower at 1M exchanges over six months
-- than at 10k in one). The generic plan is the one wanted: it prunes the months at run time and
-- reads one per event, as a custom plan does. Same statement, same rows out.
CREATE FUNCTION record_feedback_events(lock_key bigint, response_ids text[], choice_indexes numeric[],
                                       owners bigint[], ats timestamptz[], author_key_ids bigint[], kinds text[],
                                       event_values smallint[], event_texts text[])
RETURNS TABLE (i bigint, completion_id bigint, exchange_at timestamptz, client_task text, id text, kind text,
               value smallint, text text, author_key_id bigint, created_at timestamptz, updated_at timestamptz)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH joined AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(lock_key)),
    event AS (
        SELECT * FROM unnest(author_key_ids, kinds, event_values, event_texts)
            WITH ORDINALITY AS e(author_key_id, kind, value, text, i)
    ),
    target AS (
        SELECT n.id AS completion_id, n.exchange_at, n.client_task, e.*
        FROM joined, named_completions(response_ids, choice_indexes, owners, ats) n
        JOIN event e ON e.i = n.i
    ),
    saved AS (
        INSERT INTO feedback AS f (completion_id, exchange_at, author_key_id, kind, value, text)
        SELECT t.completion_id, t.exchange_at, t.author_key_id, t.kind, t.value, t.text FROM target t
        WHERE t.client_task IS NULL
        ORDER BY t.completion_id, t.author_key_id, t.kind
        ON CONFLICT (completion_id, author_key_id, kind, exchange_at) DO UPDATE
        SET value = EXCLUDED.value, text = EXCLUDED.text, event_id = EXCLUDED.event_id, updated_at = now()
        WHERE (f.value, f.text) IS DISTINCT FROM (EXCLUDED.value, EXCLUDED.text)
        RETURNING f.*
    )
    SELECT e.i, t.completion_id, t.exchange_at, t.client_task, 'fb_' || r.id, r.kind, r.value, r.text,
           r.author_key_id, r.created_at, r.updated_at
    FROM event e LEFT JOIN target t ON t.i = e.i
    LEFT JOIN LATERAL (
        SELECT * FROM (
            SELECT 0 AS o, s.id, s.kind, s.value, s.text, s.author_key_id, s.created_at, s.updated_at FROM saved s
            WHERE s.completion_id = t.completion_id AND s.author_key_id = t.author_key_id AND s.kind = t.kind
            UNION ALL
            SELECT 1, f.id, f.kind, f.value, f.text, f.author_key_id, f.created_at, f.updated_at FROM feedback f
            WHERE f.completion_id = t.completion_id AND f.exchange_at = t.exchange_at
              AND f.author_key_id = t.author_key_id AND f.kind = t.kind
        ) current ORDER BY o LIMIT 1
    ) r ON t.client_task IS NULL
    ORDER BY e.i;
END $$;
