"""`feedloop simulate`: simulated users with hidden preferences drive the real API and the real
trainer service on the default round config; within a few rounds the served policy wins against
the first version on held-out prompts (users whose taste is sparse too; users whose taste
switches: against the version served before the switch), within its drift budgets, and every
number the simulation reports is in the database as well as in its JSON."""
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


def test_tastes_that_switch_and_sparse_tastes():
    switching = preferences.resolve("shorter_then_longer")
    assert (switching.before, switching.after, switching.switch_round) == (preferences.brevity, preferences.detail, 4)
    short, long = "Hi.", "Hello there, this is a much longer answer than the other one."
    for round in (1, 3):
        switching.at(round)
        assert switching("q", short) > switching("q", long)
        assert switching.correct("q", "One. Two.") == "One."  # brevity's correction
    switching.at(4)
    assert switching("q", long) > switching("q", short) and switching.correct("q", short) is None
    assert preferences.resolve("shorter_then_longer") is not switching  # each simulation its own
    custom = preferences.resolve("detail>brevity@2")
    assert (custom.before, custom.after, custom.switch_round) == (preferences.detail, preferences.brevity, 2)
    # sparse: most answers tie at 0; the correction shows what it wants
    assert preferences.offers_more("q", "Paris. I can explain more if you want.") == 1.0
    assert preferences.offers_more("q", "Paris.") == 0.0
    assert preferences.offers_more.correct("q", "Paris.") == "Paris. I can explain more if you want."
    assert simulate.target_win_rate(switching, {"win_rate": 0.9}) == 0.0  # before the switch: not there yet
    assert simulate.target_win_rate(switching, {"win_rate": 0.2, "win_vs_switch": 0.8}) == 0.8


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


def test_a_round_is_over_when_the_trainer_answered_its_feedback():
    def run(id, status, **metrics):
        return {"id": id, "status": status, "metrics": metrics}
    soon = run(5, "skipped", **{"data/waiting": True, "data/trains_in_seconds": 12.0})
    assert not simulate.round_over([soon], after=4, patience=120)  # it trains on this feedback in 12 s
    assert not simulate.round_over([run(4, "succeeded"), run(5, "running")], after=4, patience=120)
    assert simulate.round_over([soon, run(6, "succeeded")], after=4, patience=120)
    assert simulate.round_over([soon], after=4, patience=10)  # not before the round's deadline
    # waiting for more feedback than was given (a count, or a day): the next round's users give it
    assert simulate.round_over([run(5, "skipped", **{"data/waiting": True, "data/trains_in_seconds": 86390.0})],
                               after=4, patience=120)
    assert simulate.round_over([run(5, "skipped", **{"data/waiting": True, "data/trains_in_seconds": None})],
                               after=4, patience=120)
    assert simulate.round_over([run(5, "skipped", skip_reason="0 new pairs")], after=4, patience=120)
    assert not simulate.round_over([run(4, "skipped", skip_reason="0 new pairs")], after=4, patience=120)


