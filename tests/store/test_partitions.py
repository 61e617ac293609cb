"""The exchange tables partitioned by month (migration 013): rows go to their exchange's month,
a time no month was made for goes to the default partition instead of failing, a chat's write
reads no other month than its own (an id without its time aside), retention drops
only whole old months (and what points into them) leaving the rest working, and the migration
carries every existing row over."""
import asyncio
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from schemas.errors import Conflict
from schemas.openai import completion_id
from schemas.records import CompletionRecord, FeedbackCreate, PreferenceCreate, RankingCreate
from store import derive, exchanges, feedback, keys, partitions, registry
from store.db import migrate, migrations

NOW = datetime.now(timezone.utc)
OLD = NOW - timedelta(days=150)  # five months ago: a month a 60-day retention drops


def month(t: datetime) -> str:
    return t.strftime("%Y_%m")


class Store:
    """One connection and an event loop, for the store's async functions."""

    def __init__(self, url: str):
        self.url, self.loop, self.ids = url, asyncio.new_event_loop(), {}
        self.conn = self.run(psycopg.AsyncConnection.connect(url, autocommit=True))
        self.key = self.run(keys.create_api_key(self.conn, name="a", role="user")).id
        self.version = self.run(registry.insert_model_version(self.conn, kind="policy", path="/nowhere",
                                                              content_hash="0", status="archived")).id

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def sql(self, query: str, *params) -> list[tuple]:
        async def go():
            cur = await self.conn.execute(query, params or None)
            return await cur.fetchall() if cur.description else []
        return self.run(go())

    def id(self, rid: str) -> str:
        """The response id a test's name for an exchange stands for."""
        return self.ids.get(rid, rid)

    def exchange(self, rid: str, prompt: str, texts: list[str], at: datetime | None = None) -> None:
        """Record an exchange through the store; `at`: as if made then (its response id carries
        that time, which is the partition key, so the rows are written with it, never moved)."""
        if at is not None:
            self.ids[rid] = completion_id(at_ms=int(at.timestamp() * 1000))

        async def go():
            async with self.conn.transaction():
                await exchanges.record_exchange(
                    self.conn, response_id=self.id(rid), api_key_id=self.key, user=None,
                    messages=[{"role": "user", "content": prompt}], params={}, model_version_id=self.version,
                    stream=False, batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None, total_ms=0,
                    choices=[CompletionRecord(choice_index=i, text=t, finish_reason="stop", completion_tokens=1,
                                              model_version_id=self.version) for i, t in enumerate(texts)])
        self.run(go())

    def thumbs(self, rid: str, i: int, value: int) -> None:
        async def go():
            async with self.conn.transaction():
                await feedback.record_feedback(self.conn, feedback=FeedbackCreate(
                    response_id=self.id(rid), choice_index=i, kind="thumbs", value=value), author_key_id=self.key,
                    owned_by=None)
        self.run(go())

    def prefer(self, chosen: tuple[str, int], rejected: tuple[str, int]) -> None:
        async def go():
            async with self.conn.transaction():
                await feedback.record_preference(self.conn, preference=PreferenceCreate(
                    chosen={"response_id": self.id(chosen[0]), "choice_index": chosen[1]},
                    rejected={"response_id": self.id(rejected[0]), "choice_index": rejected[1]}, strength=1.0),
                    author_key_id=self.key, owned_by=None)
        self.run(go())

    def rank(self, rid: str, order: list) -> None:
        async def go():
            async with self.conn.transaction():
                await feedback.record_ranking(self.conn, ranking=RankingCreate(response_id=self.id(rid), order=order),
                                              author_key_id=self.key, owned_by=None)
        self.run(go())

    def where(self, table: str) -> dict[str, int]:
        """Partition name -> rows of `table` in it."""
        return dict(self.sql(f"SELECT tableoid::regclass::text, count(*) FROM {table} GROUP BY 1"))

    def pair_keys(self, full: bool = False) -> list[str]:
        async def go():
            if full:
                return sorted(p.group + str(p.origin.get("choices", "")) + p.chosen
                              for p in await derive.derive_pairs_in_full(self.conn))
            return sorted(p.group + str(p.origin.get("choices", "")) + p.chosen
                          for p in await derive.derive_pairs(self.conn, after=0))
        return self.run(go())


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.run(s.conn.close())
    s.loop.close()


