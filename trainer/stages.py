"""A round's model work, blocking (the round runs it in a worker thread): SFT -> reward model ->
PPO -> gates, then the policy published. Registers nothing: that is one transaction afterwards,
in `trainer.round`."""
import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from lm.checkpoint import load_policy, load_tokenizer
from schemas.records import Demonstration, ModelVersion, TrainingPair
from trainer import ppo, reward
from trainer.common import publish_policy
from trainer.config import RoundConfig
from trainer.gates import Decision, gate
from trainer.lora import AdapterView, HeadView, SharedBase, new_head
from trainer.sft import train as sft_train

MIN_NORMALISING_DEMOS = 32  # fewer demonstrations: normalise rewards on the training answers instead


@dataclass
class Inputs:
    pairs: list[TrainingPair]
    """the newest derived pairs up to the watermark (`RoundConfig.reward_window`), newest first:
    the reward model's training data"""
    demonstrations: list[Demonstration]
    """since the last round's watermark (all of them for one stage alone): SFT's training data"""
    prompts: list[list[dict]]
    """conversations users sent: PPO's prompts (empty when PPO does not run)"""
    policy: ModelVersion
    """the active policy, which this round improves"""
    reference: ModelVersion
    """the policy PPO's KL and the per-round budget are measured against (the active policy
    itself when re-anchoring, else the root)"""
    root: ModelVersion
    """the lineage's first version: the total drift is measured against it"""
    previous_reward: ModelVersion | None
    """the active reward model: continued, or used as it is when this run trains none"""
    out: Path
    """this run's checkpoint directory"""


@dataclass
class Trained:
    """What the stages produced, for `trainer.round` to register."""
    metrics: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    reward: Path | None = None
    """the new reward model's checkpoint, when one was trained"""
    policy: Path | None = None
    """the new policy's checkpoint, when SFT or PPO changed it"""
    decision: Decision = field(default_factory=Decision)
    """the gates' verdict on the policy"""

    @property
    def passed(self) -> bool:
        return self.decision.passed

    def keep(self, stage_metrics: dict) -> None:
        """A stage's metrics: per-step curves to `curves`, the rest (less its config) to `metrics`."""
        for k, v in stage_metrics.items():
            if k == "ppo/curves":
                self.curves.update(v)
            elif "/curve" in k:
                self.curves[k] = v
            elif not k.endswith("/config"):
                self.metrics[k] = v


@dataclass
class Models:
    """The policy and its reference, and with LoRA the base they share (else None)."""
    policy: object
    reference: object
    shared: SharedBase | None = None


def load_models(cfg: RoundConfig, inp: Inputs) -> Models:
    """Full fine-tuning: the policy and the reference, two models. LoRA: the policy's checkpoint
    loaded once as the frozen base; the policy is its "policy" adapter, the reference the base
    alone (`Inputs.reference` is then the policy version itself: `trainer.round`)."""
    if not cfg.lora.enabled:
        return Models(load_policy(inp.policy.path, cfg.device), load_policy(inp.reference.path, cfg.device).eval())
    shared = SharedBase(load_policy(inp.policy.path, cfg.device), inp.policy.path, cfg.lora)
    return Models(AdapterView(shared, "policy"), AdapterView(shared, None).eval(), shared)