def test_simulate_is_a_feedloop_command():
    out = subprocess.run([sys.executable, "-m", "service", "simulate", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    for option in ("--url", "--api-key", "--users", "--preference", "--noise", "--rounds", "--requests", "--seed",
                   "--json", "--png"):
        assert option in out


# --- the loop learns, end to end ------------------------------------------------------------

# The round config is the defaults (trainer/config.py): what a deployment runs. The trigger
# differs, for the test's pace: the trainer tries a round every 3 s (a deployment: hourly), and
# trains once the oldest new feedback event has waited ROUND_AFTER seconds (a deployment: a day),
# never on a count. Simulated users send a round's feedback in a burst of a few seconds, so the
# round takes all of it. On a count (250 events, about half a burst) a round could start on the
# first part of a burst and leave the rest, the leftovers grew round by round, and a burst that
# met large leftovers trained twice (locally: round 7 of a switching taste, 8 runs for 7 rounds).
ROUND_AFTER = 15
NEVER_ON_A_COUNT = 10**9
WIN_RATE = 0.7  # the bar: against v1, or for a switching taste against the pre-switch version
CASES = {  # preference: (rounds at most, requests per round)
    "brevity": (5, 600),
    "detail": (5, 600),
    "offers_more": (5, 600),  # sparse signal: most answers tie, n >= 2 mostly yields nothing
    "shorter_then_longer": (7, 600),  # shorter for rounds 1-3, longer from round 4
}
# The default round config, but for users known to change their minds, as an operator expecting
# such users would set it: a short memory (pairs count half after a quarter of a round), and a
# total drift guard with room to follow them past v1 the other way. Following "longer" after three
# rounds of "shorter" measured up to 12.6 nats from v1 in a round whose own drift was within its
# 3, so the default 12 rejected the round that would have caught up (CI, stop 28: 68 % after it).
# At a half-life of half a round the reward model's held-out accuracy the round after the switch
# was 0.49-0.64 in five runs (two waited for evidence), and the served version reached 70 % in
# round 4, 6 or 7 in four of them and not at all in one (CI); at a quarter 0.66 and 0.69, and 75 %
# and 78 % in rounds 5 and 6.
ROUND_CONFIG = {"shorter_then_longer": {"recency_half_life": 0.25, "gates": {"total_kl_budget": 24.0}}}


@pytest.fixture
def loop(new_database, policy_path, tmp_path, request):
    """The API and the trainer service on the default round config, promoting what passes the
    gates."""
    preference = request.node.callspec.params["preference"]
    server = Server(new_database(), tmp_path, FEEDLOOP_POLICY_PATH=policy_path).start()
    env = dict(server.env, FEEDLOOP_TRAIN_INTERVAL_SECONDS="3", FEEDLOOP_PROMOTION="auto",
               FEEDLOOP_MIN_NEW_FEEDBACK=str(NEVER_ON_A_COUNT), FEEDLOOP_MAX_ROUND_INTERVAL_SECONDS=str(ROUND_AFTER),
               FEEDLOOP_TORCH_THREADS="1")
    env.pop("FEEDLOOP_ROUND_CONFIG", None)
    if preference in ROUND_CONFIG:
        env["FEEDLOOP_ROUND_CONFIG"] = json.dumps(ROUND_CONFIG[preference])
    trainer = subprocess.Popen([sys.executable, "-m", "trainer", "trainer"], cwd=ROOT, env=env,
                               stdout=open(tmp_path / "trainer.log", "ab"), stderr=subprocess.STDOUT)
    yield server
    trainer.terminate()
    trainer.wait(60)
    server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("preference", list(CASES))
def test_simulated_users_teach_the_served_policy(loop, preference, tmp_path):
    """Within the rounds allowed the served version wins >= 70 % on held-out prompts: against v1,
    or, for users whose taste switches after round 3, against the version served before the
    switch, judged by the new taste, within 4 rounds of it; every round's drift within its budget
    and the total within its own."""
    rounds_max, requests = CASES[preference]
    out, png = tmp_path / "simulation.json", tmp_path / "simulation.png"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "service", "simulate", "--url", loop.url, "--api-key", OPERATOR_KEY,
                           "--preference", preference, "--json", str(out), "--png", str(png), "--users", "8",
                           "--rounds", str(rounds_max), "--requests", str(requests), "--noise", "0.1",
                           "--round-timeout", "600", "--until-win-rate", str(WIN_RATE)],
                          cwd=ROOT, capture_output=True, text=True, timeout=2400)
    print(proc.stdout, f"{time.time() - t0:.0f}s", sep="\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rounds = result["rounds"]
    assert png.stat().st_size > 10_000 and result["baseline"]["version"] == "v1"
    assert [r["round"] for r in rounds] == list(range(len(rounds))) and len(rounds) <= rounds_max + 1

    # every round's numbers are the database's
    pref = preferences.resolve(preference)
    held = set(simulate.heldout_prompts())
    with psycopg.connect(loop.db_url) as conn:
        for row in rounds:
            if isinstance(pref, preferences.Switching):
                pref.at(row["round"])
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
            assert served.get("gates/kl_total", served.get("gates/kl", 0.0)) == pytest.approx(row["served_kl_total"])
            for run in row["runs"]:
                assert conn.execute("SELECT status FROM training_runs WHERE id = %s", (run["id"],)).fetchone()[0] \
                    == run["status"]
            if row["run"]:
                status, metrics = conn.execute("SELECT status, metrics FROM training_runs WHERE id = %s",
                                               (row["run"]["id"],)).fetchone()
                assert status == row["run"]["status"] == "succeeded", row["run"]
                assert metrics["gates/kl"] == pytest.approx(row["run"]["kl"])
                assert metrics["reward/heldout_accuracy"] == pytest.approx(row["run"]["rm_accuracy"])
                # re-anchored: each policy's reference is its parent, the version the round improved
                parent, reference = conn.execute(
                    "SELECT parent_id, reference_id FROM model_versions WHERE training_run_id = %s AND kind = 'policy'",
                    (row["run"]["id"],)).fetchone()
                assert reference == parent
        # users never asked a held-out prompt: only the measurement did
        asked = conn.execute("SELECT DISTINCT messages->-1->>'content' FROM chat_requests "
                             "WHERE user_field IS DISTINCT FROM 'simulate-eval'").fetchall()
        assert not {a[0] for a in asked} & held
        trained = conn.execute("SELECT count(*) FROM training_runs WHERE kind = 'round' AND status <> 'skipped'"
                               ).fetchone()[0]

    # every served version within its round's budget and the total budget
    for row in rounds[1:]:
        assert row["served_kl"] <= row["kl_budget"] and row["served_kl_total"] <= row["total_kl_budget"], row
    last = rounds[-1]
    assert trained <= rounds_max and last["served_version"] != "v1"
    if isinstance(pref, preferences.Switching):
        assert result["switch_baseline"]["round"] == pref.switch_round == 4
        assert last["round"] - pref.switch_round < 4  # within 4 rounds of the switch
        assert last["preferences"][preference]["win_vs_switch"] >= WIN_RATE, proc.stdout
    else:
        assert last["preferences"][preference]["win_rate"] >= WIN_RATE, proc.stdout
