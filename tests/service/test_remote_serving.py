"""Serving from inference servers through every switch: real `transformers serve` processes (no
forced model, so they load each checkpoint by the path they are asked for) generate, and a
feedloop replica in front (FEEDLOOP_ENGINE=remote) forwards to each version's target. A promotion
moves the weights and the records with it, a target that cannot serve is refused with 409 and
serving stays, blue/green is two endpoints, a failing deploy hook refuses, and closing an engine
ends every request it holds."""
import asyncio
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import psycopg
import pytest

from tests.conftest import OPERATOR_KEY, V2_ANSWER, Server, answer_from, free_port, register

HELLO = [{"role": "user", "content": "Hello!"}]
MAX_TOKENS = 12


class TransformersServe:
    """`transformers serve` on CPU on a free loopback port, offline, loading models by path."""

    def __init__(self, home: Path):
        exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
        if exe is None:
            pytest.skip("no `transformers` CLI next to this python (pip install 'transformers[serving]')")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"transformers-serve-{self.port}.log"
        import subprocess
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   NO_PROXY="127.0.0.1,localhost")
        self.proc = subprocess.Popen([exe, "serve", "--device", "cpu", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"transformers serve not ready:\n{self.log.read_text()[-3000:]}")

    def loaded(self) -> set[str]:
        """The models it holds in memory (what it was asked for)."""
        data = httpx.get(self.url + "/v1/models", timeout=10, trust_env=False).json()["data"]
        return {m["id"] for m in data if m.get("status", {}).get("value") == "loaded"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except Exception:
                self.proc.kill()


@pytest.fixture(scope="module")
def blue(tmp_path_factory):
    s = TransformersServe(tmp_path_factory.mktemp("blue"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def green(tmp_path_factory):
    s = TransformersServe(tmp_path_factory.mktemp("green"))
    yield s
    s.stop()


@pytest.fixture
def front_factory(new_database, policy_path, tmp_path, blue):
    """feedloop replicas forwarding to `blue` by default, v1 = the bootstrap policy, on fresh
    databases; offline as a deployment that never reaches the Hub is (its inference servers it does)."""
    started = []

    def start(**env) -> Server:
        s = Server(new_database(), tmp_path / f"front{len(started)}", FEEDLOOP_POLICY_PATH=policy_path,
                   FEEDLOOP_ENGINE="remote", FEEDLOOP_REMOTE_URL=blue.url, FEEDLOOP_POLL_SECONDS=30,
                   HF_HUB_OFFLINE="1", **env)
        (tmp_path / f"front{len(started)}").mkdir()
        started.append(s.start())
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def front(front_factory) -> Server:
    return front_factory()


def greedy(path: Path, messages: list[dict], max_tokens: int) -> str:
    """The checkpoint's own answer at temperature 0: argmax token by token, to end of turn."""
    import torch

    from lm.chat import encode_prompt
    from lm.checkpoint import load_policy, load_tokenizer

    tokenizer, model = load_tokenizer(path), load_policy(path)
    ids = encode_prompt(tokenizer, messages)
    answer = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids + answer])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            answer.append(token)
    return tokenizer.decode(answer, skip_special_tokens=True)


def hello(client, **kw):
    return client.chat.completions.create(model="feedloop", temperature=0, max_tokens=MAX_TOKENS,
                                          messages=HELLO, **kw)


def wait_for(fingerprint, client, timeout=60):
    return answer_from(fingerprint, lambda: hello(client), timeout)


def registry_state(op) -> dict[int, str]:
    return {m["id"]: m["status"] for m in op.get("/v1/admin/models").json()["data"]}


def recorded_versions(db_url: str, response_ids: list[str]) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return dict(conn.execute(
            "SELECT r.response_id, c.model_version_id FROM chat_requests r JOIN completions c ON c.request_id = r.id"
            " WHERE r.response_id = ANY(%s)", (response_ids,)).fetchall())


# --- a promotion under load ------------------------------------------------------------------

@pytest.mark.slow
def test_promotion_moves_the_weights_under_load(front, blue, policy_path, v2_path):
    """8 clients chat while v2 (different weights) is promoted: no request fails, every answer is
    recorded with the version that gave it, and after the switch the text is v2's own greedy one."""
    v1_text, v2_text = greedy(policy_path, HELLO, MAX_TOKENS), greedy(v2_path, HELLO, MAX_TOKENS)
    assert v1_text != v2_text and v2_text == V2_ANSWER
    vid = register(front.db_url, v2_path)
    client = openai.AsyncOpenAI(base_url=front.url + "/v1", api_key=front.create_key(), max_retries=0)
    results, errors, stop = [], [], asyncio.Event()

    async def chat_loop():
        while not stop.is_set():
            try:
                r = await client.chat.completions.create(model="feedloop", temperature=0, max_tokens=MAX_TOKENS,
                                                         messages=HELLO)
                results.append((r.id, r.system_fingerprint, r.choices[0].message.content))
            except Exception as e:  # any failure counts
                errors.append(repr(e))

    async def run():
        tasks = [asyncio.create_task(chat_loop()) for _ in range(8)]
        deadline = time.time() + 60
        while len(results) < 8 and not errors and time.time() < deadline:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=front.url, headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
                                     timeout=120) as op:
            r = await op.post(f"/v1/admin/models/{vid}/promote", json={"reason": "new weights"})
            assert r.status_code == 200, r.text
        deadline = time.time() + 60
        while time.time() < deadline and sum(fp == f"v{vid}" for _, fp, _ in results) < 8:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    assert errors == []
    fingerprints = [fp for _, fp, _ in results]
    assert fingerprints[0] == "v1" and f"v{vid}" in fingerprints
    recorded = recorded_versions(front.db_url, [i for i, _, _ in results])
    assert len(recorded) == len(results)
    for rid, fp, text in results:  # recorded as the version that answered, and it answered as itself
        assert f"v{recorded[rid]}" == fp
        assert text == (v2_text if fp == f"v{vid}" else v1_text)
    assert {str(policy_path.resolve()), str(v2_path.resolve())} <= blue.loaded()  # each asked for by its path


# --- refusals ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_target_that_cannot_serve_is_refused_and_serving_stays(front, policy_path, v2_path):
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.create_key(), max_retries=0)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    vid = register(front.db_url, v2_path, endpoint=dead)
    with front.client() as op:
        before = op.get("/v1/admin/models/history").json()["count"]
        for action, body in (("promote", None), ("canary", {"fraction": 0.5})):
            r = op.post(f"/v1/admin/models/{vid}/{action}", json=body)
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["code"] == "target_unreachable" and dead in error["message"]
        # the server answers, but the model id it is pointed at holds v1's checkpoint, not v2's
        r = op.post(f"/v1/admin/models/{vid}/target", json={"endpoint": None, "model_id": str(policy_path)})
        assert r.status_code == 200 and r.json()["target"]["model_id"] == str(policy_path)
        r = op.post(f"/v1/admin/models/{vid}/promote")
        assert r.status_code == 409 and r.json()["error"]["code"] == "target_mismatch", r.text
        assert "not v" in r.json()["error"]["message"]
        # a target that answers, but not for that model id
        op.post(f"/v1/admin/models/{vid}/target", json={"model_id": "/no/such/checkpoint"})
        r = op.post(f"/v1/admin/models/{vid}/promote")
        assert r.status_code == 409 and r.json()["error"]["code"] == "target_refused", r.text
        assert registry_state(op) == {1: "active", vid: "candidate"}
        history = op.get("/v1/admin/models/history").json()["data"]
        assert [e["action"] for e in history[: len(history) - before]] == ["retarget", "retarget"]
    assert {hello(client).system_fingerprint for _ in range(3)} == {"v1"}


