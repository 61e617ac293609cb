"""The embedded engine in a process of its own, so that generation and the HTTP side never wait
for one interpreter lock.

In one process the engine's forward passes and everything a request costs the event loop
(parsing, keys, recording, server-sent events) take turns on the GIL: at 16 streaming clients
the process sat at one core, the engine starved at ~10 rows of its 32. Here the API process keeps
the tokenizer (prompts are encoded and grammars checked where the request is validated) and a
`Generation` per request; the engine process runs `LocalEngine`'s scheduler unchanged, with a
`Ticket` standing for each request.

The wire is one duplex pipe of pickled tuples:
  API -> engine   ("submit", id, prompt_ids, sampling, submitted), ("cancel", id), ("close",)
  engine -> API   ("ready",) or ("failed", message) once, at start-up; then after every scheduler
                  iteration one list of what it did: ("admit", id), ("pieces", id, batch_rows,
                  [Piece]), ("reject", id, message, retry_after), ("error", id, message),
                  ("metric", name, args)
so a decoding step costs one write, whatever the batch. Each side reads the pipe on the thread
that does its work (the API on its event loop, the engine between decoding steps), so neither
process has a second thread contending for its interpreter lock.
Engine processes fork from one server process that imported torch once (multiprocessing's
forkserver), so a hot swap pays loading the model, not importing torch again.
"""
import asyncio
import itertools
import logging
import multiprocessing
import threading
import weakref
from pathlib import Path

from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import EngineClosed, EngineError, EngineOverloaded, Generation, Piece, wake_all
from service.metrics import EngineMetrics

log = logging.getLogger(__name__)


# --- API side -------------------------------------------------------------------------------

