"""The remote engine against a real OpenAI-protocol server: another feedloop process. The front
replica owns protocol, recording and versions; the back one generates."""
import openai
import psycopg
import pytest

from tests.conftest import OPERATOR_KEY, Server, trained_answers


@pytest.fixture(scope="module")
def front(server, new_database, policy_path, tmp_path_factory):
    s = Server(new_database(), tmp_path_factory.mktemp("front"), FEEDLOOP_POLICY_PATH=policy_path,
               FEEDLOOP_ENGINE="remote", FEEDLOOP_REMOTE_URL=server.url, FEEDLOOP_REMOTE_MODEL="feedloop",
               FEEDLOOP_REMOTE_API_KEY=OPERATOR_KEY).start()
    yield s
    s.stop()


def test_remote_generation_is_served_and_recorded(front, server):
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.create_key(), max_retries=0)
    ask = dict(model="feedloop", messages=[{"role": "user", "content": "What is the capital of France?"}])
    r = client.chat.completions.create(temperature=0, **ask)
    assert r.choices[0].message.content in trained_answers("What is the capital of France?")
    assert r.system_fingerprint == "v1" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0

    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(temperature=0, stream=True, **ask) if c.choices)
    assert streamed == r.choices[0].message.content

    fanned = client.chat.completions.create(n=3, temperature=1.0, seed=7, max_tokens=12, **ask)
    assert [c.index for c in fanned.choices] == [0, 1, 2]
    again = client.chat.completions.create(n=3, temperature=1.0, seed=7, max_tokens=12, **ask)
    assert [c.message.content for c in again.choices] == [c.message.content for c in fanned.choices]

    with psycopg.connect(front.db_url) as conn:
        rows = conn.execute("SELECT c.text FROM chat_requests r JOIN completions c ON c.request_id = r.id"
                            " WHERE r.response_id = %s", (r.id,)).fetchall()
    assert rows == [(r.choices[0].message.content,)]
    with psycopg.connect(server.db_url) as conn:  # the back server saw the fan-out as 3 requests
        n = conn.execute("SELECT count(*) FROM chat_requests WHERE params->>'seed' IN ('7', '8', '9')").fetchone()[0]
    assert n == 6


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_what_a_remote_server_cannot_do_is_refused_by_name(front):
    """Tools, grammars and log-probabilities are the local decoding core's: through a remote engine
    a tool on auto is answered in text, and what needs the core is a 400 naming its parameter."""
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.create_key(), max_retries=0)
    ask = dict(model="feedloop", messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=8)
    plain = client.chat.completions.create(tools=[WEATHER], **ask)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason in ("stop", "length")
    refused = {"tool_choice": dict(tools=[WEATHER], tool_choice="required"),
               "response_format": dict(response_format={"type": "json_object"}),
               "logprobs": dict(logprobs=True)}
    for param, extra in refused.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**extra, **ask)
        assert e.value.param == param, (param, e.value.body)
