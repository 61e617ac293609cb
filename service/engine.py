"""Generation engines behind one small interface, and what a submitted request looks like.

An engine takes a tokenized prompt and sampling parameters and returns a `Generation`: admitted
(or turned away with `EngineOverloaded`), then an async iterator of `Piece`s (text deltas per
choice, then each choice's finish). Model work never runs on the event loop: engines hand results
back through `loop.call_soon_threadsafe` or their own I/O.
"""
import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from lm.grammar import Constraints
from lm.tools import ToolFormat
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
    logprobs: list[dict] | None = None
    """with logprobs asked for: an entry per token drawn since the choice's last piece"""


class EngineError(RuntimeError):
    """Generation failed inside the engine; the request gets a 5xx."""


class EngineClosed(EngineError):
    """The engine is closing (a swap replaced it after the request chose it): nothing was
    submitted; the request goes to the engine that serves now."""


class EngineOverloaded(EngineError):
    """The engine cannot take the request now: its queue is full, or the request waited past its
    deadline without a place in the batch. Nothing was generated; the client may retry."""

    def __init__(self, message: str, *, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Generation:
    """One submitted request: the engine admits it (or turns it away), then pushes pieces; the
    route consumes them."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams):
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.loop = asyncio.get_running_loop()
        # Pieces (or an exception) in arrival order. The engine's thread appends, the route takes
        # one at a time, so a consumer that stops early loses nothing and another may drain the
        # rest. One wake-up of the event loop stands for all pieces pushed until it is consumed.
        self._pieces: deque[Piece | Exception] = deque()
        self._ready = asyncio.Event()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._admitted: asyncio.Future = self.loop.create_future()
        self._admitted.add_done_callback(_retrieved)  # a refusal nobody awaits is not an error
        self._admit_pending = False  # admitted, the route not yet told (`admit(wake=False)`)
        self._cancelled = threading.Event()
        self.error: Exception | None = None
        """what the engine failed with; every later read raises it again"""
        self.open_choices = sampling.n
        self.batch_rows = 0
        """the most rows it shared a decoding step with (its own included)"""
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None

    # engine side (any thread) ----------------------------------------------------------------
    def admit(self, *, wake: bool = True) -> None:
        """It has a place in the batch: it will be generated, and answered 200. With
        `wake=False` the route learns it at the next wake-up (`push`, `wake_all`): an engine
        that admits and pushes the first pieces in one step wakes the loop once."""
        self.started = time.perf_counter()
        if wake:
            self._call(_settle, self._admitted, None)
        else:
            self._admit_pending = True

    def reject(self, error: EngineOverloaded) -> None:
        """It will not be generated: the route answers with `error` and records nothing."""
        self.fail(error)

    def fail(self, error: EngineError) -> None:
        """The engine can do nothing more for it: a route still waiting for a place in the batch
        gets `error` there, one reading pieces gets it next."""
        self._call(_settle, self._admitted, error)
        self.push(error)

    def push(self, pieces: list[Piece] | Exception, *, wake: bool = True) -> bool:
        """Hand pieces (or an exception) to the route. Returns whether its event loop still has
        to be woken for them; with `wake=False` that is left to the caller (`wake_all`)."""
        if isinstance(pieces, Exception):
            self._pieces.append(pieces)
        else:
            self._pieces.extend(pieces)
        with self._wake_lock:
            if self._wake_pending:
                return False
            self._wake_pending = True
        if wake:
            self._call(self._woken)
        return True

    def _woken(self) -> None:
        """On the event loop: what was admitted and pushed since the last wake-up is there."""
        if self._admit_pending:
            self._admit_pending = False
            _settle(self._admitted, None)
        self._ready.set()

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # route side ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """The client went away: the engine stops this request's rows at its next step (or
        drops it from the queue)."""
        self._cancelled.set()

    async def admitted(self) -> None:
        """Wait for a place in the batch; raises `EngineOverloaded` when there will be none."""
        await asyncio.shield(self._admitted)

    async def __aiter__(self) -> AsyncIterator[Piece]:
        # Progress lives on the object, so a consumer that stopped early can resume draining.
        while self.open_choices:
            if self.error is not None:  # a consumer that resumes draining (the Recorder) must not wait forever
                raise self.error
            if not self._pieces:
                self._ready.clear()
                with self._wake_lock:
                    self._wake_pending = False
                if not self._pieces:  # checked again: a push in between has scheduled a wake-up
                    await self._ready.wait()
                continue
            p = self._pieces.popleft()
            if isinstance(p, Exception):  # kept: this read and every later one raise it
                if not isinstance(p, EngineError):
                    wrapped = EngineError(str(p))
                    wrapped.__cause__, p = p, wrapped
                self.error = p
                continue
            p = self._catch_up(p)
            if self.first_token is None and p.text:
                self.first_token = time.perf_counter()
            self.open_choices -= p.finish_reason is not None
            yield p

    def _catch_up(self, p: Piece) -> Piece:
        """The same choice's pieces already waiting behind `p`, joined to it: a consumer that
        fell behind the engine sends one chunk for them, not one per token (each chunk costs
        the server and the client more than the token did)."""
        while p.finish_reason is None and self._pieces:
            nxt = self._pieces[0]
            if not isinstance(nxt, Piece) or nxt.index != p.index:
                return p
            self._pieces.popleft()
            logprobs = None if p.logprobs is None and nxt.logprobs is None else (p.logprobs or []) + (nxt.logprobs or [])
            p = Piece(p.index, p.text + nxt.text, nxt.finish_reason, nxt.tokens, logprobs)
        return p

    def timings(self) -> dict[str, float | None]:
        ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000, 2)
        return {"queue_ms": ms(self.submitted, self.started) or 0.0,
                "first_token_ms": ms(self.submitted, self.first_token),
                "total_ms": ms(self.submitted, time.perf_counter())}


def wake_all(gens: list[Generation]) -> None:
    """Wake the routes of these generations with one call per event loop, not one each: an
    engine step that pushed to every request in its batch costs their loop one wake-up."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Generation]] = {}
    for gen in gens:
        by_loop.setdefault(gen.loop, []).append(gen)
    for loop, woken in by_loop.items():
        woken[0]._call(_set_ready, woken)


def _set_ready(gens: list[Generation]) -> None:
    for gen in gens:
        gen._woken()


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future, error: Exception | None) -> None:
    if not future.done():
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class Engine(Protocol):
    version: ModelVersion
    context_length: int
    tool_format: "ToolFormat | None"
    """how the model writes a tool call (lm/tools.py); None: it cannot be asked to"""
    constraints: "Constraints | None"
    """grammar-constrained decoding and log-probabilities (lm/grammar.py); None: not offered"""
    lost: str | None
    """why this engine can serve nothing more (its process died); None while it can. Serving
    replaces a lost engine as it would swap one (service/serving.py)"""
    on_lost: "Callable[[], None] | None"
    """called (from any thread) once the engine is lost, so serving replaces it at once"""

    def encode(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The chat-formatted prompt (with the tools the model is offered) as token ids."""

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        """Queue a request (the prompt both tokenized and as messages); call from the event loop.
        Raises `EngineOverloaded` when the queue is full, `EngineClosed` once `close` began."""

    def warm(self) -> None:
        """Run one tiny generation so the first real request pays no start-up cost (blocking)."""

    def close(self) -> None:
        """Finish queued work and free the model (blocking)."""
