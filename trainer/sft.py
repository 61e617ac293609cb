"""Supervised fine-tuning on demonstrations (InstructGPT step 1), loss on answer tokens only."""
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lm.chat import encode_prompt
from lm.checkpoint import save_pretrained
from lm.turns import turn_end_id
from trainer.common import fp32_trainable, make_accelerator, on_terminal
from trainer.optim import adamw, set_lr, warmup_cosine

log = logging.getLogger(__name__)
IGNORE = -100  # label value cross-entropy skips: prompt and padding positions


@dataclass
class SFTConfig:
    epochs: int = 40
    """passes over the demonstrations"""
    batch_size: int = 16
    """demonstrations per optimizer step"""
    lr: float = 3e-3
    """peak learning rate (AdamW), reached after warmup and decayed by cosine to lr/10"""
    warmup_frac: float = 0.05
    """share of steps spent warming up"""
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    """torch device; auto picks an accelerator when present"""
    mixed_precision: str = "auto"
    """autocast: auto (bf16 on a GPU with bf16, fp16 on other GPUs, none on CPU), no, bf16, fp16;
    trainable weights and AdamW's state stay fp32 either way"""


def encode_demonstration(tokenizer, prompt, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the chat-formatted prompt, then the answer and its end of turn
    (`lm.turns.turn_end_id`); only the answer and the end of turn are learned, so the model learns
    to answer and to stop, not to parrot users."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [turn_end_id(tokenizer)]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad to the longest: (input_ids, attention_mask, labels), each (B, T)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def answer_loss(model, ids, mask, labels) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (labels shifted inside the model)."""
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train(cfg: SFTConfig, model, tokenizer, demonstrations: list[dict]) -> dict:
    """Fine-tune `model` in place on [{"prompt", "completion"}]; returns metrics."""
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    examples = [encode_demonstration(tokenizer, d["prompt"], d["completion"]) for d in demonstrations]
    fp32_trainable(model)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(cfg.seed)
    curve, step, t0 = [], 0, time.time()
    bar = tqdm(total=total, desc="sft", disable=not on_terminal(), leave=False)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([examples[i] for i in order[start:start + cfg.batch_size]],
                            tokenizer.pad_token_id)
            ids, mask, labels = (t.to(accelerator.device) for t in batch)
            set_lr(optimizer, warmup_cosine(step, total, cfg.lr, cfg.warmup_frac))
            loss = answer_loss(model, ids, mask, labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            curve.append(round(loss.item(), 4))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.3f}")
        if not on_terminal():
            log.info("sft epoch %d/%d loss %.4f", epoch + 1, cfg.epochs, curve[-1])
    bar.close()
    model = accelerator.unwrap_model(model)
    model.eval()
    tail = curve[-steps_per_epoch:]
    return {"sft/loss": sum(tail) / len(tail), "sft/steps": step, "sft/examples": len(examples),
            "sft/seconds": round(time.time() - t0, 2), "sft/curve": curve, "sft/config": asdict(cfg)}


def fine_tune(base: str | Path, out: str | Path, cfg: SFTConfig, demonstrations: list[dict], *,
              config: dict) -> Path:
    """The policy published at `base`, trained on `demonstrations` and published at `out`
    (atomically, with `config` in its manifest): a derived version to register."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    train(cfg, model, tokenizer, demonstrations)
    save_pretrained(model, tokenizer, Path(out), kind="policy", config=config)
    return Path(out)
