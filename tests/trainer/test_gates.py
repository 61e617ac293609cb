"""The gates' decisions on evaluations made by hand: each reason to reject, alone and together,
the edges, and the gates a policy trained without PPO answers to."""
from trainer.gates import GateConfig, check_gates, degenerate

CFG = GateConfig(min_reward_gain=0.5, kl_budget=6.0, min_rm_accuracy=0.6, max_empty_rate=0.2,
                 min_distinct_rate=0.3)
DISTINCT = [f"answer {i}" for i in range(10)]


def evaluation(reward: float = 0.0, kl: float = 1.0, answers: list[str] = DISTINCT) -> dict:
    """What `ppo.evaluate` returns, as far as the gates read it."""
    return {"reward": reward, "kl": kl, "answers": answers}


def test_a_candidate_that_clears_every_gate_passes():
    assert check_gates(CFG, evaluation(reward=1.0), evaluation(reward=0.25), rm_accuracy=0.7) == []


def test_too_small_a_reward_gain_is_rejected():
    assert check_gates(CFG, evaluation(reward=0.5), evaluation(reward=0.25), 0.7) == [
        "reward gain +0.250 below 0.5"]
    assert check_gates(CFG, evaluation(reward=-1.0), evaluation(reward=0.0), 0.7) == [
        "reward gain -1.000 below 0.5"]
    assert check_gates(CFG, evaluation(reward=0.75), evaluation(reward=0.25), 0.7) == []  # exactly the gain


def test_kl_over_the_budget_is_rejected():
    assert check_gates(CFG, evaluation(reward=1.0, kl=6.5), evaluation(), 0.7) == [
        "KL 6.50 to the reference over the budget 6.0"]
    assert check_gates(CFG, evaluation(reward=1.0, kl=6.0), evaluation(), 0.7) == []  # at the budget


def test_a_weak_reward_model_is_rejected_and_an_unmeasured_one_is_not():
    assert check_gates(CFG, evaluation(reward=1.0), evaluation(), rm_accuracy=0.55) == [
        "reward model held-out accuracy 0.55 below 0.6"]
    assert check_gates(CFG, evaluation(reward=1.0), evaluation(), rm_accuracy=0.6) == []
    assert check_gates(CFG, evaluation(reward=1.0), evaluation(), rm_accuracy=None) == []  # no held-out pairs


def test_too_many_empty_answers_are_degenerate():
    three_empty = ["", "  ", "\n"] + DISTINCT[:7]
    assert degenerate(three_empty, CFG) == ["30% empty answers (limit 20%)"]
    assert degenerate(["", " "] + DISTINCT[:8], CFG) == []  # 20%: at the limit
    assert check_gates(CFG, evaluation(reward=1.0, answers=three_empty), evaluation(), 0.7) == [
        "30% empty answers (limit 20%)"]


def test_too_few_distinct_answers_are_degenerate():
    collapsed = ["yes"] * 8 + ["no", "maybe"]
    assert degenerate(["yes"] * 9 + ["no"], CFG) == ["only 20% distinct answers (floor 30%)"]
    assert degenerate(collapsed, CFG) == []  # 3 of 10: at the floor
    assert degenerate([""] * 10, CFG) == ["100% empty answers (limit 20%)", "only 10% distinct answers (floor 30%)"]


def test_every_failing_gate_is_reported():
    new = evaluation(reward=0.0, kl=9.0, answers=["same"] * 10)
    assert check_gates(CFG, new, evaluation(reward=0.1), rm_accuracy=0.5) == [
        "reward gain -0.100 below 0.5",
        "KL 9.00 to the reference over the budget 6.0",
        "reward model held-out accuracy 0.50 below 0.6",
        "only 10% distinct answers (floor 30%)",
    ]


def test_without_ppo_only_the_kl_budget_and_degenerate_output_gate():
    # SFT did not optimise the reward: a lower score and a weak reward model do not reject it.
    assert check_gates(CFG, evaluation(reward=-1.0), evaluation(reward=0.0), rm_accuracy=0.1, ppo_ran=False) == []
    assert check_gates(CFG, evaluation(kl=7.0, answers=["same"] * 10), evaluation(), 0.1, ppo_ran=False) == [
        "KL 7.00 to the reference over the budget 6.0", "only 10% distinct answers (floor 30%)"]
