"""The registry over HTTP and hot swap in a real serving process: promote, roll back, canary,
reject, a corrupt checkpoint, and zero failed requests while 16 clients chat through a swap."""
import asyncio
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import psycopg
import pytest

from tests.conftest import ROOT, V2_ANSWER, Server, answer_from, register


@pytest.fixture
def fresh_server(new_database, policy_path, tmp_path):
    s = Server(new_database(), tmp_path, FEEDLOOP_POLICY_PATH=policy_path, FEEDLOOP_POLL_SECONDS=30).start()
    yield s
    s.stop()


def hello(client, **kw):
    return client.chat.completions.create(model="feedloop", temperature=0,
                                          messages=[{"role": "user", "content": "Hello!"}], **kw)


def wait_for(fingerprint, client, timeout=60):
    return answer_from(fingerprint, lambda: hello(client), timeout)


def test_promote_then_rollback(fresh_server, v2_path):
    s = fresh_server
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    assert hello(client).system_fingerprint == "v1"
    vid = register(s.db_url, v2_path)
    with s.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/promote", json={"reason": "better"}).json()["status"] == "active"
        r = wait_for(f"v{vid}", client, timeout=20)  # NOTIFY, not the 30 s poll
        assert r.choices[0].message.content == V2_ANSWER
        models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
        assert models[1]["status"] == "archived" and models[vid]["status"] == "active"
        assert models[vid]["parent_id"] == 1
        assert op.post("/v1/admin/models/1/rollback").status_code == 409  # v1 is not active
        assert op.post(f"/v1/admin/models/{vid}/rollback").json()["id"] == 1
        wait_for("v1", client, timeout=20)
        log = [(e["version_id"], e["action"]) for e in op.get("/v1/admin/models/history").json()["data"]]
        assert log[:3] == [(1, "rollback"), (vid, "promote"), (vid, "register")]
        assert op.post(f"/v1/admin/models/{vid}/reject").status_code == 409  # archived, not a candidate
        assert op.post("/v1/admin/models/999/promote").status_code == 404


def test_models_cli(fresh_server, v2_path):
    s = fresh_server
    vid = register(s.db_url, v2_path)
    env = dict(os.environ, DATABASE_URL=s.db_url)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "service", "models", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True)
    assert f"v{vid}  policy  candidate" in cli("list").stdout
    assert cli("promote", str(vid), "--reason", "from the cli").stdout.strip() == f"v{vid} is active"
    refused = cli("promote", str(vid))
    assert refused.returncode == 1 and "active already" in refused.stderr
    assert cli("rollback").stdout.strip() == "v1 is active"
    with s.client() as op:
        entry = op.get("/v1/admin/models/history").json()["data"][1]
    assert entry["action"] == "promote" and entry["reason"] == "from the cli" and entry["actor"].startswith("cli:")


def test_corrupt_checkpoint_is_marked_failed_and_serving_stays(fresh_server, v2_path, tmp_path):
    s = fresh_server
    bad = tmp_path / "corrupt"
    shutil.copytree(v2_path, bad)
    vid = register(s.db_url, bad)
    (bad / "model.safetensors").write_bytes(b"not weights")  # damaged after registration
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    with s.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
        deadline = time.time() + 30
        while time.time() < deadline:
            models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
            if models[vid]["status"] == "failed":
                break
            time.sleep(0.2)
        assert models[vid]["status"] == "failed" and models[1]["status"] == "active"
        actions = [(e["version_id"], e["action"]) for e in op.get("/v1/admin/models/history").json()["data"]]
        assert (vid, "fail") in actions
    assert hello(client).system_fingerprint == "v1"


def test_canary_takes_its_fraction_and_reject_removes_it(fresh_server, v2_path):
    s = fresh_server
    vid = register(s.db_url, v2_path)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    with s.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/canary", json={"fraction": 1.5}).status_code == 400
        assert op.post(f"/v1/admin/models/{vid}/canary", json={"fraction": 0.5}).json()["status"] == "canary"
        deadline = time.time() + 20
        while time.time() < deadline and f"v{vid}" not in [m.id for m in client.models.list().data]:
            time.sleep(0.1)
        seen = [hello(client, max_tokens=4).system_fingerprint for _ in range(40)]
        assert 5 <= seen.count(f"v{vid}") <= 35 and seen.count("v1") >= 5
        assert op.post(f"/v1/admin/models/{vid}/reject", json={"reason": "worse"}).json()["status"] == "rejected"
        deadline = time.time() + 20
        while time.time() < deadline and f"v{vid}" in [m.id for m in client.models.list().data]:
            time.sleep(0.1)
    assert {hello(client, max_tokens=4).system_fingerprint for _ in range(10)} == {"v1"}


