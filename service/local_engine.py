"""The embedded engine: a transformers causal LM in this process, and one worker thread that
schedules at the level of iterations (continuous batching, as Orca and vLLM do).

Every iteration the worker
1. turns away what waited past its deadline (503, nothing generated) and drops what its client
   left before it ran;
2. admits waiting requests, first come first served, while the batch has room for all their
   choices: their prompts are prefilled together (a prompt once, however many choices ask for
   it), each choice samples its first token from that prefill, and the prompt's cache is copied
   to the choice's row and merged into the running batch;
3. decodes one token for every row in one forward pass;
4. lets every row that finished (EOS, a stop string, its token budget, its client gone) leave at
   once, freeing its place for the next iteration.
Each row keeps its own sampling parameters, seeded generator, stop strings and token budget. The
queue is bounded (`max_queue` requests waiting): one more is refused at submission."""
import logging
import queue
import random
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from lm.chat import context_length, encode_prompt
from lm.checkpoint import load_policy, load_tokenizer
from lm.turns import end_of_turn_ids
from lm.decoding import Batch, left_pad, prefill
from lm.detokenize import AnswerText, Detokenizer
from lm.grammar import Constraints
from lm.sampling import sample_rows
from lm.tools import tool_format
from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import EngineClosed, EngineOverloaded, Generation, Piece, wake_all
from service.metrics import EngineMetrics

log = logging.getLogger(__name__)

ADMIT_SHARE = 0.25
"""a busy batch admits once the waiting rows are this share of its own ..."""
ADMIT_DEFER = 3
"""... or after this many decoding steps"""


def queue_full(size: int) -> EngineOverloaded:
    return EngineOverloaded(f"The engine is overloaded: its queue of {size} is full. Please retry shortly.")


class Row:
    """One choice being generated: its tokens, its sampler state, what was streamed so far."""

    def __init__(self, gen: Generation, index: int, device: str, constraints: Constraints, answer: AnswerText):
        self.gen, self.index = gen, index
        p = gen.sampling
        # A grammar's matcher (each choice its own: they diverge), advanced by every token drawn.
        self.matcher = constraints.matcher(p.grammar) if p.grammar else None
        self.logprobs: list[dict] = []  # entries not yet pushed (with logprobs asked for)
        self.temperature, self.top_p, self.stops, self.max_tokens = p.temperature, p.top_p, p.stop, p.max_tokens
        # A seed replays: the choice draws alone from its own generator (`sample_rows`). Without
        # one it draws from the engine's shared generator, with every other such row at once.
        self.rng = None if p.seed is None else torch.Generator(device=device).manual_seed((p.seed + index) % (2**63))
        self.answer = answer  # its tokens and their text
        self.last = -1  # the token sampled last: the row's input at the next step
        self.sent = 0  # characters of the answer already pushed to the client
        self.finish: str | None = None


