"""A round's configuration: one dataclass of the stages' configs, resolved from the settings, the
settings' `round_config` overrides and a run's own overrides (a queued run's `config`, or
`feedloop train --config`), in that order."""
import copy
import dataclasses
from dataclasses import dataclass, field

from lm.device import resolve_device
from schemas.settings import Settings
from trainer.gates import GateConfig
from trainer.lora import LoraSettings
from trainer.ppo import PPOConfig
from trainer.reward import RewardConfig
from trainer.sft import SFTConfig

STAGES = ("sft", "reward", "ppo")


# The defaults learn on two CPU cores and on a GPU alike (tests/e2e/test_simulate.py and `make demo`
# run them). Each round's PPO aims at a KL to its reference (the parent: re-anchored every round)
# well under the gates' per-round budget and stops short of it, since the gates measure on held-out
# prompts a few tenths of a nat above PPO's own figure; the total drift from the root has its own,
# larger budget (`GateConfig.total_kl_budget`).
DEFAULT_PPO = dict(steps=20, batch_size=32, num_minibatches=2, temperature=1.0, target_kl=1.5, stop_kl=2.5)


@dataclass
class RoundConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """which steps run: a round runs all; `feedloop train reward|sft|ppo` one"""
    min_new_feedback: int = 64
    """a scheduled round trains once this many feedback events (thumbs, ratings, rankings,
    preferences, corrections, comments, imports) arrived since the last round's watermark ..."""
    max_round_interval_seconds: float = 86400.0
    """... or once the oldest of fewer new events has waited this long"""
    min_new_pairs: int = 1
    """fewer new pairs since the last round's watermark: skip (the reward model needs some)"""
    reward_window: int | None = 50_000
    """the reward model trains on the newest this many pairs (None: all), continuing from the
    active reward model, so a round's cost follows the window, not the whole history"""
    anchor: str = "parent"
    """the reference PPO's KL and the gates' per-round budget are measured against: `parent`
    (re-anchored on the version the round improves; the total drift from the root has its own
    budget) or `root` (the lineage's first version, every round: learning stops at one budget)"""
    recency_half_life: float | None = 1.0
    """rounds after which a pair counts half in the reward model (and in its held-out accuracy):
    recent feedback counts more, so a change of taste shows within a few rounds; None: all equal"""
    promotion: str = "manual"
    """auto: promote a candidate that passes the gates at once; manual: an operator decides"""
    seed: int = 0
    """seeds the reward model's new head and the gates' sampling"""
    device: str = "auto"
    """torch device of every stage; auto: the settings' device, resolved at run time"""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=3, lr=3e-4))
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=2, heldout_frac=0.2))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(**DEFAULT_PPO))
    gates: GateConfig = field(default_factory=GateConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters over one frozen base instead of full fine-tuning (`trainer.lora`)"""

    def __post_init__(self):
        if self.anchor not in ("parent", "root"):
            raise ValueError("anchor is parent or root")
        if self.ppo.target_kl >= self.gates.kl_budget or (self.ppo.stop_kl or 0) > self.gates.kl_budget:
            raise ValueError(f"PPO's target_kl ({self.ppo.target_kl}) and stop_kl ({self.ppo.stop_kl}) must stay "
                             f"below the gates' kl_budget ({self.gates.kl_budget}): a round aiming at the budget "
                             "overshoots it and is rejected")


def with_overrides(cfg, overrides: dict | None):
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
    """The defaults, then the settings (`min_new_feedback`, `max_round_interval_seconds`,
    `min_new_pairs`, `promotion`, `round_config`), then `overrides`; the device resolved once and
    handed to every stage."""
    cfg = RoundConfig(min_new_feedback=settings.min_new_feedback,
                      max_round_interval_seconds=settings.max_round_interval_seconds,
                      min_new_pairs=settings.min_new_pairs, promotion=settings.promotion)
    cfg = with_overrides(cfg, settings.round_config)
    cfg = with_overrides(cfg, overrides)
    device = resolve_device(settings.device if cfg.device == "auto" else cfg.device)
    cfg.device = cfg.sft.device = cfg.reward.device = cfg.ppo.device = device
    return cfg


def run_kind(cfg: RoundConfig) -> str:
    """`round` when every stage runs, else the stages that do (`feedloop train reward` …)."""
    return "round" if set(cfg.stages) == set(STAGES) else "+".join(cfg.stages)
