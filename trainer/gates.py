"""The gates a round's policy must pass to become a promotable `candidate`: on held-out prompts,
against the active version, sampled and scored the same way. Each gate decides from an interval at
`confidence`, not a point estimate, and has three outcomes: passed, rejected (the interval lies on
the wrong side: the policy is `rejected`), or not enough evidence yet (the interval straddles the
bar, or too little was held out: the policy stays a candidate an operator may promote, and is not
promoted automatically; the next round has more evidence).

    reward gain     paired over the held-out prompts (each prompt's mean reward, candidate minus
                    active): the lower bound must clear `min_reward_gain`
    reward model    held-out pairwise accuracy (Wilson interval on the recency-weighted effective
                    number of pairs): the lower bound must clear `min_rm_accuracy`; fewer than
                    `min_heldout_pairs` or `min_heldout_prompts` is not enough evidence
    drift           KL per answer to the round's reference (the parent, re-anchored each round)
                    within `kl_budget`, and to the lineage's root within `total_kl_budget`
    degenerate      not too many empty answers, not too few distinct ones

The reward gates judge what PPO optimised; a policy only fine-tuned on demonstrations (no PPO)
answers to the drift and degenerate-output gates only.
"""
import math
import statistics
from dataclasses import dataclass, field

from schemas.bundled import heldout_prompts
from store.derive import wilson_interval
from trainer import ppo


@dataclass
class GateConfig:
    confidence: float = 0.9
    """one-sided confidence of every interval the gates decide from"""
    min_reward_gain: float = 0.0
    """the lower bound of the candidate's mean reward gain over the active version (held-out
    prompts, reward-model std units) must exceed this"""
    min_rm_accuracy: float = 0.5
    """the lower bound of the new reward model's held-out pairwise accuracy must exceed this
    (0.5: better than chance)"""
    min_heldout_pairs: float = 20.0
    """fewer (effective) held-out pairs than this: not enough evidence to judge the reward model"""
    min_heldout_prompts: int = 3
    """held-out pairs from fewer prompts than this: not enough evidence (one prompt's pairs are
    not independent)"""
    kl_budget: float = 3.0
    """mean KL per answer (nats) from the round's reference, its parent: one round's step"""
    total_kl_budget: float = 12.0
    """mean KL per answer (nats) from the lineage's root (the first version, e.g. v1): the guard
    against drifting unchecked over many rounds"""
    max_empty_rate: float = 0.2
    """share of empty answers above which the candidate is degenerate"""
    min_distinct_rate: float = 0.3
    """distinct answers / answers below which the candidate is degenerate (mode collapse)"""
    eval_prompts: int = 64
    """held-out prompts the gates sample on (at most the bundled held-out set)"""
    samples_per_prompt: int = 4
    """answers per held-out prompt and version: one answer each left the reward gain too noisy
    to tell a small real gain from sampling luck"""


@dataclass
class Decision:
    """The gates' verdict: reasons to reject, and reasons the evidence does not decide yet."""
    reject: list[str] = field(default_factory=list)
    wait: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reject and not self.wait

    @property
    def verdict(self) -> str:
        return "rejected" if self.reject else "not enough evidence yet" if self.wait else "passed"

    def reasons(self) -> list[str]:
        return self.reject + [f"not enough evidence yet: {w}" for w in self.wait]


def z_of(confidence: float) -> float:
    return statistics.NormalDist().inv_cdf(confidence)


def mean_interval(xs: list[float], confidence: float) -> tuple[float, float, float]:
    """(mean, lower, upper): a normal interval on the mean of `xs` at one-sided `confidence`."""
    m = statistics.fmean(xs)
    half = z_of(confidence) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.inf
    return m, m - half, m + half


def per_prompt_gain(new: dict, old: dict, samples_per_prompt: int) -> list[float]:
    """Each prompt's mean reward, candidate minus active: both sampled on the same prompts."""
    k = samples_per_prompt
    mean = lambda rs: [statistics.fmean(rs[i:i + k]) for i in range(0, len(rs), k)]
    return [a - b for a, b in zip(mean(new["rewards"]), mean(old["rewards"]))]


def reward_gain_gate(cfg: GateConfig, gains: list[float], d: Decision) -> dict:
    gain, lo, hi = mean_interval(gains, cfg.confidence)
    if hi <= cfg.min_reward_gain:
        d.reject.append(f"reward gain {gain:+.3f} [{lo:+.3f}, {hi:+.3f}] not above {cfg.min_reward_gain}")
    elif lo <= cfg.min_reward_gain:
        d.wait.append(f"reward gain {gain:+.3f} [{lo:+.3f}, {hi:+.3f}] not surely above {cfg.min_reward_gain}")
    return {"gates/reward_gain": gain, "gates/reward_gain_low": lo, "gates/reward_gain_high": hi}


