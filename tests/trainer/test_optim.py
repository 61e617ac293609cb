"""The optimizer and schedules every trainer shares: the numbers by hand, and weight decay only
where it belongs."""
import pytest
import torch

from trainer.optim import adamw, set_lr, warmup_cosine, warmup_linear


def test_ppo_schedule_warms_up_then_anneals_linearly():
    # warmup 2 of 10: 1/3, 2/3; then lr * (1 - step / total): 0.8, 0.7
    assert [round(warmup_linear(s, 10, 1.0, 2), 3) for s in range(4)] == [0.333, 0.667, 0.8, 0.7]
    assert warmup_linear(9, 10, 1.0, 0) == pytest.approx(0.1)
    assert warmup_linear(9, 10, 1.0, 0, anneal=False) == 1.0


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [warmup_cosine(s, 100, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # 10 warmup steps, (step + 1) / 10
    assert lrs[10] == 1.0  # the peak, where the cosine starts
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert warmup_cosine(0, 5, 1.0, 0.05) == 1.0  # a warmup shorter than a step is one step


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(model, 1e-2, 0.5)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3  # the linear bias, the norm's gain and bias
    # With zero gradients Adam moves nothing: whatever changes was decayed.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert [not torch.equal(a, p) for a, p in zip(before, model.parameters())] == [True, False, False, False]


def test_adamw_over_parameters_decays_them_all_alike():
    model = torch.nn.Linear(3, 4)
    opt = adamw(model.parameters(), 1e-2, 0.01, eps=1e-5)
    (group,) = opt.param_groups
    assert len(group["params"]) == 2 and group["weight_decay"] == 0.01 and group["eps"] == 1e-5
    set_lr(opt, 0.5)
    assert group["lr"] == 0.5

