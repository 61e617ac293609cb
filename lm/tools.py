"""Tool calls as a model writes them: which format a checkpoint's chat template teaches, the
parser that turns its output back into OpenAI's `tool_calls`, and the grammar (lm/grammar.py)
that makes a call certain when the request requires one.

Formats, as vLLM's tool parsers of the same names read them:
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one or more (Hermes 2/3,
  Qwen 2.5/3, and the bootstrap policy's own template, trainer/tokenizer.py);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral 7B v0.3, Mixtral,
  Mistral Nemo/Small);
- `llama3_json`: `{"name": ..., "parameters": {...}}` as the whole answer, optionally after
  `<|python_tag|>`, several separated by `;` (Llama 3.1/3.2/3.3).
A template that renders tools but names none of these markers is read as `hermes`."""
import json
import re
import uuid
from dataclasses import dataclass

from lm.grammar import json_rule, literal

PROBE_TOOL = {"type": "function", "function": {"name": "feedloop_probe", "description": "probe",
                                               "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str
    """the text a call starts with (a llama3_json call starts with its JSON)"""
    end: str
    arguments_key: str = "arguments"

    # --- parsing ----------------------------------------------------------------------------
    def split(self, text: str) -> tuple[str, str]:
        """(content before the first call, the calls' text); the latter empty when none began."""
        if self.name == "llama3_json":
            stripped = text.lstrip()
            if stripped.startswith(("{", "<|python_tag|>")):
                return "", stripped
            return text, ""
        at = text.find(self.start)
        return (text, "") if at == -1 else (text[:at], text[at:])

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[dict]]:
        """(content, tool calls in OpenAI's shape) from a whole answer. Output that does not hold
        well-formed calls of the given tools is content, as a model that chose not to call."""
        content, calls_text = self.split(text)
        calls = self._calls(calls_text) if calls_text else []
        if not calls or any(c.get("name") not in names or not isinstance(c.get(self.arguments_key), dict)
                            for c in calls):
            return text, []
        return content.strip() or None, [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c[self.arguments_key])}} for c in calls]

    def _calls(self, text: str) -> list:
        try:
            if self.name == "hermes":
                bodies = re.findall(re.escape(self.start) + r"\s*(.*?)\s*(?:" + re.escape(self.end) + "|$)",
                                    text, re.S)
                return [json.loads(b) for b in bodies]
            if self.name == "mistral":
                calls = json.loads(text[len(self.start):].strip())
                return calls if isinstance(calls, list) else [calls]
            body = text.removeprefix("<|python_tag|>").strip()
            return [json.loads(part) for part in body.split(";") if part.strip()]
        except ValueError:
            return []

    def holdback(self, text: str) -> int:
        """How many characters at the end of `text` (no call begun yet) could be the start of
        one, and so must not be streamed as content yet."""
        if self.name == "llama3_json":
            s = text.lstrip()
            return len(text) if not s or s[0] == "{" or "<|python_tag|>".startswith(s[:14]) else 0
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):
            if self.start.startswith(text[-k:]):
                return k
        return 0

    # --- constraint -------------------------------------------------------------------------
    def grammar(self, tools: list[dict], only: str | None = None) -> str:
        """A Lark grammar for exactly one call of one of `tools` (of `only`, when named), its
        arguments matching the tool's parameter schema."""
        choices = [{"type": "object", "additionalProperties": False,
                    "required": ["name", self.arguments_key],
                    "properties": {"name": {"const": t["function"]["name"]},
                                   self.arguments_key: t["function"].get("parameters") or {"type": "object"}}}
                   for t in tools if only is None or t["function"]["name"] == only]
        call = json_rule(choices[0] if len(choices) == 1 else {"anyOf": choices})
        if self.name == "llama3_json":
            return f"start: {call}"
        if self.name == "mistral":
            return f'start: {literal(self.start)} "[" {call} "]"'
        return f"start: {literal(self.start)} {call} {literal(self.end)}"


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", ""),
    "llama3_json": ToolFormat("llama3_json", "", "", arguments_key="parameters"),
}


def tool_format(tokenizer) -> ToolFormat | None:
    """The format a tokenizer's chat template teaches, or None when it does not render tools
    (then the model cannot be asked to call one)."""
    template = tokenizer.chat_template
    if not template:
        return None
    probe = [{"role": "user", "content": "hi"}]
    try:
        with_tools = tokenizer.apply_chat_template(probe, tools=[PROBE_TOOL], tokenize=False)
        without = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that fails on tools cannot take them
        return None
    if with_tools == without or "feedloop_probe" not in with_tools:
        return None
    text = template if isinstance(template, str) else json.dumps(template)
    if "[TOOL_CALLS]" in text:
        return FORMATS["mistral"]
    if "<|python_tag|>" in text or "ipython" in text:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]
