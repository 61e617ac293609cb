"""One batched decoding loop for any causal LM that takes `position_ids`, `attention_mask`,
`cache` and `logits_to_keep`: the serving engine's and PPO's rollouts alike.

Prompts are left-padded, so every row's next token is at the last column; position ids count real
tokens only, so the padding does not shift them. The prompt runs once (prefill, the LM head only
at the last column), then one token per row per step with the KV cache, the mask growing by one
column each step. Which token comes next, and when to stop, is the caller's `step`.
"""
from typing import Callable

import torch

Step = Callable[[torch.Tensor], torch.Tensor | None]
"""logits (B, V) float of the last column -> next tokens (B,), or None to stop"""


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, P): left padding, so every row's next token is at column P."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of real tokens counted from 0; padding gets 0 (it is masked anyway). (B, T)"""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, step: Step) -> None:
    """Run `model` on the left-padded prompts (B, P), then feed back what `step` picks from each
    new last-column logits until it returns None. Finished rows are the caller's to pad or ignore:
    the batch runs until `step` stops it."""
    B = prompt_ids.shape[0]
    mask, pos = prompt_mask, position_ids(prompt_mask)
    # Prefill: the LM head only at the last column, where the first answer token is predicted.
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    next_pos = pos[:, -1:] + 1  # (B, 1)
    while (token := step(out.logits[:, -1].float())) is not None:  # (B,)
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                    cache=out.cache, use_cache=True)
        next_pos = next_pos + 1
