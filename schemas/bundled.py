"""The data that ships with the project: demonstrations for the bootstrap, prompts for PPO, and
the held-out prompts. It is a contract between the trainer's gates and the simulator's
measurement (both must hold out the same prompts), so it lives here; stdlib only, so the
simulator can read it without importing anything that runs a model."""
import json
from importlib import resources


def _jsonl(name: str) -> list[dict]:
    text = resources.files("schemas").joinpath("data", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bundled_demonstrations() -> list[dict]:
    """[{"prompt": str, "completion": str}]: greetings, simple facts, arithmetic, instructions.
    A one-sentence answer comes twice: as it is and followed by a follow-up ("I hope that helps.",
    "Anything else I can help with?"). People's demonstrations differ in length like this, and the
    first policy learns both: it answers a new prompt sometimes briefly and sometimes at length, a
    choice that feedback can move either way within a small KL."""
    return _jsonl("demonstrations.jsonl")


def bundled_prompts() -> list[str]:
    """User prompts that are not in the demonstrations: PPO top-up and held-out evaluation."""
    return [r["prompt"] for r in _jsonl("prompts.jsonl")]


def heldout_prompts() -> list[str]:
    """A fixed quarter of the bundled prompts: gates and the simulator measure on these, and
    training never uses them."""
    return bundled_prompts()[::4]


def training_prompts() -> list[str]:
    """The bundled prompts that are not held out: PPO's top-up when users asked little."""
    held = set(heldout_prompts())
    return [p for p in bundled_prompts() if p not in held]
