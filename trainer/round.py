"""One training round: new feedback in, a gated candidate policy out.

    1. data since the last round's watermark; a scheduled round trains once enough new evidence
       arrived (`min_new_feedback` events of any kind) or the oldest of it waited long enough
       (`max_round_interval_seconds`), else it is a `skipped` run
    2. the models, in a worker thread (`trainer.stages`): SFT on new demonstrations, the reward
       model on the newest `reward_window` pairs up to the watermark (older pairs weigh less:
       `trainer.recency`), PPO against it from the active version, anchored on it (`anchor`), the
       gates (`trainer.gates`)
    3. registration in one transaction: the reward model active, the policy `candidate` or
       `rejected` with the gates' reasons; then auto-promotion of a candidate that passed when
       the config says so (one the gates had not enough evidence on waits for an operator)

Long-run learning. Each round's KL is measured to its parent (the reference is re-anchored on the
version the round improves) under a per-round budget, and the total drift to the lineage's root
under a separate, larger one; both are in the policy's metrics (`gates/kl`, `gates/kl_total`).

The round lock (`store.locks.ROUND`) keeps one round at a time across every trainer replica.
Checkpoints are published atomically before they are registered, and registration is one
transaction, so a round killed at any point leaves no version behind; its `running` row is marked
failed on restart (`recover`).
"""
import asyncio
import dataclasses
import logging
import traceback
from dataclasses import asdict
from datetime import datetime, timezone

from psycopg import AsyncConnection

from lm.checkpoint import load_tokenizer
from schemas.bundled import heldout_prompts
from schemas.records import Demonstration, ModelVersion, TrainingPair, TrainingRun
from schemas.settings import Settings
from store import derive, exchanges, feedback, locks, registry, runs
from trainer import ppo
from trainer.config import RoundConfig, round_config, run_kind
from trainer.recency import weigh_by_recency
from trainer.stages import Inputs, Trained, train_models

log = logging.getLogger(__name__)


async def recover(conn) -> list[int]:
    """Mark runs left `running` by a killed trainer as failed; only while no round can be
    running anywhere (we hold the round lock), so a live round elsewhere is never touched."""
    async with locks.holding(conn, locks.ROUND) as got:
        if not got:
            return []
        failed = await runs.fail_abandoned_runs(conn)
        if failed:
            log.warning("marked abandoned runs %s as failed", failed)
        return failed


async def run_round(url: str, settings: Settings, *, trigger: str, requested_by: str | None = None,
                    queued: bool = False, overrides: dict | None = None) -> TrainingRun | None:
    """Run one round now, or return None when another round holds the lock (or, with
    `queued`, when no operator request is waiting). A queued request's `config` is its overrides."""
    async with await AsyncConnection.connect(url, autocommit=True) as conn:
        async with locks.holding(conn, locks.ROUND) as got:
            if not got:
                log.info("another round is running; not starting one")
                return None
            if not queued:
                cfg = round_config(settings, overrides)  # a bad override fails here, before any run exists
                run = await runs.start_training_run(conn, kind=run_kind(cfg), config=_jsonable(cfg),
                                                    trigger=trigger, requested_by=requested_by)
                return await _round(conn, settings, cfg, run)
            run = await runs.claim_queued_run(conn)
            if run is None:
                return None
            try:
                cfg = round_config(settings, run.config)
            except Exception as e:  # the request is claimed: close it, or it stays `running`
                return await _failed(conn, run, e)
            return await _round(conn, settings, cfg, run)


async def _round(conn, settings: Settings, cfg: RoundConfig, run: TrainingRun) -> TrainingRun:
    """Take `run` to its end: skipped, succeeded, or failed with its traceback."""
    try:
        return await _train(conn, settings, cfg, run)
    except Exception as e:
        return await _failed(conn, run, e)


