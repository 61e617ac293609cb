"""Feedback written in groups (service/feedback_writer.py) on a real database: each event gets its
own answer, committed when it is given; an event at fault fails alone and writes nothing; no event
is written twice."""
import asyncio

import psycopg

from schemas.errors import Invalid, NotFound
from schemas.records import CompletionRecord, FeedbackCreate
from service.feedback_writer import FeedbackWriter
from store import exchanges, keys, registry
from store.db import Database
from store.feedback import FeedbackEvent

ANSWERS = 8


async def seed(conn) -> tuple[int, int]:
    """Two user keys; ANSWERS one-choice exchanges `chatcmpl-0..` of the first."""
    alice = (await keys.create_api_key(conn, name="alice", role="user")).id
    bob = (await keys.create_api_key(conn, name="bob", role="user")).id
    version = (await registry.insert_model_version(conn, kind="policy", path="/nowhere", content_hash="0",
                                                   status="archived")).id
    for i in range(ANSWERS):
        await exchanges.record_exchange(
            conn, response_id=f"chatcmpl-{i}", api_key_id=alice, user=None,
            messages=[{"role": "user", "content": "Hi"}], params={}, model_version_id=version, stream=False,
            batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None, total_ms=0,
            choices=[CompletionRecord(choice_index=0, text=f"answer {i}", finish_reason="stop", completion_tokens=1,
                                      model_version_id=version)])
    return alice, bob


def thumbs(i: int, author: int, value: int = 1, owner: int | None = -1) -> FeedbackEvent:
    body = FeedbackCreate(response_id=f"chatcmpl-{i}", choice_index=0, kind="thumbs", value=value)
    return FeedbackEvent(body, author, author if owner == -1 else owner)


def in_groups(url: str, make_events, check) -> None:
    """Every event of `make_events(alice, bob)` handed to one writer at once (one lane: the first
    is written alone, the rest as one group), then `check(results, conn, writer)`."""
    async def go():
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            alice, bob = await seed(conn)
        db = Database(url, min_size=1, max_size=4)
        await db.open()
        try:
            writer = FeedbackWriter(db, lanes=1)
            events = make_events(alice, bob)
            results = await asyncio.gather(*(writer(e) for e in events), return_exceptions=True)
            with psycopg.connect(url) as conn:
                check(results, conn, writer)
        finally:
            await db.close()
    asyncio.run(go())


def rows(conn) -> list[tuple]:
    return conn.execute("SELECT rq.response_id, f.author_key_id, f.value FROM feedback f"
                        " JOIN completions c ON c.id = f.completion_id JOIN chat_requests rq ON rq.id = c.request_id"
                        " ORDER BY rq.response_id").fetchall()


def test_a_group_commits_every_event_and_answers_each_with_its_own_row(db_url):
    def check(results, conn, writer):
        assert writer.groups.batches == 2 and writer.groups.items == ANSWERS  # one alone, then one group
        assert [(r.response_id, r.value) for r in results] == [(f"chatcmpl-{i}", (-1) ** i) for i in range(ANSWERS)]
        assert len({r.id for r in results}) == ANSWERS
        assert rows(conn) == [(f"chatcmpl-{i}", results[0].author_key_id, (-1) ** i) for i in range(ANSWERS)]
    in_groups(db_url, lambda alice, bob: [thumbs(i, alice, (-1) ** i) for i in range(ANSWERS)], check)


def test_events_that_may_not_be_judged_fail_alone_and_write_nothing(db_url):
    def events(alice, bob):
        return [thumbs(0, alice), thumbs(1, alice), thumbs(2, bob),  # bob's key did not produce chatcmpl-2
                FeedbackEvent(FeedbackCreate(response_id="chatcmpl-nope", choice_index=0, kind="thumbs", value=1),
                              alice, alice),
                thumbs(3, alice, -1), thumbs(4, bob, owner=None)]  # an operator (owner None) may judge any

    def check(results, conn, writer):
        assert writer.groups.batches == 2
        assert [type(r).__name__ for r in results] == ["FeedbackPublic", "FeedbackPublic", "NotFound", "NotFound",
                                                       "FeedbackPublic", "FeedbackPublic"]
        assert isinstance(results[2], NotFound) and "chatcmpl-2" in str(results[2])
        assert [(rid, v) for rid, _, v in rows(conn)] == [("chatcmpl-0", 1), ("chatcmpl-1", 1), ("chatcmpl-3", -1),
                                                          ("chatcmpl-4", 1)]
    in_groups(db_url, events, check)


def test_a_value_the_database_refuses_fails_that_event_alone_and_nothing_is_written_twice(db_url):
    def events(alice, bob):
        # past the validation a request gets: the database refuses it, failing the group's transaction
        refused = FeedbackCreate.model_construct(response_id="chatcmpl-2", choice_index=0, kind="rating",
                                                 value=10 ** 12, text=None)
        return [thumbs(0, alice), thumbs(1, alice), FeedbackEvent(refused, alice, alice), thumbs(3, alice)]

    def check(results, conn, writer):
        assert [type(r).__name__ for r in results] == ["FeedbackPublic", "FeedbackPublic", "Invalid",
                                                       "FeedbackPublic"]
        assert isinstance(results[2], Invalid)
        assert [rid for rid, _, _ in rows(conn)] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-3"]
        # each written event drew one event id: the failed group's attempt left none behind
        drawn = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM feedback").fetchone()
        assert drawn == (3, 3)
    in_groups(db_url, events, check)


def test_two_events_on_one_row_in_a_group_are_written_in_order_each_answered_with_its_own_write(db_url):
    def events(alice, bob):
        return [thumbs(0, alice), thumbs(1, alice, 1), thumbs(1, alice, -1), thumbs(1, alice, -1), thumbs(2, alice)]

    def check(results, conn, writer):
        assert [r.value for r in results] == [1, 1, -1, -1, 1]
        assert results[1].id == results[2].id == results[3].id
        assert results[3].updated_at == results[2].updated_at  # the same value again changed nothing
        assert [(rid, v) for rid, _, v in rows(conn)] == [("chatcmpl-0", 1), ("chatcmpl-1", -1), ("chatcmpl-2", 1)]
    in_groups(db_url, events, check)
