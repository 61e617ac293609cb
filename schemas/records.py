"""Rows as the code sees them, and our own API resources (`…Create` in, `…Public` out)."""
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, computed_field, field_validator, model_validator

from schemas.openai import Text

Role = Literal["user", "operator"]
RATE_LIMIT_MAX = 2**31 - 1  # the column is a Postgres integer
T = TypeVar("T")


class ListPublic(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    count: int
    has_more: bool = Field(False, description="a paged list: more items follow this page")


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Text = Field(min_length=1, max_length=200)
    role: Role = "user"
    rate_limit: int | None = Field(None, ge=1, le=RATE_LIMIT_MAX, description="requests per minute")


class ApiKeyPublic(BaseModel):
    id: int
    prefix: str
    name: str
    role: Role
    rate_limit: int | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="the secret; shown once, only its hash is stored")


class ModelVersion(BaseModel):
    id: int
    kind: Literal["policy", "reward"]
    parent_id: int | None
    reference_id: int | None
    reward_model_id: int | None
    path: str
    content_hash: str
    endpoint: str | None = Field(description="server that serves it (remote engine); None: FEEDLOOP_REMOTE_URL")
    model_id: str | None = Field(None, description="model id that server is asked for; None: "
                                 "FEEDLOOP_REMOTE_MODEL, else the checkpoint's path")
    status: str
    canary_fraction: float | None
    training_run_id: int | None
    metrics: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None
    promoted_by: str | None

    @computed_field
    @property
    def name(self) -> str:
        """What clients see as `system_fingerprint` and may name as `model`."""
        return f"v{self.id}"


class Promotion(BaseModel):
    """One entry of the registry's audit log."""
    id: int
    version_id: int
    action: Literal["register", "promote", "rollback", "canary", "reject", "fail", "retarget", "restore"]
    actor: str
    reason: str | None
    created_at: datetime


class TrainingRun(BaseModel):
    id: int
    kind: str
    status: Literal["queued", "running", "succeeded", "skipped", "failed"]
    trigger: str
    requested_by: str | None
    watermark: int | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    curves: dict[str, Any]
    error: str | None
    produced_version_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class CompletionRecord(BaseModel):
    choice_index: int
    text: str
    """what the model generated, a tool call's markup included"""
    finish_reason: Literal["stop", "length", "cancelled", "tool_calls"]
    completion_tokens: int
    model_version_id: int
    tool_calls: list[dict[str, Any]] | None = None
    """parsed from `text`, as OpenAI's `tool_calls`"""
    logprobs: list[dict[str, Any]] | None = None
    """when asked: OpenAI's `logprobs.content` entries, each with the token's `id` too"""


class ClientRef(BaseModel):
    """What a chat client says of one exchange, in request headers (service/routes/chat.py):
    its own id for the answer, its conversation id, and its task kind. A non-empty task marks the
    client's housekeeping (Open WebUI: title_generation, tags_generation, follow_up_generation...),
    which is not a user's conversation and is never trained on."""
    client_ref: str | None = None
    client_chat_id: str | None = None
    client_task: str | None = None


class ExchangeCreate(ClientRef):
    """One exchange as it is written: what `store.exchanges.record_exchange` takes, and what the
    serving spool keeps on disk while the database is away."""
    response_id: str
    api_key_id: int
    user: str | None
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    model_version_id: int
    stream: bool
    batch_rows: int
    prompt_tokens: int
    queue_ms: float
    first_token_ms: float | None
    total_ms: float
    choices: list[CompletionRecord]


class ExchangeRecord(ClientRef):
    """Everything recorded about one chat request."""
    response_id: str
    api_key_id: int
    user: str | None
    messages: list[dict[str, Any]]
    prompt_hash: str
    params: dict[str, Any]
    model_version_id: int
    stream: bool
    batch_rows: int
    prompt_tokens: int
    completion_tokens: int
    queue_ms: float
    first_token_ms: float | None
    total_ms: float
    created_at: datetime
    choices: list[CompletionRecord]
    feedback: list["FeedbackPublic"] = Field(default_factory=list, description="on its choices, current values")
    rankings: list["RankingPublic"] = Field(default_factory=list)
    preferences: list["PreferencePublic"] = Field(default_factory=list,
                                                  description="with one of its choices on either side")


