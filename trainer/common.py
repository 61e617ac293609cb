"""What every training loop here shares: how progress is shown, dropout off, and how a trained
policy is published."""
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers.activations import GELUTanh, NewGELUActivation

from lm.checkpoint import save_pretrained
from lm.device import resolve_device


def on_terminal() -> bool:
    """Progress bars on a terminal; plain log lines when output goes to a file or a pipe."""
    return sys.stderr.isatty()


def _is_dropout(name: str, value) -> bool:
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop") or name == "layerdrop")


def disable_dropout(model: torch.nn.Module) -> None:
    """N-details "disable dropout": PPO's ratios and KL, and a reward pair's two scores, must
    compare the very function that produced them. Not only `nn.Dropout` modules: many models
    read a rate from their config into a float attribute and call the functional form in train
    mode (Llama's `attention_dropout`, OPT's `dropout` and `layerdrop`), so those floats go to 0
    too, on every module and in the config (with its sub-configs), which is saved with the model."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if _is_dropout(name, value):
                setattr(m, name, 0.0)
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for sub in [config, *(getattr(config, k) for k in getattr(config, "sub_configs", {}))]:
                for name, value in list(vars(sub).items()):
                    if _is_dropout(name, value):
                        setattr(sub, name, 0.0)


def fused_activations(model: torch.nn.Module) -> None:
    """Swap transformers' tanh-GELU written in Python (`gelu_new`: GPT-2, GPT-J, Phi-2; seven
    elementwise ops and as many saved for the backward) for PyTorch's fused kernel of the same
    function (`gelu_pytorch_tanh`, equal to float rounding, ~4e-7). On a CPU the Python form is
    about a tenth of a small model's forward and backward. Only the modules in memory change:
    the config, and so what a published checkpoint loads, keeps `gelu_new`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())


def mixed_precision(device: str, wanted: str = "auto") -> str:
    """accelerate's mixed precision: `auto` is bf16 autocast on a GPU that has bf16, fp16 (with
    a loss scaler) on one that does not, none on a CPU or MPS; anything else is taken as given."""
    if wanted != "auto":
        return wanted
    if resolve_device(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(device: str, precision: str = "auto") -> Accelerator:
    """The trainers' accelerator: on `device`, autocasting in `precision` (`mixed_precision`)."""
    return Accelerator(cpu=resolve_device(device) == "cpu", mixed_precision=mixed_precision(device, precision))


def fp32_trainable(model: torch.nn.Module) -> None:
    """Trainable weights (and so AdamW's state) in fp32, whatever dtype the checkpoint was saved
    in: Adam's updates are far below bf16's resolution for weights of order 1, so pure-bf16
    training leaves most weights unchanged. Frozen weights keep their dtype; autocast computes in
    bf16/fp16 where `make_accelerator` turns it on."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def summary(metrics: dict) -> dict:
    """Metrics as a manifest keeps them: per-step curves and configs stay with the training run."""
    return {k: v for k, v in metrics.items() if "/curve" not in k and not k.endswith("/config")}


def publish_policy(policy, tokenizer, out: Path, *, configs: dict, metrics: dict,
                   provenance: dict | None = None) -> dict:
    """Publish a trained policy at `out` (staged, hashed, renamed into place); returns the
    manifest. Its config holds the resolved config of each stage that trained the policy, by
    stage (`{"sft": SFTConfig, "ppo": PPOConfig}`: those that ran, no others), and `provenance`
    (parent and reference versions); its metrics the `summary` of `metrics`."""
    config = {stage: asdict(stage_cfg) for stage, stage_cfg in configs.items()}
    return save_pretrained(policy, tokenizer, out, kind="policy", config={**config, **(provenance or {})},
                           metrics=summary(metrics))
