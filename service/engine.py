"""Generation engines behind one small interface, and what a submitted request looks like.

An engine takes a tokenized prompt and sampling parameters and returns a `Generation`: an async
iterator of `Piece`s (text deltas per choice, then each choice's finish). Model work never runs on
the event loop: engines hand results back through `loop.call_soon_threadsafe` or their own I/O.
"""
import asyncio
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from schemas.openai import SamplingParams
from schemas.records import ModelVersion


@dataclass
class Piece:
    index: int
    """choice index"""
    text: str = ""
    """new text for that choice"""
    finish_reason: str | None = None
    """stop | length | cancelled on the choice's last piece"""
    tokens: int = 0
    """completion tokens so far for that choice"""


class EngineError(RuntimeError):
    """Generation failed inside the engine; the request gets a 5xx."""


class Generation:
    """One submitted request: the engine pushes pieces, the route consumes them."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self.error: Exception | None = None
        """what the engine failed with; every later read raises it again"""
        self.open_choices = sampling.n
        self.batch_rows = 0
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None

    # engine side (any thread) ----------------------------------------------------------------
    def push(self, pieces: list[Piece] | Exception) -> None:
        self.loop.call_soon_threadsafe(self._pieces.put_nowait, pieces)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # route side ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the engine stops this request's rows at its next step."""
        self._cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Piece]:
        # Progress lives on the object, so a consumer that stopped early can resume draining.
        while self.open_choices:
            if self.error is not None:  # a consumer that resumes draining (the Recorder) must not wait forever
                raise EngineError(str(self.error)) from self.error
            pieces = await self._pieces.get()
            if isinstance(pieces, Exception):
                self.error = pieces
                continue
            for p in pieces:
                if self.first_token is None and p.text:
                    self.first_token = time.perf_counter()
                self.open_choices -= p.finish_reason is not None
                yield p

    def timings(self) -> dict[str, float | None]:
        ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000, 2)
        return {"queue_ms": ms(self.submitted, self.started) or 0.0,
                "first_token_ms": ms(self.submitted, self.first_token),
                "total_ms": ms(self.submitted, time.perf_counter())}


class Engine(Protocol):
    version: ModelVersion
    context_length: int

    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        """The chat-formatted prompt as token ids, ready for generation."""

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        """Queue a request (the prompt both tokenized and as messages); call from the event loop."""

    def warm(self) -> None:
        """Run one tiny generation so the first real request pays no start-up cost (blocking)."""

    def close(self) -> None:
        """Finish queued work and free the model (blocking)."""
