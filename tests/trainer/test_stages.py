"""A round's model work on a tiny policy, without a database: which stages run, the configs the
published policy records (those of the stages that ran, no others), the KL coefficient carried
from the parent, and `publish_policy` itself."""
from dataclasses import asdict
from datetime import datetime, timezone

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.checkpoint import read_manifest
from schemas.records import Demonstration, ModelVersion
from trainer import ppo, stages
from trainer.common import publish_policy
from trainer.config import RoundConfig, with_overrides
from trainer.sft import SFTConfig


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # two cores, shared with other tests and engineers


def version(id: int, path, **fields) -> ModelVersion:
    return ModelVersion(**{"id": id, "kind": "policy", "parent_id": None, "reference_id": None,
                           "reward_model_id": None, "path": str(path), "content_hash": "sha256:x",
                           "endpoint": None, "status": "active", "canary_fraction": None,
                           "training_run_id": None, "metrics": {}, "created_at": datetime.now(timezone.utc),
                           "promoted_at": None, "promoted_by": None, **fields})


# Gates on few held-out prompts, short answers: the plumbing, not the verdict, is under test.
TINY = {"device": "cpu", "sft": {"epochs": 1, "device": "cpu"}, "ppo": {"device": "cpu", "max_new_tokens": 8},
        "gates": {"eval_prompts": 2, "samples_per_prompt": 2}}


def config(**overrides) -> RoundConfig:
    return with_overrides(with_overrides(RoundConfig(), TINY), overrides)


def inputs(policy_dir, tmp_path, **fields) -> stages.Inputs:
    policy = version(1, policy_dir, **fields.pop("policy_fields", {}))
    return stages.Inputs(**{"pairs": [], "demonstrations": [], "prompts": [], "policy": policy,
                            "reference": policy, "root": policy, "previous_reward": None, "out": tmp_path / "run-1", **fields})


DEMOS = [Demonstration(prompt=[{"role": "user", "content": "Say hi."}], completion="Hi!", source="import")]


def test_sft_alone_publishes_a_policy_that_records_sft_only(tiny_policy_dir, tmp_path):
    trained = stages.train_models(config(stages=["sft"]), inputs(tiny_policy_dir, tmp_path, demonstrations=DEMOS))
    assert trained.reward is None and trained.policy == tmp_path / "run-1" / "policy"
    manifest = read_manifest(trained.policy)
    assert set(manifest["config"]) == {"sft", "parent_id", "reference_id"}  # no PPO config: PPO never ran
    assert manifest["config"]["sft"]["epochs"] == 1
    assert "sft/curve" in trained.curves and "sft/loss" in trained.metrics and "sft/config" not in trained.metrics
    # Without PPO the reward gates do not apply, and with no reward model every answer scores 0.
    assert trained.metrics["gates/reward_gain"] == 0.0
    assert not any(r.startswith(("reward gain", "reward model")) for r in trained.decision.reasons())
    assert trained.passed == (trained.decision.reasons() == []) == trained.metrics["gates/passed"]
    # drift per round and in total: re-anchored on the policy, which is also the root, they are one
    assert trained.metrics["gates/kl_total"] == trained.metrics["gates/kl"]
    assert (trained.metrics["gates/kl_budget"], trained.metrics["gates/total_kl_budget"]) == (3.0, 12.0)


def test_sft_without_demonstrations_leaves_the_policy_alone(tiny_policy_dir, tmp_path):
    trained = stages.train_models(config(stages=["sft"]), inputs(tiny_policy_dir, tmp_path))
    assert trained.policy is None and trained.metrics == {} and not (tmp_path / "run-1").exists()


def test_ppo_without_a_reward_model_is_a_clear_error(tiny_policy_dir, tmp_path):
    with pytest.raises(RuntimeError, match="PPO needs a reward model"):
        stages.train_models(config(stages=["ppo"]), inputs(tiny_policy_dir, tmp_path))


