"""OpenAI's chat-completions wire models. Fields follow the order of OpenAI's API reference
(https://platform.openai.com/docs/api-reference/chat/create); server extras are marked."""
import json
import logging
import re
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

log = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Lenient on input: clients send fields newer than this file; we log and ignore them."""
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def log_extra_fields(self):
        if self.model_extra:
            log.debug("ignoring unknown fields %s in %s", sorted(self.model_extra), type(self).__name__)
        return self


# --- errors -------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- request --------------------------------------------------------------------------------

# What Postgres text cannot hold (NUL) and UTF-8 cannot encode (a lone UTF-16 surrogate, which
# JSON's "\ud800" escapes can produce): no field may carry either to the database or a tokenizer.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored as it is, or None. The one rule: the HTTP edge applies it to
    every field, path and query parameter and stored header (service/middleware.py), the import
    parsers to every line, and `Text` to every model field."""
    m = _UNSTORABLE.search(text)
    if m is None:
        return None
    if m.group() == "\x00":
        return "must not contain NUL (\\u0000) characters"
    return f"must not contain an unpaired UTF-16 surrogate (\\u{ord(m.group()):04x})"


def storable(text: str) -> str:
    if problem := text_problem(text):
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(storable)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


# Numbers and flags as JSON has them: `true` is not 1 and "1" is not a number (OpenAI refuses both).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class FunctionCall(BaseModel):
    name: Text
    arguments: Text = Field(description="the arguments as a JSON object, encoded as a string")


class ToolCall(BaseModel):
    id: Text = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class ParamError(ValueError):
    """A rule broken by one parameter, raised from a validator: `param` names it (relative to
    where the validator sits; service/errors.py joins it to the location) and `code` says why."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def arguments(text: str, param: str) -> dict:
    """A tool call's arguments (a JSON object encoded as a string) as an object."""
    try:
        args = json.loads(text)
    except ValueError:
        args = None
    if not isinstance(args, dict):
        raise ParamError(param, "a tool call's arguments must be a JSON object encoded as a string")
    return args


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    @model_validator(mode="after")
    def check_content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ParamError("content", "content is required (it may be null only in an assistant "
                                        "message with tool_calls)", "missing_required_parameter")
        if self.tool_calls and self.role != "assistant":
            raise ParamError("tool_calls", "only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ParamError("tool_call_id", "a tool message needs the tool_call_id it answers",
                             "missing_required_parameter")
        for j, c in enumerate(self.tool_calls or []):
            arguments(c.function.arguments, f"tool_calls[{j}].function.arguments")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: Bool = False


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema")
        return self


# OpenAI parameters this server does not implement: a value other than the neutral one is refused
# (400 unsupported_parameter) rather than accepted and ignored. README lists them.
UNSUPPORTED = {"logit_bias": ({},), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
               "functions": (), "function_call": (), "audio": (), "prediction": (),
               "web_search_options": (), "modalities": (["text"],)}


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    logprobs: Bool = False
    max_completion_tokens: Int | None = Field(None, ge=1)
    max_tokens: Int | None = Field(None, ge=1, deprecated="use max_completion_tokens")
    n: Int = Field(1, ge=1, le=8)
    parallel_tool_calls: Bool = True
    response_format: ResponseFormat | None = None
    seed: Int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Text | list[Text] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    temperature: Float = Field(1.0, ge=0, le=2)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    tools: list[Tool] | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    top_p: Float = Field(1.0, gt=0, le=1)
    user: Text | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def null_means_unset(cls, data):
        """`null` for an optional field is the field left out, as OpenAI reads it."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="before")
    @classmethod
    def check_unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and data[name] not in neutral:
                    raise ParamError(name, f"'{name}' is not supported by this server; leave it out.",
                                     "unsupported_parameter")
        return data

    @field_validator("stop")
    @classmethod
    def check_stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def check_tools(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs set to true")
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ParamError("tool_choice", f"tool_choice names '{self.tool_choice.function.name}', "
                                             "which is not one of the tools given")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ParamError("tool_choice", "tool_choice needs tools")
        return self

    @property
    def max_tokens_asked(self) -> tuple[str, int] | None:
        """(param, value) of the answer length the client asked for, if any. (max_tokens is read
        through __dict__: the attribute is marked deprecated and would warn.)"""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        if self.__dict__["max_tokens"] is not None:
            return "max_tokens", self.__dict__["max_tokens"]
        return None

    @property
    def tool_mode(self) -> str | None:
        """none (or no tools) -> None; else auto, required, or the named function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"

    def conversation(self) -> list[dict]:
        """Messages as chat templates take them (developer is the newer name of system; a tool
        call's arguments as an object, as Hugging Face templates expect)."""
        out = []
        for m in self.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                    for c in m.tool_calls]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out

    def to_sampling(self, default_max_tokens: int) -> "SamplingParams":
        asked = self.max_tokens_asked
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop=list(self.stop or []), max_tokens=asked[1] if asked else default_max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None)


class SamplingParams(BaseModel):
    """What generation actually used; recorded with every exchange."""
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None
    logprobs: int | None = None
    """None: off; else how many alternatives per token (top_logprobs)"""
    tools: list[dict] | None = None
    """the tools the chat template was given"""
    grammar: str | None = None
    """a Lark grammar (llguidance's dialect, lm/grammar.py) every choice is constrained to"""


# --- response -------------------------------------------------------------------------------

# A response id is a UUIDv7 (RFC 9562): its first 48 bits are the millisecond it was made, which is
# also the time its exchange is recorded at. An id alone so names the month partition its rows are
# in (store migration 013): a lookup by id reads one month, however long the history.
_TIMED_ID = re.compile(r"chatcmpl-([0-9a-f]{12})7[0-9a-f]{3}[89ab][0-9a-f]{15}")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def completion_id(at_ms: int | None = None) -> str:
    """A new response id, made now (or at `at_ms`, milliseconds since the epoch)."""
    ms = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    rand = secrets.randbits(74)
    value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return f"chatcmpl-{value:032x}"


def completion_time(response_id: str) -> datetime | None:
    """When the response with this id was made; None for an id that does not say (one recorded
    before ids carried their time, or one a client chose)."""
    m = _TIMED_ID.fullmatch(response_id)
    return _EPOCH + timedelta(milliseconds=int(m.group(1), 16)) if m else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = Field(description="the model version that produced this")
    choices: list[Choice]
    usage: Usage


class DeltaToolCall(ToolCall):
    index: int


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "feedloop"
    context_length: int | None = Field(None, description="not in OpenAI's object: positions prompt "
                                       "plus answer may take (as vLLM's max_model_len, OpenRouter's context_length)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
