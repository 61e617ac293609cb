"""The queries on the hot paths (chat, feedback, stats) and a round's reads use indexes, not a
scan of a big table, on a database seeded with hundreds of thousands of exchanges over half a
year (six month partitions of each exchange table, migration 013): their cost stays flat as the
record grows. Postgres plans each named query (EXPLAIN, not run) with realistic parameters after
ANALYZE. A query that is given its exchange's time reads one month's partition of each table."""
import json
import re

import psycopg
import pytest

from store.derive import RATING_SCALE
from store.sql import Q

REQUESTS = 200_000  # enough rows that the planner prefers an index wherever one serves
BIG = {"chat_requests", "completions", "feedback", "rankings", "preferences", "training_pairs", "judged_answers"}

SPREAD = 80  # seconds between seeded requests: 200k of them span six months
SEED = f"""
SELECT ensure_exchange_partitions(since => now() - make_interval(secs => {REQUESTS * SPREAD}));
INSERT INTO api_keys (key_hash, prefix, name, role) VALUES ('h', 'p', 'seed', 'user');
INSERT INTO model_versions (kind, path, content_hash, status) VALUES ('policy', '/seed', '0', 'archived');
-- counters and foreign keys are triggers: off while seeding, since plans are what is checked here
SET session_replication_role = replica;
INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id, stream,
                           batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT 'chatcmpl-' || g, 1, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'q' || g % 50000)),
       md5((g % 50000)::text), '{{}}', 1, false, 1, 1, 1, 0, 0,
       now() - make_interval(secs => ({REQUESTS} - g) * {SPREAD})
FROM generate_series(1, {REQUESTS}) g;
INSERT INTO completions (id, request_id, request_created_at, choice_index, text, finish_reason, completion_tokens,
                         model_version_id)
SELECT 2 * rq.id - 1 + i, rq.id, rq.created_at, i, 'answer ' || (rq.id + i) % 7, 'stop', 1, 1
FROM chat_requests rq, generate_series(0, 1) i;
INSERT INTO feedback (completion_id, exchange_at, author_key_id, kind, value)
SELECT c.id, c.request_created_at, 1, CASE WHEN c.id % 4 < 2 THEN 'thumbs' ELSE 'rating' END,
       CASE WHEN c.id % 4 = 0 THEN 1 WHEN c.id % 4 = 1 THEN -1 ELSE 1 + c.id % 7 END
FROM completions c WHERE c.id % 3 = 1;
INSERT INTO rankings (request_id, exchange_at, author_key_id, ordering)
SELECT id, created_at, 1, '[1, 0]' FROM chat_requests;
INSERT INTO preferences (source, author_key_id, chosen_completion_id, chosen_at, rejected_completion_id,
                         rejected_at, strength)
SELECT 'pairwise', 1, 2 * rq.id - 1, rq.created_at, 2 * rq.id, rq.created_at, 1
FROM chat_requests rq WHERE rq.id % 4 = 1;
SET session_replication_role = origin;
"""