async def _train(conn, settings: Settings, cfg: RoundConfig, run: TrainingRun) -> TrainingRun:
    full = run_kind(cfg) == "round"
    after = await runs.last_round_watermark(conn) if full else 0  # one stage: all data so far
    upto = await feedback.current_watermark(conn)
    data = {}
    if full:  # most scheduled ticks end here, on counts, before anything is derived
        new_pairs = await derive.count_new_pairs(conn, after=after, upto=upto)
        events, oldest = await feedback.new_events(conn, after=after, upto=upto)
        waited = (datetime.now(timezone.utc) - oldest).total_seconds() if oldest else 0.0
        data = {"data/new_pairs": new_pairs, "data/new_events": events, "data/waited_seconds": round(waited, 1)}
        if run.trigger == "schedule" and (wait := waiting_reason(cfg, events, waited)):
            # when these events train if no more come: watchers (`feedloop simulate`) can tell a
            # round that is coming from one that waits for feedback not yet given
            due = max(0.0, cfg.max_round_interval_seconds - waited) if events else None
            return await _skipped(conn, run, after, wait, dict(data, **{"data/waiting": True,
                                                                        "data/trains_in_seconds": due}))
        if skip := skip_reason(cfg, new_pairs, None):
            return await _skipped(conn, run, after, skip, data)
    # the reward model continues from the active one on the newest pairs, older ones weighing less
    pairs = await derive.pair_window(conn, upto=upto, limit=cfg.reward_window)
    pairs = weigh_by_recency(pairs, await runs.trained_round_watermarks(conn), cfg.recency_half_life)
    demos = await derive.derive_demonstrations(conn, after=after, upto=upto)
    new_pairs = new_pairs if full else len(pairs)
    data.update({"data/new_pairs": new_pairs, "data/pairs": len(pairs), "data/demonstrations": len(demos),
                 "data/pair_weight": round(sum(p.weight for p in pairs), 2)})
    if skip := skip_reason(cfg, new_pairs, len(demos)):
        return await _skipped(conn, run, after, skip, data)

    inp = await _inputs(conn, settings, cfg, run, pairs, demos)
    log.info("run %d (%s): %d pairs (%d new), %d demonstrations, %d prompts", run.id, run_kind(cfg),
             len(pairs), new_pairs, len(demos), len(inp.prompts))
    trained = await asyncio.to_thread(train_models, cfg, inp)
    await _register(conn, settings, run, cfg, inp, trained)
    return await runs.finish_training_run(conn, id=run.id, status="succeeded", watermark=upto,
                                          metrics=_jsonable({**trained.metrics, **data}),
                                          curves=_jsonable(trained.curves))


def waiting_reason(cfg: RoundConfig, new_events: int, waited: float) -> str | None:
    """Why a scheduled round waits for more evidence, or None: fewer than `min_new_feedback`
    feedback events of any kind since the last round, the oldest of which has waited `waited`
    seconds, less than `max_round_interval_seconds` (an operator's round does not wait)."""
    if new_events < cfg.min_new_feedback and not (new_events and waited >= cfg.max_round_interval_seconds):
        return (f"{new_events} new feedback events, fewer than {cfg.min_new_feedback}, the oldest "
                f"{waited:.0f}s old (a round trains anyway after {cfg.max_round_interval_seconds:g}s)")
    return None


def skip_reason(cfg: RoundConfig, new_pairs: int, demonstrations: int | None) -> str | None:
    """Why there is nothing worth training, or None (`demonstrations` None: not counted yet)."""
    if ("reward" in cfg.stages or "ppo" in cfg.stages) and new_pairs < cfg.min_new_pairs:
        return f"{new_pairs} new pairs, fewer than the minimum {cfg.min_new_pairs}"
    if list(cfg.stages) == ["sft"] and demonstrations == 0:
        return "no demonstrations"
    return None


async def _skipped(conn, run: TrainingRun, watermark: int, reason: str, data: dict) -> TrainingRun:
    log.info("run %d skipped: %s", run.id, reason)
    return await runs.finish_training_run(conn, id=run.id, status="skipped", watermark=watermark,
                                          metrics=dict(data, skip_reason=reason))


async def _failed(conn, run: TrainingRun, error: Exception) -> TrainingRun:
    log.error("run %d failed", run.id, exc_info=error)
    return await runs.finish_training_run(conn, id=run.id, status="failed",
                                          error="".join(traceback.format_exception(error))[-8000:])


