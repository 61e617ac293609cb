"""A round's model work, blocking (the round runs it in a worker thread): SFT -> reward model ->
PPO -> gates, then the policy published. Registers nothing: that is one transaction afterwards,
in `trainer.round`."""
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


def train_models(cfg: RoundConfig, inp: Inputs) -> Trained:
    """The stages in `cfg.stages`, in order: SFT on new demonstrations (when there are any),
    reward model, PPO against it, then the gates and the policy published under `inp.out`."""
    tokenizer = load_tokenizer(inp.policy.path)
    policy = load_policy(inp.policy.path, cfg.device)
    reference = load_policy(inp.reference.path, cfg.device).eval()
    root = load_policy(inp.root.path, cfg.device).eval() if inp.root.id != inp.reference.id else None
    out, ran = Trained(), {}  # ran: the configs of the stages that changed the policy

    if "sft" in cfg.stages and inp.demonstrations:  # 1) what users corrected or operators imported
        demos = [{"prompt": d.prompt, "completion": d.completion} for d in inp.demonstrations]
        out.keep(sft_train(cfg.sft, policy, tokenizer, demos))
        ran["sft"] = cfg.sft

    reward_path = inp.previous_reward.path if inp.previous_reward else None
    if "reward" in cfg.stages:  # 2) continued from the last reward model, else from the policy's backbone
        out.keep(train_reward(cfg, inp, tokenizer))
        reward_path = out.reward = inp.out / "reward"
    if "ppo" in cfg.stages and reward_path is None:
        raise RuntimeError("PPO needs a reward model: train one first (feedloop train reward)")
    reward_fn = reward_scorer(reward_path, tokenizer, cfg.device) if reward_path else None

    if "ppo" in cfg.stages:  # 3) the value model starts from the reward model (InstructGPT)
        carried = carried_kl_coef(inp.policy) if inp.reference.id != inp.policy.id else None
        ppo_cfg = dataclasses.replace(cfg.ppo, initial_kl_coef=carried)
        value_model = AutoModelForSequenceClassification.from_pretrained(reward_path).to(cfg.device)
        out.keep(ppo.train(ppo_cfg, policy, reference, value_model, tokenizer, inp.prompts, reward_fn))
        ran["ppo"] = ppo_cfg

    if ran:  # 4) gates against the active version, then publish (rejected policies too, for audit)
        active = load_policy(inp.policy.path, cfg.device).eval()
        rm = {k: v for k, v in out.metrics.items() if k.startswith("reward/")}
        out.decision, gate_metrics = gate(
            cfg.gates, policy, reference, active, root, tokenizer, reward_fn, rm=rm, ppo_ran="ppo" in ran,
            temperature=cfg.ppo.temperature, max_new_tokens=cfg.ppo.max_new_tokens, seed=cfg.seed)
        out.metrics.update(gate_metrics)
        out.policy = inp.out / "policy"
        publish_policy(policy, tokenizer, out.policy, configs=ran, metrics=out.metrics,
                       provenance={"parent_id": inp.policy.id, "reference_id": inp.reference.id})
    return out


def train_reward(cfg: RoundConfig, inp: Inputs, tokenizer) -> dict:
    """Train the reward model on every pair so far and publish it at `inp.out / "reward"`;
    returns its metrics."""
    start = inp.previous_reward.path if inp.previous_reward else inp.policy.path
    rm, _ = reward.load_for_training(start, seed=cfg.seed)
    # InstructGPT normalises on demonstrations; a handful would make the scale jump per round.
    references = ([(d.prompt, d.completion) for d in inp.demonstrations]
                  if len(inp.demonstrations) >= MIN_NORMALISING_DEMOS else None)
    rm_metrics = reward.train(cfg.reward, rm, tokenizer, inp.pairs, references=references)
    reward.save(rm, tokenizer, inp.out / "reward", cfg.reward, rm_metrics)
    return rm_metrics


def reward_scorer(path: str | Path, tokenizer, device: str) -> ppo.RewardFn:
    """The reward model at `path` as PPO's and the gates' reward: normalised scores, (B,)."""
    scorer, _ = reward.load_reward_model(path, device)
    return lambda convs, answers: reward.score(scorer, tokenizer, convs, answers)


def carried_kl_coef(parent: ModelVersion) -> float | None:
    """With the reference fixed at the root (`anchor` root), the KL controller runs on across
    rounds, as over one long PPO run: the parent's final beta (its reference is ours). Restarting
    at `kl_coef` each round let a policy already near the budget overshoot it before beta caught
    up. Re-anchored on the parent, each round's KL starts at 0 and beta starts afresh."""
    return parent.metrics.get("ppo/final_kl_coef")
