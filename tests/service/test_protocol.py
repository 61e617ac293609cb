"""OpenAI's chat protocol as clients use it, through a real server and the official client:
null as unset, strict types, any content type, trailing slashes, CORS, model retrieval with the
context length, logprobs that match a forward pass, structured output, and tool calls."""
import json
import time

import httpx
import jsonschema
import openai
import psycopg
import pytest
import torch
from psycopg.rows import dict_row

from tests.conftest import OPERATOR_KEY, Server, register

CORS_ORIGIN = "https://app.example"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}},
                                       "required": ["utc"]}}}
ANSWER_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["capital", "sure"],
                 "properties": {"capital": {"enum": ["Paris", "Rome", "Berlin"]}, "sure": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def server(new_database, policy_path, tmp_path_factory):
    """This module's server allows one browser origin."""
    s = Server(new_database(), tmp_path_factory.mktemp("home"), FEEDLOOP_POLICY_PATH=policy_path,
               FEEDLOOP_CORS_ORIGINS=CORS_ORIGIN).start()
    yield s
    s.stop()


def ask(client, content="What is the capital of France?", **kw):
    return client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": content}], **kw)


def recorded_choices(server, response_id):
    with psycopg.connect(server.db_url, row_factory=dict_row) as conn:
        return conn.execute("SELECT c.* FROM completions c JOIN chat_requests r ON r.id = c.request_id "
                            "WHERE r.response_id = %s ORDER BY choice_index", (response_id,)).fetchall()


def body(**kw):
    return {"model": "feedloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, **kw}


# --- leniency and strictness ------------------------------------------------------------------

def test_null_means_unset(user):
    r = user.post("/v1/chat/completions", json=body(temperature=None, top_p=None, n=None, stream=None,
                                                    seed=None, stop=None, max_completion_tokens=None, user=None))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


@pytest.mark.parametrize("field,value", [("seed", True), ("temperature", True), ("n", False),
                                         ("stream", 1), ("max_tokens", "5"), ("logprobs", "yes")])
def test_booleans_and_strings_are_not_numbers(user, field, value):
    r = user.post("/v1/chat/completions", json=body(**{field: value}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_json_is_read_whatever_the_content_type(user):
    for kind in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {"content-type": kind} if kind else {}
        r = user.post("/v1/chat/completions", content=json.dumps(body()), headers=headers)
        assert r.status_code == 200, (kind, r.text)


def test_body_level_errors_name_no_parameter(user):
    for raw in ("[1, 2]", '"text"', "{broken"):
        r = user.post("/v1/chat/completions", content=raw, headers={"content-type": "text/plain"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] is None and "None" not in err["message"], r.text


def test_unsupported_parameters_are_refused(user):
    for field, value in [("logit_bias", {"50": 10}), ("frequency_penalty", 0.5), ("functions", [WEATHER["function"]]),
                         ("audio", {"voice": "alloy"})]:
        r = user.post("/v1/chat/completions", json=body(**{field: value}))
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and err["code"] == "unsupported_parameter", r.text
    assert user.post("/v1/chat/completions", json=body(frequency_penalty=0, logit_bias={})).status_code == 200


def test_trailing_slash(user):
    assert user.get("/v1/models/").status_code == 200
    r = user.post("/v1/chat/completions/", json=body())
    assert r.status_code == 200, r.text


def test_cors_for_the_configured_origin(server, user):
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == CORS_ORIGIN
    r = user.get("/v1/models", headers={"Origin": CORS_ORIGIN})
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    other = user.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default():
    from schemas.settings import Settings
    from service.app import create_app
    assert Settings().cors_origins is None
    assert not any(m.cls.__name__ == "CORSMiddleware" for m in create_app().user_middleware)


def test_models_have_their_context_length(openai_client):
    card = openai_client.models.retrieve("feedloop")
    assert card.id == "feedloop" and card.context_length == 512
    assert openai_client.models.retrieve("v1").context_length == 512
    assert {m.id: m.context_length for m in openai_client.models.list()} == {"feedloop": 512, "v1": 512}
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.models.retrieve("nope")
    assert e.value.code == "model_not_found"


def test_max_tokens_beyond_the_context_is_refused(openai_client):
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as e:
            ask(openai_client, **{field: 600})
        assert e.value.code == "context_length_exceeded" and e.value.param == field
    assert ask(openai_client, max_tokens=200).choices[0].finish_reason in ("stop", "length")


# --- logprobs -----------------------------------------------------------------------------------

def forward_logprobs(policy_path, conversation, ids, temperature):
    """log softmax(logits / T) of each answer token, by one full forward pass of prompt + answer."""
    from lm.chat import encode_prompt
    from lm.checkpoint import load_policy, load_tokenizer
    tokenizer, model = load_tokenizer(policy_path), load_policy(policy_path)
    prompt = encode_prompt(tokenizer, conversation)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_match_a_forward_pass_of_the_recorded_answer(server, openai_client, policy_path, stream):
    kw = dict(temperature=0.7, seed=5, max_tokens=24, logprobs=True, top_logprobs=3)
    if stream:
        chunks = list(ask(openai_client, "Tell me about the sun.", stream=True, **kw))
        rid, text = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        r = ask(openai_client, "Tell me about the sun.", **kw)
        rid, text, entries = r.id, r.choices[0].message.content, r.choices[0].logprobs.content
    (row,) = recorded_choices(server, rid)
    assert row["text"] == text and len(row["logprobs"]) == len(entries) == row["completion_tokens"]
    assert [e.logprob for e in entries] == pytest.approx([e["logprob"] for e in row["logprobs"]])
    for e in entries:
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.logprob <= e.top_logprobs[0].logprob + 1e-6
    ids = [e["id"] for e in row["logprobs"]]
    expected = forward_logprobs(policy_path, [{"role": "user", "content": "Tell me about the sun."}], ids, 0.7)
    assert [e["logprob"] for e in row["logprobs"]] == pytest.approx(expected.tolist(), abs=1e-3)


def test_greedy_logprobs_are_the_top_token(openai_client):
    r = ask(openai_client, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
    for e in r.choices[0].logprobs.content:
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob) and e.logprob <= 0


def test_logprobs_off_unless_asked(openai_client):
    assert ask(openai_client, max_tokens=5).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as e:
        ask(openai_client, max_tokens=5, top_logprobs=2)
    assert e.value.param == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        ask(openai_client, max_tokens=5, logprobs=True, top_logprobs=21)
    assert e.value.param == "top_logprobs"


# --- structured output ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_answers_parse_and_match(openai_client, seed):
    r = ask(openai_client, temperature=1.0, seed=seed, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER_SCHEMA)


def test_json_object_answer_parses(openai_client):
    r = ask(openai_client, "Reply in JSON.", temperature=0, max_tokens=120, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max_tokens: what there is is a JSON object's beginning
        assert r.choices[0].message.content.startswith("{")


def test_a_schema_that_cannot_be_enforced_is_refused(openai_client):
    with pytest.raises(openai.BadRequestError) as e:
        ask(openai_client, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
    assert e.value.param == "response_format"


# --- tools ----------------------------------------------------------------------------------------

def check_weather_call(call):
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_named_tool_call_then_the_follow_up_turn(server, openai_client):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    # one tool at a time: the bootstrap's context is 512 tokens, and a tool's schema takes ~130
    r = openai_client.chat.completions.create(model="feedloop", messages=question, tools=[WEATHER],
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    check_weather_call(choice.message.tool_calls[0])
    (row,) = recorded_choices(server, r.id)
    assert row["finish_reason"] == "tool_calls" and row["tool_calls"][0]["function"]["name"] == "get_weather"
    history = question + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "Sunny, 21C"}]
    follow = openai_client.chat.completions.create(model="feedloop", messages=history, tools=[WEATHER])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    if follow.choices[0].finish_reason != "tool_calls":
        assert follow.choices[0].message.content


def test_required_tool_call_streamed(openai_client):
    stream = openai_client.chat.completions.create(
        model="feedloop", messages=[{"role": "user", "content": "What time is it?"}], tools=[TIME],
        tool_choice="required", stream=True, temperature=1.0, seed=3)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"] and len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == "get_time" and calls[0].id and calls[0].type == "function"
    assert isinstance(json.loads(calls[0].function.arguments)["utc"], bool)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_tool_choice_errors(openai_client):
    for choice, tools in [({"type": "function", "function": {"name": "nope"}}, [WEATHER]), ("required", None)]:
        with pytest.raises(openai.BadRequestError) as e:
            openai_client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}],
                                                  tools=tools or openai.omit, tool_choice=choice)
        assert e.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="feedloop", messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}])
    assert e.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.fixture(scope="module")
