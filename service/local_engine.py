"""The embedded engine: a transformers causal LM in this process, fed by one worker thread that
batches whatever requests are waiting (each choice of each request is one row) and steps them
together with a KV cache. Each row keeps its own sampling parameters, seed, stop strings and
token budget; rows finish independently and the batch ends when the last one does."""
import logging
import queue
import random
import threading
import time
from collections import deque
from pathlib import Path

import torch

from lm.chat import context_length, encode_prompt
from lm.checkpoint import load_policy, load_tokenizer
from lm.decoding import generate, left_pad
from lm.sampling import sample_rows
from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import Generation, Piece
from service.metrics import BATCH_ROWS, GENERATED_TOKENS

log = logging.getLogger(__name__)


class Row:
    """One choice being generated: its tokens, its sampler state, what was streamed so far."""

    def __init__(self, gen: Generation, index: int, device: str):
        self.gen, self.index = gen, index
        p = gen.sampling
        self.temperature, self.top_p, self.stops, self.max_tokens = p.temperature, p.top_p, p.stop, p.max_tokens
        seed = p.seed + index if p.seed is not None else random.getrandbits(63)
        self.rng = torch.Generator(device=device).manual_seed(seed % (2**63))
        self.tokens: list[int] = []
        self.sent = 0  # characters of the answer already pushed to the client
        self.finish: str | None = None


class LocalEngine:
    def __init__(self, version: ModelVersion, *, device: str = "cpu", max_batch_rows: int = 32):
        self.version, self.device, self.max_batch_rows = version, device, max_batch_rows
        path = Path(version.path)
        self.tokenizer = load_tokenizer(path)
        self.model = load_policy(path, device)
        self.context_length = context_length(self.model.config)
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self._inbox: queue.Queue[Generation | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"engine-{version.name}", daemon=True)
        self._worker.start()

    # --- interface ------------------------------------------------------------------------------
    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return encode_prompt(self.tokenizer, conversation)

    def submit(self, prompt_ids: list[int], sampling: SamplingParams, conversation: list[dict]) -> Generation:
        gen = Generation(prompt_ids, sampling)
        self._inbox.put(gen)
        return gen

    def warm(self) -> None:
        ids = self.encode([{"role": "user", "content": "Hello"}])
        rows = [Row(_Offline(ids), 0, self.device)]
        self._step_batch(rows)

    def close(self) -> None:
        self._inbox.put(None)
        self._worker.join()
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # --- worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        waiting: deque[Generation] = deque()
        while True:
            if not waiting:
                item = self._inbox.get()
                if item is None:
                    return
                waiting.append(item)
            while True:  # take everything that has arrived, then batch as much as fits
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._inbox.put(None)  # finish what is waiting first, then stop
                    break
                waiting.append(item)
            batch, rows = [], 0
            while waiting and (not batch or rows + waiting[0].sampling.n <= self.max_batch_rows):
                gen = waiting.popleft()
                batch.append(gen)
                rows += gen.sampling.n
            self._serve(batch)

    def _serve(self, batch: list[Generation]) -> None:
        rows = [Row(g, i, self.device) for g in batch for i in range(g.sampling.n)]
        started = time.perf_counter()
        for g in batch:
            g.started, g.batch_rows = started, len(rows)
        BATCH_ROWS.observe(len(rows))
        try:
            self._step_batch(rows)
        except Exception as e:  # one bad batch must not kill the worker
            log.exception("generation failed for a batch of %d rows", len(rows))
            for g in batch:
                g.push(e)

    @torch.inference_mode()
    def _step_batch(self, rows: list[Row]) -> None:
        ids, mask = (t.to(self.device) for t in left_pad([r.gen.prompt_ids for r in rows], self.pad_id))
        temperatures, top_ps, rngs = [r.temperature for r in rows], [r.top_p for r in rows], [r.rng for r in rows]

        def step(logits: torch.Tensor) -> torch.Tensor | None:  # (B, V) -> (B,)
            next_ids = sample_rows(logits, temperatures, top_ps, rngs)
            self._advance(rows, next_ids)
            if all(r.finish for r in rows):
                return None
            return torch.tensor(next_ids, device=self.device)  # finished rows keep stepping, ignored

        generate(self.model, ids, mask, step)

    def _advance(self, rows: list[Row], next_ids: list[int]) -> None:
        """Append each open row's token, decide whether it finished, push new text per request."""
        pushed: dict[Generation, list[Piece]] = {}
        generated = 0
        for r, tok in zip(rows, next_ids):
            if r.finish:
                continue
            if r.gen.cancelled:
                r.finish = "cancelled"
            elif tok == self.eos_id:
                r.finish = "stop"
            else:
                r.tokens.append(tok)
                generated += 1
                if len(r.tokens) >= r.max_tokens:
                    r.finish = "length"
            text, stopped = self._visible_text(r)
            if stopped:
                r.finish = "stop"
            piece = Piece(r.index, text[r.sent:], r.finish, len(r.tokens))
            r.sent = len(text)
            if piece.text or piece.finish_reason:
                pushed.setdefault(r.gen, []).append(piece)
        GENERATED_TOKENS.inc(generated)
        for gen, pieces in pushed.items():
            gen.push(pieces)

    def _visible_text(self, r: Row) -> tuple[str, bool]:
        """The answer so far as it may be shown: cut at a stop string (then stopped), and while
        open, hold back an incomplete UTF-8 character and any tail that could start a stop."""
        # Byte-level BPE can sample a NUL byte, which Postgres text cannot hold: shown and
        # recorded alike as U+FFFD.
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True).replace("\x00", "\ufffd")
        for s in r.stops:
            at = text.find(s, max(0, r.sent - len(s)))
            if at != -1:
                return text[:at], True
        if r.finish:
            return text, False
        text = text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in r.stops), default=0)
        return text[:max(r.sent, len(text) - hold)], False


class _Offline:
    """A Generation stand-in for warm-up, which runs on the caller's thread without a client."""

    def __init__(self, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.sampling = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=4, stop=[], seed=0)
        self.cancelled = False

    def push(self, pieces) -> None:
        pass