def rm_accuracy_gate(cfg: GateConfig, rm: dict, d: Decision) -> dict:
    """`rm`: the reward model's held-out metrics (accuracy, effective pairs, prompts), or {} when
    this round trained none (then the active reward model was judged when it was trained)."""
    acc, n, prompts = (rm.get("reward/heldout_accuracy"), rm.get("reward/heldout_effective_pairs") or 0.0,
                       rm.get("reward/prompts_heldout") or 0)
    if "reward/heldout_accuracy" not in rm:
        return {}
    if acc is None or n < cfg.min_heldout_pairs or prompts < cfg.min_heldout_prompts:
        d.wait.append(f"reward model judged on {n:.0f} held-out pairs from {prompts} prompts "
                      f"(needs {cfg.min_heldout_pairs:g} from {cfg.min_heldout_prompts})")
        return {}
    lo, hi = wilson_interval(round(acc * n), round(n), z=z_of(cfg.confidence))
    if hi <= cfg.min_rm_accuracy:
        d.reject.append(f"reward model held-out accuracy {acc:.2f} [{lo:.2f}, {hi:.2f}] not above {cfg.min_rm_accuracy}")
    elif lo <= cfg.min_rm_accuracy:
        d.wait.append(f"reward model held-out accuracy {acc:.2f} [{lo:.2f}, {hi:.2f}] not surely above "
                      f"{cfg.min_rm_accuracy}")
    return {"gates/rm_accuracy_low": lo, "gates/rm_accuracy_high": hi}


def drift_gate(cfg: GateConfig, kl: float, kl_total: float, d: Decision) -> None:
    if kl > cfg.kl_budget:
        d.reject.append(f"KL {kl:.2f} to the reference over the round's budget {cfg.kl_budget}")
    if kl_total > cfg.total_kl_budget:
        d.reject.append(f"KL {kl_total:.2f} to the root over the total budget {cfg.total_kl_budget}")


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


def check_gates(cfg: GateConfig, new: dict, old: dict, rm: dict, *, kl_total: float | None = None,
                ppo_ran: bool = True) -> tuple[Decision, dict]:
    """The decision on the candidate (`new`, from `ppo.evaluate` against the round's reference)
    next to the active version (`old`), and its `gates/*` interval metrics. `rm`: the new reward
    model's held-out metrics ({} when none was trained). `kl_total`: the candidate's KL to the
    lineage's root (None: the reference is the root). Without PPO the reward gates do not apply:
    SFT did not optimise that reward."""
    d, metrics = Decision(), {}
    if ppo_ran:
        metrics.update(reward_gain_gate(cfg, per_prompt_gain(new, old, cfg.samples_per_prompt), d))
        metrics.update(rm_accuracy_gate(cfg, rm, d))
    drift_gate(cfg, new["kl"], new["kl"] if kl_total is None else kl_total, d)
    d.reject += degenerate(new["answers"], cfg)
    return d, metrics


def gate(cfg: GateConfig, candidate, reference, active, root, tokenizer, reward_fn: ppo.RewardFn | None, *,
         rm: dict, ppo_ran: bool, temperature: float, max_new_tokens: int, seed: int) -> tuple[Decision, dict]:
    """Sample the candidate and the active version on the same held-out prompts (same seed,
    same scorer) and check the gates: (decision, `gates/*` metrics). `root`: the lineage's first
    version, for the total drift (None: the reference is the root). No reward model (`reward_fn`
    None) scores every answer 0, leaving the drift and degenerate-output gates."""
    held = heldout_prompts()[:cfg.eval_prompts]
    score = reward_fn or (lambda convs, answers: [0.0] * len(answers))
    ev = dict(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
              samples_per_prompt=cfg.samples_per_prompt)
    new = ppo.evaluate(candidate, reference, tokenizer, held, score, **ev)
    old = ppo.evaluate(active, reference, tokenizer, held, score, **ev)
    # the same seed samples the same answers again: their KL to the root
    kl_total = ppo.evaluate(candidate, root, tokenizer, held, score, **ev)["kl"] if root is not None else new["kl"]
    d, metrics = check_gates(cfg, new, old, rm, kl_total=kl_total, ppo_ran=ppo_ran)
    return d, {"gates/reward_new": new["reward"], "gates/reward_active": old["reward"],
               "gates/reward_gain": new["reward"] - old["reward"], **metrics,  # the gain's interval when PPO ran
               "gates/kl": new["kl"], "gates/kl_active": old["kl"], "gates/kl_total": kl_total,
               "gates/kl_budget": cfg.kl_budget, "gates/total_kl_budget": cfg.total_kl_budget,
               "gates/passed": d.passed, "gates/verdict": d.verdict, "gates/reasons": d.reasons(),
               "gates/samples": new["answers"][:8]}
