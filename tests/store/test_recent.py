"""PPO's prompts: what users asked lately, each prompt once, newest first, read from the newest
requests only (the history's length costs nothing)."""
import asyncio

import psycopg

from schemas.records import CompletionRecord
from store import exchanges, keys, registry


async def record(url: str, prompts: list[str]) -> list[list[dict]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        key = (await keys.create_api_key(conn, name="u", role="user")).id
        version = (await registry.insert_model_version(conn, kind="policy", path="/nowhere", content_hash="0",
                                                       status="archived")).id
        for i, prompt in enumerate(prompts):
            await exchanges.record_exchange(
                conn, response_id=f"chatcmpl-{i}", api_key_id=key, user=None,
                messages=[{"role": "user", "content": prompt}], params={}, model_version_id=version,
                stream=False, batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None, total_ms=0,
                choices=[CompletionRecord(choice_index=0, text="a", finish_reason="stop", completion_tokens=1,
                                          model_version_id=version)])
        return [await exchanges.recent_conversations(conn, limit=n) for n in (2, 10)]


def test_recent_conversations_are_distinct_and_newest_first(db_url):
    two, all_of_them = asyncio.run(record(db_url, ["a", "b", "a", "c", "b", "b"]))
    assert [c[0]["content"] for c in two] == ["b", "c"]
    assert [c[0]["content"] for c in all_of_them] == ["b", "c", "a"]