def toolless(server, policy_path, tmp_path_factory):
    """v2: the bootstrap with a chat template that does not render tools, served as a canary."""
    from lm.checkpoint import load_policy, load_tokenizer, save_pretrained
    tokenizer = load_tokenizer(policy_path)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    out = tmp_path_factory.mktemp("toolless") / "policy"
    save_pretrained(load_policy(policy_path), tokenizer, out, kind="policy", config={"test": "toolless"})
    register(server.db_url, out, status="canary")
    with server.client(OPERATOR_KEY) as c:
        deadline = time.time() + 60
        while "v2" not in [m["id"] for m in c.get("/v1/models").json()["data"]]:
            assert time.time() < deadline, "v2 never served"
            time.sleep(0.3)
    return "v2"


def test_a_model_that_cannot_call_tools(openai_client, toolless):
    plain = openai_client.chat.completions.create(model=toolless, messages=[{"role": "user", "content": "Hi"}],
                                                  tools=[WEATHER], max_tokens=10)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model=toolless, messages=[{"role": "user", "content": "Hi"}],
                                              tools=[WEATHER], tool_choice="required")
    assert e.value.param == "tool_choice" and e.value.code == "tools_unsupported"


def test_tools_that_do_not_fit_the_context_are_answered_in_text_on_auto(server, openai_client):
    """Chat UIs (Open WebUI) attach dozens of tools to every turn: on auto a model whose context
    cannot hold them answers in text, and says so; a required call is refused, never answered without."""
    many = [{"type": "function", "function": dict(WEATHER["function"], name=f"get_weather_{i}")} for i in range(40)]
    raw = openai_client.chat.completions.with_raw_response.create(
        model="feedloop", messages=[{"role": "user", "content": "Hi"}], tools=many, max_tokens=5)
    r = raw.parse()
    assert raw.headers["x-feedloop-tools-omitted"]
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with psycopg.connect(server.db_url, row_factory=dict_row) as conn:
        params = conn.execute("SELECT params FROM chat_requests WHERE response_id = %s", (r.id,)).fetchone()["params"]
    assert params["tools"] is None
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}],
                                              tools=many, tool_choice="required", max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    fits = openai_client.chat.completions.with_raw_response.create(
        model="feedloop", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], max_tokens=5)
    assert "x-feedloop-tools-omitted" not in fits.headers
