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

    def __init__(self, cache, mask: torch.Tensor, next_pos: torch.Tensor, hidden: torch.Tensor | None = None):
        self.cache, self.mask, self.next_pos = cache, mask, next_pos
        self.hidden = hidden
        """(B, H) final hidden state of the last column, kept only when asked (`keep_hidden`)"""

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
    def step(self, model, tokens: torch.Tensor, keep_hidden: bool = False) -> torch.Tensor:
        """Feed each row's next token (B,); returns the logits (B, V) float for the token after.
        With `keep_hidden`, `hidden` is the final hidden state the LM head read."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos,
                    cache=self.cache, use_cache=True, output_hidden_states=keep_hidden)
        self.cache, self.next_pos = out.cache, self.next_pos + 1
        self.hidden = _last_hidden(out, keep_hidden)
        return out.logits[:, -1].float()

    def take(self, index: list[int] | torch.Tensor) -> None:
        """Keep these rows, in this order (an index may repeat: the row is copied). Columns left
        holding padding only are dropped, so the batch is as wide as its longest row."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.mask.device)
        self.mask, self.next_pos = self.mask.index_select(0, index), self.next_pos.index_select(0, index)
        if self.hidden is not None:  # it stays each kept row's own
            self.hidden = self.hidden.index_select(0, index)
        if not self.repackable:
            self.cache.batch_select_indices(index)
            return
        first = int(self.mask.any(0).int().argmax()) if self.rows else 0  # the first column in use
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:  # one copy of what stays (index_select: 4x faster than [index])
            layer.keys = layer.keys[:, :, first:].index_select(0, index)
            layer.values = layer.values[:, :, first:].index_select(0, index)

    def extend(self, other: "Batch") -> None:
        """Append `other`'s rows below these: both are laid into one batch as wide as the wider
        one, each right-aligned (the padding on the left: zero keys and values, masked out)."""
        if not (self.repackable and other.repackable):
            raise ValueError("this model's cache cannot take rows of another width")
        rows, width = self.rows + other.rows, max(self.width, other.width)
        parts = ((slice(0, self.rows), self), (slice(self.rows, rows), other))
        mask = self.mask.new_zeros((rows, width))
        for at, b in parts:
            mask[at, width - b.width:] = b.mask
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                t = getattr(mine, name)
                joined = t.new_zeros((rows, t.shape[1], width, t.shape[3]))  # (B, H, T, D)
                for at, layer in zip((p[0] for p in parts), (mine, theirs)):
                    src = getattr(layer, name)
                    joined[at, :, width - src.shape[2]:] = src
                setattr(mine, name, joined)
        self.mask = mask
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.hidden = None  # the other rows' may not have been kept: none until the next step


def _last_hidden(out, keep: bool) -> torch.Tensor | None:
    # transformers puts the final-normed state, the one the LM head reads, last in hidden_states.
    return out.hidden_states[-1][:, -1] if keep else None


@torch.no_grad()
def prefill(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, keep_hidden: bool = False
            ) -> tuple[torch.Tensor, Batch]:
    """Run the left-padded prompts (B, P) once; returns the logits (B, V) float predicting each
    row's first answer token, and the batch ready to `step`."""
    pos = position_ids(prompt_mask)
    # The LM head only at the last column, where the first answer token is predicted.
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                logits_to_keep=1, output_hidden_states=keep_hidden)
    return out.logits[:, -1].float(), Batch(out.cache, prompt_mask, pos[:, -1:] + 1, _last_hidden(out, keep_hidden))


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, step: Step,
             on_hidden: Callable[[torch.Tensor], None] | None = None) -> None:
    """Run `model` on the left-padded prompts (B, P), then feed back what `step` picks from each
    new last-column logits until it returns None. Finished rows are the caller's to pad or ignore:
    the batch runs until `step` stops it. `on_hidden`, when given, first sees the final hidden
    state (B, H) the same logits came from (PPO's shared value head reads it)."""
    keep = on_hidden is not None
    logits, batch = prefill(model, prompt_ids, prompt_mask, keep)
    while True:
        if keep:
            on_hidden(batch.hidden)
        if (token := step(logits)) is None:  # (B,)
            return
        logits = batch.step(model, token, keep)
