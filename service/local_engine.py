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
from transformers import AutoModelForCausalLM, AutoTokenizer

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


def sample(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Next token per row: greedy at temperature 0, else nucleus sampling from logits / T."""
    temps = torch.tensor([r.temperature for r in rows], device=logits.device)
    top_ps = torch.tensor([r.top_p for r in rows], device=logits.device)
    greedy = logits.argmax(-1)
    if all(r.temperature == 0 for r in rows):
        return greedy.tolist()
    probs = torch.softmax(logits / temps.clamp(min=1e-5)[:, None], dim=-1)  # (B, V)
    if all(r.top_p >= 1.0 for r in rows):  # no nucleus to cut: skip the sort
        sorted_p, order = probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs)
    else:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_ps[:, None]  # beyond the top_p nucleus
        sorted_p = sorted_p.masked_fill(outside, 0.0)
    out = []
    for i, r in enumerate(rows):
        if r.temperature == 0:
            out.append(int(greedy[i]))
        else:  # one draw per row from its own generator: a seed replays the same text
            out.append(int(order[i, torch.multinomial(sorted_p[i], 1, generator=r.rng)]))
    return out


class LocalEngine:
    def __init__(self, version: ModelVersion, *, device: str = "cpu", max_batch_rows: int = 32):
        self.version, self.device, self.max_batch_rows = version, device, max_batch_rows
        path = Path(version.path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        cfg = self.model.config
        self.context_length = getattr(cfg, "n_positions", None) or cfg.max_position_embeddings
        self.eos_id, self.pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self._inbox: queue.Queue[Generation | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"engine-{version.name}", daemon=True)
        self._worker.start()

    # --- interface ------------------------------------------------------------------------------
    def encode(self, conversation: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]

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
        width = max(len(r.gen.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token is at position -1
            n = len(r.gen.prompt_ids)
            ids[i, width - n:] = torch.tensor(r.gen.prompt_ids)
            mask[i, width - n:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        while True:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=past, use_cache=True, logits_to_keep=1)
            past = out.cache
            next_ids = sample(out.logits[:, -1, :].float(), rows)  # (B,)
            self._advance(rows, next_ids)
            if all(r.finish for r in rows):
                return
            ids = torch.tensor(next_ids, device=self.device)[:, None]  # (B, 1)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1

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
