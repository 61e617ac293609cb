"""PPO against a reward (InstructGPT step 3), top to bottom: config, prompts, rollout, score,
per-token KL reward, GAE, clipped losses, update epochs, `train`, `evaluate`. A trained policy is
published by `trainer.common.publish_policy`.

The choices follow InstructGPT (Ouyang et al. 2022, §3.5 and appendix C.4), Ziegler et al. 2019
("Fine-tuning language models from human preferences": the adaptive KL controller) and "The N
implementation details of RLHF with PPO" (Huang et al. 2023; its details are unnumbered, so they
are cited by name as N-details "…" below). TRL's PPOTrainer (removed after 1.12) made the same
choices; `bench/ppo.py` times both.

Shapes: B answers per update, P prompt columns (left-padded), R answer columns (right-padded
after EOS), V vocabulary. `response_mask (B, R)` is 1 on answer tokens up to and including EOS.
"""
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lm.chat import as_messages, context_length, encode_prompt
from lm.decoding import left_pad
from lm.turns import check_pad, end_of_turn_ids
from schemas.bundled import bundled_prompts
from trainer.lora import AdapterView, HeadView, new_head
from trainer.rollout import (Samples, decode, join, response_logits, response_logits_and_values, response_values,
                             sample)
from trainer.common import disable_dropout, fp32_trainable, fused_activations, make_accelerator, on_terminal
from trainer.optim import adamw, set_lr, warmup_linear
from trainer.sft import answer_loss, collate, encode_demonstration

log = logging.getLogger(__name__)

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]
"""(conversations, answers) -> (B,) scores; the normalised reward model in a round."""

# Keys of the per-step curves `train` returns under "ppo/curves" (and the last values at top level).
CURVE_KEYS = (
    "reward/score",            # mean reward-model score of the answers
    "reward/penalised",        # score minus the missing-EOS penalty
    "reward/total",            # penalised score minus beta * KL: the objective PPO maximises
    "ppo/kl",                  # mean KL(policy || reference) per answer, nats (sum over tokens)
    "ppo/kl_coef",             # beta used for this rollout
    "ppo/entropy",             # mean per-token entropy of the policy on its answers
    "ppo/pg_loss",
    "ppo/vf_loss",
    "ppo/clipfrac",            # share of tokens whose ratio was clipped
    "ppo/vf_clipfrac",
    "ppo/approx_kl",           # KL(old || new) estimate over the update epochs
    "ppo/ratio",
    "ppo/explained_variance",  # of the returns by the rollout values
    "ppo/ptx_loss",            # SFT loss on demonstrations (PPO-ptx); 0 when off
    "ppo/minibatches",         # optimizer steps taken (fewer when max_approx_kl stopped the epochs)
    "rollout/response_length", # mean answer tokens, EOS included
    "rollout/eos_rate",        # share of answers that ended with EOS
    "time/update_seconds",     # rollout + scoring + all epochs
)


VALUE_MODELS = ("separate", "shared")


