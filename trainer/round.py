"""One training round: new feedback in, a gated candidate policy out.

    1. data since the last round's watermark; too few new pairs -> a `skipped` run
    2. SFT on new demonstrations (when there are any)
    3. reward model on every derived pair up to the watermark (continued from the last one)
    4. PPO against it on prompts users actually sent, KL-penalised to the reference policy
    5. gates against the active version on held-out prompts -> `candidate` or `rejected`

A Postgres advisory lock keeps one round at a time across every trainer replica. Checkpoints are
published atomically before they are registered, and registration is one transaction, so a round
killed at any point leaves no version behind; its `running` row is marked failed on restart.
"""
import asyncio
import copy
import dataclasses
import logging
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from psycopg import AsyncConnection

from schemas import feedback, registry, store
from schemas.records import ModelVersion, TrainingRun
from schemas.settings import Settings, resolve_device
from trainer import ppo, reward
from trainer.ppo import PPOConfig
from trainer.reward import RewardConfig
from trainer.data import heldout_prompts
from trainer.sft import SFTConfig, train as sft_train

log = logging.getLogger(__name__)
ROUND_LOCK = 0x726F756E64  # advisory lock key ("round")
MIN_NORMALISING_DEMOS = 32  # fewer demonstrations: normalise rewards on the training answers instead


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


STAGES = ("sft", "reward", "ppo")


@dataclass
class RoundConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """which steps run: a round runs all; `feedloop train reward|sft|ppo` one"""
    min_new_pairs: int = 16
    """fewer new pairs since the last round's watermark: skip"""
    promotion: str = "manual"
    """auto: promote a candidate that passes the gates at once; manual: an operator decides"""
    seed: int = 0
    device: str = "auto"
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=3, lr=3e-4))
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gates: GateConfig = field(default_factory=GateConfig)


def with_overrides(cfg, overrides: dict):
    """A copy of a (nested) config dataclass with `{"ppo": {"steps": 8}}`-style overrides;
    unknown keys are refused, so a typo does not silently train with defaults."""
    cfg = copy.deepcopy(cfg)
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown round config key {key!r} in {type(cfg).__name__}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            value = with_overrides(current, value)
        setattr(cfg, key, value)
    if hasattr(cfg, "__post_init__"):
        cfg.__post_init__()  # the overridden fields are checked as the constructor checks them
    return cfg


def round_config(settings: Settings, overrides: dict | None = None) -> RoundConfig:
    cfg = RoundConfig(min_new_pairs=settings.min_new_pairs, promotion=settings.promotion)
    cfg = with_overrides(cfg, settings.round_config)
    cfg = with_overrides(cfg, overrides or {})
    device = resolve_device(settings.device if cfg.device == "auto" else cfg.device)
    cfg.device = cfg.sft.device = cfg.reward.device = cfg.ppo.device = device
    return cfg


# --- the models: blocking, run in a worker thread -------------------------------------------

@dataclass
class Inputs:
    pairs: list
    demonstrations: list
    prompts: list[list[dict]]
    policy: ModelVersion
    reference: ModelVersion
    previous_reward: ModelVersion | None
    out: Path


def degenerate(answers: list[str], gates: GateConfig) -> list[str]:
    """Reasons the answers look broken: too many empty, too few distinct."""
    reasons = []
    empty = sum(not a.strip() for a in answers) / max(1, len(answers))
    distinct = len(set(answers)) / max(1, len(answers))
    if empty > gates.max_empty_rate:
        reasons.append(f"{empty:.0%} empty answers (limit {gates.max_empty_rate:.0%})")
    if distinct < gates.min_distinct_rate:
        reasons.append(f"only {distinct:.0%} distinct answers (floor {gates.min_distinct_rate:.0%})")
    return reasons


def check_gates(cfg: GateConfig, new: dict, old: dict, rm_accuracy: float | None) -> list[str]:
    """Reasons to reject; empty means the candidate passes."""
    reasons = []
    gain = new["reward"] - old["reward"]
    if gain < cfg.min_reward_gain:
        reasons.append(f"reward gain {gain:+.3f} below {cfg.min_reward_gain}")
    if new["kl"] > cfg.kl_budget:
        reasons.append(f"KL {new['kl']:.2f} to the reference over the budget {cfg.kl_budget}")
    if rm_accuracy is not None and rm_accuracy < cfg.min_rm_accuracy:
        reasons.append(f"reward model held-out accuracy {rm_accuracy:.2f} below {cfg.min_rm_accuracy}")
    return reasons + degenerate(new["answers"], cfg)


