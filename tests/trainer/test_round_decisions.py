"""What a round decides before any model work, without a database: whether to skip, what kind
of run it is, and its config from the settings and overrides."""
import pytest
import torch

from schemas.settings import Settings
from trainer.config import RoundConfig, round_config, run_kind, with_overrides
from trainer.ppo import PPOConfig
from trainer.gates import GateConfig
from trainer.recency import age_in_rounds, weigh_by_recency
from trainer.round import skip_reason, waiting_reason
from schemas.records import TrainingPair


# --- skipping ------------------------------------------------------------------------------------

def test_a_round_with_too_few_new_pairs_is_skipped():
    cfg = RoundConfig(min_new_pairs=16)
    assert skip_reason(cfg, 15, None) == "15 new pairs, fewer than the minimum 16"
    assert skip_reason(cfg, 16, None) is None
    assert skip_reason(cfg, 16, 0) is None  # a round trains the reward model and PPO without demonstrations


def test_a_stage_that_learns_from_pairs_needs_the_minimum_and_sft_alone_does_not():
    for stages in (["reward"], ["ppo"], ["sft", "reward"]):
        assert skip_reason(RoundConfig(stages=stages, min_new_pairs=16), 3, 5) is not None, stages
    assert skip_reason(RoundConfig(stages=["sft"], min_new_pairs=16), 0, 5) is None


def test_a_scheduled_round_waits_for_enough_feedback_of_any_kind_or_for_the_max_interval():
    cfg = RoundConfig(min_new_feedback=50, max_round_interval_seconds=3600, min_new_pairs=1)
    assert waiting_reason(cfg, 49, 60) == (
        "49 new feedback events, fewer than 50, the oldest 60s old (a round trains anyway after 3600s)")
    assert waiting_reason(cfg, 50, 0) is None
    # few pairs (mostly ties), but enough judgements: the round trains on what they gave
    assert waiting_reason(cfg, 80, 0) is None and skip_reason(cfg, 2, None) is None
    assert waiting_reason(cfg, 3, 3600) is None  # evidence waited long enough
    assert waiting_reason(cfg, 0, 0).startswith("0 new feedback events")
    assert waiting_reason(cfg, 0, 10**9) is not None  # nothing new has nothing to wait for
    assert skip_reason(cfg, 0, None) == "0 new pairs, fewer than the minimum 1"


def test_sft_alone_without_demonstrations_is_skipped():
    cfg = RoundConfig(stages=["sft"])
    assert skip_reason(cfg, 100, 0) == "no demonstrations"
    assert skip_reason(cfg, 100, None) is None  # not counted yet: decided once they are derived
    assert skip_reason(RoundConfig(stages=["sft", "reward"]), 100, 0) is None  # the reward model still trains


# --- recency --------------------------------------------------------------------------------------

def pair(event_id: int) -> TrainingPair:
    return TrainingPair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b", source="pairwise",
                        prompt_hash="h", group=f"g{event_id}", origin={"event_id": event_id})


def test_older_pairs_weigh_less_by_rounds_of_age():
    watermarks = [10, 20, 30]  # three trained rounds read up to these events
    assert [age_in_rounds(e, watermarks) for e in (5, 10, 11, 25, 31)] == [3, 3, 2, 1, 0]
    weights = [p.weight for p in weigh_by_recency([pair(e) for e in (5, 15, 25, 35)], watermarks, 2.0)]
    assert weights == pytest.approx([0.5 ** 1.5, 0.5, 0.5 ** 0.5, 1.0])
    assert [p.weight for p in weigh_by_recency([pair(5)], watermarks, None)] == [1.0]  # off: all equal


# --- the defaults -----------------------------------------------------------------------------------