@dataclass
class PPOConfig:
    # general
    seed: int = 0
    """seeds prompt order and sampling"""
    device: str = "auto"
    """torch device; auto lets accelerate pick (a GPU when present)"""
    mixed_precision: str = "auto"
    """autocast: auto (bf16 on a GPU with bf16, fp16 on other GPUs, none on CPU), no, bf16, fp16;
    trainable weights and AdamW's state stay fp32 either way"""
    steps: int = 20
    """PPO updates: each samples `batch_size` answers, scores them and trains `ppo_epochs` on them"""

    # rollout
    batch_size: int = 64
    """prompts per update per process, one answer each"""
    max_prompt_tokens: int = 128
    """longer prompts are dropped by `prompts_for_ppo` (and left-truncated if passed anyway)"""
    max_new_tokens: int = 32
    """answer length cap; an answer that reaches it without EOS is penalised"""
    temperature: float = 0.7
    """sampling temperature; log-probs are computed from logits / temperature to match"""
    missing_eos_penalty: float = 1.0
    """subtracted from the score of an answer without EOS (scores are normalised to std 1)"""

    # algorithm specific arguments
    lr: float = 1e-4
    """AdamW learning rate of policy and value model"""
    weight_decay: float = 0.01
    """AdamW weight decay, on every parameter (PyTorch's default, which PPO has always run with)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the run (N-details "learning rate annealing")"""
    warmup_steps: int = 2
    """updates over which the learning rate rises linearly first (Adam's first steps are large)"""
    ppo_epochs: int = 4
    """passes over each rollout"""
    max_approx_kl: float | None = None
    """stop an update's epochs early once a minibatch's approx-KL(old || new) exceeds this
    (CleanRL's target_kl); None never stops"""
    num_minibatches: int = 4
    """minibatches per pass (one optimizer step each)"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip around the rollout's values"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    value_model: str = "separate"
    """separate: a value model of its own (InstructGPT: started from the reward model); shared: a
    new scalar head on the policy's final hidden state, one forward giving logits and values and
    one backward for both (CleanRL's and trlx's layout): a cheaper update, but the value loss also
    moves the policy's trunk. The head is never published: the checkpoint is the policy alone"""
    kl_coef: float = 0.05
    """initial beta of the per-token KL penalty to the reference policy, and its floor"""
    initial_kl_coef: float | None = None
    """beta to start from instead of `kl_coef`: a round continues its parent's final beta"""
    adaptive_kl: bool = True
    """steer beta towards `target_kl` (Ziegler et al. 2019); off: beta stays `kl_coef`"""
    target_kl: float = 6.0
    """KL per answer (nats, summed over its tokens) the controller steers towards"""
    kl_horizon: int = 256
    """answers over which the controller corrects beta (Ziegler et al. use 10000 on longer runs)"""
    stop_kl: float | None = None
    """end the run once a rollout's KL to the reference reaches this (nats per answer); the update
    on that rollout is the last. Beta moves a few percent per update, too slowly to hold the KL
    in a round of tens of updates, and the gates reject a policy past their budget. None: every step"""
    kl_estimator: str = "k1"
    """per-token KL in the reward: k1 = log(p/q) as InstructGPT, k3 = (q/p - 1) - log(q/p)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards before GAE (N-details "reward whitening"; off as in TRL's default)"""
    max_grad_norm: float = 1.0
    """gradient clipping over policy and value parameters"""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of the SFT loss on demonstrations mixed into each minibatch; 0 is off"""
    ptx_batch_size: int = 8
    """demonstrations per minibatch when PPO-ptx is on"""

    def __post_init__(self):
        if self.batch_size % self.num_minibatches:
            raise ValueError("batch_size must be a multiple of num_minibatches")
        if self.value_model not in VALUE_MODELS:
            raise ValueError(f"value_model is one of {', '.join(VALUE_MODELS)}, not {self.value_model!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError("kl_estimator is k1 or k3")
        if self.temperature <= 0:
            raise ValueError("PPO samples: temperature must be positive")
        if self.stop_kl is not None and self.stop_kl <= 0:
            raise ValueError("stop_kl must be positive (or None)")

    @property
    def minibatch_size(self) -> int:
        """answers per optimizer step, per process (derived: follows overrides of the fields)"""
        return self.batch_size // self.num_minibatches


# --- prompts ---------------------------------------------------------------------------------

def _clean(conversation) -> list[dict]:
    """Just role and text: OpenAI content parts joined, extra fields (name, ids) dropped."""
    out = []
    for m in as_messages(conversation):
        content = m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m["role"], "content": content})
    return out


def prompts_for_ppo(recorded: list[list[dict]], tokenizer, max_prompt_tokens: int, n: int) -> list[list[dict]]:
    """Up to `n` distinct conversations to train on: the recorded ones in the order given (the
    store lists the most recent first), without duplicates or ones longer than
    `max_prompt_tokens`, topped up from the bundled prompts when fewer than `n` remain."""
    seen, out = set(), []
    candidates = [_clean(c) for c in recorded] + [as_messages(p) for p in bundled_prompts()]
    for conv in candidates:
        if len(out) >= n:
            break
        key = json.dumps(conv, sort_keys=True)
        if not conv or conv[-1]["role"] == "assistant" or key in seen:
            continue
        seen.add(key)
        if len(encode_prompt(tokenizer, conv)) <= max_prompt_tokens:
            out.append(conv)
    return out


# --- rollout -------------------------------------------------------------------------------------

@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P) left-padded
    prompt_mask: torch.Tensor      # (B, P)
    samples: Samples               # responses, logprobs, response_mask (B, R); has_eos (B,)
    answers: list[str]


def rollout(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
            device, generator: torch.Generator | None = None, value_head=None) -> Rollout:
    """Sample one answer per prompt from the current policy, cut at EOS (and, with a shared
    `value_head`, read the values on the way)."""
    ids, mask = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    samples = sample(policy, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                     end_ids=end_of_turn_ids(tokenizer), pad_id=tokenizer.pad_token_id, generator=generator,
                     value_head=value_head)
    return Rollout(ids, mask, samples, decode(tokenizer, samples.responses, samples.response_mask))


# --- score ---------------------------------------------------------------------------------------

def score(reward_fn: RewardFn, conversations: list[list[dict]], answers: list[str],
          has_eos: torch.Tensor, missing_eos_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, penalised score), each (B,): the reward model's value of the answer truncated at
    EOS; an answer that never stopped loses `missing_eos_penalty` (N-details "response
    truncation": OpenAI gave -1 to answers without the ending token; TRL's missing_eos_penalty)."""
    scores = torch.as_tensor(reward_fn(conversations, answers), dtype=torch.float32).reshape(-1)
    scores = scores.to(has_eos.device)
    return scores, scores - missing_eos_penalty * (~has_eos).float()


