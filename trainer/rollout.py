"""Batched sampling and re-scoring for PPO and evaluation: answers sampled with `lm.decoding`'s
loop and cut at EOS, with the log-prob of each token; then log-probs and values of those answers
in one forward each. Works for any causal LM (and `*ForSequenceClassification` value model) that
takes `position_ids`, `attention_mask`, `cache` and `logits_to_keep`.

Layout shared by every function here: a batch is `prompt_ids (B, P)` left-padded, followed by
`responses (B, R)` right-padded after EOS; `response_mask (B, R)` is 1 on answer tokens up to and
including EOS. Position ids count real tokens only, so left padding does not shift them.
"""
from dataclasses import dataclass

import torch

from lm.decoding import generate, position_ids
from lm.sampling import sample_batch
from lm.turns import end_of_turn_ids


@dataclass
class Samples:
    responses: torch.Tensor
    """(B, R) sampled answer tokens; pad after EOS"""
    logprobs: torch.Tensor
    """(B, R) log-prob of each sampled token under the temperature-scaled sampling distribution"""
    response_mask: torch.Tensor
    """(B, R) 1 on answer tokens up to and including EOS"""
    has_eos: torch.Tensor
    """(B,) whether the answer ended with EOS within the length limit"""
    values: torch.Tensor | None = None
    """(B, R) a value head's reading of the state before each answer token, when one was given;
    0 on padding"""


def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, end_ids: list[int], pad_id: int,
           generator: torch.Generator | None = None, value_head: torch.nn.Module | None = None) -> Samples:
    """Sample answers token by token with a KV cache; temperature 0 is greedy. Stops when every
    row has emitted an end-of-turn id (`end_ids`, `lm.turns`: EOS below means any of them).
    Log-probs are those of the distribution sampled from (logits / T). A `value_head` on the
    model's own final hidden state (PPO's value_model="shared") is read in the same forwards, so
    the values need no forward of their own."""
    end_ids = torch.tensor(list(end_ids), device=prompt_ids.device)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)  # (B,)
    tokens, logprobs, values = [], [], []

    def step(logits: torch.Tensor) -> torch.Tensor | None:  # (B, V) -> (B,)
        nonlocal done
        token, lp = sample_batch(logits, temperature, generator)
        token = token.masked_fill(done, pad_id)  # finished rows only pad
        tokens.append(token)
        logprobs.append(lp.masked_fill(done, 0.0))
        done = done | torch.isin(token, end_ids)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            return None
        return token

    def read_value(hidden: torch.Tensor) -> None:  # (B, H), the column whose logits `step` gets next
        values.append(head_values(value_head, hidden))

    generate(model, prompt_ids, prompt_mask, step, read_value if value_head is not None else None)
    responses = torch.stack(tokens, 1)  # (B, R)
    is_end = torch.isin(responses, end_ids)  # (B, R)
    response_mask = _mask_through_eos(is_end)
    return Samples(responses, torch.stack(logprobs, 1) * response_mask, response_mask, is_end.any(1),
                   torch.stack(values, 1) * response_mask if values else None)


def _mask_through_eos(is_end: torch.Tensor) -> torch.Tensor:
    """(B, R) 1 up to and including the first end of turn (everywhere when there is none)."""
    is_eos = is_end.long()
    before = is_eos.cumsum(1) - is_eos  # EOS tokens strictly before this column
    return (before == 0).long()


def join(prompt_ids, prompt_mask, responses, response_mask):
    """The full sequences the policy, reference and value model score: (ids, mask, pos), (B, P + R)."""
    ids = torch.cat([prompt_ids, responses], 1)
    mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], 1)
    return ids, mask, position_ids(mask)


def response_logits(model, ids, mask, pos, R: int, temperature: float) -> torch.Tensor:
    """(B, R, V) logits / T predicting each answer token; the LM head runs only on those columns."""
    return response_logits_and_values(model, None, ids, mask, pos, R, temperature)[0]


def response_logits_and_values(model, value_head, ids, mask, pos, R: int, temperature: float
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`response_logits` and, with a `value_head` on the policy's own trunk (PPO's
    value_model="shared"), the (B, R) values from the same forward's final hidden states."""
    # Column P - 1 + t predicts answer token t. The last column predicts nothing we need and, the
    # attention being causal, no other column sees it: it is left out of the forward altogether.
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                logits_to_keep=R, use_cache=False,  # no KV cache to build: nothing follows
                output_hidden_states=value_head is not None)
    values = None
    if value_head is not None:  # the last hidden state is the final-normed one the LM head reads
        values = head_values(value_head, out.hidden_states[-1][:, -R:])
    # N-details "scale the logits by sampling temperature": log-probs of the distribution that
    # was sampled from, else the KL and ratios compare different distributions.
    return out.logits.float() / max(temperature, 1e-7), values


def head_values(value_head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """A scalar head on final hidden states (..., H) -> (...) float, in the head's own dtype."""
    return value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float()


def response_values(value_model, ids, mask, pos, R: int) -> torch.Tensor:
    """(B, R) value of the state before each answer token: the value head on every hidden state,
    not only the last one a `*ForSequenceClassification` model pools."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                      use_cache=False).last_hidden_state  # the last column: as in response_logits
    return value_model.score(hidden[:, -R:]).squeeze(-1).float()


def decode(tokenizer, responses: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Answer texts without end of turn or padding, as the reward model and users see them."""
    out, drop = [], {*end_of_turn_ids(tokenizer), tokenizer.pad_token_id}
    for row, m in zip(responses.tolist(), response_mask.tolist()):
        ids = [t for t, keep in zip(row, m) if keep and t not in drop]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out
