"""API keys: hashed at rest, roles, 401/403, create/list/revoke over HTTP and the CLI."""
import hashlib
import os
import subprocess
import sys

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
    out = subprocess.run([sys.executable, "-m", "service", "keys", "create", "--role", "user", "--name", "cli"],
                         cwd=ROOT, env=dict(os.environ, DATABASE_URL=server.db_url),
                         capture_output=True, text=True, check=True).stdout
    key = out.split('"key": "')[1].split('"')[0]
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_init_key_is_an_operator(operator):
    assert operator.get("/v1/admin/keys").status_code == 200
