"""Next-token choice from the last column's logits (B, V). Two samplers on purpose:

- `sample_rows`: the serving engine's. Every row has its own temperature and top_p. A row with
  a seed has its own generator and draws alone from it by a procedure that depends on that row
  only (its probabilities sorted high to low when it has a nucleus to cut, as they are
  otherwise), so a seed replays the same text whichever rows share the step: with continuous
  batching they change from one step to the next. Rows without a seed promise nothing to
  replay: they draw together from one shared generator by inverse CDF (`draw`), one uniform per
  row, about ten times cheaper on CPU than the exponential noise over the whole vocabulary a
  seeded row draws. A row may be constrained by a mask of allowed tokens (a grammar,
  lm/grammar.py) and may ask for the log-probabilities of what it drew from.
- `sample_batch`: PPO's. One temperature and one generator for the batch, and the log-prob of the
  token under the distribution sampled from, which the PPO ratios need.
"""
import torch
import torch.nn.functional as F


def sample_rows(logits: torch.Tensor, temperatures: list[float], top_ps: list[float],
                generators: list[torch.Generator | None], allowed: torch.Tensor | None = None,
                logprobs: bool = False, shared: torch.Generator | None = None) -> tuple[list[int], torch.Tensor | None]:
    """Next token per row: greedy at temperature 0, else nucleus sampling from logits / T. A row
    whose generator is None (no seed) draws from `shared` (None: torch's default generator).
    With `allowed` (B, V) bool, a row draws only among its allowed tokens (a grammar's mask: rows
    with no constraint allow all). With `logprobs`, also the log-probabilities (B, V) of the
    distribution each row actually drew from (the mask, T and the top_p cut applied,
    renormalised; greedy rows: the masked softmax of the logits), -inf where a token could not
    be drawn."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if all(t == 0 for t in temperatures):
        return logits.argmax(-1).tolist(), torch.log_softmax(logits, -1) if logprobs else None
    temps = torch.tensor(temperatures, device=logits.device)
    probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], dim=-1)  # (B, V), row by row
    nucleus = [i for i, (t, p) in enumerate(zip(temperatures, top_ps)) if t != 0 and p < 1.0]
    if nucleus:  # only these rows are sorted (and cut): the others draw from probs as they are
        rows = torch.tensor(nucleus, device=logits.device)
        top_p = torch.tensor([top_ps[i] for i in nucleus], device=logits.device)
        sorted_p, order = probs[rows].sort(dim=-1, descending=True)  # (N, V)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p[:, None]  # beyond the top_p nucleus
        probs[rows] = sorted_p.masked_fill(outside, 0.0)
    drawn = _draw_rows(probs, temperatures, generators, shared)
    if nucleus:
        drawn[rows] = order.gather(1, drawn[rows, None]).squeeze(1)  # back from sorted positions
    greedy_rows = [i for i, t in enumerate(temperatures) if t == 0]
    if greedy_rows:
        at = torch.tensor(greedy_rows, device=logits.device)
        drawn[at] = logits[at].argmax(-1)
    tokens = drawn.tolist()
    if not logprobs:
        return tokens, None
    if nucleus:  # the cut probabilities back in vocabulary order
        probs[rows] = torch.zeros_like(sorted_p).scatter_(1, order, probs[rows])
    logp = (probs / probs.sum(-1, keepdim=True)).log()
    if greedy_rows:
        logp[at] = torch.log_softmax(logits[at], -1)
    return tokens, logp


def _draw_rows(probs: torch.Tensor, temperatures: list[float], generators: list[torch.Generator | None],
               shared: torch.Generator | None) -> torch.Tensor:
    """One draw per row (B,) from probs (rows need not sum to 1; greedy rows' draws are unused).
    A seeded row: what `torch.multinomial(p, 1, generator=g)` computes, argmax(p / q) with
    q ~ Exp(1) drawn from g, the noise drawn row by row and the division and argmax done once for
    those rows. The other rows: one inverse-CDF draw for all of them from `shared`."""
    seeded = [i for i, (t, g) in enumerate(zip(temperatures, generators)) if t != 0 and g is not None]
    if not seeded:
        return draw(probs, shared)
    noise = torch.empty((len(seeded), probs.shape[1]), device=probs.device)
    for k, i in enumerate(seeded):
        noise[k].exponential_(1, generator=generators[i])
    if len(seeded) == len(temperatures):
        return (probs / noise).argmax(-1)
    drawn = draw(probs, shared)  # unseeded (and greedy) rows: the seeded ones are overwritten
    at = torch.tensor(seeded, device=probs.device)
    drawn[at] = (probs[at] / noise).argmax(-1)
    return drawn


def sample_batch(logits: torch.Tensor, temperature: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs), each (B,): a draw from softmax(logits / T) (greedy at T = 0) and its
    log-prob under that distribution (plain softmax when greedy)."""
    if temperature > 0:
        logp = F.log_softmax(logits / temperature, dim=-1)  # (B, V)
        token = draw(logp.exp(), generator)
    else:
        logp = F.log_softmax(logits, dim=-1)
        token = logits.argmax(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,) by inverse CDF: exact, and on CPU ~10x cheaper than torch.multinomial."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