def train_models(cfg: RoundConfig, inp: Inputs) -> Trained:
    """The stages in `cfg.stages`, in order: SFT on new demonstrations (when there are any),
    reward model, PPO against it, then the gates and the policy published under `inp.out`."""
    tokenizer = load_tokenizer(inp.policy.path)
    models = load_models(cfg, inp)
    policy, reference, shared = models.policy, models.reference, models.shared
    root = load_policy(inp.root.path, cfg.device).eval() if inp.root.id != inp.reference.id else None
    out, ran = Trained(), {}  # ran: the configs of the stages that changed the policy
    rm = None  # the reward model trained here, when one is

    if "sft" in cfg.stages and inp.demonstrations:  # 1) what users corrected or operators imported
        demos = [{"prompt": d.prompt, "completion": d.completion} for d in inp.demonstrations]
        out.keep(sft_train(cfg.sft, policy, tokenizer, demos))
        ran["sft"] = cfg.sft

    reward_path = inp.previous_reward.path if inp.previous_reward else None
    if "reward" in cfg.stages:  # 2) continued from the last reward model, else from the policy's backbone
        metrics, rm = train_reward(cfg, inp, tokenizer, shared)
        out.keep(metrics)
        reward_path = out.reward = inp.out / "reward"
    if "ppo" in cfg.stages and reward_path is None:
        raise RuntimeError("PPO needs a reward model: train one first (feedloop train reward)")
    if rm is not None and shared is not None:  # the reward adapter scores, on the base already in memory
        reward_fn = scores_of(rm.eval(), tokenizer)
    else:
        reward_fn = reward_scorer(reward_path, tokenizer, cfg.device) if reward_path else None

    if "ppo" in cfg.stages:  # 3) the value model starts from the reward model (InstructGPT)
        carried = carried_kl_coef(inp.policy) if inp.reference.id != inp.policy.id else None
        ppo_cfg = dataclasses.replace(cfg.ppo, initial_kl_coef=carried)
        out.keep(ppo.train(ppo_cfg, policy, reference, value_model(cfg, reward_path, rm, shared), tokenizer,
                           inp.prompts, reward_fn))
        ran["ppo"] = ppo_cfg

    if ran:  # 4) gates against the active version, then publish (rejected policies too, for audit)
        # With LoRA the active version is the base: the reference view, not another copy.
        active = reference if shared else load_policy(inp.policy.path, cfg.device).eval()
        rm_metrics = {k: v for k, v in out.metrics.items() if k.startswith("reward/")}
        out.decision, gate_metrics = gate(
            cfg.gates, policy, reference, active, root, tokenizer, reward_fn, rm=rm_metrics, ppo_ran="ppo" in ran,
            temperature=cfg.ppo.temperature, max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed)
        out.metrics.update(gate_metrics)
        out.policy = inp.out / "policy"
        provenance = {"parent_id": inp.policy.id, "reference_id": inp.reference.id}
        if shared:  # lineage: the base the adapter trained on, and the adapter kept beside the weights
            provenance["lora"] = {**shared.lineage("policy"), "base_id": inp.policy.id}
        publish_policy(policy, tokenizer, out.policy, configs=ran, metrics=out.metrics, provenance=provenance)
    return out


def value_model(cfg: RoundConfig, reward_path, rm, shared: SharedBase | None):
    """PPO's value model, started from the reward model (InstructGPT): a copy of its checkpoint,
    or with LoRA the "value" adapter set to the reward adapter's weights, with a copy of its head.
    None with `value_model="shared"`: PPO puts a new head on the policy's own trunk."""
    if cfg.ppo.value_model == "shared":
        return None
    if shared is None:
        return AutoModelForSequenceClassification.from_pretrained(reward_path).to(cfg.device)
    if rm is None:  # this run trained no reward model: the value adapter and head start fresh
        return HeadView(shared, "value", new_head(shared.model.config, cfg.seed).to(cfg.device))
    shared.copy_adapter("reward", "value")
    return HeadView(shared, "value", copy.deepcopy(rm.score))


def train_reward(cfg: RoundConfig, inp: Inputs, tokenizer, shared: SharedBase | None = None) -> tuple[dict, object]:
    """Train the reward model on the round's pairs and publish it at `inp.out / "reward"`;
    returns (its metrics, the model). With LoRA it is the "reward" adapter on the shared base with
    a new head, trained afresh on the round's pairs, not continued."""
    if shared is not None:
        rm = HeadView(shared, "reward", new_head(shared.model.config, cfg.seed).to(cfg.device))
    else:
        start = inp.previous_reward.path if inp.previous_reward else inp.policy.path
        rm, _ = reward.load_for_training(start, seed=cfg.seed)
    # InstructGPT normalises on demonstrations; a handful would make the scale jump per round.
    references = ([(d.prompt, d.completion) for d in inp.demonstrations]
                  if len(inp.demonstrations) >= MIN_NORMALISING_DEMOS else None)
    rm_metrics = reward.train(cfg.reward, rm, tokenizer, inp.pairs, references=references)
    reward.save(rm, tokenizer, inp.out / "reward", cfg.reward, rm_metrics)
    return rm_metrics, rm


def reward_scorer(path: str | Path, tokenizer, device: str) -> ppo.RewardFn:
    """The reward model at `path` as PPO's and the gates' reward: normalised scores, (B,)."""
    scorer, _ = reward.load_reward_model(path, device)
    return scores_of(scorer, tokenizer)


def scores_of(model, tokenizer) -> ppo.RewardFn:
    """A reward model's normalised scores as PPO's and the gates' reward: (B,)."""
    return lambda convs, answers: reward.score(model, tokenizer, convs, answers)


def carried_kl_coef(parent: ModelVersion) -> float | None:
    """With the reference fixed at the root (`anchor` root), the KL controller runs on across
    rounds, as over one long PPO run: the parent's final beta (its reference is ours). Restarting
    at `kl_coef` each round let a policy already near the budget overshoot it before beta caught
    up. Re-anchored on the parent, each round's KL starts at 0 and beta starts afresh."""
    return parent.metrics.get("ppo/final_kl_coef")