def test_rows_go_to_their_exchanges_month(store):
    store.exchange("chatcmpl-now", "Hi", ["a", "b"])
    store.thumbs("chatcmpl-now", 0, 1)
    store.rank("chatcmpl-now", [1, 0])
    for table in ("chat_requests", "completions", "feedback", "rankings"):
        assert list(store.where(table)) == [f"{table}_p{month(NOW)}"], table
    made = {r["partition"] for r in store.run(partitions.list_partitions(store.conn))}
    ahead = NOW + timedelta(days=62)  # the months ahead were made too, and the defaults
    assert {f"chat_requests_p{month(ahead)}", "chat_requests_default", "feedback_default"} <= made


def test_a_time_no_month_was_made_for_is_written_to_the_default(store):
    for rid, at in (("chatcmpl-past", datetime(1999, 1, 1, tzinfo=timezone.utc)),
                    ("chatcmpl-future", datetime(2999, 1, 1, tzinfo=timezone.utc))):
        store.exchange(rid, "Hi", ["a", "b"], at=at)
        store.thumbs(rid, 1, -1)
        store.thumbs(rid, 0, 1)
        store.prefer((rid, 0), (rid, 1))
    for table in ("chat_requests", "completions", "feedback"):
        assert list(store.where(table)) == [f"{table}_default"], table
    assert store.pair_keys() == store.pair_keys(full=True) and len(store.pair_keys()) == 6  # one prompt: across both
    # making partitions for a month the default holds rows of leaves that month to the default
    with psycopg.connect(store.url, autocommit=True) as conn:
        conn.execute("SELECT ensure_exchange_partitions(since => '1999-01-01', upto => '1999-01-02')")
    assert list(store.where("chat_requests")) == ["chat_requests_default"]


def test_a_response_id_is_recorded_once_across_months(store):
    """Uniqueness within a partition is all Postgres gives; the spool relies on a second recording
    of an exchange being refused (service/recording.py), whatever month the first went to. An id
    that carries its time (schemas.openai.completion_id) always goes to that time's month; one
    that does not (recorded before ids did, or a client's) goes to the month it is recorded in."""
    store.exchange("chatcmpl-once", "Hi", ["a"], at=OLD)
    with pytest.raises(Conflict) as e:
        store.exchange("chatcmpl-once", "Hi", ["a"])
    assert e.value.code == "already_exists"
    store.exchange("chatcmpl-untimed", "Hi", ["a"])
    with pytest.raises(psycopg.errors.UniqueViolation):  # the same id in another month: refused too
        store.sql("INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id,"
                  " stream, batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)"
                  " VALUES ('chatcmpl-untimed', %s, '[]', 'h', '{}', %s, false, 1, 1, 1, 0, 0, %s)",
                  store.key, store.version, OLD)
    with pytest.raises(psycopg.errors.CheckViolation, match="recorded at that time"):  # a timed id elsewhere
        store.sql("INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id,"
                  " stream, batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)"
                  " VALUES (%s, %s, '[]', 'h', '{}', %s, false, 1, 1, 1, 0, 0, now())",
                  store.id("chatcmpl-once"), store.key, store.version)
    assert store.sql("SELECT count(*) FROM chat_requests") == [(2,)]
    # the timed one in its old month (no partition was made for it here: the default), the other now
    assert store.where("chat_requests") == {"chat_requests_default": 1, f"chat_requests_p{month(NOW)}": 1}


def test_a_chat_reads_no_other_month(store):
    """Its response id carries its time, so that the write needs no probe of every month's index
    for the id (migration 019): a chat's cost does not grow with the months kept."""
    store.exchange("chatcmpl-old", "Hi", ["a"], at=OLD)  # a month other than this one: the default here

    def default_pages() -> int:
        store.sql("SELECT pg_stat_force_next_flush()")
        return store.sql("SELECT heap_blks_hit + heap_blks_read + idx_blks_hit + idx_blks_read"
                         " FROM pg_statio_user_tables WHERE relname = 'chat_requests_default'")[0][0]

    before = default_pages()
    store.exchange("chatcmpl-new", "Hi", ["a"], at=NOW)
    assert default_pages() == before
    store.exchange("chatcmpl-untimed", "Hi", ["a"])  # an id without its time still probes every month
    assert default_pages() > before


