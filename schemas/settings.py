"""One configuration for every process: environment variables `FEEDLOOP_*` plus `DATABASE_URL`."""
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEEDLOOP_", extra="ignore")

    # storage
    database_url: str | None = Field(
        None, validation_alias=AliasChoices("DATABASE_URL", "FEEDLOOP_DATABASE_URL"),
        description="Postgres URL; unset means an embedded pgserver in `home`.")
    home: Path = Field(Path(".feedloop"), description="data directory: embedded database, checkpoints")

    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = Field(1, ge=1, description="API worker processes (uvicorn --workers); each runs its own "
                         "engine, so more than one suits a remote engine or replicas that only take feedback")
    init_api_key: str | None = Field(None, description="operator key created at start-up when missing")
    policy_path: Path | None = Field(None, description="checkpoint registered as version 1 instead of the bootstrap")
    engine: Literal["local", "remote"] = "local"
    remote_url: str | None = Field(None, description="TGI/OpenAI-protocol server for versions that name no endpoint")
    remote_model: str | None = Field(
        None, description="model id asked for when a version names none; unset: the checkpoint's path")
    remote_api_key: str | None = Field(None, description="bearer token for the remote servers")
    target_timeout_seconds: float = Field(
        120.0, description="most seconds a target may take to answer the warm-up (it may load the model first)")
    deploy_command: str | None = Field(
        None, description="shell command run before a remote version starts serving; $1..$4 and "
                          "FEEDLOOP_VERSION, _CHECKPOINT, _ENDPOINT, _MODEL_ID name it")
    deploy_timeout_seconds: float = Field(600.0, description="a deploy command running longer is killed: refused")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, mps")
    torch_threads: int = Field(0, description="torch intra-op threads; 0 leaves torch's default")
    engine_process: bool = Field(True, description="run the embedded engine in a process of its own, so "
                                 "generation and the HTTP side never wait for one interpreter lock; "
                                 "false: a thread of the API process")
    max_batch_rows: int = Field(32, description="most sequences (choices) one generation batch holds")
    max_queue: int = Field(256, ge=1, description="requests that may wait for a place in the batch; "
                                                  "one more is refused with 503 engine_overloaded")
    queue_timeout_seconds: float = Field(30.0, gt=0, description="a request that waited this long for "
                                                                 "a place in the batch is refused with 503")
    default_max_tokens: int = 128
    max_body_bytes: int = 1 << 20
    model_name: str = Field("feedloop", description="the `model` name clients ask for")
    cors_origins: str | None = Field(None, description="comma-separated origins browsers may call the API "
                                                       "from (`*` for any); unset: no CORS")
    poll_seconds: float = Field(5.0, description="registry poll interval, the fallback to LISTEN/NOTIFY")
    open_metrics: bool = Field(True, description="GET /metrics without a key; false: an operator key")
    open_docs: bool = Field(True, description="/docs, /redoc, /openapi.json without a key; false: any key")
    idempotency_key_hours: float = Field(24.0, gt=0, description="how long an Idempotency-Key is remembered")
    spool_max_exchanges: int = Field(10_000, ge=0, description="answered exchanges kept on disk while the "
                                                               "database is away; past it such answers are 503s")

    # bootstrap
    bootstrap_seed: int = 0

    # trainer service
    train_interval_seconds: float = Field(3600.0, description="how often a round is tried")
    train_cron: str | None = Field(None, description="crontab schedule instead of the interval, e.g. '0 3 * * *'")
    queue_poll_seconds: float = Field(2.0, description="how often the trainer looks for queued runs")
    min_new_feedback: int = Field(64, description="a scheduled round trains once this many feedback events "
                                                  "(any kind) arrived since the last round")
    max_round_interval_seconds: float = Field(86400.0, description="or once the oldest of fewer new events "
                                                                   "waited this long")
    min_new_pairs: int = Field(1, description="a round trains only with at least this many new pairs")
    promotion: Literal["auto", "manual"] = Field("manual", description="auto: a candidate that passes the gates is promoted")
    round_config: dict = Field(default_factory=dict, description="JSON overrides of the round config, e.g. {\"ppo\": {\"steps\": 8}}")
    retention_days: float | None = Field(None, gt=0, description="exchanges (with their choices, feedback and "
                                         "rankings) older than this are dropped a month at a time by the "
                                         "trainer; unset: kept for ever")
    partition_job_seconds: float = Field(86400.0, gt=0, description="how often the trainer makes the coming "
                                         "months' partitions and applies the retention")

    # Open WebUI feedback import (trainer/openwebui.py): a scheduled job of the trainer service when
    # the URL, the key and an interval are all set; off by default
    openwebui_url: str | None = Field(None, description="Open WebUI's base URL, e.g. http://127.0.0.1:8080")
    openwebui_api_key: str | None = Field(None, description="an Open WebUI admin's API key or token")
    openwebui_import_seconds: float = Field(0.0, ge=0, description="how often its feedback is imported; 0: never")

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def checkpoint_dir(self) -> Path:
        return self.home.resolve() / "checkpoints"

    @property
    def spool_dir(self) -> Path:
        return self.home.resolve() / "spool"


@lru_cache
def get_settings() -> Settings:
    return Settings()