class RelayedGeneration(Generation):
    """A request whose engine is in another process: a cancel is sent there."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, engine: "ProcessEngine", rid: int):
        super().__init__(prompt_ids, sampling)
        self._engine, self.id = engine, rid

    def cancel(self) -> None:
        if not self.cancelled:
            super().cancel()
            self._engine._send(("cancel", self.id))


class ProcessEngine:
    """The Engine interface (service/engine.py) over an engine process."""

    def __init__(self, version: ModelVersion, *, device: str = "cpu", max_batch_rows: int = 32,
                 max_queue: int = 256, queue_timeout: float = 30.0, torch_threads: int = 0):
        from transformers import AutoConfig

        from lm.chat import context_length
        from lm.checkpoint import load_tokenizer
        from lm.grammar import Constraints
        from lm.tools import tool_format

        self.version, self.max_queue = version, max_queue
        self.tokenizer = load_tokenizer(Path(version.path))
        config = AutoConfig.from_pretrained(version.path)
        self.context_length = context_length(config)
        self.constraints = Constraints(self.tokenizer, config.vocab_size)  # grammars checked here
        self.tool_format = tool_format(self.tokenizer)
        self.metrics = EngineMetrics(version.name)
        self._gens: dict[int, RelayedGeneration] = {}
        self._open: dict[int, int] = {}  # choices not yet finished, per request
        self._queued, self._lock = 0, threading.Lock()  # submitted, not yet admitted or refused
        self._closed_to_new = False  # close() began
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._gone: str | None = None  # why the engine process is no longer there
        self.on_lost = None
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, "service.local_engine"])
        self._conn, theirs = ctx.Pipe()
        options = dict(device=device, max_batch_rows=max_batch_rows, max_queue=max_queue,
                       queue_timeout=queue_timeout, torch_threads=torch_threads)
        self._process = ctx.Process(target=run_engine, args=(theirs, version, options),
                                    name=f"engine-{version.name}", daemon=True)
        self._process.start()
        theirs.close()
        try:
            first = self._conn.recv()  # blocks while the model loads and warms
        except EOFError:
            first = ("failed", f"the engine process exited with code {self._process.exitcode} while loading")
        if first[0] != "ready":
            self._process.join(10)
            raise EngineError(f"{version.name} failed to load in its engine process: {first[1]}")
        self._loop = None  # the event loop that reads the pipe (the first to submit)
        self._closed = threading.Event()  # the engine process said it closed, or is gone

    @property
    def lost(self) -> str | None:
        return self._gone

    def encode(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        from lm.chat import encode_prompt
        return encode_prompt(self.tokenizer, conversation, tools)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        from service.local_engine import queue_full
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._listen(loop)
        with self._lock:  # held while sending: nothing is sent behind close()'s message
            if self._closed_to_new:
                raise EngineClosed(f"{self.version.name} is closing")
            if self._gone is None and not self._process.is_alive():
                self._lost()
            if self._gone is not None:
                raise EngineError(self._gone)
            if self._queued >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise queue_full(self.max_queue)
            self._queued += 1
            gen = RelayedGeneration(prompt_ids, sampling, self, next(self._ids))
            self._gens[gen.id], self._open[gen.id] = gen, sampling.n
            self._send(("submit", gen.id, prompt_ids, sampling, gen.submitted))
        return gen

    def warm(self) -> None:
        """Nothing left to do: the engine process warmed its model before it said it was ready."""

    def close(self) -> None:
        """Finish everything submitted, then stop the engine process (blocking: call it from a
        thread while the event loop reading the pipe runs, or once no loop does)."""
        with self._lock:
            self._closed_to_new = True
            self._send(("close",))
        if self._loop is None or not self._loop.is_running():
            self._read_until_closed()
        self._closed.wait()
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
        self.metrics.remove()

    def _send(self, message: tuple) -> None:
        with self._send_lock:  # a cancel may come from another thread than a submit
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the process is gone: reading the pipe says so
                pass

    # reading the pipe: on the event loop, so no second thread takes the interpreter lock -------
    def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the pipe on `loop` from now on. (A server has one loop; tests run one per test,
        and a loop that has ended is let go.)"""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        loop.add_reader(self._conn.fileno(), self._readable)
        self._loop = loop

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                events = self._conn.recv()
                if events == ("closed",):
                    self._loop.remove_reader(self._conn.fileno())
                    self._closed.set()
                    return
                self._dispatch(events)
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._lost()

    def _read_until_closed(self) -> None:
        try:
            while (events := self._conn.recv()) != ("closed",):
                self._dispatch(events)
            self._closed.set()
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The engine process is gone: what was in flight fails, and so does every later request
        to this engine; serving is told, and replaces it (`on_lost`)."""
        if self._gone is not None:
            return
        self._process.join(1)  # it is dead or dying: its exit code says how
        self._gone = f"the engine process of {self.version.name} exited (code {self._process.exitcode})"
        log.error("%s; %d requests in flight fail", self._gone, len(self._gens))
        for rid in list(self._gens):
            self._end(rid).fail(EngineError(self._gone))  # admitted or still waiting to be
        self._closed.set()
        if not self._closed_to_new:
            self.metrics.lost()
            if self.on_lost is not None:
                self.on_lost()

    def _dispatch(self, events: list[tuple]) -> None:
        woken = []
        for event in events:
            kind = event[0]
            if kind == "metric":
                getattr(self.metrics, event[1])(*event[2])
                continue
            rid = event[1]
            gen = self._gens.get(rid)
            if gen is None:
                continue
            if kind == "admit":
                self._dequeued()
                gen.admit(wake=False)
                pieces = []
            elif kind == "pieces":
                gen.batch_rows, pieces = event[2], event[3]
                self._open[rid] -= sum(p.finish_reason is not None for p in pieces)
                if not self._open[rid]:
                    self._end(rid)
            elif kind == "reject":
                self._dequeued()
                self._end(rid).reject(EngineOverloaded(event[2], retry_after=event[3]))
                continue
            else:  # "error"
                self._end(rid).fail(EngineError(event[2]))
                continue
            if gen.push(pieces, wake=False):
                woken.append(gen)
        wake_all(woken)

    def _end(self, rid: int) -> RelayedGeneration:
        self._open.pop(rid, None)
        return self._gens.pop(rid)

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1


# --- engine side ----------------------------------------------------------------------------

class Outbox:
    """What one scheduler iteration did, sent to the API process as one message. Only the
    engine's worker uses it (and, once that has ended, `close`)."""

    def __init__(self, conn):
        self.conn, self.events = conn, []

    def put(self, event: tuple) -> None:
        self.events.append(event)

    def flush(self) -> None:
        events, self.events = self.events, []
        if events:
            try:
                self.conn.send(events)
            except OSError:  # the API process is gone; the worker's next read of the pipe says so
                pass