def stats(store) -> dict:
    got = store.run(derive.feedback_stats(store.conn))
    return {v.model_version_id: (v.requests, v.completions, v.feedback["thumbs"], v.feedback["preference"])
            for v in got.data}


def test_retention_drops_old_months_and_what_points_into_them(store):
    with psycopg.connect(store.url, autocommit=True) as conn:  # months back to OLD, as if running since then
        conn.execute("SELECT ensure_exchange_partitions(since => %s)", (OLD,))
    store.exchange("chatcmpl-old", "Joke?", ["x", "y"], at=OLD)
    store.exchange("chatcmpl-new", "Joke?", ["z", "w"])
    store.exchange("chatcmpl-new2", "Joke?", ["v"])
    store.thumbs("chatcmpl-old", 0, 1)
    store.thumbs("chatcmpl-new", 0, -1)   # pairs with the old one's up: goes with the old month
    store.thumbs("chatcmpl-new2", 0, 1)   # pairs with the new one's down: stays
    store.prefer(("chatcmpl-old", 1), ("chatcmpl-new", 1))
    store.prefer(("chatcmpl-new", 1), ("chatcmpl-new", 0))
    store.rank("chatcmpl-old", [0, 1])
    store.pair_keys()  # rolls the stored pairs forward
    before, counted = store.where("chat_requests"), stats(store)
    assert f"chat_requests_p{month(OLD)}" in before

    dropped = store.run(partitions.expire(store.conn, retention_days=60))
    assert month(OLD) in dropped and month(NOW) not in dropped
    for table in ("chat_requests", "completions", "feedback", "rankings"):
        names = {r["partition"] for r in store.run(partitions.list_partitions(store.conn)) if r["table"] == table}
        assert f"{table}_p{month(OLD)}" not in names and f"{table}_p{month(NOW)}" in names
        assert f"{table}_default" in names
    assert store.sql("SELECT response_id FROM chat_requests ORDER BY 1") == [("chatcmpl-new",), ("chatcmpl-new2",)]
    assert store.sql("SELECT count(*) FROM preferences") == [(1,)]
    # no stored pair names a completion that is gone, and they are what the full derivation gives now
    assert store.sql("SELECT count(*) FROM training_pairs tp WHERE NOT EXISTS"
                     " (SELECT 1 FROM completions c WHERE c.id = tp.chosen_completion_id)") == [(0,)]
    assert store.sql("SELECT count(*) FROM judged_answers j WHERE NOT EXISTS"  # nor a judged answer
                     " (SELECT 1 FROM completions c WHERE c.id = j.completion_id)") == [(0,)]
    assert store.sql("SELECT count(*) FROM judged_answers") == [(2,)]  # chatcmpl-new's and -new2's
    assert store.pair_keys() == store.pair_keys(full=True) and len(store.pair_keys()) == 2
    assert stats(store) == counted  # lifetime counters: what each version served, ever
    # and everything goes on: new feedback, derivation, exports, a second run that drops nothing
    store.thumbs("chatcmpl-new", 1, 1)
    assert store.pair_keys() == store.pair_keys(full=True) and len(store.pair_keys()) == 3

    async def export():
        return [r async for r in derive.export_rows(store.conn, format="preference")]
    assert len(store.run(export())) == 3
    assert store.run(partitions.expire(store.conn, retention_days=60)) == []


# --- the migration, on a database with rows --------------------------------------------------

