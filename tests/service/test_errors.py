"""Every malformed request gets a 4xx in OpenAI's error shape naming the field, and writes nothing."""
import openai
import psycopg
import pytest


def count_exchanges(server) -> int:
    with psycopg.connect(server.db_url) as conn:
        return conn.execute("SELECT count(*) FROM chat_requests").fetchone()[0]


def msgs(content="Hi"):
    return [{"role": "user", "content": content}]


BAD_BODIES = [
    # (body, status, param)
    ({"model": "no-such-model", "messages": msgs()}, 404, "model"),
    ({"model": "feedloop", "messages": msgs(), "n": 0}, 400, "n"),
    ({"model": "feedloop", "messages": msgs(), "n": 100}, 400, "n"),
    ({"model": "feedloop", "messages": msgs(), "temperature": -1}, 400, "temperature"),
    ({"model": "feedloop", "messages": msgs(), "top_p": 0}, 400, "top_p"),
    ({"model": "feedloop", "messages": []}, 400, "messages"),
    ({"model": "feedloop", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "feedloop", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"messages": msgs()}, 400, "model"),
    ({"model": "feedloop", "messages": msgs(), "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "feedloop", "messages": msgs(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "feedloop", "messages": msgs(), "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "feedloop", "messages": msgs(), "stream": "sometimes"}, 400, "stream"),
    ({"model": "feedloop", "messages": msgs("nul \u0000 byte")}, 400, "messages[0].content"),
]


@pytest.mark.parametrize("body,status,param", BAD_BODIES)
def test_bad_request_bodies(server, user, body, status, param):
    before = count_exchanges(server)
    r = user.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert err["code"] is None or isinstance(err["code"], str)
    assert count_exchanges(server) == before


def test_bad_json(server, user):
    before = count_exchanges(server)
    r = user.post("/v1/chat/completions", content=b'{"model": "feedloop", "messages": [',
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert count_exchanges(server) == before


def test_oversized_body(server, user):
    before = count_exchanges(server)
    big = {"model": "feedloop", "messages": msgs("x" * (2 << 20))}
    r = user.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no content-length: counted as it streams in
        yield b'{"model": "feedloop", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'
    r = user.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert count_exchanges(server) == before


def test_errors_through_the_openai_client(openai_client):
    with pytest.raises(openai.NotFoundError) as e:
        openai_client.chat.completions.create(model="gpt-9", messages=msgs())
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="feedloop", messages=msgs(), n=100)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="feedloop", messages=msgs(), temperature=-1)
    assert e.value.param == "temperature"


def test_unknown_route_is_404_in_error_shape(server, user):
    r = user.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
