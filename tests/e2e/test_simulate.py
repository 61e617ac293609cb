"""`feedloop simulate`: simulated users with hidden preferences drive the real API and the real
trainer service; within a few rounds the served policy wins against the first version on
held-out prompts, within its KL budget, and every number the simulation reports is in the
database as well as in its JSON."""
import json
import subprocess
import sys
import time

import psycopg
import pytest

from sim import preferences, simulate
from tests.conftest import OPERATOR_KEY, ROOT, Server


# --- the pieces, fast ------------------------------------------------------------------------

def test_users_never_ask_the_heldout_prompts():
    held, asked = set(simulate.heldout_prompts()), set(simulate.user_prompts())
    assert held and asked and not held & asked
    assert len(held) >= 40  # the gates and the simulation's win rate measure on these


def test_builtin_preferences():
    assert preferences.brevity("Hi", "Hello.") > preferences.brevity("Hi", "Hello, how are you today?")
    assert preferences.brevity("Hi", "  ") == 0.0  # no answer is not a short answer
    assert preferences.politeness("Hi", "Thank you, please come again.") == 2.0
    assert preferences.politeness("Hi", "Go away.") == 0.0
    cases = {"What is 7 plus 5?": 12, "Subtract 6 from 10.": 4, "10 * 4 = ?": 40, "What is 20 - 11?": 9,
             "What is the product of 7 and 6?": 42, "Please add 6 to 17.": 23, "Name three birds.": None}
    assert {p: preferences.arithmetic_result(p) for p in cases} == cases
    assert preferences.correct_arithmetic("What is 7 plus 5?", "7 plus 5 is 12.") == 1.0
    assert preferences.correct_arithmetic("What is 7 plus 5?", "7 plus 5 is 13.") == 0.0
    assert preferences.correct_arithmetic("Tell me a joke.", "7") == 0.0
    assert preferences._arithmetic_correction("What is 7 plus 5?", "13") == "The answer is 12."


