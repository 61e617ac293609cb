"""The edge: every input a caller can send is a 2xx or a 4xx in OpenAI's shape naming the field,
and a 4xx writes nothing. Text Postgres cannot hold (NUL, lone surrogates) is refused in one place
for every field, path and query parameter and stored header; keys come before bodies; a crash is
a 500 with its request id that does not poison the connection."""
import json
import subprocess
import sys
import threading
import time

import httpx
import psycopg
import pytest
import uvicorn

from tests.conftest import OPERATOR_KEY, ROOT, Server


def tables(server) -> dict[str, int]:
    with psycopg.connect(server.db_url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("chat_requests", "feedback", "rankings", "preferences", "api_keys", "promotions",
                          "training_runs", "idempotency_keys", "demonstrations")}


def assert_refused(r: httpx.Response, status: int, param: str | None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["param"] == param, err
    assert r.headers["x-request-id"]


@pytest.fixture(scope="module")
def response_id(server, user_key) -> str:
    with server.client(user_key) as c:
        r = c.post("/v1/chat/completions", json={"model": "feedloop", "max_tokens": 4, "n": 2,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
        return r.json()["id"]


def chat(**extra):
    return {"model": "feedloop", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **extra}


UNSTORABLE = [
    # (method, path, body, status, param): what the fuzzing found, and its kin
    ("POST", "/v1/chat/completions", chat(stop="a\u0000"), 400, "stop"),
    ("POST", "/v1/chat/completions", chat(stop=["ok", "a\u0000"]), 400, "stop[1]"),
    ("POST", "/v1/chat/completions", chat(stop="a\u0000", stream=True), 400, "stop"),
    ("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "lone \ud800 half"}]), 400,
     "messages[0].content"),
    ("POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "x", "name": "\udfff"}]), 400,
     "messages[0].name"),
    ("POST", "/v1/chat/completions", chat(user="\u0000"), 400, "user"),
    ("POST", "/v1/feedback", {"response_id": "chatcmpl-\u0000", "choice_index": 0, "kind": "thumbs", "value": 1},
     400, "response_id"),
    ("POST", "/v1/rankings", {"response_id": "\u0000", "order": [1, 0]}, 400, "response_id"),
    ("POST", "/v1/preferences", {"chosen": {"response_id": "a\u0000"}, "rejected": {"response_id": "b"}}, 400,
     "chosen.response_id"),
    ("POST", "/v1/admin/keys", {"name": "ok", "role": "user", "\u0000": 1}, 400, None),
    ("POST", "/v1/admin/models/1/reject", {"reason": "bad \u0000 reason"}, 400, "reason"),
    ("POST", "/v1/admin/training/runs", {"config": {"ppo": {"note": "\u0000"}}}, 400, "config.ppo.note"),
    ("GET", "/v1/admin/exchanges/chatcmpl-%00", None, 400, "response_id"),
    ("GET", "/v1/admin/export?format=%00", None, 400, "format"),
]


@pytest.mark.parametrize("method,path,body,status,param", UNSTORABLE)
def test_unstorable_text_is_refused_naming_the_field(server, method, path, body, status, param):
    before = tables(server)
    with server.client(OPERATOR_KEY) as c:
        r = c.request(method, path, content=None if body is None else json.dumps(body),
                      headers={"content-type": "application/json"})
    assert_refused(r, status, param)
    assert tables(server) == before


def test_unstorable_idempotency_key_and_odd_request_ids(server, user, response_id):
    before = tables(server)
    r = user.post("/v1/feedback", json={"response_id": response_id, "kind": "thumbs", "value": 1},
                  headers={"Idempotency-Key": b"caf\xc3\xa9\xff"})
    assert r.status_code in (200, 400), r.text  # bytes as latin-1 text are storable: either is honest
    # a request id that is not printable ASCII is replaced, on every route, /health too
    for path in ("/health", "/ready", "/v1/models"):
        r = httpx.get(server.url + path, headers={"x-request-id": b"\xff\xfe caf\xc3",
                                                   "authorization": f"Bearer {OPERATOR_KEY}"})
        assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
    assert tables(server)["chat_requests"] == before["chat_requests"]


def test_numbers_past_what_the_database_holds(server, operator):
    before = tables(server)
    assert_refused(operator.post("/v1/admin/keys", json={"name": "x", "rate_limit": 2**31}), 400, "rate_limit")
    assert_refused(operator.post("/v1/feedback", json={"response_id": "chatcmpl-x", "choice_index": 2**63,
                                                       "kind": "thumbs", "value": 1}), 404, None)
    assert tables(server) == before


def test_an_import_line_nested_too_deeply(server, operator):
    before = tables(server)
    deep = "[" * 100_000 + "]" * 100_000
    r = operator.post("/v1/admin/imports/demonstrations", content=deep + "\n")
    assert_refused(r, 400, "lines[1]")
    assert "nested too deeply" in r.json()["error"]["message"]
    r = operator.post("/v1/admin/imports/preferences?partial=true",
                      content=deep + '\n{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert r.status_code == 200 and r.json()["imported"] == 1 and r.json()["errors"][0]["line"] == 1
    r = operator.post("/v1/admin/training/runs", content=b'{"config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert tables(server)["training_runs"] == before["training_runs"]


def test_keys_are_checked_before_bodies(server, user):
    for headers, status in (({}, 401), ({"authorization": "Bearer fl-nope"}, 401)):
        r = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": [', headers=headers)
        assert r.status_code == status, r.text
    r = user.post("/v1/admin/keys", content=b'{"name": ', headers={"content-type": "application/json"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = user.post("/v1/admin/keys", json={"name": "\u0000"})
    assert r.status_code == 403


def test_405_says_what_is_allowed(user):
    r = user.delete("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["message"]


def test_openapi_documents_what_the_app_sends(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    chat_ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(chat_ok) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert doc["paths"]["/v1/feedback"]["post"]["security"] == [{"bearer": []}]


def test_the_last_operator_key_cannot_be_revoked(server, operator):
    keys = operator.get("/v1/admin/keys", params={"limit": 1000}).json()["data"]
    operators = [k for k in keys if k["role"] == "operator" and not k["revoked_at"]]
    spare = operator.post("/v1/admin/keys", json={"name": "spare", "role": "operator"}).json()
    for k in operators:  # every other operator key goes; the spare is then the last
        assert operator.delete(f"/v1/admin/keys/{k['id']}").status_code == 200
    with server.client(spare["key"]) as op:
        r = op.delete(f"/v1/admin/keys/{spare['id']}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "last_operator_key"
        assert op.get("/v1/admin/keys").status_code == 200
        # the init key stays revoked across a restart: nobody gets a revoked key back
        with psycopg.connect(server.db_url) as conn:
            revoked = conn.execute("SELECT revoked_at FROM api_keys WHERE name = 'init'").fetchone()[0]
        assert revoked is not None
        op.post("/v1/admin/keys", json={"name": "init-again", "role": "operator"})  # leave the module an operator
    server.stop()
    server.start()
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}).status_code == 401
    with psycopg.connect(server.db_url, autocommit=True) as conn:  # the rest of the module's tests use it
        conn.execute("UPDATE api_keys SET revoked_at = NULL WHERE name = 'init'")


def test_keys_come_a_page_at_a_time(server):
    with server.client(OPERATOR_KEY) as op:
        made = [op.post("/v1/admin/keys", json={"name": f"page{i}"}).json()["id"] for i in range(5)]
        first = op.get("/v1/admin/keys", params={"limit": 2}).json()
        assert [k["id"] for k in first["data"]] == made[::-1][:2] and first["has_more"]
        second = op.get("/v1/admin/keys", params={"limit": 2, "before": first["data"][-1]["id"]}).json()
        assert [k["id"] for k in second["data"]] == made[::-1][2:4]
        assert op.get("/v1/admin/keys", params={"limit": 0}).status_code == 400


def test_idempotency_keys_are_forgotten_after_their_time(server, user, response_id):
    body = {"response_id": response_id, "kind": "thumbs", "value": 1}
    assert user.post("/v1/feedback", json=body, headers={"Idempotency-Key": "old-key"}).status_code == 200
    other = dict(body, value=-1)
    assert user.post("/v1/feedback", json=other, headers={"Idempotency-Key": "old-key"}).status_code == 409
    with psycopg.connect(server.db_url, autocommit=True) as conn:
        conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old-key'")
    r = user.post("/v1/feedback", json=other, headers={"Idempotency-Key": "old-key"})
    assert r.status_code == 200 and r.json()["value"] == -1 and "idempotent-replayed" not in r.headers


def test_no_model_yet_is_503_and_introspection_can_need_a_key(new_database, tmp_path):
    s = Server(new_database(), tmp_path, FEEDLOOP_OPEN_METRICS="false", FEEDLOOP_OPEN_DOCS="false")
    s.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=s.env,
                              stdout=open(s.log, "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(s.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        with s.client() as op:
            r = op.post("/v1/chat/completions", json=chat())
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
            assert op.post("/v1/chat/completions", json=chat(model="v7")).status_code == 404
            assert op.get("/metrics").status_code == 200 and op.get("/openapi.json").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/openapi.json").status_code == 401
        assert httpx.get(s.url + "/docs").status_code == 401
    finally:
        s.stop()


def test_a_crash_is_a_500_with_its_request_id_and_the_connection_survives():
    """The guard around a route that crashes (an app of the test's own: the server has none)."""
    from service.middleware import RequestGuard

    async def crashing(scope, receive, send):
        if scope["type"] == "lifespan":
            message = await receive()
            while message["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
                message = await receive()
            return await send({"type": "lifespan.shutdown.complete"})
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fine"})

    from tests.conftest import free_port
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(RequestGuard(crashing, max_body_bytes=1024), port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            r = c.get("/boom", headers={"x-request-id": "trace-500"})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
            assert r.headers["x-request-id"] == "trace-500" and r.headers["connection"] == "close"
            assert c.get("/fine").text == "fine"  # the client's next request on it works
    finally:
        server.should_exit = True
        thread.join(10)