# --- per-token KL reward -----------------------------------------------------------------------

def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) at the sampled tokens (B, R); see
    http://joschu.net/blog/kl-approx.html. k1 = log p - log q, unbiased, InstructGPT's penalty;
    k3 = (q/p - 1) - log(q/p), unbiased and never negative."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def token_rewards(penalised: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """(B, R) reward per answer token: -beta * KL on every token and the sequence's score added
    on its last token (EOS, or the last one sampled): InstructGPT eq. 2; N-details "the reward
    model score is added to the last token, the KL penalty to every token"."""
    rewards = -kl_coef * kl * response_mask
    last = response_mask.sum(1).long() - 1  # (B,) index of the last answer token
    rewards[torch.arange(len(last), device=last.device), last] += penalised
    return rewards


class AdaptiveKLController:
    """beta_{t+1} = beta_t * (1 + K * e_t), e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),
    K = answers this update / horizon (Ziegler et al. 2019, §2.2). One change for short rounds
    (tens of updates where Ziegler et al. ran thousands): beta never drops below `kl_coef`. A first
    round starts at KL 0, below any target; unbounded, beta would wind down over those first
    updates and could not climb back before the policy had overshot the budget. A later round's
    policy starts at its parent's KL, so its beta starts where the parent's stopped (`start`)."""

    def __init__(self, kl_coef: float, target: float, horizon: int, start: float | None = None):
        self.floor, self.target, self.horizon = kl_coef, target, horizon
        self.value = max(kl_coef, start or kl_coef)

    def update(self, current_kl: float, n_answers: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value = max(self.floor, self.value * (1 + error * n_answers / self.horizon))


# --- GAE and whitening ---------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the unmasked entries."""
    n = mask.sum()
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero mean (unless not `shift_mean`), unit variance over the unmasked entries; masked stay 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens: (advantages, returns), each (B, R).
    After the last answer token value and reward are 0, so the episode ends there."""
    values, rewards = values * response_mask, rewards * response_mask
    R = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(R)):
        nextvalues = values[:, t + 1] if t < R - 1 else torch.zeros_like(lastgaelam)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], 1) * response_mask
    return advantages, (advantages + values) * response_mask


# --- losses ----------------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, token-level mean."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        stats = {"ppo/clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
                 # KL(old || new), k3 estimator: http://joschu.net/blog/kl-approx.html
                 "ppo/approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
                 "ppo/ratio": masked_mean(ratio, mask)}
    return pg_loss, stats


def value_loss(vpred: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (N-details "clipped value function"; CleanRL's v_loss), token-level mean."""
    vpred_clipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    v_loss_unclipped = (vpred - returns) ** 2
    v_loss_clipped = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        stats = {"ppo/vf_clipfrac": masked_mean((v_loss_clipped > v_loss_unclipped).float(), mask)}
    return vf_loss, stats


# --- one update's batch: rollout -> score -> per-token KL reward -> GAE -----------------------

@dataclass
class Batch:
    """Everything one update trains on; rows are answers."""
    ids: torch.Tensor          # (B, P + R) prompt then answer
    mask: torch.Tensor         # (B, P + R)
    responses: torch.Tensor    # (B, R)
    response_mask: torch.Tensor
    logprobs: torch.Tensor     # (B, R) under the policy that sampled
    values: torch.Tensor       # (B, R) of the value model before the update
    advantages: torch.Tensor   # (B, R) whitened
    returns: torch.Tensor      # (B, R)

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, P + R) positions counted over real tokens, so left padding does not shift them."""
        return (self.mask.cumsum(1) - 1).clamp(min=0)


def reference_logprobs(ref_policy, ids, mask, pos, samples: Samples, temperature: float) -> torch.Tensor:
    """(B, R) log-probs of the sampled answers under the frozen reference; 0 on padding, like the
    sampled log-probs."""
    ref_logits = response_logits(ref_policy, ids, mask, pos, samples.responses.shape[1], temperature)  # (B, R, V)
    ref_logprobs = F.log_softmax(ref_logits, -1).gather(-1, samples.responses[..., None]).squeeze(-1)
    return ref_logprobs * samples.response_mask


def advantages_and_returns(cfg: PPOConfig, penalised, logprobs, ref_logprobs, values, response_mask,
                           kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl, advantages, returns), each (B, R): the per-token KL to the reference, then GAE on
    InstructGPT eq. 2's reward r(x, y) - beta * log(pi / pi_ref), the KL spread over the tokens."""
    kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * response_mask  # (B, R)
    rewards = token_rewards(penalised, kl, response_mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, response_mask, shift_mean=False)
    advantages, returns = gae(rewards, values, response_mask, cfg.gamma, cfg.lam)
    # N-details "advantage whitening": over the batch's answer tokens, not per sequence.
    return kl, masked_whiten(advantages, response_mask), returns


