"""The loop through real processes: chat and feedback through the API, a round in the trainer,
a candidate in the registry, promotion, the new fingerprint, rollback; and the trainer's safety:
one round at a time across processes, nothing registered by a killed round."""
import json
import signal
import subprocess
import sys
import time

import openai
import psycopg
import pytest

from tests.conftest import ROOT, Server

pytestmark = pytest.mark.slow

# Small enough for two CPU cores; gates opened wide: this tests the loop's plumbing, not learning.
TINY_ROUND = {
    "reward": {"epochs": 2, "batch_size": 16},
    "ppo": {"steps": 3, "batch_size": 8, "num_minibatches": 2, "max_new_tokens": 16},
    "gates": {"eval_prompts": 8, "min_reward_gain": -100.0, "kl_budget": 1000.0, "total_kl_budget": 1000.0,
              "min_rm_accuracy": -1.0, "min_heldout_pairs": 0, "min_heldout_prompts": 0,
              "max_empty_rate": 1.0, "min_distinct_rate": 0.0},
}


def trainer_env(server: Server, **extra) -> dict:
    return dict(server.env, FEEDLOOP_ROUND_CONFIG=json.dumps(TINY_ROUND), FEEDLOOP_MIN_NEW_PAIRS="4",
                FEEDLOOP_TORCH_THREADS="1", **{k: str(v) for k, v in extra.items()})


def give_feedback(server: Server, n_prompts: int = 12) -> None:
    """Users ask for two answers and prefer the shorter one, through the real API."""
    key = server.create_key()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    from schemas.bundled import training_prompts
    with server.client(key) as http:
        for prompt in training_prompts()[:n_prompts]:
            r = client.chat.completions.create(model="feedloop", n=2, temperature=1.2, max_tokens=24,
                                               messages=[{"role": "user", "content": prompt}])
            a, b = r.choices
            if a.message.content == b.message.content:
                continue
            chosen, rejected = (a, b) if len(a.message.content) <= len(b.message.content) else (b, a)
            res = http.post("/v1/preferences", json={
                "chosen": {"response_id": r.id, "choice_index": chosen.index},
                "rejected": {"response_id": r.id, "choice_index": rejected.index}})
            assert res.status_code == 200, res.text


def train_once(env, *args, timeout=600) -> dict:
    out = subprocess.run([sys.executable, "-m", "trainer", "train", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    return json.loads(out.stdout)


@pytest.fixture
def loop_server(new_database, policy_path, tmp_path):
    s = Server(new_database(), tmp_path, FEEDLOOP_POLICY_PATH=policy_path).start()
    yield s
    s.stop()


def test_feedback_to_round_to_promotion_and_back(loop_server):
    s = loop_server
    env = trainer_env(s)
    assert train_once(env)["status"] == "skipped"  # no feedback yet
    give_feedback(s)
    result = train_once(env)
    assert result["status"] == "succeeded", result
    vid = result["version"]
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
    with s.client() as op:
        models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
        assert models[vid]["status"] == "candidate" and models[vid]["parent_id"] == 1
        rm = models[vid]["reward_model_id"]
        assert models[rm]["kind"] == "reward" and models[rm]["status"] == "active"
        runs = op.get("/v1/admin/training/runs").json()["data"]
        assert [r["status"] for r in runs] == ["succeeded", "skipped"]
        assert runs[0]["produced_version_id"] == vid and runs[0]["watermark"] > 0
        assert len(runs[0]["curves"]["reward/score"]) == TINY_ROUND["ppo"]["steps"]
        assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
        deadline = time.time() + 30
        while time.time() < deadline:
            r = client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}])
            if r.system_fingerprint == f"v{vid}":
                break
            time.sleep(0.2)
        assert r.system_fingerprint == f"v{vid}"
        assert op.post(f"/v1/admin/models/{vid}/rollback").json()["id"] == 1
        deadline = time.time() + 30
        while time.time() < deadline:
            r = client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "Hi"}])
            if r.system_fingerprint == "v1":
                break
            time.sleep(0.2)
        assert r.system_fingerprint == "v1"
    assert train_once(env)["status"] == "skipped"  # the watermark moved past what was used


def test_operator_requested_round_runs_in_the_trainer_service(loop_server):
    s = loop_server
    give_feedback(s, n_prompts=10)
    trainer = subprocess.Popen([sys.executable, "-m", "trainer", "trainer"], cwd=ROOT,
                               env=trainer_env(s, FEEDLOOP_TRAIN_INTERVAL_SECONDS=3600, FEEDLOOP_PROMOTION="auto",
                                               FEEDLOOP_QUEUE_POLL_SECONDS=0.5),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with s.client() as op:
            run = op.post("/v1/admin/training/runs", json={}).json()
            assert run["status"] == "queued"
            deadline = time.time() + 400
            while time.time() < deadline:
                run = op.get(f"/v1/admin/training/runs/{run['id']}").json()
                if run["status"] in ("succeeded", "failed"):
                    break
                time.sleep(1)
            assert run["status"] == "succeeded" and run["trigger"] == "operator", run.get("error")
            models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
            assert models[run["produced_version_id"]]["status"] == "active"  # promotion policy: auto
    finally:
        trainer.terminate()
        trainer.wait(30)


def test_two_trainers_run_one_round(loop_server):
    s = loop_server
    give_feedback(s, n_prompts=10)
    env = trainer_env(s)
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "train"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    with psycopg.connect(s.db_url) as conn:
        statuses = [r[0] for r in conn.execute("SELECT status FROM training_runs ORDER BY id")]
        policies = conn.execute("SELECT count(*) FROM model_versions WHERE kind = 'policy'").fetchone()[0]
    # one trained; the other found the lock taken (or, if it came later, nothing new)
    assert statuses.count("succeeded") == 1 and "running" not in statuses, (statuses, outs)
    assert policies == 2


def test_killed_round_registers_nothing_and_is_failed_on_restart(loop_server, tmp_path):
    s = loop_server
    give_feedback(s, n_prompts=10)
    slow = dict(TINY_ROUND, ppo=dict(TINY_ROUND["ppo"], steps=200))
    env = dict(trainer_env(s), FEEDLOOP_ROUND_CONFIG=json.dumps(slow))
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "train"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    with psycopg.connect(s.db_url, autocommit=True) as conn:
        while time.time() < deadline:  # wait until the reward model is published: PPO is under way
            if any((s_dir / "reward" / "feedloop.json").exists()
                   for s_dir in (tmp_path / "checkpoints").glob("run-*")):
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert conn.execute("SELECT status FROM training_runs").fetchone()[0] == "running"
        trainer = subprocess.Popen([sys.executable, "-m", "trainer", "trainer"], cwd=ROOT,
                                   env=dict(env, FEEDLOOP_TRAIN_INTERVAL_SECONDS="3600"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while time.time() < deadline:
                status, error = conn.execute("SELECT status, error FROM training_runs").fetchone()
                if status != "running":
                    break
                time.sleep(0.5)
        finally:
            trainer.terminate()
            trainer.wait(30)
        assert status == "failed" and "abandoned" in error
        assert conn.execute("SELECT count(*) FROM model_versions").fetchone()[0] == 1  # only v1