async def _inputs(conn, settings: Settings, cfg: RoundConfig, run: TrainingRun, pairs: list[TrainingPair],
                  demos: list[Demonstration]) -> Inputs:
    """The versions the stages start from and the prompts PPO trains on."""
    policy = await registry.get_active_version(conn, kind="policy")
    if policy is None:
        raise RuntimeError("no active policy to improve")
    root = await lineage_root(conn, policy)
    return Inputs(pairs=pairs, demonstrations=demos,
                  prompts=await _ppo_prompts(conn, policy.path, cfg) if "ppo" in cfg.stages else [],
                  policy=policy, root=root,
                  # LoRA's reference is the base with the adapters off: the policy this round starts
                  # from, so a LoRA round is always anchored on its parent
                  reference=policy if cfg.anchor == "parent" or cfg.lora.enabled else root,
                  previous_reward=await registry.get_active_version(conn, kind="reward"),
                  out=settings.checkpoint_dir / f"run-{run.id}")


async def lineage_root(conn, version: ModelVersion) -> ModelVersion:
    """The first version of `version`'s lineage (its parents' parent …: v1 for the bootstrapped
    policy, an imported base for its descendants): what the total drift is measured against."""
    seen = {version.id}
    while version.parent_id is not None and version.parent_id not in seen:
        version = await registry.get_model_version(conn, id=version.parent_id)
        seen.add(version.id)
    return version


async def _ppo_prompts(conn, tokenizer_path: str, cfg: RoundConfig) -> list[list[dict]]:
    """What users asked most recently, less the gates' held-out prompts, topped up from the
    bundled prompts: enough for every PPO step."""
    n = cfg.ppo.batch_size * cfg.ppo.steps
    recorded = await exchanges.recent_conversations(conn, limit=4 * n)
    tokenizer = await asyncio.to_thread(load_tokenizer, tokenizer_path)
    held = set(heldout_prompts())  # never train on what the gates measure
    recorded = [c for c in recorded if not (len(c) == 1 and c[0]["content"] in held)]
    return ppo.prompts_for_ppo(recorded, tokenizer, cfg.ppo.max_prompt_tokens, n)


async def _register(conn, settings: Settings, run: TrainingRun, cfg: RoundConfig, inp: Inputs,
                    trained: Trained) -> None:
    """One transaction: the reward model (the active one of its kind), the policy (candidate or
    rejected, with the gates' reasons), their audit entries; then auto-promotion. Not with a deploy
    hook (FEEDLOOP_DEPLOY_COMMAND): only the API and `feedloop models promote` deploy and check a
    target before switching, so the candidate waits for them. Without one, a remote target is
    still checked by every replica as it loads the version (failed, and serving stays, otherwise)."""
    actor = f"training run {run.id}"
    rm = inp.previous_reward
    auto = trained.passed and cfg.promotion == "auto"
    reason = "passed the gates" if trained.passed else "; ".join(trained.decision.reasons())
    if auto and settings.deploy_command:
        auto, reason = False, reason + "; not promoted automatically: a deploy hook must run first (promote it)"
    async with conn.transaction():
        if trained.reward:
            await registry.archive_active(conn, kind="reward")  # one active reward model: the newest
            rm = await registry.register_checkpoint(conn, path=trained.reward, kind="reward", status="active",
                                                    actor=actor, reason="trained", training_run_id=run.id,
                                                    parent_id=inp.previous_reward.id if inp.previous_reward else None)
            await runs.set_run_version(conn, id=run.id, version_id=rm.id)
        if not trained.policy:
            return
        status = "rejected" if trained.decision.reject else "candidate"  # not enough evidence: an operator decides
        policy = await registry.register_checkpoint(conn, path=trained.policy, kind="policy", status=status,
                                                    actor=actor, reason=reason, parent_id=inp.policy.id,
                                                    reference_id=inp.reference.id, reward_model_id=rm and rm.id,
                                                    training_run_id=run.id)
        await runs.set_run_version(conn, id=run.id, version_id=policy.id)
    if auto:
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