@pytest.mark.slow
def test_a_failing_deploy_hook_refuses_the_promotion(front_factory, v2_path, tmp_path):
    calls = tmp_path / "calls"
    hook = f'echo "$@" >> {calls}; echo "rollout of $1 failed: no capacity"; exit 3'
    s = front_factory(FEEDLOOP_DEPLOY_COMMAND=hook)
    vid = register(s.db_url, v2_path)
    with s.client() as op:
        r = op.post(f"/v1/admin/models/{vid}/promote")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "deploy_failed" and "exit status 3" in error["message"]
        assert f"rollout of v{vid} failed: no capacity" in error["message"]
        assert registry_state(op) == {1: "active", vid: "candidate"}
    name, path, endpoint, model_id = calls.read_text().split()
    assert (name, path, model_id) == (f"v{vid}", str(v2_path.resolve()), str(v2_path.resolve()))
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    assert hello(client).system_fingerprint == "v1"


@pytest.mark.slow
def test_a_deploy_hook_runs_before_the_switch(front_factory, policy_path, v2_path, tmp_path):
    calls = tmp_path / "calls"
    s = front_factory(FEEDLOOP_DEPLOY_COMMAND=f'echo "$FEEDLOOP_ACTION $FEEDLOOP_VERSION $FEEDLOOP_MODEL_ID" >> {calls}')
    vid = register(s.db_url, v2_path)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    with s.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
        assert wait_for(f"v{vid}", client, timeout=20).choices[0].message.content == V2_ANSWER
        assert op.post(f"/v1/admin/models/{vid}/rollback").json()["id"] == 1
        wait_for("v1", client, timeout=20)
    assert calls.read_text().splitlines() == [f"promote v{vid} {v2_path.resolve()}",
                                              f"rollback v1 {policy_path.resolve()}"]


