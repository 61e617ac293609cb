"""The data that ships with the project: demonstrations for the bootstrap and prompts for PPO."""
import json
from importlib import resources


def _jsonl(name: str) -> list[dict]:
    text = resources.files("trainer").joinpath("data", name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def bundled_demonstrations() -> list[dict]:
    """[{"prompt": str, "completion": str}]: greetings, simple facts, arithmetic, instructions."""
    return _jsonl("demonstrations.jsonl")


def bundled_prompts() -> list[str]:
    """User prompts that are not in the demonstrations: PPO top-up and held-out evaluation."""
    return [r["prompt"] for r in _jsonl("prompts.jsonl")]