class LocalEngine:
    lost, on_lost = None, None  # its worker is a thread of this process: it lives as long as we do

    def __init__(self, version: ModelVersion, *, device: str = "cpu", max_batch_rows: int = 32,
                 max_queue: int = 256, queue_timeout: float = 30.0, metrics: EngineMetrics | None = None,
                 after_step: Callable[[], None] | None = None):
        """`after_step` runs on the worker after every iteration (an engine process sends what
        the iteration pushed)."""
        self.version, self.device, self.max_batch_rows = version, device, max_batch_rows
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        path = Path(version.path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_policy(path, device)
        self.context_length = context_length(self.model.config)
        self.constraints = Constraints(self.tokenizer, self.model.config.vocab_size)
        self.tool_format = tool_format(self.tokenizer)
        self.end_ids, self.pad_id = set(end_of_turn_ids(self.tokenizer)), self.tokenizer.pad_token_id
        self.detokenizer = Detokenizer(self.tokenizer)
        self._inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self._queued, self._queued_lock = 0, threading.Lock()  # submitted, not yet admitted
        self._closed = False  # close() began: nothing more is taken
        # The worker's own state: what waits, and the running batch (one Row per batch row).
        self._waiting: deque[Generation] = deque()
        self._rows: list[Row] = []
        self._batch: Batch | None = None
        self._closing = False
        self._deferred = 0  # decoding steps since requests waited and a prefill did not pay
        self._rng = torch.Generator(device=device).manual_seed(random.getrandbits(63))  # rows without a seed
        self._rate = (time.perf_counter(), 0)  # (since, tokens): generated tokens per second
        self.metrics = metrics or EngineMetrics(version.name)
        self._after_step = after_step or (lambda: None)
        self._worker = threading.Thread(target=self._run, name=f"engine-{version.name}", daemon=True)
        self._worker.start()

    # --- interface ------------------------------------------------------------------------------
    def encode(self, conversation: list[dict], tools: list[dict] | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, conversation, tools)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        gen = Generation(prompt_ids, sampling)
        self.enqueue(gen)
        return gen

    def enqueue(self, gen: Generation) -> None:
        """Queue a request made elsewhere (anything with a Generation's engine side); raises
        `EngineOverloaded` when the queue is full."""
        with self._queued_lock:  # held while queuing: nothing is queued behind close()'s marker
            if self._closed:
                raise EngineClosed(f"{self.version.name} is closing")
            if self._queued >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise queue_full(self.max_queue)
            self._queued += 1
            self.metrics.queued(self._queued)
            self._inbox.put(gen)

    def warm(self) -> None:
        """Two prompts of different lengths through prefill, merge, steps and a row leaving: the
        worker's every path, on the caller's thread (the worker is idle until requests come)."""
        ids = self.encode([{"role": "user", "content": "Hello"}])
        with torch.inference_mode():
            _, batch = prefill(self.model, *(t.to(self.device) for t in left_pad([ids], self.pad_id)))
            _, other = prefill(self.model, *(t.to(self.device) for t in left_pad([ids[1:]], self.pad_id)))
            if batch.repackable:
                batch.extend(other)
            for _ in range(3):
                batch.step(self.model, torch.full((batch.rows,), ids[-1], device=self.device))
            batch.take([0])

    def close(self) -> None:
        """Finish everything submitted (queued requests too), then free the model."""
        with self._queued_lock:
            self._closed = True
            self._inbox.put(None)
        self._worker.join()
        del self.model
        self.metrics.remove()
        self._after_step()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # --- worker ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            self._collect(block=not (self._rows or self._waiting or self._closing))
            if self._closing and not self._rows and not self._waiting:
                return
            self._turn_away()
            admitted = self._admit()
            try:
                if admitted:
                    self._prefill(admitted)
                if self._rows:
                    self._decode()
            except Exception as e:  # one failed step must not kill the worker
                failed = {r.gen for r in self._rows} | set(admitted)
                log.exception("generation failed: %d requests in flight fail with it", len(failed))
                for gen in failed:
                    gen.push(e)
                self._rows, self._batch = [], None
            self._report()
            self._after_step()

    def _collect(self, block: bool) -> None:
        """Move what was submitted into the waiting line; wait for something when idle."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is None:
                self._closing = True  # finish what is waiting and running, then stop
            else:
                self._waiting.append(item)

    def _turn_away(self) -> None:
        """Requests whose client left while they waited end as cancelled without running; those
        that waited past the deadline are refused (the route answers 503 and records nothing)."""
        if not self._waiting:
            return
        now, kept = time.perf_counter(), deque()
        for gen in self._waiting:
            if gen.cancelled:
                gen.admit()
                gen.push([Piece(i, "", "cancelled", 0) for i in range(gen.sampling.n)])
            elif now - gen.submitted > self.queue_timeout:
                self.metrics.rejected("deadline")
                gen.reject(EngineOverloaded(f"The engine is overloaded: no place in the batch within "
                                            f"{self.queue_timeout:g}s. Please retry shortly."))
            else:
                kept.append(gen)
        self._dequeued(len(self._waiting) - len(kept))
        self._waiting = kept

    def _admit(self) -> list[Generation]:
        """Waiting requests, in order, while all their choices fit in the batch. (A request with
        more choices than the batch holds runs alone. A cache that cannot take rows of another
        width, see `Batch.repackable`, admits only into an empty batch.)"""
        if self._batch is not None and not self._batch.repackable:
            return []
        if not self._prefill_pays():
            self._deferred += 1
            return []
        self._deferred = 0
        free, admitted = self.max_batch_rows - len(self._rows), []
        while self._waiting and (self._waiting[0].sampling.n <= free or not (self._rows or admitted)):
            gen = self._waiting.popleft()
            free -= gen.sampling.n
            admitted.append(gen)
        self._dequeued(len(admitted))
        return admitted

    def _prefill_pays(self) -> bool:
        """Whether to prefill what waits now or after another decoding step. A prefill is a
        forward of its own, which for a small model costs about what a decoding step of the
        whole batch does (the time goes on per-layer overhead, not arithmetic): admitting one
        request at every step, as rows finish one by one, would spend every other forward on a
        prefill of one prompt. So while the batch is busy, requests wait until their rows are
        a fair share of it (`ADMIT_SHARE`), at most `ADMIT_DEFER` steps."""
        if not (self._waiting and self._rows) or self._deferred >= ADMIT_DEFER:
            return True
        free = self.max_batch_rows - len(self._rows)
        waiting = min(free, sum(g.sampling.n for g in self._waiting))
        return waiting >= ADMIT_SHARE * len(self._rows) or waiting == free

    def _dequeued(self, count: int) -> None:
        if count:
            with self._queued_lock:
                self._queued -= count
                self.metrics.queued(self._queued)

    def _prefill(self, admitted: list[Generation]) -> None:
        """Each distinct prompt once; every choice samples its first token from its prompt's
        logits and gets a copy of its prompt's cache; the open rows join the running batch."""
        prompts: dict[tuple[int, ...], int] = {}
        for gen in admitted:
            prompts.setdefault(tuple(gen.prompt_ids), len(prompts))
        ids, mask = (t.to(self.device) for t in left_pad([list(p) for p in prompts], self.pad_id))
        for gen in admitted:
            gen.admit(wake=False)  # the route hears it with the first pieces: one wake-up
        logits, batch = prefill(self.model, ids, mask)  # (U, V)
        rows = [Row(gen, i, self.device, self.constraints, self.detokenizer.answer())
                for gen in admitted for i in range(gen.sampling.n)]
        source = [prompts[tuple(r.gen.prompt_ids)] for r in rows]  # each row's prompt in `batch`
        self._sample(rows, logits[source], admitted)
        now = time.perf_counter()
        for gen in admitted:
            self.metrics.first_token(now - gen.submitted)
            gen.batch_rows = len(self._rows) + len(rows)
        open_ = [k for k, r in enumerate(rows) if not r.finish]
        if not open_:
            return
        index = [source[k] for k in open_]
        if index != list(range(batch.rows)):  # copies for n choices, drops for rows already done
            batch.take(index)
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.extend(batch)
        self._rows += [rows[k] for k in open_]

    def _decode(self) -> None:
        """One token for every row, then the finished rows leave."""
        rows = self._rows
        self.metrics.step(len(rows))
        for r in rows:
            r.gen.batch_rows = max(r.gen.batch_rows, len(rows))
        logits = self._batch.step(self.model, torch.tensor([r.last for r in rows], device=self.device))
        self._sample(rows, logits)
        open_ = [k for k, r in enumerate(rows) if not r.finish]
        if len(open_) == len(rows):
            return
        self._rows = [rows[k] for k in open_]
        if open_:
            self._batch.take(open_)
        else:
            self._batch = None

    def _sample(self, rows: list[Row], logits: torch.Tensor, admitted: list[Generation] = ()) -> None:
        matchers = [r.matcher for r in rows]
        allowed = self.constraints.allowed(matchers)
        wanted = [r.gen.sampling.logprobs for r in rows]
        next_ids, logp = sample_rows(logits, [r.temperature for r in rows], [r.top_p for r in rows],
                                     [r.rng for r in rows], allowed=None if allowed is None else
                                     allowed.to(logits.device), logprobs=any(k is not None for k in wanted),
                                     shared=self._rng)
        for k, (r, tok) in enumerate(zip(rows, next_ids)):
            if r.matcher is not None and tok not in self.end_ids:
                r.matcher.consume_token(tok)
            if wanted[k] is not None and tok not in self.end_ids:  # the answer's tokens, as OpenAI lists them
                r.logprobs.append(self._logprob_entry(logp[k], tok, wanted[k]))
        self._advance(rows, next_ids, admitted)

    def _logprob_entry(self, logp: torch.Tensor, token: int, top: int) -> dict:
        """OpenAI's entry for one drawn token (and its `id`): -inf, a token the distribution
        excluded, is written -9999.0 as vLLM does (JSON has no infinity)."""
        def item(t: int, value: float) -> dict:
            return {"token": self.tokenizer.decode([t]), "logprob": max(value, -9999.0),
                    "bytes": list(self.constraints.token_bytes(t))}
        values, ids = logp.topk(top) if top else (logp[:0], logp[:0].long())
        return {"id": token, **item(token, float(logp[token])),
                "top_logprobs": [item(int(t), float(v)) for v, t in zip(values.tolist(), ids.tolist())]}

    def _advance(self, rows: list[Row], next_ids: list[int], admitted: list[Generation]) -> None:
        """Append each open row's token, decide whether it finished, push new text per request;
        one wake-up for the pieces and the requests `admitted` this step."""
        pushed: dict[Generation, list[Piece]] = {}
        generated = 0
        for r, tok in zip(rows, next_ids):
            r.last = tok
            text = None
            if r.gen.cancelled:
                r.finish = "cancelled"
            elif tok in self.end_ids:
                r.finish = "stop"
            else:
                text = r.answer.add(tok)
                generated += 1
                if len(r.answer.tokens) >= r.max_tokens:
                    r.finish = "length"
            text, stopped = self._visible_text(r, text)
            if stopped:
                r.finish = "stop"
            piece = Piece(r.index, text[r.sent:], r.finish, len(r.answer.tokens))
            r.sent = len(text)
            if piece.text or piece.finish_reason:
                piece.logprobs, r.logprobs = r.logprobs, []  # the tokens drawn since the last piece
                pushed.setdefault(r.gen, []).append(piece)
        self.metrics.generated(generated)
        self._rate = (self._rate[0], self._rate[1] + generated)
        woken = [gen for gen, pieces in pushed.items() if gen.push(pieces, wake=False)]
        woken += [gen for gen in admitted if gen not in pushed and gen.push([], wake=False)]
        wake_all(woken)

    @staticmethod
    def _visible_text(r: Row, text: str | None) -> tuple[str, bool]:
        """The answer so far as it may be shown: cut at a stop string (then stopped), and while
        open, hold back an incomplete UTF-8 character (`text`, what `AnswerText.add` returned
        for this step's token, holds it back already) and any tail that could start a stop."""
        if r.finish or text is None:
            text = r.answer.final()
        # Byte-level BPE can sample a NUL byte, which Postgres text cannot hold: shown and
        # recorded alike as U+FFFD.
        text = text.replace("\x00", "\ufffd")
        for s in r.stops:
            at = text.find(s, max(0, r.sent - len(s)))
            if at != -1:
                return text[:at], True
        if r.finish:
            return text, False
        text = text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in r.stops), default=0)
        return text[:max(r.sent, len(text) - hold)], False

    def _report(self) -> None:
        """Occupancy after this iteration; generated tokens per second about once a second (and
        zero as the worker goes idle)."""
        since, tokens = self._rate
        now, rate = time.perf_counter(), None
        if now - since >= 1.0 or not (self._rows or self._waiting):
            rate = tokens / max(now - since, 1e-3) if self._rows else 0.0
            self._rate = (now, 0)
        self.metrics.batch(len(self._rows) / self.max_batch_rows, rate)