def train_models(cfg: RoundConfig, inp: Inputs) -> dict:
    """The round's stages in order (`cfg.stages`): SFT -> reward model -> PPO -> gates. Publishes
    what it trains under `inp.out`; returns metrics, curves and the gates' verdict. Registers
    nothing: that is one transaction afterwards."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(inp.policy.path)
    load_policy = lambda path: AutoModelForCausalLM.from_pretrained(path).to(cfg.device)
    policy, reference = load_policy(inp.policy.path), load_policy(inp.reference.path).eval()
    metrics, curves, out = {}, {}, {"reward": None, "policy": None}

    def keep(stage_metrics: dict, curve_prefix: str) -> None:
        curves.update({k: v for k, v in stage_metrics.items() if k.startswith(curve_prefix)})
        metrics.update({k: v for k, v in stage_metrics.items()
                        if not k.startswith(curve_prefix) and not k.endswith("/config")})

    if "sft" in cfg.stages and inp.demonstrations:  # 1) what users corrected or operators imported
        demos = [{"prompt": d.prompt, "completion": d.completion} for d in inp.demonstrations]
        keep(sft_train(cfg.sft, policy, tokenizer, demos), "sft/curve")

    reward_path = inp.previous_reward.path if inp.previous_reward else None
    if "reward" in cfg.stages:  # 2) continued from the last reward model, else from the policy's backbone
        rm, _ = reward.load_for_training(reward_path or inp.policy.path, seed=cfg.seed)
        # InstructGPT normalises on demonstrations; a handful would make the scale jump per round.
        references = ([(d.prompt, d.completion) for d in inp.demonstrations]
                      if len(inp.demonstrations) >= MIN_NORMALISING_DEMOS else None)
        rm_metrics = reward.train(cfg.reward, rm, tokenizer, inp.pairs, references=references)
        reward.save(rm, tokenizer, inp.out / "reward", cfg.reward, rm_metrics)
        keep(rm_metrics, "reward/curve")
        reward_path = out["reward"] = inp.out / "reward"
    if reward_path is None:
        if "ppo" in cfg.stages:
            raise RuntimeError("PPO needs a reward model: train one first (feedloop train reward)")
        reward_fn = None
    else:
        scorer, _ = reward.load_reward_model(reward_path, cfg.device)
        reward_fn = lambda convs, answers: reward.score(scorer, tokenizer, convs, answers)

    if "ppo" in cfg.stages:  # 3) the value model starts from the reward model (InstructGPT)
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, initial_kl_coef=carried_kl_coef(inp)))
        value_model = AutoModelForSequenceClassification.from_pretrained(reward_path).to(cfg.device)
        ppo_metrics = ppo.train(cfg.ppo, policy, reference, value_model, tokenizer, inp.prompts, reward_fn)
        curves.update(ppo_metrics.pop("ppo/curves", {}))
        metrics.update({k: v for k, v in ppo_metrics.items() if k != "ppo/config"})

    reasons = []
    if "ppo" in cfg.stages or ("sft" in cfg.stages and inp.demonstrations):  # 4) gates, then publish
        reasons = gate(cfg, policy, reference, load_policy(inp.policy.path).eval(), tokenizer, reward_fn,
                       metrics, ppo_ran="ppo" in cfg.stages)
        ppo.save_policy(policy, tokenizer, inp.out / "policy", cfg.ppo, metrics,
                        provenance={"parent_id": inp.policy.id, "reference_id": inp.reference.id})
        out["policy"] = inp.out / "policy"
    return {"metrics": metrics, "curves": curves, "passed": not reasons, "reasons": reasons, **out}


def carried_kl_coef(inp: Inputs) -> float | None:
    """The KL controller runs on across rounds, as over one long PPO run: the parent's final beta
    (its reference is ours). Restarting at `kl_coef` each round let a policy already near the
    budget overshoot it before beta caught up."""
    return inp.policy.metrics.get("ppo/final_kl_coef")


def gate(cfg: RoundConfig, candidate, reference, active, tokenizer, reward_fn, metrics: dict, *,
         ppo_ran: bool) -> list[str]:
    """The candidate against the active version on the same held-out prompts and scorer; the
    reward-gain and reward-model gates apply when PPO optimised for that reward."""
    held = heldout_prompts()[:cfg.gates.eval_prompts]
    score = reward_fn or (lambda convs, answers: [0.0] * len(answers))
    ev = dict(temperature=cfg.ppo.temperature, max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed,
              samples_per_prompt=cfg.gates.samples_per_prompt)
    new = ppo.evaluate(candidate, reference, tokenizer, held, score, **ev)
    old = ppo.evaluate(active, reference, tokenizer, held, score, **ev)
    if ppo_ran:
        reasons = check_gates(cfg.gates, new, old, metrics.get("reward/heldout_accuracy"))
    else:
        reasons = degenerate(new["answers"], cfg.gates)
        if new["kl"] > cfg.gates.kl_budget:
            reasons.append(f"KL {new['kl']:.2f} to the reference over the budget {cfg.gates.kl_budget}")
    metrics.update({"gates/reward_new": new["reward"], "gates/reward_active": old["reward"],
                    "gates/reward_gain": new["reward"] - old["reward"], "gates/kl": new["kl"],
                    "gates/kl_active": old["kl"], "gates/passed": not reasons,
                    "gates/reasons": reasons, "gates/samples": new["answers"][:8]})
    return reasons


# --- orchestration ----------------------------------------------------------------------------

async def recover(conn) -> list[int]:
    """Mark runs left `running` by a killed trainer as failed; only while no round can be
    running anywhere (we hold the round lock), so a live round elsewhere is never touched."""
    if not (await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (ROUND_LOCK,))).fetchone())[0]:
        return []
    try:
        failed = await store.fail_abandoned_runs(conn)
        if failed:
            log.warning("marked abandoned runs %s as failed", failed)
        return failed
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (ROUND_LOCK,))


async def run_round(url: str, settings: Settings, *, trigger: str, requested_by: str | None = None,
                    queued: bool = False, overrides: dict | None = None) -> TrainingRun | None:
    """Run one round now, or return None when another round holds the lock (or, with
    `queued`, when no operator request is waiting)."""
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        if not (await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (ROUND_LOCK,))).fetchone())[0]:
            log.info("another round is running; not starting one")
            return None
        try:
            if queued:
                run = await store.claim_queued_run(conn)
                if run is None:
                    return None
                overrides = run.config
            else:
                run = None
            cfg = round_config(settings, overrides)
            if run is None:
                run = await store.start_training_run(conn, kind=run_kind(cfg), config=_jsonable(cfg),
                                                     trigger=trigger, requested_by=requested_by)
            return await _round(conn, settings, cfg, run)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (ROUND_LOCK,))


def run_kind(cfg: RoundConfig) -> str:
    """`round` when every stage runs, else the one stage (`feedloop train reward` …)."""
    return "round" if set(cfg.stages) == set(STAGES) else "+".join(cfg.stages)


async def _round(conn, settings: Settings, cfg: RoundConfig, run: TrainingRun) -> TrainingRun:
    try:
        full = run_kind(cfg) == "round"
        after = await store.last_round_watermark(conn) if full else 0  # one stage: all data so far
        upto = await feedback.current_watermark(conn)
        if full:  # most scheduled ticks end here, on a count, before anything is derived
            new_pairs = await feedback.count_new_pairs(conn, after=after)
            if skip := skip_reason(cfg, new_pairs, None):
                return await _skipped(conn, run, after, skip, {"data/new_pairs": new_pairs})
        pairs = await feedback.derive_pairs(conn, upto=upto)
        demos = await feedback.derive_demonstrations(conn, after=after, upto=upto)
        new_pairs = new_pairs if full else len(pairs)
        data = {"data/new_pairs": new_pairs, "data/pairs": len(pairs), "data/demonstrations": len(demos)}
        if skip := skip_reason(cfg, new_pairs, len(demos)):
            return await _skipped(conn, run, after, skip, data)
        policy = await store.get_active_version(conn, kind="policy")
        if policy is None:
            raise RuntimeError("no active policy to improve")
        inp = Inputs(pairs=pairs, demonstrations=demos,
                     prompts=await _ppo_prompts(conn, policy.path, cfg) if "ppo" in cfg.stages else [],
                     policy=policy,
                     reference=await store.get_model_version(conn, id=policy.reference_id or policy.id),
                     previous_reward=await store.get_active_version(conn, kind="reward"),
                     out=settings.checkpoint_dir / f"run-{run.id}")
        log.info("run %d (%s): %d pairs (%d new), %d demonstrations, %d prompts", run.id, run_kind(cfg),
                 len(pairs), new_pairs, len(demos), len(inp.prompts))
        result = await asyncio.to_thread(train_models, cfg, inp)
        await _register(conn, run, cfg, inp, result)
        return await store.finish_training_run(conn, id=run.id, status="succeeded", watermark=upto,
                                               metrics=_jsonable(dict(result["metrics"], **data)),
                                               curves=_jsonable(result["curves"]))
    except Exception as e:
        log.exception("run %d failed", run.id)
        return await store.finish_training_run(conn, id=run.id, status="failed",
                                               error="".join(traceback.format_exception(e))[-8000:])


async def _skipped(conn, run: TrainingRun, watermark: int, reason: str, data: dict) -> TrainingRun:
    log.info("run %d skipped: %s", run.id, reason)
    return await store.finish_training_run(conn, id=run.id, status="skipped", watermark=watermark,
                                           metrics=dict(data, skip_reason=reason))


def skip_reason(cfg: RoundConfig, new_pairs: int, demonstrations: int | None) -> str | None:
    """Why there is nothing worth training, or None (`demonstrations` None: not counted yet)."""
    if ("reward" in cfg.stages or "ppo" in cfg.stages) and new_pairs < cfg.min_new_pairs:
        return f"{new_pairs} new pairs, fewer than the minimum {cfg.min_new_pairs}"
    if cfg.stages == ["sft"] and demonstrations == 0:
        return "no demonstrations"
    return None


async def _ppo_prompts(conn, tokenizer_path: str, cfg: RoundConfig) -> list[list[dict]]:
    from transformers import AutoTokenizer
    recorded = await store.recent_conversations(conn, limit=4 * cfg.ppo.batch_size * cfg.ppo.steps)
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, tokenizer_path)
    held = set(heldout_prompts())  # never train on what the gates measure
    recorded = [c for c in recorded if not (len(c) == 1 and c[0]["content"] in held)]
    return ppo.prompts_for_ppo(recorded, tokenizer, cfg.ppo.max_prompt_tokens, cfg.ppo.batch_size * cfg.ppo.steps)


async def _register(conn, run: TrainingRun, cfg: RoundConfig, inp: Inputs, result: dict) -> None:
    """One transaction: the reward model (the active one of its kind), the policy (candidate or
    rejected, with the gates' reasons), their audit entries; then auto-promotion."""
    actor = f"training run {run.id}"
    rm = inp.previous_reward
    async with conn.transaction():
        if result["reward"]:
            await store.archive_active(conn, kind="reward")  # one active reward model: the newest
            rm = await registry.register_checkpoint(conn, path=result["reward"], kind="reward", status="active",
                                                    actor=actor, reason="trained", training_run_id=run.id,
                                                    parent_id=inp.previous_reward.id if inp.previous_reward else None)
            await store.set_run_version(conn, id=run.id, version_id=rm.id)
        if not result["policy"]:
            return
        status = "candidate" if result["passed"] else "rejected"
        reason = "passed the gates" if result["passed"] else "; ".join(result["reasons"])
        policy = await registry.register_checkpoint(conn, path=result["policy"], kind="policy", status=status,
                                                    actor=actor, reason=reason, parent_id=inp.policy.id,
                                                    reference_id=inp.reference.id, reward_model_id=rm and rm.id,
                                                    training_run_id=run.id)
        await store.set_run_version(conn, id=run.id, version_id=policy.id)
    if result["passed"] and cfg.promotion == "auto":
        policy = await registry.promote(conn, id=policy.id, actor=actor, reason="auto: passed the gates")
    log.info("run %d: %s is %s (%s)", run.id, policy.name, policy.status, reason)


def _jsonable(value):
    """Configs and metrics as JSON: dataclasses as dicts, tensors and numpy scalars as floats."""
    if dataclasses.is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
