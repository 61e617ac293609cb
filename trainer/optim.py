"""The optimizer and learning-rate schedules the three trainers share: AdamW with weight decay on
matrices only (nanoGPT's `configure_optimizers`), warmup then cosine decay for SFT and the reward
model, warmup then linear anneal for PPO."""
import math

import torch


def adamw(model_or_params, lr: float, weight_decay: float, *, eps: float = 1e-8,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over a module's parameters, decaying only those with 2+ dimensions (matrices,
    embeddings): decaying biases and norm gains only pulls them towards 0 for nothing. An iterable
    of parameters instead of a module is decayed as one group, all alike. Frozen parameters
    (`requires_grad` False) are left out."""
    if isinstance(model_or_params, torch.nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]  # a frozen LoRA base: none
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for p in model_or_params if p.requires_grad], "weight_decay": weight_decay}]
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def warmup_cosine(step: int, total: int, lr: float, warmup_frac: float) -> float:
    """Learning rate at `step` of `total`: nanoGPT's `get_lr`, decaying to lr/10."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:  # 1) linear warmup
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 2) cosine decay to lr/10
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_linear(step: int, total: int, lr: float, warmup_steps: int, anneal: bool = True) -> float:
    """Learning rate at update `step` of `total` for PPO."""
    if step < warmup_steps:  # 1) linear warmup: Adam's first steps are large
        return lr * (step + 1) / (warmup_steps + 1)
    if anneal:  # 2) linear decay towards 0, as OpenAI's lm-human-preferences and CleanRL
        return lr * (1 - step / total)
    return lr  # 3) constant