AT77 = "at77"  # request 77's time (completions 153 and 154), set once seeded
# name -> parameters: what serving a chat, taking feedback, showing stats and a round run
ONLINE = {
    "insert_exchange": dict(response_id="chatcmpl-new", api_key_id=1, user_field=None, messages="[]",
                            prompt_hash="h", params="{}", model_version_id=1, stream=False, batch_rows=1,
                            prompt_tokens=1, completion_tokens=1, queue_ms=0, first_token_ms=None,
                            total_ms=0, client_ref=None, client_chat_id=None, client_task=None,
                            choice_index=[0], text=["t"], finish_reason=["stop"], choice_tokens=[1],
                            choice_version_id=[1], tool_calls=[None], logprobs=[None], created_at=None),
    "get_chat_request": dict(response_id="chatcmpl-77", at=None),
    "list_completions": dict(request_id=77, exchange_at=AT77),
    "find_completion": dict(response_id="chatcmpl-77", choice_index=0, owner=1, at=None, lock=1),
    "find_request": dict(response_id="chatcmpl-77", owner=1, lock=1, at=None),
    "record_feedback": dict(response_ids=["chatcmpl-77", "chatcmpl-78"], choice_indexes=[0, 1], owners=[1, None],
                            ats=[None, None], author_key_ids=[1, 1], kinds=["thumbs", "rating"], values=[1, 5],
                            texts=[None, None], lock=1),
    "get_feedback": dict(completion_id=153, exchange_at=AT77, author_key_id=1, kind="thumbs"),
    "upsert_ranking": dict(request_id=77, exchange_at=AT77, author_key_id=1, ordering="[0, 1]"),
    "get_ranking": dict(request_id=77, exchange_at=AT77, author_key_id=1),
    "upsert_preference": dict(author_key_id=1, chosen_id=153, chosen_at=AT77, rejected_id=154, rejected_at=AT77,
                              strength=1.0, margin=1.0),
    "get_preference": dict(author_key_id=1, chosen_id=153, rejected_id=154),
    "list_feedback_on_request": dict(request_id=77, exchange_at=AT77),
    "list_rankings_on_request": dict(request_id=77, exchange_at=AT77),
    "list_preferences_on_request": dict(request_id=77, exchange_at=AT77),
    "list_chat_requests": dict(limit=50, before_id=None, version_id=None),
    "last_event_id": {},
    "version_stats": {},
}
# given their exchange's time, these read one month's partition of each table (pruned when planned)
PRUNED = ["list_completions", "get_feedback", "get_ranking", "list_feedback_on_request", "list_rankings_on_request"]
# given the time a response id carries (schemas.openai.completion_id), these read one month too: when
# planned, or (a group's ids, joined) when run
TIMED = {"get_chat_request": dict(at=AT77), "find_request": dict(at=AT77), "find_completion": dict(at=AT77),
         "record_feedback": dict(ats=[AT77, AT77])}
# queries that call a PL/pgSQL function holding their statement (whose plan is the one checked)
IN_FUNCTION = {"record_feedback": "record_feedback_events"}
RECENT = dict(after="recent")  # a watermark near the end (set once seeded): a round's new rows
ROUND = {
    "count_stored_pairs": RECENT,
    "count_stored_pairs_by_version": RECENT,
    "count_demonstrations": dict(RECENT, upto=2**62),
    "forget_explicit_pairs": RECENT,
    "store_explicit_pairs": dict(RECENT, upto=2**62),
    "forget_ranking_pairs": RECENT,
    "store_ranking_pairs": dict(RECENT, upto=2**62),
    "note_judged_answers": RECENT,
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
        conn.execute("SET jit = off")  # as refresh_pairs does (Q["without_jit"], for its transaction)
        # the stored pairs as a round leaves them (prompts null: all), then statistics for the planner
        for name in ("store_explicit_pairs", "store_ranking_pairs"):
            conn.execute(Q[name], dict(after=0, upto=2**62))
        conn.execute(Q["note_judged_answers"], dict(after=0))
        conn.execute(Q["store_judged_pairs"], dict(prompts=None, upto=2**62, rating_scale=RATING_SCALE))
        conn.execute("ANALYZE")
        recent = conn.execute(Q["last_event_id"]).fetchone()[0] - 1000
        at77 = conn.execute("SELECT created_at FROM chat_requests WHERE id = 77").fetchone()[0]
    return url, {"recent": recent, AT77: at77}


def scanned(plan: dict) -> set[str]:
    """Every table read by a sequential scan anywhere in a plan (trees, CTEs, subplans)."""
    found = {plan["Relation Name"]} if plan.get("Node Type") == "Seq Scan" else set()
    for child in plan.get("Plans", []):
        found |= scanned(child)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ONLINE) + sorted(ROUND))
def test_no_sequential_scan_of_a_big_table(seeded, name):
    """A partition holding next to nothing (a month to come, a default) may be scanned: reading it
    costs nothing, and the planner rightly prefers that to an index of it."""
    plan = explain(seeded, name)
    url, _ = seeded
    with psycopg.connect(url) as conn:
        small = {r[0] for r in conn.execute("SELECT relname FROM pg_class WHERE relkind = 'r' AND reltuples < 1000")}
    assert not {parent(t) for t in scanned(plan) - small} & BIG, json.dumps(plan, indent=1)[:4000]


