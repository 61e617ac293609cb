"""OpenAI's chat-completions wire models. Fields follow the order of OpenAI's API reference
(https://platform.openai.com/docs/api-reference/chat/create); server extras are marked."""
import logging
import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(OpenAIBaseModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="accepted, not applied")
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, deprecated="use max_completion_tokens")
    n: int = Field(1, ge=1, le=8)
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="accepted, not applied")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    user: Text | None = Field(None, max_length=256)

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
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (developer is the newer name of system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

    def to_sampling(self, default_max_tokens: int) -> "SamplingParams":
        # max_tokens is read through __dict__: the attribute is marked deprecated and would warn.
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
            stop=list(self.stop or []),
            max_tokens=self.max_completion_tokens or self.__dict__["max_tokens"] or default_max_tokens)


class SamplingParams(BaseModel):
    """What generation actually used; recorded with every exchange."""
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None


# --- response -------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = Field(description="the model version that produced this")
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