def test_ppo_anchored_on_the_root_continues_the_parents_kl_coefficient(tiny_policy_dir, tmp_path, monkeypatch):
    ran = {}

    def fake_ppo(cfg, policy, reference, value_model, tokenizer, prompts, reward_fn):
        ran["cfg"] = cfg
        ran["scores"] = reward_fn([[{"role": "user", "content": "Hi"}]], ["Hello"])
        return {"ppo/kl": 1.0, "ppo/final_kl_coef": 0.3, "ppo/curves": {"ppo/kl": [0.5, 1.0]},
                "ppo/config": {"ignored": True}}

    monkeypatch.setattr(ppo, "train", fake_ppo)
    cfg = config(stages=["ppo"])
    # The tiny policy doubles as the previous reward model: a fresh scalar head on its backbone.
    root = version(3, tiny_policy_dir)
    inp = inputs(tiny_policy_dir, tmp_path, prompts=[[{"role": "user", "content": "Hi"}]],
                 previous_reward=version(2, tiny_policy_dir, kind="reward"), reference=root, root=root,
                 policy_fields={"metrics": {"ppo/final_kl_coef": 0.17}})
    trained = stages.train_models(cfg, inp)
    assert ran["cfg"].initial_kl_coef == 0.17  # the parent's final beta
    assert cfg.ppo.initial_kl_coef is None  # the caller's config is not changed
    assert ran["scores"].shape == (1,)  # PPO is handed the previous reward model's scores
    assert trained.curves == {"ppo/kl": [0.5, 1.0]} and "ppo/config" not in trained.metrics
    config_recorded = read_manifest(trained.policy)["config"]
    assert set(config_recorded) == {"ppo", "parent_id", "reference_id"}
    assert config_recorded["ppo"]["initial_kl_coef"] == 0.17
    # re-anchored on the parent (the default) its KL starts at 0, and so does beta's controller
    inp = inputs(tiny_policy_dir, tmp_path / "again", prompts=[[{"role": "user", "content": "Hi"}]],
                 previous_reward=version(2, tiny_policy_dir, kind="reward"), root=root,
                 policy_fields={"metrics": {"ppo/final_kl_coef": 0.17}})
    trained = stages.train_models(cfg, inp)
    assert ran["cfg"].initial_kl_coef is None
    assert trained.metrics["gates/kl"] == pytest.approx(0.0, abs=1e-6)  # the same weights: no drift this round


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_shared_value_head_trains_on_the_policys_trunk_and_is_not_published(tiny_policy_dir, tmp_path, lora):
    # With LoRA the head sits on the shared base with the policy's adapter on: the policy's hidden
    # states, as in full fine-tuning; the "value" adapter is unused.
    cfg = config(stages=["ppo"], ppo={"value_model": "shared", "steps": 2, "batch_size": 4},
                 lora={"enabled": lora, "rank": 4, "alpha": 8})
    assert stages.value_model(cfg, tiny_policy_dir, None, None) is None  # PPO builds the head itself
    inp = inputs(tiny_policy_dir, tmp_path, prompts=[[{"role": "user", "content": "Hi"}]] * 4,
                 previous_reward=version(2, tiny_policy_dir, kind="reward"))
    trained = stages.train_models(cfg, inp)
    assert trained.metrics["ppo/steps"] == 2
    assert read_manifest(trained.policy)["config"]["ppo"]["value_model"] == "shared"
    published = AutoModelForCausalLM.from_pretrained(trained.policy)
    assert set(published.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_policy_dir).state_dict())


def test_a_first_policy_starts_from_the_configured_kl_coefficient(tiny_policy_dir, tmp_path):
    assert stages.carried_kl_coef(version(1, tiny_policy_dir)) is None  # PPO then starts at kl_coef
    assert stages.carried_kl_coef(version(1, tiny_policy_dir, metrics={"ppo/final_kl_coef": 0.08})) == 0.08


# --- publishing ----------------------------------------------------------------------------------

def test_publish_policy_records_the_configs_given_and_a_summary_of_the_metrics(tiny_policy_dir, tmp_path):
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy_dir)
    metrics = {"sft/loss": 0.5, "sft/curve": [1.0, 0.5], "sft/config": {}, "ppo/curves": {"ppo/kl": [1.0]},
               "gates/passed": True}
    manifest = publish_policy(policy, tokenizer, tmp_path / "cand", configs={"sft": SFTConfig(epochs=2)},
                              metrics=metrics, provenance={"parent_id": 3, "reference_id": 1})
    assert read_manifest(tmp_path / "cand")["content_hash"] == manifest["content_hash"]
    assert manifest["kind"] == "policy"
    assert manifest["config"] == {"sft": asdict(SFTConfig(epochs=2)), "parent_id": 3, "reference_id": 1}
    assert manifest["metrics"] == {"sft/loss": 0.5, "gates/passed": True}  # curves and configs stay with the run
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "cand").config.n_layer == policy.config.n_layer
    assert [p.name for p in tmp_path.iterdir()] == ["cand"]  # no staging directory left behind
    with pytest.raises(FileExistsError):
        publish_policy(policy, tokenizer, tmp_path / "cand", configs={}, metrics={})