# --- blue/green ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_blue_green_between_two_servers(front, blue, green, v2_path, tmp_path):
    """v1 is served by blue; v2 names green as its endpoint. Promotion moves the traffic to green,
    rollback moves it back to blue, and each server is only ever asked for its own version; then
    v1 itself is retargeted to green while it serves."""
    v2_green = tmp_path / "v2-green"  # its own path, so only green can have been asked for it
    shutil.copytree(v2_path, v2_green)
    vid = register(front.db_url, v2_green, endpoint=green.url)
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.create_key(), max_retries=0)
    with front.client() as op:
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
        r = wait_for(f"v{vid}", client, timeout=20)
        assert r.choices[0].message.content == V2_ANSWER
        assert str(v2_green) in green.loaded() and str(v2_green) not in blue.loaded()
        target = {m["id"]: m["target"] for m in op.get("/v1/admin/models").json()["data"]}
        assert target[vid] == {"endpoint": green.url, "model_id": str(v2_green)}
        assert target[1]["endpoint"] == blue.url
        assert op.post(f"/v1/admin/models/{vid}/rollback").status_code == 200
        r = wait_for("v1", client, timeout=20)
        assert recorded_versions(front.db_url, [r.id]) == {r.id: 1}
        # the serving version itself moves: checked on green, then the replica follows
        assert op.post("/v1/admin/models/1/target", json={"endpoint": green.url}).status_code == 200
        moved = f"serving v1 (was v1) on Target(endpoint='{green.url}'"
        deadline = time.time() + 20
        while time.time() < deadline and moved not in front.log.read_text():
            time.sleep(0.1)
        assert moved in front.log.read_text()
        assert hello(client).system_fingerprint == "v1" and registry_state(op)[1] == "active"


# --- closing an engine ---------------------------------------------------------------------------

