"""Rows as the code sees them, and our own API resources (`…Create` in, `…Public` out)."""
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field

Role = Literal["user", "operator"]
T = TypeVar("T")


class ListPublic(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    count: int


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    role: Role = "user"
    rate_limit: int | None = Field(None, ge=1, description="requests per minute")


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
    endpoint: str | None
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
    action: Literal["register", "promote", "rollback", "canary", "reject", "fail"]
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
    finish_reason: Literal["stop", "length", "cancelled"]
    completion_tokens: int
    model_version_id: int


class ExchangeRecord(BaseModel):
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


class Demonstration(BaseModel):
    """An ideal answer: imported, a user's corrected answer, or bundled."""
    prompt: list[dict[str, str]]
    completion: str
    source: str
    origin: dict[str, Any] = Field(default_factory=dict)


# --- registry and training runs over HTTP -----------------------------------------------------

class ModelAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=2000)


class CanaryAction(ModelAction):
    fraction: float = Field(gt=0, lt=1, description="share of `feedloop` requests this version takes")


class ModelVersionPublic(ModelVersion):
    requests: int = Field(0, description="chat requests this version answered")


class TrainingRunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["round"] = "round"
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of the round's config")
