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


@dataclass
class RoundConfig:
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """which steps run: a round runs all; `feedloop train reward|sft|ppo` one"""
    min_new_pairs: int = 16
    """fewer new pairs since the last round's watermark: skip"""
    promotion: str = "manual"
    """auto: promote a candidate that passes the gates at once; manual: an operator decides"""
    seed: int = 0
    """seeds the reward model's new head and the gates' sampling"""
    device: str = "auto"
    """torch device of every stage; auto: the settings' device, resolved at run time"""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(epochs=3, lr=3e-4))
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters over one frozen base instead of full fine-tuning (`trainer.lora`)"""


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
    """The defaults, then the settings (`min_new_pairs`, `promotion`, `round_config`), then
    `overrides`; the device resolved once and handed to every stage."""
    cfg = RoundConfig(min_new_pairs=settings.min_new_pairs, promotion=settings.promotion)
    cfg = with_overrides(cfg, settings.round_config)
    cfg = with_overrides(cfg, overrides)
    device = resolve_device(settings.device if cfg.device == "auto" else cfg.device)
    cfg.device = cfg.sft.device = cfg.reward.device = cfg.ppo.device = device
    return cfg


def run_kind(cfg: RoundConfig) -> str:
    """`round` when every stage runs, else the stages that do (`feedloop train reward` …)."""
    return "round" if set(cfg.stages) == set(STAGES) else "+".join(cfg.stages)
