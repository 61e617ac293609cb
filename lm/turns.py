"""One notion of end of turn for every model: the set of token ids that finish an assistant's
answer. The engine stops on any of them, SFT teaches the model to emit one, the reward model reads
its score at one, PPO's rollouts are cut at the first of them and answers without one are
penalised.

The set is the tokenizer's `eos_token_id`, the token the chat template writes right after an
assistant message (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`, which
are often not `eos_token`), and every id in the checkpoint's `generation_config.json`
`eos_token_id` (what `model.generate` stops on). A finished answer is written with `turn_end_id`:
the template's own end of turn when it has one, else EOS.
"""
import json
from functools import lru_cache
from pathlib import Path

SENTINEL = "feedloop-answer"  # a plain-text answer whose position in the rendered turn we can find


def template_turn_end(tokenizer) -> int | None:
    """The first special token the chat template writes after an assistant message, or None
    (no template, or nothing special after the answer)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation names no turn end
        return None
    if SENTINEL not in text:
        return None
    after = text[text.rindex(SENTINEL) + len(SENTINEL):]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)


def generation_eos_ids(path: str | Path | None) -> list[int]:
    """`eos_token_id` of `generation_config.json` in the checkpoint at `path` (an int or a list)."""
    if not path:
        return []
    try:
        ids = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


@lru_cache(maxsize=64)  # per tokenizer object: it renders the template once, not per example
def end_of_turn_ids(tokenizer) -> tuple[int, ...]:
    """Every id that ends an answer, `turn_end_id` first. The generation config is read from the
    directory the tokenizer was loaded from (`name_or_path`), where checkpoints keep it."""
    ids = [template_turn_end(tokenizer), tokenizer.eos_token_id, *generation_eos_ids(tokenizer.name_or_path)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def turn_end_id(tokenizer) -> int:
    """The id a finished answer ends with in training data: the template's end of turn, else EOS."""
    ids = end_of_turn_ids(tokenizer)
    if not ids:
        raise ValueError("the tokenizer has no end-of-turn token (no eos_token, nothing after an "
                         "assistant turn in its chat template, no eos_token_id in generation_config.json)")
    return ids[0]


def check_pad(tokenizer) -> None:
    """Pad must exist and differ from every end-of-turn id: the reward model finds the last real
    token by it, and rollouts tell a stopped answer from its padding by it."""
    ends = end_of_turn_ids(tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (import the model: `feedloop models import` adds one)")
    if tokenizer.pad_token_id in ends:
        raise ValueError(f"the pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) is also an "
                         f"end-of-turn token {ends}: answers could not be told from their padding")
