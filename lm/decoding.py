"""One batched decoding core for any causal LM that takes `position_ids`, `attention_mask`,
`cache` and `logits_to_keep`: the serving engine's continuous batching and PPO's rollouts alike.

A `Batch` is rows being decoded together: a KV cache whose rows are left-padded to one width,
the attention mask over its columns (0 on padding), and each row's next position. Position ids
count real tokens only, so padding never shifts them, and every row's next token is at the last
column. A prompt runs once (`prefill`, the LM head only at the last column), then one token per
row per `step`, the mask growing by one column. Between steps rows can leave (`take` keeps some,
and drops the columns that only padding still fills), be repeated (`take` with an index twice:
n answers to one prompt share its prefill) or join (`extend`: the narrower batch is left-padded
to the wider one's width, then the rows are stacked). Which token comes next, and when a row is
done, is the caller's.

`generate` is the static form PPO uses: prefill once, then step until the caller says stop.
"""
from typing import Callable

import torch
from transformers.cache_utils import DynamicLayer

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


class Batch:
    """Rows decoded together. `cache` holds per layer keys and values (B, H, T, D), `mask` is
    (B, T) with 1 on real tokens, `next_pos` (B, 1) the position of each row's next token."""

    def __init__(self, cache, mask: torch.Tensor, next_pos: torch.Tensor):
        self.cache, self.mask, self.next_pos = cache, mask, next_pos

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def repackable(self) -> bool:
        """Whether rows of different widths can be merged: every layer a plain growing KV cache.
        (Sliding-window, linear-attention or shared-KV layers keep state that left padding
        cannot line up; a batch of those can still lose rows, but not take new ones.)"""
        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in self.cache.layers)

    @torch.no_grad()
    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's next token (B,); returns the logits (B, V) float for the token after."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                    cache=self.cache, use_cache=True)
        self.cache, self.next_pos = out.cache, self.next_pos + 1
        return out.logits[:, -1].float()

    def take(self, index: list[int] | torch.Tensor) -> None:
        """Keep these rows, in this order (an index may repeat: the row is copied). Columns left
        holding padding only are dropped, so the batch is as wide as its longest row."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        if self.repackable and self.rows:
            first = int(self.mask.any(0).int().argmax())  # the first column a row still uses
            if first:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def extend(self, other: "Batch") -> None:
        """Append `other`'s rows below these: the narrower batch is left-padded to the wider
        one's width (padding keys and values are zeros, masked out), then rows are stacked."""
        if not (self.repackable and other.repackable):
            raise ValueError("this model's cache cannot take rows of another width")
        width = max(self.width, other.width)
        padded = [_pad_left(b, width) for b in (self, other)]
        self.mask = torch.cat([m for m, _ in padded])
        for i, layer in enumerate(self.cache.layers):
            kvs = [p[i] for _, p in padded]
            layer.keys = torch.cat([k for k, _ in kvs])
            layer.values = torch.cat([v for _, v in kvs])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])


def _pad_left(batch: Batch, width: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(mask (B, width), per layer (keys, values) (B, H, width, D)): zeros on the left."""
    extra = width - batch.width
    layers = [(layer.keys, layer.values) for layer in batch.cache.layers]
    if not extra:
        return batch.mask, layers
    zeros = lambda t: t.new_zeros((*t.shape[:2], extra, t.shape[3]))
    mask = torch.cat([batch.mask.new_zeros((batch.rows, extra)), batch.mask], dim=1)
    return mask, [(torch.cat([zeros(k), k], dim=2), torch.cat([zeros(v), v], dim=2)) for k, v in layers]


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, Batch]:
    """Run the left-padded prompts (B, P) once; returns the logits (B, V) float predicting each
    row's first answer token, and the batch ready to `step`."""
    pos = position_ids(prompt_mask)
    # The LM head only at the last column, where the first answer token is predicted.
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1].float(), Batch(out.cache, prompt_mask, pos[:, -1:] + 1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, step: Step) -> None:
    """Run `model` on the left-padded prompts (B, P), then feed back what `step` picks from each
    new last-column logits until it returns None. Finished rows are the caller's to pad or ignore:
    the batch runs until `step` stops it."""
    logits, batch = prefill(model, prompt_ids, prompt_mask)
    while (token := step(logits)) is not None:  # (B,)
        logits = batch.step(model, token)