OLD_SCHEMA_ROWS = """
INSERT INTO api_keys (key_hash, prefix, name, role) VALUES ('h', 'p', 'seed', 'user');
INSERT INTO model_versions (kind, path, content_hash, status) VALUES ('policy', '/seed', '0', 'archived');
INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id, stream,
                           batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT 'chatcmpl-' || g, 1, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'q' || g % 5)),
       md5((g % 5)::text), '{}', 1, false, 1, 1, 1, 0, 0, now() - make_interval(days => g)
FROM generate_series(1, 400) g;
INSERT INTO completions (request_id, choice_index, text, finish_reason, completion_tokens, model_version_id)
SELECT g, i, 'answer ' || (g + i) % 7, 'stop', 1, 1 FROM generate_series(1, 400) g, generate_series(0, 1) i;
INSERT INTO feedback (completion_id, author_key_id, kind, value)
SELECT g, 1, CASE WHEN g % 4 < 2 THEN 'thumbs' ELSE 'rating' END,
       CASE WHEN g % 4 = 0 THEN 1 WHEN g % 4 = 1 THEN -1 ELSE 1 + g % 7 END
FROM generate_series(1, 800, 3) g;
INSERT INTO rankings (request_id, author_key_id, ordering) SELECT g, 1, '[1, 0]' FROM generate_series(1, 400, 7) g;
INSERT INTO preferences (source, author_key_id, chosen_completion_id, rejected_completion_id, strength)
SELECT 'pairwise', 1, 2 * g - 1, 2 * g, 1 FROM generate_series(1, 400, 9) g;
"""
# the stored pairs as 012 left them: thumbs pairs, their watermark not yet moved
STORED_PAIRS = """
INSERT INTO training_pairs (pair_key, source, grp, event_id, judged_at, prompt_hash, chosen_completion_id,
                            rejected_completion_id, versions, margin, origin)
SELECT 'thumbs:' || chosen_id || '>' || rejected_id, 'thumbs', 'thumbs:' || chosen_id || '>' || rejected_id,
       event_id, judged_at, prompt_hash, chosen_id, rejected_id, '{1}', 0, '{}'
FROM thumbs_pairs_of(NULL, 1000000);
"""
TABLES = ("chat_requests", "completions", "feedback", "rankings", "preferences", "training_pairs", "version_stats")


def snapshot(conn) -> dict:
    """Every row of the tables the migration rebuilds or changes, as JSON without the new columns."""
    new = ("request_created_at", "exchange_at", "chosen_at", "rejected_at")
    out = {}
    for t in TABLES:
        rows = conn.execute(f"SELECT to_jsonb(x) FROM {t} x").fetchall()
        out[t] = sorted(str({k: v for k, v in r[0].items() if k not in new}) for r in rows)
    return out


def test_the_migration_carries_every_row_over(new_database):
    url = new_database()
    with psycopg.connect(url, autocommit=True) as conn:  # a database at 012, with a year of exchanges
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    migrate(url, below=13)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(OLD_SCHEMA_ROWS)
        conn.execute(STORED_PAIRS)
        before = snapshot(conn)
    assert migrate(url) == [n for n, _, _ in migrations() if n >= 13]
    with psycopg.connect(url, autocommit=True) as conn:
        assert snapshot(conn) == before
        for t, at in (("chat_requests", "created_at"), ("completions", "request_created_at"),
                      ("feedback", "exchange_at"), ("rankings", "exchange_at")):
            assert conn.execute(f"SELECT count(*) FROM {t} WHERE tableoid::regclass::text"
                                f" <> '{t}_p' || to_char({at} AT TIME ZONE 'UTC', 'YYYY_MM')").fetchone() == (0,), t
        assert conn.execute("SELECT count(*) FROM training_pairs WHERE chosen_at IS NULL OR rejected_at IS NULL"
                            " UNION ALL SELECT count(*) FROM preferences WHERE chosen_at IS NULL").fetchall() == [(0,), (0,)]
        # the sequences go on where they were
        assert conn.execute("SELECT nextval('chat_requests_id_seq'), nextval('feedback_id_seq')").fetchone() == (401, 268)
        # every judged answer is noted (migration 020), so re-judging an old prompt finds them all
        assert conn.execute("SELECT count(*) FROM judged_answers").fetchone() == (
            conn.execute("SELECT count(DISTINCT completion_id) FROM feedback WHERE kind IN ('thumbs', 'rating')").fetchone())
    store = Store(url)
    try:
        assert store.pair_keys() == store.pair_keys(full=True) and len(store.pair_keys()) > 50
        before = store.pair_keys()
        store.thumbs("chatcmpl-3", 0, -1)  # an old answer to prompt 3 % 5, whose other answers were judged
        assert store.pair_keys() == store.pair_keys(full=True) and len(store.pair_keys()) > len(before)
    finally:
        store.run(store.conn.close())
        store.loop.close()