def test_own_preference_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "mytaste.py").write_text("def likes_cats(prompt, answer):\n    return float('cat' in answer)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(tmp_path)
    assert preferences.resolve("mytaste:likes_cats")("", "a cat") == 1.0
    assert preferences.resolve("brevity") is preferences.brevity
    with pytest.raises(ValueError, match="unknown preference"):
        preferences.resolve("nonsense")


def test_ranking_ties_and_win_rate():
    assert simulate.ranking([0.1, 0.9, 0.5]) == [1, 2, 0]
    assert simulate.ranking([0.5, 0.9, 0.5]) == [1, [0, 2]]
    base = {"p": {"answers": ["aaaa", "aa"]}}
    new = {"p": {"answers": ["a", "aa"]}}
    # "a" beats both; "aa" loses to nothing shorter, ties "aa", beats "aaaa": (1 + 1 + 1 + 0.5) / 4
    assert simulate.win_rate(preferences.brevity, new, base) == pytest.approx(3.5 / 4)
    assert simulate.win_rate(preferences.brevity, base, base) == pytest.approx(0.5)


def test_simulate_is_a_feedloop_command():
    out = subprocess.run([sys.executable, "-m", "service", "simulate", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for option in ("--url", "--api-key", "--users", "--preference", "--noise", "--rounds", "--requests", "--seed",
                   "--json", "--png"):
        assert option in out


# --- the loop learns, end to end ------------------------------------------------------------

# Sized for two CPU cores: a round is well under a minute here. The KL is to v1 and accumulates
# over rounds: PPO's KL target and its stop sit below the gates' budget (6 nats, the default),
# which the gates measure on held-out prompts, a few tenths of a nat above PPO's own figure.
# Without the stop a round's KL ran past the budget and the round was rejected.
ROUND = {
    "reward": {"epochs": 2, "batch_size": 32, "heldout_frac": 0.2},
    "ppo": {"steps": 20, "batch_size": 32, "num_minibatches": 2, "temperature": 1.0, "target_kl": 4.0,
            "stop_kl": 4.5},
    "gates": {"eval_prompts": 43, "min_reward_gain": 0.0},
}
ROUNDS = 5
WIN_RATE = 0.7  # against v1 on the held-out prompts, the bar
SIMULATION = ["--users", "8", "--rounds", str(ROUNDS), "--requests", "600", "--choices", "1,2,4,4,4", "--noise", "0.1",
              "--round-timeout", "600"]


@pytest.fixture
def loop(new_database, policy_path, tmp_path):
    """The API and the trainer service trying a round every few seconds, promoting what passes
    the gates; a round needs 800 new pairs (a simulated round brings about 1200, so a round
    that starts while feedback is still arriving leaves too few for a second one)."""
    server = Server(new_database(), tmp_path, FEEDLOOP_POLICY_PATH=policy_path).start()
    env = dict(server.env, FEEDLOOP_TRAIN_INTERVAL_SECONDS="3", FEEDLOOP_PROMOTION="auto",
               FEEDLOOP_MIN_NEW_PAIRS="800", FEEDLOOP_ROUND_CONFIG=json.dumps(ROUND), FEEDLOOP_TORCH_THREADS="1")
    trainer = subprocess.Popen([sys.executable, "-m", "trainer", "trainer"], cwd=ROOT, env=env,
                               stdout=open(tmp_path / "trainer.log", "ab"), stderr=subprocess.STDOUT)
    yield server
    trainer.terminate()
    trainer.wait(60)
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("preference", ["brevity", "detail"])
def test_simulated_users_teach_the_served_policy(loop, preference, tmp_path):
    out, png = tmp_path / "simulation.json", tmp_path / "simulation.png"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "service", "simulate", "--url", loop.url, "--api-key", OPERATOR_KEY,
                           "--preference", preference, "--json", str(out), "--png", str(png), *SIMULATION,
                           "--until-win-rate", str(WIN_RATE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    print(proc.stdout, f"{time.time() - t0:.0f}s", sep="\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rounds = result["rounds"]
    assert png.stat().st_size > 10_000 and result["baseline"]["version"] == "v1"
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) <= ROUNDS + 1

    # every round's numbers are the database's
    pref = preferences.resolve(preference)
    held = set(simulate.heldout_prompts())
    with psycopg.connect(loop.db_url) as conn:
        for row in rounds:
            answers = conn.execute(
                "SELECT rq.model_version_id, rq.messages->-1->>'content', c.text FROM chat_requests rq "
                "JOIN completions c ON c.request_id = rq.id WHERE rq.response_id = ANY(%s)",
                (row["eval_response_ids"],)).fetchall()
            assert len(answers) == len(held) * 4 and {a[0] for a in answers} == {row["served_version_id"]}
            assert {a[1] for a in answers} == held
            score = sum(pref(prompt, text) for _, prompt, text in answers) / len(answers)
            assert score == pytest.approx(row["preferences"][preference]["score"])
            served = conn.execute("SELECT metrics FROM model_versions WHERE id = %s",
                                  (row["served_version_id"],)).fetchone()[0]
            assert served.get("gates/kl", 0.0) == pytest.approx(row["served_kl"])
            for run in row["runs"]:
                assert conn.execute("SELECT status FROM training_runs WHERE id = %s", (run["id"],)).fetchone()[0] \
                    == run["status"]
            if row["run"]:
                status, metrics = conn.execute("SELECT status, metrics FROM training_runs WHERE id = %s",
                                               (row["run"]["id"],)).fetchone()
                assert status == row["run"]["status"] == "succeeded", row["run"]
                assert metrics["gates/kl"] == pytest.approx(row["run"]["kl"])
                assert metrics["reward/heldout_accuracy"] == pytest.approx(row["run"]["rm_accuracy"])
                # PPO's KL controller went on from where the parent's stopped
                curves, parent = conn.execute(
                    "SELECT r.curves, p.metrics FROM training_runs r JOIN model_versions v ON v.training_run_id = r.id "
                    "JOIN model_versions p ON p.id = v.parent_id WHERE r.id = %s AND v.kind = 'policy'",
                    (row["run"]["id"],)).fetchone()
                floor = ROUND["ppo"].get("kl_coef", 0.05)
                carried = max(floor, parent.get("ppo/final_kl_coef", floor))
                assert curves["ppo/kl_coef"][0] == pytest.approx(carried, abs=1e-5)  # curves keep 5 decimals
        # users never asked a held-out prompt: only the measurement did
        asked = conn.execute("SELECT DISTINCT messages->-1->>'content' FROM chat_requests "
                             "WHERE user_field IS DISTINCT FROM 'simulate-eval'").fetchall()
        assert not {a[0] for a in asked} & held
        trained = conn.execute("SELECT count(*) FROM training_runs WHERE kind = 'round' AND status <> 'skipped'"
                               ).fetchone()[0]

    # within five training rounds the served version wins against v1, within the KL budget
    last = rounds[-1]
    assert trained <= ROUNDS
    assert last["preferences"][preference]["win_rate"] >= WIN_RATE, proc.stdout
    assert last["served_version"] != "v1" and last["served_kl"] <= last["kl_budget"]