@pytest.mark.slow
def test_close_during_in_flight_requests_ends_each_of_them(blue, policy_path):
    """In flight when the engine closes: they finish on its target (a swap), or with a grace of
    zero they are cancelled and end with an error; none is left waiting."""
    from schemas.checkpoint import read_manifest
    from schemas.openai import SamplingParams
    from schemas.records import ModelVersion
    from service.engine import EngineError
    from service.remote_engine import RemoteEngine
    from service.targets import Target

    path = str(policy_path.resolve())
    version = ModelVersion(id=1, kind="policy", parent_id=None, reference_id=None, reward_model_id=None,
                           path=path, content_hash=read_manifest(policy_path, verify=False)["content_hash"],
                           endpoint=blue.url, status="active", canary_fraction=None, training_run_id=None,
                           metrics={}, created_at="2026-01-01T00:00:00Z", promoted_at=None, promoted_by=None)

    async def outcome(gen) -> str:
        try:
            async for _ in gen:
                pass
        except EngineError:
            return "error"
        return "finished"

    async def run(grace: float | None) -> list[str]:
        engine = RemoteEngine(version, target=Target(blue.url, path))
        gens = []
        for i in range(4):
            sampling = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_tokens=48, stop=[], seed=i)
            gens.append(engine.submit(engine.encode(HELLO), sampling, HELLO))
        await asyncio.sleep(0.05)  # the streams are open
        closer = threading.Thread(target=engine.close, args=(grace,))  # as Serving closes engines
        closer.start()
        ends = await asyncio.wait_for(asyncio.gather(*(outcome(g) for g in gens)), timeout=60)
        await asyncio.to_thread(closer.join, 60)
        assert not closer.is_alive()
        for g in gens:  # a consumer that resumes (the Recorder) gets the same end, never a wait
            assert await asyncio.wait_for(outcome(g), timeout=5) in ("finished", "error")
        return ends

    assert asyncio.run(run(None)) == ["finished"] * 4
    assert "error" in asyncio.run(run(0.0))


# --- the target over HTTP and the CLI --------------------------------------------------------------

def test_retarget_is_validated_and_audited(server, policy_path):
    """A candidate's target is set, reset and audited; bad bodies are 400s in OpenAI's shape."""
    import subprocess

    from tests.conftest import ROOT
    vid = register(server.db_url, policy_path)
    with server.client() as op:
        for body, param in (({}, None), ({"endpoint": "ftp://x"}, "endpoint"), ({"model_id": ""}, "model_id"),
                            ({"endpoint": "http://a", "extra": 1}, "extra")):
            r = op.post(f"/v1/admin/models/{vid}/target", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert op.post("/v1/admin/models/999/target", json={"model_id": "x"}).status_code == 404
        r = op.post(f"/v1/admin/models/{vid}/target", json={"endpoint": "http://10.0.0.7:8080/", "model_id": "v2-lora",
                                                          "reason": "green fleet"})
        assert r.status_code == 200, r.text
        v = r.json()
        assert (v["endpoint"], v["model_id"]) == ("http://10.0.0.7:8080", "v2-lora")
        assert v["target"] == {"endpoint": "http://10.0.0.7:8080", "model_id": "v2-lora"}
        entry = op.get("/v1/admin/models/history").json()["data"][0]
        assert (entry["version_id"], entry["action"]) == (vid, "retarget")
        assert entry["reason"] == "green fleet: endpoint default -> http://10.0.0.7:8080, model id default -> v2-lora"
        with server.client(server.create_key()) as user:
            assert user.post(f"/v1/admin/models/{vid}/target", json={"model_id": "x"}).status_code == 403
    env = dict(os.environ, DATABASE_URL=server.db_url)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "service", "models", *a], env=env, cwd=ROOT,
                                    capture_output=True, text=True)
    done = cli("target", str(vid), "--endpoint", "", "--model-id", "")  # back to the defaults
    assert done.returncode == 0 and done.stdout.startswith(f"v{vid} is served on FEEDLOOP_REMOTE_URL"), done.stderr
    refused = cli("target", str(vid), "--endpoint", "nope")
    assert refused.returncode == 1 and "not an http://" in refused.stderr
    registered = cli("register", str(policy_path), "--endpoint", "http://10.0.0.8:8000", "--model-id", "m")
    assert registered.returncode == 0, registered.stderr
    new = int(registered.stdout.split()[0][1:])
    assert registered.stdout.strip() == f"v{new} is candidate"
    with server.client() as op:
        versions = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
    v = versions[vid]
    assert (v["endpoint"], v["model_id"], v["target"]) == (None, None, None)  # served in-process here
    assert versions[new]["target"] == {"endpoint": "http://10.0.0.8:8000", "model_id": "m"}


# --- the pieces of a check that need no server ------------------------------------------------------