class ExchangeSummary(BaseModel):
    """One chat request in a listing; the whole record is at GET /v1/admin/exchanges/{response_id}."""
    response_id: str
    api_key_id: int
    user: str | None
    model_version_id: int
    prompt: str = Field(description="the conversation's last user message, cut to 200 characters")
    turns: int = Field(description="messages in the conversation that was answered")
    choices: int
    stream: bool
    completion_tokens: int
    created_at: datetime
    feedback: dict[str, int] = Field(description="current feedback on its choices: thumbs_up, thumbs_down, "
                                                 "rating, comment, correction, ranking, preference")


# --- training data: what the feedback derivation yields and the trainer consumes ------------

PairSource = Literal["pairwise", "ranking", "thumbs", "rating", "import"]


class TrainingPair(BaseModel):
    """One comparison: for `prompt`, `chosen` was preferred over `rejected`."""
    prompt: list[dict[str, str]] = Field(description="the conversation before the answer")
    chosen: str
    rejected: str
    margin: float = Field(0.0, description="Bradley-Terry margin: how much more chosen is preferred")
    source: PairSource
    prompt_hash: str = Field(description="groups one prompt's pairs; the train/held-out split key")
    group: str = Field(description="pairs of one group (one ranking) go in the same batch")
    origin: dict[str, Any] = Field(default_factory=dict, description="source rows it came from")
    judged_at: datetime | None = Field(None, description="when its newest source row was written: its "
                                       "age, for recency weighting (stored pairs carry it)")
    weight: float = Field(1.0, ge=0.0, description="how much it counts in training: the trainer lowers older "
                                                  "feedback's (recency half-life); derivation leaves 1")


class Demonstration(BaseModel):
    """An ideal answer: imported, a user's corrected answer, or bundled."""
    prompt: list[dict[str, str]]
    completion: str
    source: str
    origin: dict[str, Any] = Field(default_factory=dict)


# --- registry and training runs over HTTP -----------------------------------------------------

class ModelAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Text | None = Field(None, max_length=2000)


class ModelImport(ModelAction):
    path: str = Field(min_length=1, max_length=4096,
                      description="a Hugging Face causal-LM directory the server can read; never modified")


class CanaryAction(ModelAction):
    fraction: float = Field(gt=0, lt=1, description="share of `feedloop` requests this version takes")


class ServingTarget(BaseModel):
    endpoint: str
    model_id: str


class ModelVersionPublic(ModelVersion):
    requests: int = Field(0, description="chat requests this version answered")
    target: ServingTarget | None = Field(None, description="where it is served, defaults filled in (by the "
                                         "replica answering); null: in-process, or no endpoint is known")


def check_endpoint(endpoint: str) -> str:
    """A server's base URL: http(s) with a host, as `http://host:port` or ending in `/v1`."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{endpoint!r} is not an http:// or https:// URL")
    return endpoint.rstrip("/")


class TargetUpdate(BaseModel):
    """Where a version is served. A field left out stays as it is; null returns it to the default."""
    model_config = ConfigDict(extra="forbid")
    endpoint: Text | None = Field(None, max_length=2000, description="the server's base URL; null: FEEDLOOP_REMOTE_URL")
    model_id: Text | None = Field(None, min_length=1, max_length=2000, description="the model id it is asked "
                                  "for; null: FEEDLOOP_REMOTE_MODEL, else the checkpoint's path")
    reason: str | None = Field(None, max_length=2000)

    @field_validator("endpoint")
    @classmethod
    def check_endpoint(cls, v: str | None) -> str | None:
        return None if v is None else check_endpoint(v)

    @model_validator(mode="after")
    def check_something_changes(self) -> "TargetUpdate":
        if not {"endpoint", "model_id"} & self.model_fields_set:
            raise ValueError("give `endpoint`, `model_id` or both")
        return self

    def changes(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in ("endpoint", "model_id") if k in self.model_fields_set}


class TrainingRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["round"] = "round"
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the round's config")


# --- feedback: what users send and get back, imports, exports, stats ---------------------------

FeedbackKind = Literal["thumbs", "rating", "comment", "correction"]
RATING_RANGE = (1, 7)  # InstructGPT's Likert scale


class CompletionRef(BaseModel):
    """One completion: a response's id and the index of one of its choices."""
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=200, description="the chat completion's id, chatcmpl-…")
    choice_index: int = Field(0, ge=0, description="which of its choices")


