"""The gates' decisions on evaluations made by hand: each gate passes, rejects or waits for more
evidence from an interval, not a point estimate; the drift budgets per round and in total; the
gates a policy trained without PPO answers to."""
import pytest

from trainer.gates import GateConfig, check_gates, degenerate

CFG = GateConfig(min_reward_gain=0.0, kl_budget=3.0, total_kl_budget=12.0, min_rm_accuracy=0.5, confidence=0.9,
                 min_heldout_pairs=20, min_heldout_prompts=3, max_empty_rate=0.2, min_distinct_rate=0.3,
                 samples_per_prompt=2)
DISTINCT = [f"answer {i}" for i in range(10)]
GOOD_RM = {"reward/heldout_accuracy": 0.8, "reward/heldout_effective_pairs": 100.0, "reward/prompts_heldout": 10}


def evaluation(rewards: list[float] = (0.0,) * 20, kl: float = 1.0, answers: list[str] = DISTINCT) -> dict:
    """What `ppo.evaluate` returns, as far as the gates read it: 2 samples per prompt."""
    return {"reward": sum(rewards) / len(rewards), "rewards": list(rewards), "kl": kl, "answers": answers}


def gains(*per_prompt: float) -> tuple[dict, dict]:
    """A candidate whose answers beat the active version's by `per_prompt` on each prompt."""
    return (evaluation([g for g in per_prompt for _ in range(2)]), evaluation([0.0] * (2 * len(per_prompt))))


def decide(new, old, rm=GOOD_RM, **kw):
    d, metrics = check_gates(CFG, new, old, rm, **kw)
    return d.verdict, d.reject, d.wait, metrics


def test_a_candidate_surely_better_passes():
    verdict, reject, wait, m = decide(*gains(0.5, 0.7, 0.6, 0.4, 0.8, 0.5, 0.6, 0.7, 0.5, 0.6))
    assert (verdict, reject, wait) == ("passed", [], [])
    assert m["gates/reward_gain"] == pytest.approx(0.59)
    assert 0 < m["gates/reward_gain_low"] < 0.59 < m["gates/reward_gain_high"]
    assert m["gates/rm_accuracy_low"] > 0.5


def test_a_noisy_gain_is_not_enough_evidence_and_a_sure_loss_is_rejected():
    verdict, reject, wait, m = decide(*gains(1.0, -0.9, 0.8, -0.7, 0.9, -0.8))  # mean +0.05, sd ~0.9
    assert verdict == "not enough evidence yet" and not reject
    assert wait[0].startswith("reward gain +0.050 [") and "not surely above 0.0" in wait[0]
    verdict, reject, _, _ = decide(*gains(-0.5, -0.6, -0.4, -0.7, -0.5, -0.6))
    assert verdict == "rejected" and reject[0].startswith("reward gain -0.550 [") and "not above 0.0" in reject[0]


def test_the_reward_model_on_too_little_held_out_evidence_waits():
    good = gains(0.5, 0.7, 0.6, 0.4, 0.8, 0.6)
    # the case: 7 pairs of one prompt at 0.00 is not a verdict on the reward model
    one_prompt = {"reward/heldout_accuracy": 0.0, "reward/heldout_effective_pairs": 7.0, "reward/prompts_heldout": 1}
    verdict, reject, wait, _ = decide(*good, rm=one_prompt)
    assert (verdict, reject) == ("not enough evidence yet", [])
    assert wait == ["reward model judged on 7 held-out pairs from 1 prompts (needs 20 from 3)"]
    none_held = {"reward/heldout_accuracy": None, "reward/heldout_effective_pairs": 0.0, "reward/prompts_heldout": 0}
    assert decide(*good, rm=none_held)[0] == "not enough evidence yet"
    # enough pairs, but the interval straddles chance: wait; surely at or below chance: reject
    assert decide(*good, rm=dict(GOOD_RM, **{"reward/heldout_accuracy": 0.55, "reward/heldout_effective_pairs": 40}))[0] \
        == "not enough evidence yet"
    verdict, reject, _, _ = decide(*good, rm=dict(GOOD_RM, **{"reward/heldout_accuracy": 0.3}))
    assert verdict == "rejected" and reject[0].startswith("reward model held-out accuracy 0.30 [")
    assert decide(*good, rm={})[0] == "passed"  # no reward model trained this round: judged when it was


def test_drift_over_the_rounds_budget_or_the_total_budget_is_rejected():
    new, old = gains(0.5, 0.7, 0.6, 0.4, 0.8, 0.6)
    assert decide(dict(new, kl=3.0), old)[0] == "passed"  # at the budget
    assert decide(dict(new, kl=3.5), old)[1] == ["KL 3.50 to the reference over the round's budget 3.0"]
    assert decide(dict(new, kl=2.0), old, kl_total=11.0)[0] == "passed"
    assert decide(dict(new, kl=2.0), old, kl_total=12.5)[1] == ["KL 12.50 to the root over the total budget 12.0"]
    # the reference is the root (kl_total None): the round's KL is the total
    assert decide(dict(new, kl=2.0), old)[1] == []


def test_too_many_empty_answers_are_degenerate():
    three_empty = ["", "  ", "\n"] + DISTINCT[:7]
    assert degenerate(three_empty, CFG) == ["30% empty answers (limit 20%)"]
    assert degenerate(["", " "] + DISTINCT[:8], CFG) == []  # 20%: at the limit
    new, old = gains(0.5, 0.7, 0.6, 0.4, 0.8, 0.6)
    assert decide(dict(new, answers=three_empty), old)[1] == ["30% empty answers (limit 20%)"]


def test_too_few_distinct_answers_are_degenerate():
    assert degenerate(["yes"] * 9 + ["no"], CFG) == ["only 20% distinct answers (floor 30%)"]
    assert degenerate(["yes"] * 8 + ["no", "maybe"], CFG) == []  # 3 of 10: at the floor
    assert degenerate([""] * 10, CFG) == ["100% empty answers (limit 20%)", "only 10% distinct answers (floor 30%)"]


def test_every_failing_gate_is_reported_and_rejection_outranks_waiting():
    new, old = gains(-0.5, -0.6, -0.4, -0.7, -0.5, -0.6)
    d, _ = check_gates(CFG, dict(new, kl=9.0, answers=["same"] * 10), old,
                       {"reward/heldout_accuracy": 0.5, "reward/heldout_effective_pairs": 5, "reward/prompts_heldout": 1})
    assert d.verdict == "rejected" and len(d.reject) == 3 and len(d.wait) == 1
    assert d.reasons()[-1].startswith("not enough evidence yet: reward model judged on 5")


def test_without_ppo_only_the_drift_and_degenerate_output_gate():
    # SFT did not optimise the reward: a lower score and a weak reward model do not reject it.
    new, old = gains(-1.0, -1.0, -1.0)
    assert decide(new, old, rm={"reward/heldout_accuracy": 0.1}, ppo_ran=False)[:3] == ("passed", [], [])
    assert decide(dict(new, kl=7.0, answers=["same"] * 10), old, ppo_ran=False)[1] == [
        "KL 7.00 to the reference over the round's budget 3.0", "only 10% distinct answers (floor 30%)"]