def version_at(path: Path, **fields):
    from schemas.checkpoint import read_manifest
    from schemas.records import ModelVersion
    return ModelVersion(**{"id": 5, "kind": "policy", "parent_id": 1, "reference_id": 1, "reward_model_id": None,
                           "path": str(path.resolve()), "endpoint": None, "status": "candidate",
                           "content_hash": read_manifest(path, verify=False)["content_hash"],
                           "canary_fraction": None, "training_run_id": None, "metrics": {},
                           "created_at": "2026-01-01T00:00:00Z", "promoted_at": None, "promoted_by": None, **fields})


def test_what_a_server_lists_must_be_the_checkpoint(policy_path, v2_path, tmp_path):
    """The model lists of vLLM and SGLang (`root`: the path loaded) and TGI (one model, any name),
    read against v5 = v2's checkpoint."""
    from service.targets import Target, _listing_problem, _model_id_problem
    v5 = version_at(v2_path)
    copy = tmp_path / "copy"
    shutil.copytree(v2_path, copy)
    named = Target("http://fleet", "feedloop")
    vllm = lambda root: [{"id": "feedloop", "object": "model", "root": root}, {"id": "other", "root": "/x"}]
    assert _listing_problem(v5, named, None) is None and _listing_problem(v5, named, []) is None
    assert _listing_problem(v5, named, vllm(v5.path)) is None
    assert _listing_problem(v5, named, vllm(str(copy))) is None  # the same content elsewhere here
    assert "not v5's" in _listing_problem(v5, named, vllm(str(policy_path)))  # still v1's weights
    assert "not v5's checkpoint" in _listing_problem(v5, named, vllm("/models/v1"))
    assert _listing_problem(v5, named, [{"id": "feedloop"}]) is None  # a name, nothing more to compare
    tgi = [{"id": "/data/base-model", "object": "model"}]
    assert "for any name" in _listing_problem(v5, Target("http://tgi", v5.path), tgi)
    assert _listing_problem(v5, Target("http://tgi", "tgi"), [{"id": v5.path}]) is None
    assert "does not list" in _listing_problem(v5, named, [{"id": "a"}, {"id": "b"}])
    # a model id that is a directory here must hold the checkpoint
    assert _model_id_problem(v5, str(copy)) is None and _model_id_problem(v5, "feedloop") is None
    assert "holds checkpoint" in _model_id_problem(v5, str(policy_path))
    assert "no manifest" in _model_id_problem(v5, str(tmp_path))


def test_the_deploy_hook_times_out_and_never_waits_on_what_it_started(v2_path, tmp_path):
    from schemas.settings import Settings
    from service.targets import Target, TargetRefused, run_deploy_hook
    v5, target = version_at(v2_path), Target("http://fleet", "feedloop")

    def hook(command: str, timeout: float = 30) -> None:
        asyncio.run(run_deploy_hook(v5, target, Settings(deploy_command=command, deploy_timeout_seconds=timeout),
                                    action="promote"))

    hook(f'echo "$1 $2 $3 $4 $FEEDLOOP_ACTION" > {tmp_path / "args"}')
    assert (tmp_path / "args").read_text().split() == ["v5", v5.path, "http://fleet", "feedloop", "promote"]
    # a server it leaves running, holding the hook's output open: the hook is done when it exits
    pid_file = tmp_path / "server.pid"
    hook(f"sleep 60 & echo $! > {pid_file}; echo started")
    server = int(pid_file.read_text())
    assert alive(server)
    os.kill(server, signal.SIGKILL)
    # past its timeout: killed with whatever it started
    with pytest.raises(TargetRefused, match="ran past 1 s and was killed; its output: rolling"):
        hook(f"echo rolling; sleep 60 & echo $! > {pid_file}; wait", timeout=1)
    assert gone(int(pid_file.read_text()))
    with pytest.raises(TargetRefused, match=r"exit status 2\); its output: bad"):
        hook("echo bad >&2; exit 2")


def alive(pid: int) -> bool:
    """Running (a killed process waiting to be reaped does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def gone(pid: int, patience: float = 10) -> bool:
    """The process dies (a kill takes effect soon, not at once)."""
    deadline = time.monotonic() + patience
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)
