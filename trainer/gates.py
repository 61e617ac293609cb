"""The gates a round's policy must pass to become a `candidate` (else it is `rejected`, with the
reasons): on held-out prompts, against the active version, sampled and scored the same way.

    reward gain     the candidate's mean reward beats the active version's by `min_reward_gain`
    KL budget       the candidate stays within `kl_budget` nats per answer of the reference
    reward model    the new reward model's held-out pairwise accuracy reaches `min_rm_accuracy`
    degenerate      not too many empty answers, not too few distinct ones

The reward gates judge what PPO optimised; a policy only fine-tuned on demonstrations (no PPO)
answers to the KL budget and the degenerate-output checks only.
"""
from dataclasses import dataclass

from schemas.bundled import heldout_prompts
from trainer import ppo


@dataclass
class GateConfig:
    min_reward_gain: float = 0.05
    """candidate's mean reward on held-out prompts must beat the active version's by this (std units)"""
    kl_budget: float = 6.0
    """mean KL per answer (nats) from the reference policy the candidate may reach"""
    min_rm_accuracy: float = 0.6
    """the new reward model's held-out pairwise accuracy must reach this (when measurable)"""
    max_empty_rate: float = 0.2
    """share of empty answers above which the candidate is degenerate"""
    min_distinct_rate: float = 0.3
    """distinct answers / answers below which the candidate is degenerate (mode collapse)"""
    eval_prompts: int = 32
    """held-out prompts the gates sample on"""
    samples_per_prompt: int = 4
    """answers per held-out prompt and version: one answer each left the reward gain too noisy
    to tell a small real gain from sampling luck"""


def degenerate(answers: list[str], cfg: GateConfig) -> list[str]:
    """Reasons the answers look broken: too many empty, too few distinct."""
    reasons = []
    empty = sum(not a.strip() for a in answers) / max(1, len(answers))
    distinct = len(set(answers)) / max(1, len(answers))
    if empty > cfg.max_empty_rate:
        reasons.append(f"{empty:.0%} empty answers (limit {cfg.max_empty_rate:.0%})")
    if distinct < cfg.min_distinct_rate:
        reasons.append(f"only {distinct:.0%} distinct answers (floor {cfg.min_distinct_rate:.0%})")
    return reasons


def check_gates(cfg: GateConfig, new: dict, old: dict, rm_accuracy: float | None, *,
                ppo_ran: bool = True) -> list[str]:
    """Reasons to reject the candidate (`new`, from `ppo.evaluate`) next to the active version
    (`old`); empty means it passes. Without PPO the reward gates do not apply: SFT did not
    optimise that reward, and the reward model may be one this round did not train."""
    reasons = []
    gain = new["reward"] - old["reward"]
    if ppo_ran and gain < cfg.min_reward_gain:
        reasons.append(f"reward gain {gain:+.3f} below {cfg.min_reward_gain}")
    if new["kl"] > cfg.kl_budget:
        reasons.append(f"KL {new['kl']:.2f} to the reference over the budget {cfg.kl_budget}")
    if ppo_ran and rm_accuracy is not None and rm_accuracy < cfg.min_rm_accuracy:
        reasons.append(f"reward model held-out accuracy {rm_accuracy:.2f} below {cfg.min_rm_accuracy}")
    return reasons + degenerate(new["answers"], cfg)


def gate(cfg: GateConfig, candidate, reference, active, tokenizer, reward_fn: ppo.RewardFn | None, *,
         rm_accuracy: float | None, ppo_ran: bool, temperature: float, max_new_tokens: int,
         seed: int) -> tuple[list[str], dict]:
    """Sample the candidate and the active version on the same held-out prompts (same seed,
    same scorer) and check the gates: (reasons to reject, `gates/*` metrics). No reward model
    (`reward_fn` None) scores every answer 0, leaving the KL and degenerate-output gates."""
    held = heldout_prompts()[:cfg.eval_prompts]
    score = reward_fn or (lambda convs, answers: [0.0] * len(answers))
    ev = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
              samples_per_prompt=cfg.samples_per_prompt)
    new = ppo.evaluate(candidate, reference, tokenizer, held, score, **ev)
    old = ppo.evaluate(active, reference, tokenizer, held, score, **ev)
    reasons = check_gates(cfg, new, old, rm_accuracy, ppo_ran=ppo_ran)
    return reasons, {"gates/reward_new": new["reward"], "gates/reward_active": old["reward"],
                     "gates/reward_gain": new["reward"] - old["reward"], "gates/kl": new["kl"],
                     "gates/kl_active": old["kl"], "gates/passed": not reasons,
                     "gates/reasons": reasons, "gates/samples": new["answers"][:8]}
