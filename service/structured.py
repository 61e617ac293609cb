"""What a request's `tools`, `tool_choice`, `response_format` and `logprobs` ask of an engine, and
an answer read back as tool calls.

- `tool_choice` none (or no tools): the model is not shown the tools and answers in text.
- auto (the default with tools): a model whose template renders tools is shown them and may call
  one (its output is parsed, lm/tools.py); a model that cannot call tools answers in text, as
  any model that chose no tool does (chat UIs attach tools to every request).
- required or a named function: decoding is constrained to one call in the model's format, its
  arguments matching the tool's schema, so the call is certain; a model that cannot call tools
  is refused (400 naming tool_choice).
- response_format json_object / json_schema: decoding is constrained to JSON (matching the
  schema); with tools on auto, to that JSON or a call.
An engine without constrained decoding (a remote server) refuses what needs it."""
from dataclasses import dataclass

from lm.grammar import GrammarError, json_rule
from lm.tools import ToolFormat
from schemas.openai import ChatCompletionRequest
from service.engine import Engine
from service.errors import ApiError


@dataclass
class Plan:
    tools: list[dict] | None
    """what the chat template is given"""
    grammar: str | None
    """what every choice is constrained to"""
    tool_format: ToolFormat | None
    """how answers are read back as tool calls; None: they are text"""
    names: set[str]
    single: bool
    """parallel_tool_calls false: the first call only"""

    def read(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a whole answer."""
        if self.tool_format is None:
            return text, []
        content, calls = self.tool_format.parse(text, self.names)
        return content, calls[:1] if self.single else calls


def plan(body: ChatCompletionRequest, engine: Engine) -> Plan:
    """Raises ApiError (400) for what this engine cannot do."""
    mode, fmt = body.tool_mode, engine.tool_format
    if mode not in (None, "auto") and fmt is None:
        raise ApiError(400, "This model cannot call tools (its chat template does not render them), so "
                            "tool_choice cannot require a call; use 'auto' or 'none'.",
                       param="tool_choice", code="tools_unsupported")
    if body.logprobs and engine.constraints is None:
        raise ApiError(400, "logprobs are not available from this model's engine (a remote server).",
                       param="logprobs", code="unsupported_parameter")
    calls = fmt if mode is not None else None
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if calls else None
    fmt_json = body.response_format if body.response_format and body.response_format.type != "text" else None
    grammar = None
    if mode not in (None, "auto"):
        grammar = fmt.grammar(tools, only=None if mode == "required" else mode)
    elif fmt_json is not None:
        schema = fmt_json.json_schema.schema_ if fmt_json.type == "json_schema" else None
        grammar = f"start: {json_rule(schema)}"
        if calls is not None:  # auto: the JSON answer, or a call
            grammar = f"start: answer | call\nanswer: {json_rule(schema)}\n" + \
                calls.grammar(tools).replace("start:", "call:", 1)
    if grammar is not None:
        param = "tool_choice" if mode not in (None, "auto") else "response_format"
        if engine.constraints is None:
            raise ApiError(400, f"{param} needs constrained decoding, which this model's engine (a remote "
                                "server) does not offer.", param=param, code="unsupported_parameter")
        try:
            engine.constraints.check(grammar)
        except GrammarError as e:
            raise ApiError(400, f"The schema cannot be enforced: {e}",
                           param="tools" if param == "tool_choice" else "response_format",
                           code="invalid_schema") from None
    return Plan(tools, grammar, calls, {t.function.name for t in body.tools or []}, not body.parallel_tool_calls)


class ToolCallText:
    """One choice's streamed text with tool calls held back: content is sent as it comes, up to
    where a call begins (or might); at the end the rest is read as content or calls."""

    def __init__(self, plan: Plan):
        self.plan, self.fmt, self.text, self.sent = plan, plan.tool_format, "", 0

    def feed(self, delta: str) -> str:
        """The content that may be sent now."""
        self.text += delta
        content, calls = self.fmt.split(self.text)
        visible = content if calls else self.text[:len(self.text) - self.fmt.holdback(self.text)]
        out = visible[self.sent:]
        self.sent = max(self.sent, len(visible))
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, the tool calls) once the choice is whole."""
        _, calls = self.plan.read(self.text)
        if not calls:
            return self.text[self.sent:], []
        return self.fmt.split(self.text)[0][self.sent:].rstrip(), calls
