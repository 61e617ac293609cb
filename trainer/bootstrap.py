"""The first policy, built from nothing that is downloaded: a tokenizer trained on the bundled
demonstrations, a small GPT-2-style model initialised from config, and our own SFT on the same
demonstrations. Seeded, so the same data and config give the same weights."""
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lm.checkpoint import save_pretrained
from schemas.checkpoint import read_manifest
from trainer.sft import SFTConfig, train as sft_train
from schemas.bundled import bundled_demonstrations
from trainer.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


@dataclass
class BootstrapConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 512
    """context length: prompt plus answer (room for a request's tool definitions and a tool call's
    history, which the template renders as JSON)"""
    vocab_size: int = 2048
    """upper bound; BPE stops earlier when the text has no more merges worth making"""
    seed: int = 0
    sft: SFTConfig = field(default_factory=SFTConfig)


def new_policy(cfg: BootstrapConfig, tokenizer) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head,
        # Dropout off: PPO's ratios and KL must compare the same function that sampled.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # GPT-2's tanh GELU as one fused kernel: the same function, a quarter less forward time.
        activation_function="gelu_pytorch_tanh",
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def build(cfg: BootstrapConfig, out: Path) -> dict:
    """Train the bootstrap policy and publish it at `out`; returns its manifest. A finished
    checkpoint at `out` (same data, same config) is reused as it is."""
    if out.exists():
        log.info("reusing bootstrap policy at %s", out)
        return read_manifest(out)
    torch.manual_seed(cfg.seed)
    demos = bundled_demonstrations()
    tokenizer = build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos],
                                cfg.vocab_size)
    model = new_policy(cfg, tokenizer)
    log.info("bootstrap: %d demonstrations, vocab %d, %.2fM parameters", len(demos), len(tokenizer),
             sum(p.numel() for p in model.parameters()) / 1e6)
    metrics = sft_train(cfg.sft, model, tokenizer, demos)
    curve = metrics.pop("sft/curve")
    return save_pretrained(model, tokenizer, out, kind="policy", config=asdict(cfg),
                           metrics=dict(metrics, **{"sft/final_loss": curve[-1]}))