class CompletionTarget(BaseModel):
    """A recorded completion that feedback is about, as the store finds it."""
    id: int
    request_id: int
    exchange_at: datetime  # its exchange's time: the month its rows are kept in (store migration 013)
    choice_index: int
    response_id: str
    prompt_hash: str


class FeedbackCreate(CompletionRef):
    kind: FeedbackKind
    value: int | None = Field(None, validate_default=True, description="thumbs: +1 or -1; rating: 1 to 7")
    text: Text | None = Field(None, validate_default=True, max_length=100_000,
                             description="comment: the remark; correction: the answer it should have given")

    @field_validator("value")
    @classmethod
    def check_value(cls, v: int | None, info: ValidationInfo) -> int | None:
        kind = info.data.get("kind")
        if kind == "thumbs" and v not in (-1, 1):
            raise ValueError("a thumbs value is 1 (up) or -1 (down)")
        if kind == "rating" and (v is None or not RATING_RANGE[0] <= v <= RATING_RANGE[1]):
            raise ValueError(f"a rating is an integer from {RATING_RANGE[0]} to {RATING_RANGE[1]}")
        if kind in ("comment", "correction") and v is not None:
            raise ValueError(f"a {kind} carries `text`, not `value`")
        return v

    @field_validator("text")
    @classmethod
    def check_text(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind in ("comment", "correction") and (v is None or not v.strip()):
            raise ValueError(f"a {kind} needs a non-empty `text`")
        if kind in ("thumbs", "rating") and v is not None:
            raise ValueError(f"a {kind} carries `value`, not `text`; send a comment separately")
        return v


class FeedbackPublic(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    response_id: str
    choice_index: int
    kind: FeedbackKind
    value: int | None
    text: str | None
    author_key_id: int
    created_at: datetime
    updated_at: datetime


RankingOrder = list[int | list[int]]


def ranking_tiers(order: RankingOrder) -> list[list[int]]:
    """[[2, 0], 1] -> [[2, 0], [1]]: groups of tied choices, best first."""
    return [list(t) if isinstance(t, list) else [t] for t in order]


def ranking_pair_count(order: RankingOrder) -> int:
    """Pairs a ranking yields: every two choices in different tiers (K(K-1)/2 without ties)."""
    sizes = [len(t) for t in ranking_tiers(order)]
    return (sum(sizes) ** 2 - sum(s * s for s in sizes)) // 2


class RankingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1, max_length=200, description="a response with n >= 2 choices")
    order: RankingOrder = Field(min_length=1, max_length=128,
                                description="every choice index once, best first; an inner list is a tie")

    @field_validator("order")
    @classmethod
    def check_order(cls, v: RankingOrder) -> RankingOrder:
        flat = [i for tier in ranking_tiers(v) for i in tier]
        if any(isinstance(t, list) and not t for t in v):
            raise ValueError("a tie lists at least one choice index")
        if any(i < 0 for i in flat):
            raise ValueError("choice indices are >= 0")
        if len(set(flat)) != len(flat):
            raise ValueError("each choice appears once: the order must be a permutation of the choices")
        # one canonical form: a tie of one is that choice
        return [t[0] if isinstance(t, list) and len(t) == 1 else t for t in v]

    def tiers(self) -> list[list[int]]:
        return ranking_tiers(self.order)


class RankingPublic(BaseModel):
    id: str
    object: Literal["ranking"] = "ranking"
    response_id: str
    order: RankingOrder
    author_key_id: int
    created_at: datetime
    updated_at: datetime

    @computed_field
    @property
    def pairs(self) -> int:
        """comparisons this ranking yields for training"""
        return ranking_pair_count(self.order)


class PreferenceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    chosen: CompletionRef
    rejected: CompletionRef = Field(description="a different completion of the same prompt")
    strength: float = Field(1.0, ge=0, le=1, description="how clearly chosen is better: 0 barely, 1 clearly; "
                                                         "the pair's Bradley-Terry margin")

    @field_validator("rejected")
    @classmethod
    def check_distinct(cls, v: CompletionRef, info: ValidationInfo) -> CompletionRef:
        if v == info.data.get("chosen"):
            raise ValueError("chosen and rejected are the same completion")
        return v


class PreferencePublic(BaseModel):
    id: str
    object: Literal["preference"] = "preference"
    chosen: CompletionRef
    rejected: CompletionRef
    strength: float | None
    margin: float
    source: Literal["pairwise", "import"]
    author_key_id: int
    created_at: datetime
    updated_at: datetime


class PreferenceImport(BaseModel):
    """One imported pair, normalised: the prompt as a conversation, the answers as text."""
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float = 0.0


class DemonstrationImport(BaseModel):
    """One imported demonstration, normalised."""
    prompt: list[dict[str, str]]
    completion: str


class ImportLineError(BaseModel):
    line: int = Field(description="1-based line number in the file")
    param: str | None = Field(description="the field at fault, when one is")
    message: str


class ImportResult(BaseModel):
    object: Literal["import"] = "import"
    kind: Literal["preferences", "demonstrations"]
    lines: int = Field(description="non-blank lines read")
    imported: int = Field(description="new rows committed")
    duplicates: int = Field(description="valid rows already imported before, skipped")
    errors: list[ImportLineError] = Field(description="invalid lines (only with partial=true: the rest was committed)")


class KtoExample(BaseModel):
    """One unpaired judgement (KTO): a completion users' thumbs found desirable or not."""
    prompt: list[dict[str, str]]
    completion: str
    label: bool
    prompt_hash: str
    origin: dict[str, Any] = Field(default_factory=dict)


ExportFormat = Literal["preference", "kto", "sft"]


class VersionStats(BaseModel):
    model_version: str = Field(description="the version's name, as in system_fingerprint")
    model_version_id: int
    status: str
    requests: int
    completions: int
    feedback: dict[str, int] = Field(description="counts by kind: thumbs, rating, comment, correction, "
                                                 "ranking, preference")
    thumbs_up: int
    thumbs_down: int
    thumbs_up_rate: float | None = Field(description="up / (up + down); null without thumbs")
    mean_rating: float | None
    pairs_since_last_round: int = Field(description="new training pairs with a completion of this version "
                                                    "on either side")
    arena_wins: int = Field(0, description="pairwise preferences where this version's answer was chosen over "
                                           "another version's answer to the same prompt (arena votes)")
    arena_losses: int = Field(0, description="the same, where another version's answer was chosen")
    arena_win_rate: float | None = Field(None, description="wins / (wins + losses); null without such votes")
    arena_win_rate_interval: tuple[float, float] | None = Field(
        None, description="95 % Wilson score interval of the win rate; null without such votes")


class StatsPublic(BaseModel):
    object: Literal["stats"] = "stats"
    watermark: int = Field(description="the highest feedback event so far")
    last_round_watermark: int = Field(description="where the last training round stopped reading (0: none yet)")
    pairs_since_last_round: int
    demonstrations_since_last_round: int
    data: list[VersionStats]


ExchangeRecord.model_rebuild()
