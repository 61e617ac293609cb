"""API keys: hashed at rest, roles, 401/403, create/list/revoke over HTTP and the CLI, rate limits."""
import hashlib
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import psycopg
import pytest

from tests.conftest import ROOT


def test_missing_and_wrong_keys_are_401(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="fl-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_user_key_on_admin_route_is_403(user):
    for method, path in [("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"),
                         ("GET", "/v1/admin/exchanges/chatcmpl-x")]:
        r = user.request(method, path, json={"name": "x"})
        assert r.status_code == 403, path
        assert r.json()["error"]["type"] == "permission_error"


def test_create_list_revoke(server, operator):
    r = operator.post("/v1/admin/keys", json={"name": "bob", "role": "user"})
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert key.startswith("fl-") and created["prefix"] == key[:7]
    listed = operator.get("/v1/admin/keys").json()
    assert listed["count"] == len(listed["data"]) and created["id"] in [k["id"] for k in listed["data"]]
    assert all("key" not in k and "key_hash" not in k for k in listed["data"])
    with psycopg.connect(server.db_url) as conn:  # only the hash is stored
        stored = conn.execute("SELECT key_hash FROM api_keys WHERE id = %s", (created["id"],)).fetchone()[0]
    assert stored == hashlib.sha256(key.encode()).hexdigest() and key not in stored
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert operator.delete(f"/v1/admin/keys/{created['id']}").json()["revoked_at"]
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert operator.delete(f"/v1/admin/keys/{created['id']}").status_code == 404


def test_bad_key_bodies(operator):
    assert operator.post("/v1/admin/keys", json={"name": "x", "role": "root"}).json()["error"]["param"] == "role"
    assert operator.post("/v1/admin/keys", json={"name": ""}).json()["error"]["param"] == "name"


def test_cli_creates_a_key_the_server_accepts(server):
    out = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--role", "user", "--name", "cli",
                          "--rate-limit", "30"], cwd=ROOT, env=dict(os.environ, DATABASE_URL=server.db_url),
                         capture_output=True, text=True, check=True).stdout
    created = json.loads(out)
    assert created["rate_limit"] == 30
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {created['key']}"}).status_code == 200
    refused = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--rate-limit", "0"], cwd=ROOT,
                             env=dict(os.environ, DATABASE_URL=server.db_url), capture_output=True, text=True)
    assert refused.returncode == 2 and "positive whole number" in refused.stderr


def test_init_key_is_an_operator(operator):
    assert operator.get("/v1/admin/keys").status_code == 200


def test_a_keys_rate_limit_answers_429_in_openais_shape_until_the_minute_turns(server, operator):
    limited = operator.post("/v1/admin/keys", json={"name": "busy", "role": "user", "rate_limit": 3}).json()["key"]
    other = operator.post("/v1/admin/keys", json={"name": "calm", "role": "user", "rate_limit": 3}).json()["key"]
    if time.gmtime().tm_sec > 50:  # the windows are calendar minutes: start in a fresh one
        time.sleep(61 - time.gmtime().tm_sec)
    with server.client(limited) as c:
        assert [c.get("/v1/models").status_code for _ in range(3)] == [200, 200, 200]
        refused = c.get("/v1/models")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert 0 < int(refused.headers["retry-after"]) <= 60
        # openai's client sees the same: a RateLimitError (no retries, to see it at once)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=limited, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.models.list()
    with server.client(other) as c:  # each key has its own window
        assert c.get("/v1/models").status_code == 200
    # refused requests are not counted, nor are keys without a limit
    with psycopg.connect(server.db_url) as conn:
        counted = dict(conn.execute("SELECT k.name, sum(u.requests) FROM api_key_usage u "
                                    "JOIN api_keys k ON k.id = u.key_id GROUP BY k.name").fetchall())
    assert counted["busy"] == 3 and counted["calm"] == 1
    assert not {k["name"] for k in operator.get("/v1/admin/keys").json()["data"] if k["rate_limit"] is None} & set(counted)