def _explained_variance(values, returns, mask) -> torch.Tensor:
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


@torch.no_grad()
def experience(cfg: PPOConfig, policy, ref_policy, value_model, tokenizer, prompt_ids: list[list[int]],
               conversations: list[list[dict]], reward_fn: RewardFn, kl_coef: float,
               generator: torch.Generator) -> tuple[Batch, dict]:
    """Sample one answer per prompt, score it, and compute what the update needs: (batch, the
    rollout's statistics)."""
    device = next(policy.parameters()).device
    shared = cfg.value_model == "shared"
    ro = rollout(policy, tokenizer, prompt_ids, device=device, max_new_tokens=cfg.max_new_tokens,
                 temperature=cfg.temperature, generator=generator, value_head=value_model.score if shared else None)
    s = ro.samples
    scores, penalised = score(reward_fn, conversations, ro.answers, s.has_eos, cfg.missing_eos_penalty)
    ids, mask, pos = join(ro.prompt_ids, ro.prompt_mask, s.responses, s.response_mask)
    ref_logprobs = reference_logprobs(ref_policy, ids, mask, pos, s, cfg.temperature)
    if shared:  # read while sampling: the policy's trunk, as a full forward would give it
        values = s.values
    else:
        values = response_values(value_model, ids, mask, pos, s.responses.shape[1]) * s.response_mask
    kl, advantages, returns = advantages_and_returns(cfg, penalised, s.logprobs, ref_logprobs, values,
                                                     s.response_mask, kl_coef)
    seq_kl = kl.sum(1)  # (B,) nats per answer
    stats = {
        "reward/score": scores.mean(), "reward/penalised": penalised.mean(),
        "reward/total": (penalised - kl_coef * seq_kl).mean(),
        "ppo/kl": seq_kl.mean(), "ppo/kl_coef": torch.tensor(kl_coef),
        "ppo/explained_variance": _explained_variance(values, returns, s.response_mask),
        "rollout/response_length": s.response_mask.sum(1).float().mean(),
        "rollout/eos_rate": s.has_eos.float().mean(),
    }
    return Batch(ids, mask, s.responses, s.response_mask, s.logprobs, values, advantages, returns), stats


