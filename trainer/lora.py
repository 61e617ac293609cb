"""LoRA over one frozen base (peft): the policy, the value model and the reward model are adapters
on the same causal LM, held once in memory; PPO's reference is that base with every adapter off.

`SharedBase` owns the base and its three adapters ("policy", "value", "reward", rank and alpha
from `LoraSettings`, all linear layers by default, no LoRA dropout: RL compares the very function
that sampled). Adapters and heads train in fp32 whatever the base's dtype. The trainers see views
that behave like the models they take when training fully:

- `AdapterView(shared, "policy")`: a causal LM (SFT, rollouts, PPO's policy); with None, the base
  alone (PPO's reference, and the gates' active policy, which the base is).
- `HeadView(shared, "reward" | "value", head)`: a sequence scorer with a scalar `score` head on
  the backbone (the reward model; PPO's value model, started from the reward model's adapter and
  head as InstructGPT starts it from the reward model).

Which adapter a forward uses is set on peft's layers for that forward only (`SharedBase.using`),
not with peft's `set_adapter`, which also flips `requires_grad` and would cut the policy out of a
backward that also runs the value adapter. A view publishes as a plain Hugging Face directory
(`save_pretrained`): the base reloaded from its checkpoint with the adapter merged into its
weights, so transformers, vLLM and SGLang load it as any model; the adapter itself is saved
beside the weights in `adapter/` for engines that hot-load adapters.
"""
import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

ADAPTERS = ("policy", "value", "reward")
ADAPTER_DIR = "adapter"


@dataclass
class LoraSettings:
    enabled: bool = False
    """train LoRA adapters over one frozen base instead of every weight"""
    rank: int = 16
    """rank r of each adapter's update B @ A"""
    alpha: float = 32.0
    """scaling: the update is multiplied by alpha / rank"""
    target_modules: list[str] | str = "all-linear"
    """module names to adapt; "all-linear": every linear layer but the LM head (peft's default)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward: less memory, about a third more time"""


class SharedBase:
    """One frozen causal LM (loaded from `base_path`) with the three adapters injected."""

    def __init__(self, model, base_path: str | Path, settings: LoraSettings):
        self.base_path, self.settings = str(base_path), settings
        self.lora_config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                                      target_modules=settings.target_modules, bias="none")
        model.requires_grad_(False)
        self.peft = get_peft_model(model, copy.deepcopy(self.lora_config), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            self.peft.add_adapter(name, copy.deepcopy(self.lora_config))
        self.model = self.peft.base_model.model  # the causal LM itself, adapters inside its linear layers
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        for n, p in self.model.named_parameters():
            if "lora_" in n:  # trainable in fp32, whatever the base's dtype
                p.data = p.data.float()
                p.requires_grad_(True)
        if settings.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextmanager
    def using(self, adapter: str | None):
        """Forwards inside run with `adapter` alone (None: the base alone)."""
        saved = [(m._active_adapter, m._disable_adapters) for m in self.layers]
        for m in self.layers:
            m._active_adapter, m._disable_adapters = [adapter or ADAPTERS[0]], adapter is None
        try:
            yield
        finally:
            for m, (active, disabled) in zip(self.layers, saved):
                m._active_adapter, m._disable_adapters = active, disabled

    def adapter_parameters(self, adapter: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{adapter}." in n and "lora_" in n]

    def copy_adapter(self, source: str, target: str) -> None:
        """`target`'s weights set to `source`'s (the value model starts from the reward model)."""
        with torch.no_grad():
            for s, t in zip(self.adapter_parameters(source), self.adapter_parameters(target)):
                t.copy_(s)

    def deltas(self, adapter: str) -> dict[str, torch.Tensor]:
        """{weight name in the plain model: the adapter's update to it}, fp32 on the CPU."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return {f"{names[id(m)]}.weight": m.get_delta_weight(adapter).detach().float().cpu() for m in self.layers
                if adapter in m.lora_A}

    def save_adapter(self, adapter: str, out: Path) -> None:
        """The adapter as peft saves one (adapter_config.json, adapter_model.safetensors): what
        `PeftModel.from_pretrained(base, out)` and engines that hot-load LoRA adapters read."""
        out.mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.peft, adapter_name=adapter)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, out / "adapter_model.safetensors")
        config = copy.deepcopy(self.lora_config)
        config.base_model_name_or_path = self.base_path
        config.save_pretrained(out)

    def lineage(self, adapter: str) -> dict:
        """What a published checkpoint records of how it was made: its base and its adapter."""
        return {"base": self.base_path, "adapter": f"{ADAPTER_DIR}/", "adapter_name": adapter,
                **{k: v for k, v in asdict(self.settings).items() if k != "enabled"}}


def merged(fresh, deltas: dict[str, torch.Tensor]):
    """`fresh` (the base reloaded) with the adapter's updates added to its weights."""
    params = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].dtype))
    return fresh


