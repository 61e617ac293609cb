"""Exchanges written in groups (service/recording.py): concurrent ones share a transaction, each
is whole (request and choices), a repeat is no error, and one the database refuses fails alone."""
import asyncio

import psycopg
import pytest

from schemas.errors import DomainError
from schemas.records import CompletionRecord, ExchangeCreate
from service.recording import Recorder, Spool
from store.db import Database


def exchange(i: int, version: int = 1, n: int = 2) -> ExchangeCreate:
    return ExchangeCreate(
        response_id=f"chatcmpl-rec-{i}", api_key_id=1, user=None, messages=[{"role": "user", "content": f"q{i}"}],
        params={"n": n}, model_version_id=version, stream=False, batch_rows=n, prompt_tokens=3, queue_ms=0.0,
        first_token_ms=1.0, total_ms=2.0,
        choices=[CompletionRecord(choice_index=k, text=f"a{i}.{k}", finish_reason="stop", completion_tokens=2,
                                  model_version_id=version, tool_calls=[{"id": "c"}] if k else None)
                 for k in range(n)])


@pytest.fixture
def url(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO api_keys (key_hash, prefix, name, role) VALUES ('h', 'p', 'rec', 'user')")
        conn.execute("INSERT INTO model_versions (kind, path, content_hash, status) VALUES ('policy', '/r', '0', 'active')")
    return db_url


def run(url, tmp_path, records: list[ExchangeCreate]):
    async def main():
        db = Database(url, min_size=1, max_size=4)
        await db.open(timeout=30)
        try:
            recorder = Recorder(db, Spool(tmp_path / "spool", 10))
            results = await asyncio.gather(*(recorder.groups(r) for r in records), return_exceptions=True)
            return recorder.groups, results
        finally:
            await db.close()
    return asyncio.run(main())


def written(url) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT r.response_id, c.choice_index, c.text, c.tool_calls IS NOT NULL FROM chat_requests r "
                            "JOIN completions c ON c.request_id = r.id ORDER BY r.response_id, c.choice_index").fetchall()
    out = {}
    for rid, *choice in rows:
        out.setdefault(rid, []).append(tuple(choice))
    return out


def test_concurrent_exchanges_share_transactions_and_each_is_whole(url, tmp_path):
    groups, results = run(url, tmp_path, [exchange(i) for i in range(24)])
    assert results == [None] * 24
    assert groups.items == 24 and groups.batches < 24  # grouped
    rows = written(url)
    assert len(rows) == 24
    assert all(rows[f"chatcmpl-rec-{i}"] == [(0, f"a{i}.0", False), (1, f"a{i}.1", True)] for i in range(24))


def test_a_repeat_in_a_group_is_no_error_and_is_written_once(url, tmp_path):
    run(url, tmp_path, [exchange(3)])
    assert run(url, tmp_path, [exchange(3)])[1] == [None]  # alone (a spooled one drained twice, say)
    groups, results = run(url, tmp_path, [exchange(i) for i in range(8)])
    assert results == [None] * 8
    rows = written(url)
    assert sorted(rows) == sorted(f"chatcmpl-rec-{i}" for i in range(8)) and len(rows["chatcmpl-rec-3"]) == 2


def test_an_exchange_the_database_refuses_fails_alone(url, tmp_path):
    records = [exchange(i) for i in range(8)]
    records[5] = exchange(5, version=999)  # no such version: a foreign key refuses it
    groups, results = run(url, tmp_path, records)
    assert isinstance(results[5], DomainError)
    assert results[:5] + results[6:] == [None] * 7
    assert sorted(written(url)) == sorted(f"chatcmpl-rec-{i}" for i in range(8) if i != 5)