# --- update epochs --------------------------------------------------------------------------------

class TrunkValue(torch.nn.Module):
    """value_model="shared" in full fine-tuning: a scalar head on the policy's own trunk, shaped
    like a `*ForSequenceClassification` model for `response_values` (its trunk is `backbone`,
    its head `score`). The trunk's weights are the policy's; only the head is its own."""

    base_model_prefix = "backbone"

    def __init__(self, policy, head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.score = getattr(policy, policy.base_model_prefix), head


def shared_value_model(policy, seed: int):
    """A new value head on the policy's final hidden state: on its trunk, or with LoRA on the
    shared base with the policy's adapter on (the "value" adapter then stays unused)."""
    head = new_head(policy.config, seed)
    if isinstance(policy, AdapterView):
        return HeadView(policy._shared, policy.adapter, head)
    return TrunkValue(policy, head)


class PolicyAndValue(torch.nn.Module):
    """Policy and value model as one module, so `accelerator.prepare` wraps one forward (DDP
    syncs gradients of what that forward used) — as TRL and MOSS-RLHF do. With `shared`, the
    value model is a head on the policy's trunk, read from the policy's own forward."""

    def __init__(self, policy, value_model, shared: bool = False):
        super().__init__()
        self.policy, self.value_model, self.shared = policy, value_model, shared

    def forward(self, ids, mask, pos, n_answer: int, temperature: float, sft_batch=None):
        if self.shared:  # one trunk forward: (b, R, V) logits and (b, R) values
            logits, values = response_logits_and_values(self.policy, self.value_model.score, ids, mask, pos,
                                                        n_answer, temperature)
        else:
            logits = response_logits(self.policy, ids, mask, pos, n_answer, temperature)  # (b, R, V)
            values = response_values(self.value_model, ids, mask, pos, n_answer)  # (b, R)
        sft = answer_loss(self.policy, *sft_batch) if sft_batch is not None else None
        return logits, values, sft


def _trim(b: Batch, rows: torch.Tensor) -> Batch:
    """The rows of a minibatch without columns that are padding in all of them (less compute)."""
    mb_mask = b.mask[rows]
    P = b.ids.shape[1] - b.responses.shape[1]
    first = int((mb_mask.sum(0) > 0).float().argmax())  # first column any row uses
    R = int(b.response_mask[rows].sum(1).max())
    cols = slice(first, P + R)
    return Batch(b.ids[rows, cols], mb_mask[:, cols],
                 *(getattr(b, k)[rows, :R] for k in ("responses", "response_mask", "logprobs", "values",
                                                    "advantages", "returns")))


def update(model, optimizer, accelerator, mb: Batch, cfg: PPOConfig, sft_batch=None) -> dict:
    """One optimizer step on a minibatch: clipped policy loss + vf_coef * clipped value loss
    (+ ptx_coef * SFT loss on `sft_batch`). Returns its statistics, detached."""
    logits, vpred, ptx_loss = model(mb.ids, mb.mask, mb.position_ids, mb.responses.shape[1], cfg.temperature,
                                    sft_batch)
    logp = F.log_softmax(logits, dim=-1)  # (b, R, V)
    new_logprobs = logp.gather(-1, mb.responses[..., None]).squeeze(-1)  # (b, R)
    pg_loss, pg_stats = policy_loss(new_logprobs, mb.logprobs, mb.advantages, mb.response_mask, cfg.cliprange)
    vf_loss, vf_stats = value_loss(vpred, mb.values, mb.returns, mb.response_mask, cfg.cliprange_value)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if ptx_loss is not None:
        # InstructGPT eq. 2's gamma term, on demonstrations rather than pretraining text.
        loss = loss + cfg.ptx_coef * ptx_loss
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if cfg.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        entropy = masked_mean(-(logp.exp() * logp).sum(-1), mb.response_mask)
    return {k: v.detach() for k, v in {
        "ppo/pg_loss": pg_loss, "ppo/vf_loss": vf_loss, "ppo/entropy": entropy,
        "ppo/ptx_loss": ptx_loss if ptx_loss is not None else torch.zeros(()), **pg_stats, **vf_stats}.items()}


def ppo_epochs(model, optimizer, accelerator, batch: Batch, cfg: PPOConfig, generator: torch.Generator,
               demos: list | None = None, pad_id: int = 0) -> dict:
    """`ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, one
    `update` each; with `max_approx_kl`, the passes stop at the first minibatch past it."""
    stats = defaultdict(list)
    B = batch.ids.shape[0]
    stop = False
    for epoch in range(cfg.ppo_epochs):
        b_inds = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            mb = _trim(batch, b_inds[start:start + cfg.minibatch_size].to(batch.ids.device))
            sft_batch = None
            if demos and cfg.ptx_coef > 0:
                pick = torch.randint(len(demos), (cfg.ptx_batch_size,), generator=generator).tolist()
                sft_batch = [t.to(batch.ids.device) for t in collate([demos[i] for i in pick], pad_id)]
            for k, v in update(model, optimizer, accelerator, mb, cfg, sft_batch).items():
                stats[k].append(v)
            if cfg.max_approx_kl is not None:
                # Every process must stop at the same minibatch, or DDP waits forever: decide on the mean.
                approx_kl = accelerator.reduce(stats["ppo/approx_kl"][-1], reduction="mean")
                if approx_kl > cfg.max_approx_kl:
                    stop = True  # the policy has left the region where the old samples say much
                    break
        if stop:
            break
    out = {k: torch.stack(v).mean() for k, v in stats.items()}
    out["ppo/minibatches"] = torch.tensor(float(len(stats["ppo/pg_loss"])))
    return out


# --- train ---------------------------------------------------------------------------------------

def check_inputs(cfg: PPOConfig, policy, value_model, tokenizer, prompts: list) -> None:
    """Refuse what would train silently wrong, before any model work."""
    cfg.__post_init__()  # fields may have been set after construction
    if (value_model is None) != (cfg.value_model == "shared"):
        raise ValueError('value_model="shared" puts a head on the policy: pass no value model; '
                         '"separate" needs one')
    check_pad(tokenizer)  # answers are cut at the end of turn, then padded
    n_positions = context_length(policy.config)
    if n_positions and cfg.max_prompt_tokens + cfg.max_new_tokens > n_positions:
        raise ValueError(f"max_prompt_tokens + max_new_tokens exceeds the policy's {n_positions} positions")
    if not prompts:
        raise ValueError("no prompts to train on")


def next_prompts(order: list[int], n: int, n_prompts: int, generator: torch.Generator
                 ) -> tuple[list[int], list[int]]:
    """(the next `n` prompt indices, those left): cycling through the prompts, reshuffled each pass."""
    while len(order) < n:
        order = order + torch.randperm(n_prompts, generator=generator).tolist()
    return order[:n], order[n:]


def prepare(cfg: PPOConfig, policy, ref_policy, value_model, accelerator) -> tuple:
    """(model, optimizer): policy and value model as one module with its optimizer, prepared by
    accelerate; dropout off everywhere and the reference frozen on the same device."""
    for m in (policy, ref_policy, value_model):
        disable_dropout(m)
        fused_activations(m)  # rollout, reference and update all run the same swapped function
    device = accelerator.device
    ref_policy.requires_grad_(False).eval().to(device)
    model = PolicyAndValue(policy, value_model, shared=cfg.value_model == "shared").to(device)
    fp32_trainable(model)  # never pure-bf16 Adam
    # Adam eps 1e-5 as OpenAI's lm-human-preferences and CleanRL (N-details on PyTorch's Adam).
    # The fused kernel (CPU and CUDA) makes a step ~5x cheaper than the per-tensor loop on small models.
    optimizer = adamw(model.parameters(), cfg.lr, cfg.weight_decay, eps=1e-5,
                      fused=device.type in ("cpu", "cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()  # dropout is gone, so train mode changes nothing but stays honest
    return model, optimizer


def reduce_stats(accelerator, stats: dict) -> dict:
    """Step statistics as floats, averaged over the processes in one collective."""
    keys = sorted(stats)
    reduced = accelerator.reduce(torch.stack([stats[k].float().to(accelerator.device) for k in keys]),
                                 reduction="mean")
    return dict(zip(keys, reduced.tolist()))


def report(step: int, cfg: PPOConfig, stats: dict, bar, accelerator) -> None:
    """Progress: the bar on a terminal, else a log line every 10 updates and after the last."""
    bar.update(1)
    bar.set_postfix(reward=f"{stats['reward/score']:.3f}", kl=f"{stats['ppo/kl']:.2f}")
    if not on_terminal() and accelerator.is_main_process and (step % 10 == 0 or step == cfg.steps - 1):
        log.info("ppo step %d/%d reward %.3f kl %.3f beta %.4f entropy %.3f clipfrac %.3f len %.1f",
                 step + 1, cfg.steps, stats["reward/score"], stats["ppo/kl"], stats["ppo/kl_coef"],
                 stats["ppo/entropy"], stats["ppo/clipfrac"], stats["rollout/response_length"])


def train(cfg: PPOConfig, policy, ref_policy, value_model, tokenizer, prompts: list[list[dict]],
          reward_fn: RewardFn, demonstrations: list[dict] | None = None) -> dict:
    """Optimise `policy` (and `value_model`) in place with PPO against `reward_fn` on `prompts`,
    penalised by KL to the frozen `ref_policy`. `value_model` is a `*ForSequenceClassification`
    with one label (InstructGPT: initialised from the reward model), or None with
    `cfg.value_model == "shared"` (a new head on the policy's trunk, not published). With
    `cfg.ptx_coef > 0`, `demonstrations` ([{"prompt", "completion"}]) are mixed in (PPO-ptx). Returns metrics: the
    last value of every `CURVE_KEYS` entry, their per-step curves under "ppo/curves", and more."""
    check_inputs(cfg, policy, value_model, tokenizer, prompts)
    torch.manual_seed(cfg.seed)
    if value_model is None:
        value_model = shared_value_model(policy, cfg.seed)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    device = accelerator.device
    t_start = time.time()
    if accelerator.is_main_process:
        log.info("ppo on %s x%d: %s", device, accelerator.num_processes,
                 ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    model, optimizer = prepare(cfg, policy, ref_policy, value_model, accelerator)

    conversations = [as_messages(p) for p in prompts]
    # Left-truncate prompts that are still too long: the latest turns matter most.
    prompt_ids = [encode_prompt(tokenizer, c)[-cfg.max_prompt_tokens:] for c in conversations]
    demos = [encode_demonstration(tokenizer, d["prompt"], d["completion"]) for d in demonstrations or []]
    if cfg.ptx_coef > 0 and not demos:
        log.warning("ptx_coef > 0 but no demonstrations: PPO-ptx is off")

    # Same seed in every process: the same prompt order, each process taking its own slice.
    order_gen = torch.Generator().manual_seed(cfg.seed)
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * accelerator.process_index)
    global_batch = cfg.batch_size * accelerator.num_processes
    order: list[int] = []
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon, start=cfg.initial_kl_coef)
    curves = {k: [] for k in CURVE_KEYS}
    bar = tqdm(total=cfg.steps, desc="ppo", disable=not on_terminal() or not accelerator.is_main_process, leave=False)

    for step in range(cfg.steps):
        t0 = time.time()
        batch_idx, order = next_prompts(order, global_batch, len(prompt_ids), order_gen)
        mine = batch_idx[accelerator.process_index * cfg.batch_size:][:cfg.batch_size]
        set_lr(optimizer, warmup_linear(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.anneal_lr))

        unwrapped = accelerator.unwrap_model(model)
        batch, rollout_stats = experience(cfg, unwrapped.policy, ref_policy, unwrapped.value_model, tokenizer,
                                          [prompt_ids[i] for i in mine], [conversations[i] for i in mine],
                                          reward_fn, kl_ctl.value, sample_gen)
        update_stats = ppo_epochs(model, optimizer, accelerator, batch, cfg, order_gen, demos,
                                  tokenizer.pad_token_id)

        step_stats = reduce_stats(accelerator, {**rollout_stats, **update_stats})
        if cfg.adaptive_kl:
            kl_ctl.update(step_stats["ppo/kl"], global_batch)
        step_stats["time/update_seconds"] = time.time() - t0
        for k in CURVE_KEYS:
            curves[k].append(round(float(step_stats.get(k, 0.0)), 5))
        report(step, cfg, step_stats, bar, accelerator)
        if cfg.stop_kl is not None and step_stats["ppo/kl"] >= cfg.stop_kl:
            log.info("ppo: KL %.2f reached stop_kl %g after %d of %d steps", step_stats["ppo/kl"], cfg.stop_kl,
                     step + 1, cfg.steps)
            break
    bar.close()
    model = accelerator.unwrap_model(model)
    model.policy.eval()
    model.value_model.eval()
    metrics = {k: v[-1] for k, v in curves.items()}
    steps = len(curves["ppo/kl"])
    metrics.update({"ppo/steps": steps, "ppo/answers": steps * global_batch,
                    "ppo/prompts": len(prompt_ids), "ppo/final_kl_coef": kl_ctl.value,
                    "ppo/seconds": round(time.time() - t_start, 2), "ppo/curves": curves,
                    "ppo/config": asdict(cfg)})
    return metrics


# --- evaluate ---------------------------------------------------------------------------------------

def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) over the vocabulary at each position, (B, R) from (B, R, V) logits."""
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def evaluate(policy, ref_policy, tokenizer, prompts: list, reward_fn: RewardFn, *,
             temperature: float = PPOConfig.temperature, max_new_tokens: int = PPOConfig.max_new_tokens,
             max_prompt_tokens: int = PPOConfig.max_prompt_tokens, samples_per_prompt: int = 1,
             batch_size: int = 32, seed: int = 0, device: str | None = None) -> dict:
    """Mean reward and KL to the reference of answers sampled from `policy` on held-out prompts.
    KL per answer is exact per position (summed over the vocabulary, not a sampled estimate) and
    summed over the answer's tokens: nats, the unit of `PPOConfig.target_kl`. Also the standard
    errors, answer length, EOS rate, the answers (for degenerate-output checks) and each answer's
    reward and KL in prompt order, `samples_per_prompt` per prompt (for the gates' paired test)."""
    device = device or next(policy.parameters()).device
    ref_device = next(ref_policy.parameters()).device
    conversations = [as_messages(p) for p in prompts for _ in range(samples_per_prompt)]
    gen = torch.Generator(device=device).manual_seed(seed)
    rewards, kls, lengths, eos, answers = [], [], [], [], []
    was_training = policy.training
    policy.eval()
    for start in range(0, len(conversations), batch_size):
        convs = conversations[start:start + batch_size]
        ro = rollout(policy, tokenizer, [encode_prompt(tokenizer, c)[-max_prompt_tokens:] for c in convs],
                     max_new_tokens=max_new_tokens, temperature=temperature, device=device, generator=gen)
        s = ro.samples
        scores = torch.as_tensor(reward_fn(convs, ro.answers), dtype=torch.float32).reshape(-1)
        ids, mask, pos = join(ro.prompt_ids, ro.prompt_mask, s.responses, s.response_mask)
        R = s.responses.shape[1]
        logits = response_logits(policy, ids, mask, pos, R, temperature)
        ref_logits = response_logits(ref_policy, ids.to(ref_device), mask.to(ref_device),
                                     pos.to(ref_device), R, temperature).to(device)
        kls.append((token_kl(logits, ref_logits) * s.response_mask).sum(1).cpu())
        rewards.append(scores.cpu())
        lengths.append(s.response_mask.sum(1).float().cpu())
        eos.append(s.has_eos.float().cpu())
        answers += ro.answers
    policy.train(was_training)
    reward, kl = torch.cat(rewards), torch.cat(kls)
    n = len(reward)
    return {"reward": reward.mean().item(), "reward_sem": (reward.std() / math.sqrt(n)).item() if n > 1 else 0.0,
            "kl": kl.mean().item(), "kl_sem": (kl.std() / math.sqrt(n)).item() if n > 1 else 0.0,
            "response_length": torch.cat(lengths).mean().item(), "eos_rate": torch.cat(eos).mean().item(),
            "n": n, "answers": answers, "rewards": reward.tolist(), "kls": kl.tolist()}