def test_no_failed_requests_across_a_swap(fresh_server, v2_path):
    """16 clients chat continuously while a promotion happens: every request succeeds and each
    recorded completion carries the version that produced it."""
    s = fresh_server
    key = s.create_key()
    vid = register(s.db_url, v2_path)
    client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
    results, errors, stop = [], [], asyncio.Event()

    async def chat_loop():
        while not stop.is_set():
            try:
                r = await client.chat.completions.create(
                    model="feedloop", temperature=0, max_tokens=12,
                    messages=[{"role": "user", "content": "Hello!"}])
                results.append((r.id, r.system_fingerprint, r.choices[0].message.content))
            except Exception as e:  # any failure counts
                errors.append(repr(e))

    async def run():
        tasks = [asyncio.create_task(chat_loop()) for _ in range(16)]
        await asyncio.sleep(2)
        with s.client() as op:
            assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
        deadline = time.time() + 40
        while time.time() < deadline and not any(fp == f"v{vid}" for _, fp, _ in results[-16:]):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert errors == []
    fingerprints = [fp for _, fp, _ in results]
    assert "v1" in fingerprints and f"v{vid}" in fingerprints
    assert fingerprints.index(f"v{vid}") > 0
    with psycopg.connect(s.db_url) as conn:
        rows = dict(conn.execute(
            "SELECT r.response_id, c.model_version_id FROM chat_requests r JOIN completions c ON c.request_id = r.id"
            " WHERE r.response_id = ANY(%s)", ([i for i, _, _ in results],)).fetchall())
    assert len(rows) == len(results)
    for rid, fp, text in results:  # recorded with the version that answered, and it answered like it
        assert f"v{rows[rid]}" == fp
        assert (text == V2_ANSWER) == (fp == f"v{vid}")


def tamper(path):
    """Change a checkpoint's weights in place (a flipped tail: the manifest no longer matches)."""
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-16] + bytes(b ^ 0xFF for b in original[-16:]))
    return lambda: weights.write_bytes(original)


def test_a_tampered_served_checkpoint_falls_back_to_the_previous_version(fresh_server, v2_path, tmp_path):
    s = fresh_server
    mine = tmp_path / "v2-copy"
    shutil.copytree(v2_path, mine)
    vid = register(s.db_url, mine)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    with s.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
    wait_for(f"v{vid}", client)
    s.stop()
    repair = tamper(mine)
    s.start()  # ready: it came up serving the previous intact version
    assert hello(client).system_fingerprint == "v1"
    with s.client() as op:
        models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
        assert models[vid]["status"] == "failed" and models[1]["status"] == "active"
        history = op.get("/v1/admin/models/history").json()["data"]
        assert (history[0]["version_id"], history[0]["action"]) == (1, "rollback")
        assert f"v{vid} failed to load" in history[0]["reason"] and history[0]["actor"].startswith("replica")
        assert (history[1]["version_id"], history[1]["action"]) == (vid, "fail")
        r = op.post(f"/v1/admin/models/{vid}/verify")  # still broken: said so, nothing changes
        assert r.status_code == 409 and r.json()["error"]["code"] == "checkpoint_mismatch"
        repair()  # the file comes back under its own name, by an operator
        r = op.post(f"/v1/admin/models/{vid}/verify", json={"reason": "restored from backup"})
        assert r.status_code == 200 and r.json()["status"] == "archived"
        assert op.get("/v1/admin/models/history").json()["data"][0]["action"] == "restore"
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
    wait_for(f"v{vid}", client)


def test_a_tampered_only_version_starts_not_ready_and_comes_back_when_repaired(new_database, policy_path, tmp_path):
    mine = tmp_path / "policy"
    shutil.copytree(policy_path, mine)
    s = Server(new_database(), tmp_path, FEEDLOOP_POLICY_PATH=mine).start()
    s.stop()
    repair = tamper(mine)
    s.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=s.env,
                              stdout=open(s.log, "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # it starts (no crash on FEEDLOOP_POLICY_PATH) and says it is not ready
            assert s.proc.poll() is None, s.log.read_text()[-2000:]
            try:
                r = httpx.get(s.url + "/ready", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
    finally:
        s.stop()
    repair()
    s.start()  # the intact file is its own version again: v1, restored (audited), not a new version
    try:
        with s.client() as op:
            models = op.get("/v1/admin/models").json()["data"]
            assert [(m["id"], m["status"]) for m in models] == [(1, "active")]
            actions = [e["action"] for e in op.get("/v1/admin/models/history").json()["data"]]
            assert actions[:3] == ["rollback", "restore", "fail"]
    finally:
        s.stop()
