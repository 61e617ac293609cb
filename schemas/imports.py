"""Imported training data in TRL's dataset formats, read line by line into normalised rows.
Pure parsing: nothing here touches the database (`store/feedback.py` writes the rows)."""
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from schemas.errors import Invalid
from schemas.openai import storable
from schemas.records import DemonstrationImport, ImportLineError, PreferenceImport

T = TypeVar("T")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(value: str, param: str) -> str:
    try:
        return storable(value)
    except ValueError as e:
        raise Invalid(str(e), param=param) from None


def _conversation(value: Any, param: str) -> list[dict[str, str]]:
    """A prompt: plain text (one user turn) or a list of {"role", "content"} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise Invalid("is empty", param=param)
        return [{"role": "user", "content": _text(value, param)}]
    if not isinstance(value, list) or not value:
        raise Invalid("must be a string or a non-empty list of messages", param=param)
    messages = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise Invalid('a message is {"role": "system" | "user" | "assistant", "content": string}',
                          param=f"{param}[{i}]")
        messages.append({"role": ROLES[m["role"]], "content": _text(m["content"], f"{param}[{i}]")})
    return messages


def _answer(value: Any, param: str) -> str:
    """An answer: plain text, or TRL's conversational form, one assistant message."""
    if isinstance(value, str):
        return _text(value, param)
    messages = _conversation(value, param)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise Invalid('a conversational answer is one assistant message: '
                      '[{"role": "assistant", "content": ...}]', param=param)
    return messages[0]["content"]


def _split_implicit(value: Any, param: str) -> tuple[list[dict[str, str]], str]:
    """TRL's implicit-prompt form: the whole conversation, ending in the assistant's answer."""
    messages = _conversation(value, param)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise Invalid("without a `prompt`, this is the whole conversation ending in an assistant message",
                      param=param)
    return messages[:-1], messages[-1]["content"]


def parse_preference(obj: Any) -> PreferenceImport:
    """One line of a preference file: {"prompt", "chosen", "rejected"} in TRL's standard
    (strings) or conversational (messages) form, or the implicit-prompt form without "prompt";
    an optional numeric "margin"."""
    if not isinstance(obj, dict):
        raise Invalid('a line is a JSON object: {"prompt", "chosen", "rejected"}')
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise Invalid("is missing", param=field)
    if "prompt" in obj:
        prompt = _conversation(obj["prompt"], "prompt")
        chosen, rejected = _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected")
    else:
        prompt, chosen = _split_implicit(obj["chosen"], "chosen")
        other, rejected = _split_implicit(obj["rejected"], "rejected")
        if other != prompt:
            raise Invalid("chosen and rejected must continue the same conversation", param="rejected")
    if chosen == rejected:
        raise Invalid("chosen and rejected are the same answer", param="rejected")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise Invalid("must be a finite number", param="margin")
    return PreferenceImport(prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin))


def parse_demonstration(obj: Any) -> DemonstrationImport:
    """One line of a demonstration file: TRL's prompt-completion form {"prompt", "completion"}
    (strings or messages) or its conversational form {"messages"} ending in the answer."""
    if not isinstance(obj, dict):
        raise Invalid('a line is a JSON object: {"prompt", "completion"} or {"messages"}')
    if "messages" in obj:
        prompt, completion = _split_implicit(obj["messages"], "messages")
        param = "messages"
    else:
        for field in ("prompt", "completion"):
            if field not in obj:
                raise Invalid('is missing (a line is {"prompt", "completion"} or {"messages"})', param=field)
        prompt, completion = _conversation(obj["prompt"], "prompt"), _answer(obj["completion"], "completion")
        param = "completion"
    if not completion.strip():
        raise Invalid("the answer is empty", param=param)
    return DemonstrationImport(prompt=prompt, completion=completion)


def parse_jsonl(text: str, parse: Callable[[Any], T]) -> tuple[list[T], list[ImportLineError], int]:
    """(valid rows, errors by 1-based line number, non-blank lines read)."""
    rows, errors, lines = [], [], 0
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(ImportLineError(line=number, param=None, message=f"not JSON: {e.msg} (column {e.colno})"))
            continue
        except RecursionError:
            errors.append(ImportLineError(line=number, param=None, message="not JSON we read: nested too deeply"))
            continue
        try:
            rows.append(parse(obj))
        except Invalid as e:
            errors.append(ImportLineError(line=number, param=e.param,
                                          message=f"'{e.param}' {e}" if e.param else str(e)))
    return rows, errors, lines
