"""A checkpoint as a model: loaded from its directory, or saved and published as one (the
manifest and the atomic rename are `schemas.checkpoint`'s)."""
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.checkpoint import publish, staging


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, chat template included."""
    return AutoTokenizer.from_pretrained(path)


def load_policy(path: str | Path, device: str = "cpu"):
    """Any Hugging Face causal LM, on `device`, in eval mode (as `from_pretrained` leaves it)."""
    return AutoModelForCausalLM.from_pretrained(path).to(device)


def save_pretrained(model, tokenizer, final: Path, *, kind: str, config: dict[str, Any],
                    metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face model and its tokenizer published as a checkpoint at `final`: saved into a
    staging directory, then `publish`ed. Returns the manifest."""
    final = Path(final)
    with staging(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return publish(tmp, final, kind=kind, config=config, metrics=metrics)
