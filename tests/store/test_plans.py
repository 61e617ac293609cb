"""The queries on the hot paths (chat, feedback, stats) and a round's reads use indexes, not a
scan of a big table, on a database seeded with hundreds of thousands of exchanges: their cost
stays flat as the record grows. Postgres plans each named query (EXPLAIN, not run) with
realistic parameters after ANALYZE."""
import json

import psycopg
import pytest

from store.derive import RATING_SCALE
from store.sql import Q

REQUESTS = 200_000  # enough rows that the planner prefers an index wherever one serves
BIG = {"chat_requests", "completions", "feedback", "rankings", "preferences", "training_pairs"}

SEED = f"""
INSERT INTO api_keys (key_hash, prefix, name, role) VALUES ('h', 'p', 'seed', 'user');
INSERT INTO model_versions (kind, path, content_hash, status) VALUES ('policy', '/seed', '0', 'archived');
-- counters and foreign keys are triggers: off while seeding, since plans are what is checked here
SET session_replication_role = replica;
INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id, stream,
                           batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT 'chatcmpl-' || g, 1, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'q' || g % 50000)),
       md5((g % 50000)::text), '{{}}', 1, false, 1, 1, 1, 0, 0, now() - make_interval(secs => {REQUESTS} - g)
FROM generate_series(1, {REQUESTS}) g;
INSERT INTO completions (request_id, choice_index, text, finish_reason, completion_tokens, model_version_id)
SELECT g, i, 'answer ' || (g + i) % 7, 'stop', 1, 1 FROM generate_series(1, {REQUESTS}) g, generate_series(0, 1) i;
INSERT INTO feedback (completion_id, author_key_id, kind, value)
SELECT g, 1, CASE WHEN g % 4 < 2 THEN 'thumbs' ELSE 'rating' END,
       CASE WHEN g % 4 = 0 THEN 1 WHEN g % 4 = 1 THEN -1 ELSE 1 + g % 7 END
FROM generate_series(1, {2 * REQUESTS}, 3) g;
INSERT INTO rankings (request_id, author_key_id, ordering)
SELECT g, 1, '[1, 0]' FROM generate_series(1, {REQUESTS}) g;
INSERT INTO preferences (source, author_key_id, chosen_completion_id, rejected_completion_id, strength)
SELECT 'pairwise', 1, 2 * g - 1, 2 * g, 1 FROM generate_series(1, {REQUESTS}, 4) g;
SET session_replication_role = origin;
"""

# name -> parameters: what serving a chat, taking feedback, showing stats and a round run
ONLINE = {
    "insert_chat_request": dict(response_id="chatcmpl-new", api_key_id=1, user_field=None, messages="[]",
                                prompt_hash="h", params="{}", model_version_id=1, stream=False, batch_rows=1,
                                prompt_tokens=1, completion_tokens=1, queue_ms=0, first_token_ms=None,
                                total_ms=0, client_ref=None, client_chat_id=None, client_task=None),
    "insert_completion": dict(request_id=5, choice_index=0, text="t", finish_reason="stop", tool_calls=None, logprobs=None,
                              completion_tokens=1, model_version_id=1),
    "get_chat_request": dict(response_id="chatcmpl-77"),
    "list_completions": dict(request_id=77),
    "find_completion": dict(response_id="chatcmpl-77", choice_index=0, owner=1, lock=1),
    "find_request": dict(response_id="chatcmpl-77", owner=1, lock=1),
    "upsert_feedback": dict(completion_id=7, author_key_id=1, kind="thumbs", value=1, text=None),
    "get_feedback": dict(completion_id=7, author_key_id=1, kind="thumbs"),
    "upsert_ranking": dict(request_id=77, author_key_id=1, ordering="[0, 1]"),
    "get_ranking": dict(request_id=77, author_key_id=1),
    "upsert_preference": dict(author_key_id=1, chosen_id=7, rejected_id=8, strength=1.0, margin=1.0),
    "get_preference": dict(author_key_id=1, chosen_id=7, rejected_id=8),
    "list_feedback_on_request": dict(request_id=77),
    "list_rankings_on_request": dict(request_id=77),
    "list_preferences_on_request": dict(request_id=77),
    "list_chat_requests": dict(limit=50, before_id=None, version_id=None),
    "last_event_id": {},
    "version_stats": {},
}
RECENT = dict(after="recent")  # a watermark near the end (set once seeded): a round's new rows
ROUND = {
    "count_stored_pairs": RECENT,
    "count_stored_pairs_by_version": RECENT,
    "count_demonstrations": dict(RECENT, upto=2**62),
    "forget_explicit_pairs": RECENT,
    "store_explicit_pairs": dict(RECENT, upto=2**62),
    "forget_ranking_pairs": RECENT,
    "store_ranking_pairs": dict(RECENT, upto=2**62),
    "touched_prompts": RECENT,
    "forget_judged_pairs": dict(prompts=["a", "b"]),
    "store_judged_pairs": dict(prompts=["a", "b"], upto=2**62, rating_scale=RATING_SCALE),
    "stored_pairs": RECENT,
    "pair_window": dict(upto=2**62, limit=1000, since=None),
    "derive_demonstrations": dict(RECENT, upto=2**62),
    "recent_conversations": dict(limit=256, scan=5120),
    "find_client_exchange": dict(client_ref="owui-message-1"),
    "count_new_events": dict(RECENT, upto=2**62),
}


@pytest.fixture(scope="module")
def seeded(new_database):
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED)
        # the stored pairs as a round leaves them (prompts null: all), then statistics for the planner
        for name in ("store_explicit_pairs", "store_ranking_pairs"):
            conn.execute(Q[name], dict(after=0, upto=2**62))
        conn.execute(Q["store_judged_pairs"], dict(prompts=None, upto=2**62, rating_scale=RATING_SCALE))
        conn.execute("ANALYZE")
        recent = conn.execute(Q["last_event_id"]).fetchone()[0] - 1000
    return url, recent


def scanned(plan: dict) -> set[str]:
    """Every table read by a sequential scan anywhere in a plan (trees, CTEs, subplans)."""
    found = {plan["Relation Name"]} if plan.get("Node Type") == "Seq Scan" else set()
    for child in plan.get("Plans", []):
        found |= scanned(child)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ONLINE) + sorted(ROUND))
def test_no_sequential_scan_of_a_big_table(seeded, name):
    url, recent = seeded
    params = {k: recent if v == "recent" else v for k, v in ONLINE.get(name, ROUND.get(name)).items()}
    with psycopg.connect(url) as conn:
        plan = conn.execute("EXPLAIN (FORMAT JSON) " + Q[name], params).fetchone()[0]
        conn.rollback()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    assert not scanned(plan[0]["Plan"]) & BIG, json.dumps(plan, indent=1)[:4000]