def test_the_default_kl_target_and_stop_sit_below_the_gates_budget():
    cfg = RoundConfig()
    assert cfg.ppo.target_kl < cfg.ppo.stop_kl < cfg.gates.kl_budget < cfg.gates.total_kl_budget
    assert cfg.anchor == "parent" and cfg.recency_half_life
    with pytest.raises(ValueError, match="must stay below the gates' kl_budget"):
        with_overrides(cfg, {"ppo": {"target_kl": 3.0}})
    with pytest.raises(ValueError, match="must stay below the gates' kl_budget"):
        with_overrides(cfg, {"gates": {"kl_budget": 2.0}})
    with pytest.raises(ValueError, match="anchor"):
        with_overrides(cfg, {"anchor": "grandparent"})
    assert isinstance(cfg.gates, GateConfig)


# --- the kind of run ----------------------------------------------------------------------------------

def test_run_kind_names_a_whole_round_or_its_stages():
    assert run_kind(RoundConfig()) == "round"
    assert run_kind(RoundConfig(stages=["ppo", "sft", "reward"])) == "round"  # any order
    assert run_kind(RoundConfig(stages=["reward"])) == "reward"
    assert run_kind(RoundConfig(stages=["sft", "reward"])) == "sft+reward"


# --- overrides ------------------------------------------------------------------------------------------

def test_overrides_set_nested_fields_on_a_copy():
    cfg = RoundConfig()
    new = with_overrides(cfg, {"ppo": {"steps": 8, "kl_coef": 0.1}, "promotion": "auto"})
    assert (new.ppo.steps, new.ppo.kl_coef, new.promotion) == (8, 0.1, "auto")
    assert new.ppo.batch_size == RoundConfig().ppo.batch_size  # fields not named keep their values
    assert (cfg.ppo.steps, cfg.promotion) == (PPOConfig().steps, "manual")  # the original is untouched
    assert with_overrides(cfg, None) == cfg and with_overrides(cfg, None) is not cfg


def test_unknown_keys_are_refused_at_any_depth():
    with pytest.raises(ValueError, match="'step' in PPOConfig"):
        with_overrides(RoundConfig(), {"ppo": {"step": 8}})
    with pytest.raises(ValueError, match="'pp0' in RoundConfig"):
        with_overrides(RoundConfig(), {"pp0": {"steps": 8}})


def test_overridden_configs_are_checked_as_their_constructor_checks_them():
    with pytest.raises(ValueError, match="multiple of num_minibatches"):
        with_overrides(RoundConfig(), {"ppo": {"batch_size": 9}})
    with pytest.raises(ValueError, match="temperature"):
        with_overrides(RoundConfig(), {"ppo": {"temperature": 0}})
    assert with_overrides(RoundConfig(), {"ppo": {"batch_size": 8, "num_minibatches": 2}}).ppo.minibatch_size == 4


# --- the config of a run ----------------------------------------------------------------------------

def settings(**fields) -> Settings:
    return Settings(**{"device": "cpu", "min_new_pairs": 16, "min_new_feedback": 64, "max_round_interval_seconds": 86400,
                       "promotion": "manual", "round_config": {}, **fields})


def test_round_config_takes_the_settings_then_their_overrides_then_the_runs():
    s = settings(min_new_pairs=5, promotion="auto", min_new_feedback=9, max_round_interval_seconds=60,
                 round_config={"ppo": {"steps": 8, "lr": 1e-5}, "min_new_pairs": 7})
    cfg = round_config(s, {"ppo": {"steps": 2}})
    assert (cfg.promotion, cfg.min_new_pairs, cfg.ppo.steps, cfg.ppo.lr) == ("auto", 7, 2, 1e-5)
    assert (cfg.min_new_feedback, cfg.max_round_interval_seconds) == (9, 60)
    assert round_config(settings(min_new_pairs=5)).min_new_pairs == 5
    with pytest.raises(ValueError, match="unknown"):
        round_config(settings(round_config={"gates": {"kl": 1}}))


def test_round_config_resolves_one_device_for_every_stage(monkeypatch):
    def devices(cfg):
        return {cfg.device, cfg.sft.device, cfg.reward.device, cfg.ppo.device}

    assert devices(round_config(settings(device="cuda:1"))) == {"cuda:1"}
    assert devices(round_config(settings(device="cuda:1"), {"device": "cpu"})) == {"cpu"}  # the run's own wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices(round_config(settings(device="auto"))) == {"cuda"}  # auto: decided on this machine