@pytest.mark.slow
@pytest.mark.parametrize("name", PRUNED)
def test_a_query_given_its_exchanges_time_reads_one_month(seeded, name):
    plan = explain(seeded, name)
    read = [t for t in relations(plan) if parent(t) != t]
    assert len(read) == len({parent(t) for t in read}), json.dumps(plan, indent=1)[:4000]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMED))
def test_a_lookup_by_a_timed_response_id_reads_one_month(seeded, name):
    plan = explain(seeded, name, TIMED[name], analyze=True)
    read = [t for t in relations(plan, ran=True) if parent(t) != t]
    assert read and len(read) == len({parent(t) for t in read}), json.dumps(plan, indent=1)[:4000]


def test_the_seeded_exchanges_span_months(seeded):
    url, _ = seeded
    with psycopg.connect(url) as conn:
        months = conn.execute("SELECT count(DISTINCT tableoid) FROM chat_requests").fetchone()[0]
    assert months >= 6


def explain(seeded, name: str, given: dict | None = None, *, analyze: bool = False) -> dict:
    """The plan of a named query, with its parameters in ONLINE or ROUND (`given` replacing some);
    `analyze`: run (and rolled back), with what each node did."""
    url, values = seeded
    def value(v):  # a placeholder's value once seeded, in a list too
        return [value(x) for x in v] if isinstance(v, list) else values.get(v, v) if isinstance(v, str) else v
    params = {k: value(v) for k, v in {**ONLINE.get(name, ROUND.get(name)), **(given or {})}.items()}
    with psycopg.connect(url) as conn:
        if name in IN_FUNCTION:
            plan = explain_inside(conn, name, params, analyze)
        else:
            plan = conn.execute(f"EXPLAIN (FORMAT JSON, ANALYZE {analyze}) " + Q[name], params).fetchone()[0]
        conn.rollback()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    return plan[0]["Plan"]


def explain_inside(conn, name: str, params: dict, analyze: bool) -> list:
    """The plan of the statement a PL/pgSQL function holds, as the function plans it: its text
    (the function's own source) prepared with the function's arguments as parameters, planned
    generic (the function's plan_cache_mode), and run with the values the named query passes."""
    function = IN_FUNCTION[name]
    source, arg_names, arg_types, config = conn.execute(
        "SELECT prosrc, proargnames[:pronargs], (SELECT array_agg(format_type(t, NULL) ORDER BY n)"
        " FROM unnest(proargtypes) WITH ORDINALITY a(t, n)), proconfig FROM pg_proc WHERE proname = %s",
        (function,)).fetchone()
    assert "plan_cache_mode=force_generic_plan" in config
    statement = re.search(r"RETURN QUERY(.*?);\s*END", source, re.S).group(1)
    for n, arg in enumerate(arg_names, 1):
        statement = re.sub(rf"\b{arg}\b", f"${n}", statement)
    conn.execute(f"PREPARE inside ({', '.join(arg_types)}) AS {statement}")
    conn.execute("SET plan_cache_mode = force_generic_plan")
    call = re.search(rf"{function}\((.*)\)", Q[name], re.S).group(1)  # the query's arguments, in order
    explained = psycopg.ClientCursor(conn)  # the values written into EXECUTE's arguments
    return explained.execute(f"EXPLAIN (FORMAT JSON, ANALYZE {analyze}) EXECUTE inside ({call})", params).fetchone()[0]


def parent(table: str) -> str:
    """The table a partition belongs to (`feedback_p2026_11`, `feedback_default`: `feedback`)."""
    return re.sub(r"_(p\d{4}_\d{2}|default)$", "", table)


def relations(plan: dict, *, ran: bool = False) -> list[str]:
    """Every table read anywhere in a plan, once per read (`ran`: that a run of it read)."""
    found = [plan["Relation Name"]] if "Relation Name" in plan and (not ran or plan["Actual Loops"]) else []
    for child in plan.get("Plans", []):
        found += relations(child, ran=ran)
    return found
