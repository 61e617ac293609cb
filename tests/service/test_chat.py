"""The chat API through the official openai client, against a real server and database."""
import asyncio
import json

import httpx
import openai
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import trained_answers


def ask(client, content="Hello!", **kw):
    return client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": content}], **kw)


def recorded(server, response_id):
    with psycopg.connect(server.db_url, row_factory=dict_row) as conn:
        req = conn.execute("SELECT * FROM chat_requests WHERE response_id = %s", (response_id,)).fetchone()
        rows = conn.execute("SELECT * FROM completions WHERE request_id = %s ORDER BY choice_index",
                            (req["id"],)).fetchall() if req else []
    return req, rows


def test_non_streamed_answer_is_recorded(server, openai_client):
    r = ask(openai_client, "What is the capital of France?", temperature=0, user="u-42")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.system_fingerprint == "v1"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content in trained_answers("What is the capital of France?")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    req, rows = recorded(server, r.id)
    assert req["model_version_id"] == 1 and req["user_field"] == "u-42" and not req["stream"]
    assert req["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert req["params"]["temperature"] == 0 and req["params"]["n"] == 1
    assert req["prompt_tokens"] == r.usage.prompt_tokens
    assert req["completion_tokens"] == r.usage.completion_tokens
    assert [(c["text"], c["finish_reason"], c["model_version_id"]) for c in rows] == \
        [(r.choices[0].message.content, "stop", 1)]


def test_trained_prompts_get_their_training_answers(openai_client):
    from schemas.bundled import bundled_demonstrations
    prompts = list(dict.fromkeys(d["prompt"] for d in bundled_demonstrations()))[:20]
    same = sum(ask(openai_client, p, temperature=0).choices[0].message.content in trained_answers(p)
               for p in prompts)
    assert same >= 18


def test_streamed_answer_matches_and_is_recorded(server, openai_client):
    stream = ask(openai_client, "Name three fruits.", stream=True, temperature=0,
                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    plain = ask(openai_client, "Name three fruits.", temperature=0).choices[0].message.content
    assert text == plain
    req, rows = recorded(server, chunks[0].id)
    assert req["stream"] and rows[0]["text"] == text and rows[0]["finish_reason"] == "stop"


def test_n_choices(server, openai_client):
    r = ask(openai_client, "Say something kind.", n=3, temperature=1.0, max_tokens=20)
    assert [c.index for c in r.choices] == [0, 1, 2]
    _, rows = recorded(server, r.id)
    assert [c["text"] for c in rows] == [c.message.content for c in r.choices]


def test_seed_reproduces_text(openai_client):
    kw = dict(temperature=1.5, top_p=0.95, max_tokens=30, seed=1234, n=2)
    a, b = ask(openai_client, "Tell me about the sun.", **kw), ask(openai_client, "Tell me about the sun.", **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    c = ask(openai_client, "Tell me about the sun.", **dict(kw, seed=99))
    assert [x.message.content for x in c.choices] != [x.message.content for x in a.choices]


def test_max_tokens_and_stop(server, openai_client):
    r = ask(openai_client, "Count from 1 to 5.", temperature=0, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2
    full = ask(openai_client, "What is the capital of France?", temperature=0).choices[0].message.content
    r = ask(openai_client, "What is the capital of France?", temperature=0, stop=["France"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[:full.index("France")]
    req, _ = recorded(server, r.id)
    assert req["params"]["stop"] == ["France"]


def test_models_lists_served_versions(openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == ["feedloop", "v1"]


def test_version_name_pins_the_version(openai_client):
    r = openai_client.chat.completions.create(model="v1", messages=[{"role": "user", "content": "Hi"}])
    assert r.system_fingerprint == "v1"


def test_concurrent_requests_are_batched(server, user_key):
    """16 clients at once: the worker must have run some of them in one batch."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)

    async def one(i):
        return await client.chat.completions.create(
            model="feedloop", messages=[{"role": "user", "content": f"What is {i} plus 2?"}], max_tokens=24)

    async def all_():
        return await asyncio.gather(*(one(i) for i in range(16)))

    ids = [r.id for r in asyncio.run(all_())]
    with psycopg.connect(server.db_url) as conn:
        sizes = [r[0] for r in conn.execute(
            "SELECT batch_rows FROM chat_requests WHERE response_id = ANY(%s)", (ids,))]
    assert len(sizes) == 16 and max(sizes) > 1


def test_client_leaving_mid_stream_is_recorded_as_cancelled(server, user_key):
    # A schema the answer cannot complete within max_tokens: it cannot end before the client leaves.
    long = {"type": "object", "properties": {"story": {"type": "string", "minLength": 3000}}, "required": ["story"]}
    body = {"model": "feedloop", "stream": True, "temperature": 2.0, "max_tokens": 400,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": long}}}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {user_key}"}) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = json.loads(next(l for l in lines if l.startswith("data: "))[6:])
            next(lines)
    for _ in range(100):  # recorded by a detached task once the engine stops the row
        req, rows = recorded(server, first["id"])
        if req:
            break
        import time; time.sleep(0.1)
    assert req and req["stream"]
    assert rows[0]["finish_reason"] == "cancelled" and rows[0]["completion_tokens"] < 400


def test_prompt_longer_than_context_is_refused(server, openai_client):
    with psycopg.connect(server.db_url) as conn:
        before = conn.execute("SELECT count(*) FROM chat_requests").fetchone()[0]
    with pytest.raises(openai.BadRequestError) as e:
        ask(openai_client, "hello " * 800)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with psycopg.connect(server.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM chat_requests").fetchone()[0] == before


def test_seed_gives_the_same_text_streamed_or_not(openai_client):
    kw = dict(temperature=1.3, top_p=0.9, max_tokens=30, seed=77, n=2)
    plain = [c.message.content for c in ask(openai_client, "Tell me about the moon.", **kw).choices]
    streamed = ["", ""]
    for chunk in ask(openai_client, "Tell me about the moon.", stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == plain