class RelayedMetrics:
    """`EngineMetrics`' calls, sent on for the API process to make on its own series."""

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    def __getattr__(self, name: str):
        if not callable(getattr(EngineMetrics, name, None)):
            raise AttributeError(name)
        return lambda *args: self._outbox.put(("metric", name, args))


class Ticket:
    """A request as the engine process sees it: what `LocalEngine` reads of a `Generation`,
    and what it tells one, put in the outbox."""

    def __init__(self, rid: int, prompt_ids: list[int], sampling: SamplingParams, submitted: float, outbox: Outbox):
        self.id, self.prompt_ids, self.sampling, self.submitted = rid, prompt_ids, sampling, submitted
        self.outbox, self.batch_rows, self.cancelled = outbox, 0, False

    def admit(self, *, wake: bool = True) -> None:
        self.outbox.put(("admit", self.id))

    def reject(self, error: EngineOverloaded) -> None:
        self.outbox.put(("reject", self.id, str(error), error.retry_after))

    def push(self, pieces: list[Piece] | Exception, *, wake: bool = True) -> bool:
        if isinstance(pieces, Exception):
            self.outbox.put(("error", self.id, f"{type(pieces).__name__}: {pieces}"))
        elif pieces:
            self.outbox.put(("pieces", self.id, self.batch_rows, pieces))
        return False  # the outbox is flushed once per iteration: nobody to wake one by one


def run_engine(conn, version: ModelVersion, options: dict) -> None:
    """The engine process: load and warm, say so, then serve until told to close (or until the
    API process is gone: then what runs is cancelled)."""
    import torch

    if threads := options.pop("torch_threads"):
        torch.set_num_threads(threads)
    try:
        engine = piped_engine(conn, version, options)
        engine.warm()
    except Exception as e:  # noqa: BLE001 - the API process reports it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    engine.serve()


def piped_engine(conn, version: ModelVersion, options: dict):
    """`LocalEngine` whose worker reads its submissions from the pipe itself, between decoding
    steps: the only thread of the process that runs Python, so it never waits for the
    interpreter lock (a second thread reading the pipe would take it at every message)."""
    from service.local_engine import LocalEngine

    class PipedEngine(LocalEngine):
        def __init__(self):
            self.outbox = Outbox(conn)
            self.tickets: weakref.WeakValueDictionary[int, Ticket] = weakref.WeakValueDictionary()
            super().__init__(version, metrics=RelayedMetrics(self.outbox), after_step=self.outbox.flush, **options)

        def serve(self) -> None:
            self._worker.join()  # it ends once told to close, with everything submitted done
            self.close()
            try:
                conn.send(("closed",))
            except OSError:
                pass

        def _collect(self, block: bool) -> None:
            """What the pipe holds now (waiting for something when idle), then the usual inbox."""
            try:
                if block:
                    conn.poll(None)
                while conn.poll():
                    self._take(conn.recv())
            except (EOFError, OSError):  # the API process is gone: stop what runs, then stop
                for ticket in list(self.tickets.values()):
                    ticket.cancelled = True
                self._inbox.put(None)
            super()._collect(block=False)

        def _take(self, message: tuple) -> None:
            if message[0] == "submit":
                ticket = self.tickets[message[1]] = Ticket(*message[1:], self.outbox)
                try:
                    self.enqueue(ticket)
                except EngineOverloaded as e:  # the API bounds the queue first; this is a backstop
                    ticket.reject(e)
            elif message[0] == "cancel":
                if (ticket := self.tickets.get(message[1])) is not None:
                    ticket.cancelled = True
            elif message[0] == "close":
                self._inbox.put(None)  # finish what is waiting and running, then stop

    return PipedEngine()