class AdapterView(torch.nn.Module):
    """The shared base as a causal LM with one adapter on (None: the base alone)."""

    def __init__(self, shared: SharedBase, adapter: str | None):
        super().__init__()
        self.lm, self.adapter = shared.model, adapter
        self._shared = shared  # not a submodule: the views share it
        self.config, self.generation_config = shared.model.config, shared.model.generation_config

    def forward(self, **kwargs):
        with self._shared.using(self.adapter):
            return self.lm(**kwargs)

    def requires_grad_(self, requires_grad: bool = True):
        """Only this view's own adapter: the base stays frozen, the other adapters as they are."""
        for p in self._shared.adapter_parameters(self.adapter) if self.adapter else []:
            p.requires_grad_(requires_grad)
        return self

    def save_pretrained(self, out, **kwargs) -> None:
        """A plain causal-LM directory: the base with this adapter merged; the adapter in `adapter/`."""
        fresh = AutoModelForCausalLM.from_pretrained(self._shared.base_path)
        if self.adapter:
            merged(fresh, self._shared.deltas(self.adapter))
            self._shared.save_adapter(self.adapter, Path(out) / ADAPTER_DIR)
        fresh.save_pretrained(out, **kwargs)


class HeadView(torch.nn.Module):
    """The shared backbone with one adapter on and a scalar head: called like a
    `*ForSequenceClassification` model it returns the head's output at every position (B, T, 1);
    `backbone` gives the hidden states (what `trainer.rollout.response_values` reads)."""

    base_model_prefix = "backbone"

    def __init__(self, shared: SharedBase, adapter: str, head: torch.nn.Linear):
        super().__init__()
        self.lm, self.adapter, self.score = shared.model, adapter, head.float()
        self._shared = shared
        self.config = copy.deepcopy(shared.model.config)  # its own: reward_bias/scale must not reach the policy

    def backbone(self, **kwargs):
        with self._shared.using(self.adapter):
            return getattr(self.lm, self.lm.base_model_prefix)(**kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        kwargs.pop("use_cache", None)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False, **kwargs).last_hidden_state
        return self.score(hidden.to(self.score.weight.dtype))  # (B, T, 1)

    def requires_grad_(self, requires_grad: bool = True):
        for p in [*self._shared.adapter_parameters(self.adapter), *self.score.parameters()]:
            p.requires_grad_(requires_grad)
        return self

    def save_pretrained(self, out, **kwargs) -> None:
        """A plain `AutoModelForSequenceClassification` directory (one label): the base's backbone
        with this adapter merged, this head, this view's config extras (pad, reward_bias/scale)."""
        fresh = AutoModelForSequenceClassification.from_pretrained(self._shared.base_path, num_labels=1)
        merged(fresh, self._shared.deltas(self.adapter))
        with torch.no_grad():
            fresh.score.weight.copy_(self.score.weight.to(fresh.score.weight.dtype))
        for key in ("pad_token_id", "reward_bias", "reward_scale"):
            if hasattr(self.config, key):
                setattr(fresh.config, key, getattr(self.config, key))
        self._shared.save_adapter(self.adapter, Path(out) / ADAPTER_DIR)
        fresh.save_pretrained(out, **kwargs)


def new_head(config, seed: int) -> torch.nn.Linear:
    """A scalar head on the hidden states, std 1/sqrt(d+1) as `trainer.reward.load_for_training`'s."""
    head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=1 / (config.hidden_size + 1) ** 0.5,
                          generator=torch.Generator().manual_seed(seed))
    return head
