"""Completion tokens/s and time to first token for this API, against references measured in the
same run on the same checkpoint:

  api        a real `python -m service serve` process (fresh scratch database), loaded with the
             official `openai` AsyncOpenAI client, streamed requests
  api@REF    the same, running the code of an older commit (`--baseline REF`): today's engine
             against yesterday's, for the ratios that need one
  generate   raw batched `model.generate` in this process (transformers, left padding, static
             batches: a batch runs until its longest row ends)
  ts-cb      `transformers serve --continuous-batching` on the same checkpoint directory

Every system gets the same prompts (schemas/data/prompts.jsonl, chat template applied), the same
`max_tokens`, temperature 1.0 / top_p 1.0 / no top-k, and the same torch thread count. There is no
`ignore_eos`, so answers end where the model says; throughput counts the completion tokens each
system reports (`usage.completion_tokens`; for `generate`, the tokens before EOS). Time to first
token (TTFT) is from sending a request (its arrival, open loop) to its first content chunk; for
`generate`, to the first token of the batch it ran in.

Two kinds of load:
  closed loop  N clients each send their next request as soon as the last one returns, until
               `--seconds` have passed (the clock stops when the last in-flight one returns);
               `generate`'s "clients" are its batch size
  open loop    requests arrive at random (Poisson) at each of `--rates` per second for `--seconds`,
               whatever the system has finished; the same arrival times for every system.
               `generate` serves them as a static-batching server would: whatever has arrived,
               up to `--max-batch` rows, as one batch whenever the last batch ends

    python bench/serve.py [--policy DIR] [--seconds 8] [--max-tokens 48] [--baseline REF]

Loopback only; scratch databases are dropped and every server stopped at the end.
"""
import argparse
import asyncio
import gc
import itertools
import json
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from common import (ROOT, Process, ScratchDatabase, checkout, ensure_policy, feedloop_serve, free_port,
                    load_prompts, loopback_env, server_bench_parser)


def parse_args() -> argparse.Namespace:
    p = server_bench_parser(__doc__, policy="checkpoint directory; built by `python -m trainer bootstrap` when missing")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per cell")
    p.add_argument("--max-tokens", type=int, default=48, help="max completion tokens per request")
    p.add_argument("--clients", default="1,16", help="closed-loop concurrency levels (generate: batch sizes)")
    p.add_argument("--rates", default="10,40,120", help="open-loop arrival rates, requests per second")
    p.add_argument("--max-batch", type=int, default=32, help="open-loop generate: most rows per batch "
                                                              "(the API's FEEDLOOP_MAX_BATCH_ROWS default)")
    p.add_argument("--baseline", metavar="REF", help="also run the API of this git commit (api@REF)")
    p.add_argument("--systems", default="api,baseline,generate,ts-cb", help="which systems to run")
    # One thread: a model this small gains nothing from intra-op parallelism, and on a busy
    # machine OpenMP workers waiting on each other make every step many times slower.
    p.add_argument("--threads", type=int, default=1, help="torch threads for every system measured")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.systems = args.systems.split(",")
    return args


@dataclass
class Cell:
    """One measurement: a system under one load (closed: clients; open: arrivals per second)."""
    system: str
    load: str
    """"closed" or "open" """
    level: float
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stops: int = 0
    """answers that ended on EOS (or a stop string) rather than on max_tokens"""
    refused: int = 0
    """503/429 answers (open loop: the system's back-pressure)"""
    ttfts: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.requests else None

    def ttft(self, q: float) -> float | None:
        """TTFT quantile in milliseconds (nearest rank)."""
        if not self.ttfts:
            return None
        ranked = sorted(self.ttfts)
        return 1000 * ranked[min(len(ranked) - 1, max(0, round(q * len(ranked) + 0.5) - 1))]


def arrivals(rate: float, seconds: float) -> list[float]:
    """Poisson arrival times in [0, seconds), the same for every system (seeded by the rate)."""
    rng, t, out = random.Random(int(rate * 1000)), 0.0, []
    while (t := t + rng.expovariate(rate)) < seconds:
        out.append(t)
    return out


# --- load over HTTP -------------------------------------------------------------------------

@dataclass
class Answer:
    ttft: float | None
    tokens: int
    stopped: bool


async def streamed(client, model: str, prompt: str, max_tokens: int, extra_body: dict | None) -> Answer:
    """One streamed request: time to its first content chunk, completion tokens, finish."""
    sent, first, tokens, chunks, stopped = time.perf_counter(), None, None, 0, False
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=1.0, top_p=1.0, stream=True, stream_options={"include_usage": True},
        extra_body=extra_body)
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.delta.content:
                chunks += 1
                first = first or time.perf_counter()
            stopped = stopped or c.finish_reason == "stop"
    return Answer(None if first is None else first - sent, chunks if tokens is None else tokens, stopped)


async def closed_loop(client, model: str, prompts: list[str], cell: Cell, seconds: float,
                      max_tokens: int, extra_body: dict | None) -> None:
    """`cell.level` workers, each sending its next request when the last returns, until `seconds`."""
    order = itertools.count()
    start = time.perf_counter()

    async def worker():
        while time.perf_counter() - start < seconds:
            a = await streamed(client, model, prompts[next(order) % len(prompts)], max_tokens, extra_body)
            cell.requests, cell.tokens, cell.stops = cell.requests + 1, cell.tokens + a.tokens, cell.stops + a.stopped
            if a.ttft is not None:
                cell.ttfts.append(a.ttft)

    await settle(*(worker() for _ in range(int(cell.level))))
    cell.seconds = time.perf_counter() - start


async def open_loop(client, model: str, prompts: list[str], cell: Cell, seconds: float,
                    max_tokens: int, extra_body: dict | None) -> None:
    """Requests sent at `arrivals(cell.level)`; TTFT counted from each one's arrival."""
    import openai

    async def one(i: int) -> None:
        try:
            a = await streamed(client, model, prompts[i % len(prompts)], max_tokens, extra_body)
        except openai.APIStatusError as e:
            if e.status_code not in (429, 503):
                raise
            cell.refused += 1
            return
        cell.requests, cell.tokens, cell.stops = cell.requests + 1, cell.tokens + a.tokens, cell.stops + a.stopped
        if a.ttft is not None:
            cell.ttfts.append(a.ttft)

    start, tasks = time.perf_counter(), []
    for i, at in enumerate(arrivals(cell.level, seconds)):
        if (delay := start + at - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await settle(*tasks)
    cell.seconds = time.perf_counter() - start


async def settle(*aws) -> None:
    """Await all of them, then raise the first failure: a failed request must not leave the
    others running into the next cell."""
    failed = [r for r in await asyncio.gather(*aws, return_exceptions=True) if isinstance(r, BaseException)]
    if failed:
        raise failed[0]


def measure_http(system: str, base_url: str, key: str, model: str, prompts: list[str], args,
                 extra_body: dict | None = None, metrics_url: str | None = None,
                 counts_eos: bool = False) -> list[Cell]:
    import httpx2  # the openai client's HTTP library
    import openai

    async def run() -> list[Cell]:
        gc.freeze()  # this process's heap (torch too, once generate ran) is no collector's work while it measures
        # Idle connections are dropped after 2 s, before uvicorn closes them (its keep-alive is
        # 5 s, httpx's too): at equal timeouts a request sent on a connection the server is
        # closing fails with "Server disconnected without sending a response" (max_retries=0).
        http = openai.DefaultAsyncHttpxClient(trust_env=False, limits=httpx2.Limits(
            max_connections=1000, max_keepalive_connections=100, keepalive_expiry=2.0))
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300,
                                    http_client=http)
        cells = []
        try:
            # warm-up: the first request (and first batch) pays one-off costs on every server
            for n in (1, max(args.clients, default=16)):
                await asyncio.gather(*(streamed(client, model, p, 4, extra_body) for p in prompts[:n]))
            loads = [("closed", n) for n in args.clients] + [("open", r) for r in args.rates]
            for load, level in loads:
                before = await batch_rows(http, metrics_url)
                cell = Cell(system, load, level)
                loop = closed_loop if load == "closed" else open_loop
                try:
                    await loop(client, model, prompts, cell, args.seconds, args.max_tokens, extra_body)
                except Exception as e:  # noqa: BLE001 - this cell's reason; the other cells stand
                    cells.append(Cell(system, load, level, note=f"did not finish: {type(e).__name__}: {e}"[:200]))
                    print(f"  {system:<12} {load:<6} {level:>5g}: {cells[-1].note}", flush=True)
                    continue
                after = await batch_rows(http, metrics_url)
                if before and after and after[1] > before[1]:
                    cell.note = f"mean batch {(after[0] - before[0]) / (after[1] - before[1]):.1f} rows"
                if counts_eos:
                    cell.note = f"usage counts EOS: {fmt((cell.tokens - cell.stops) / cell.seconds)} tok/s without it"
                cells.append(cell)
                print(f"  {system:<12} {load:<6} {level:>5g}: {fmt(cell.tok_s)} tok/s, TTFT p50 "
                      f"{fmt(cell.ttft(0.5))} p99 {fmt(cell.ttft(0.99))} ms, {cell.refused} refused", flush=True)
        finally:
            await client.close()
        return cells

    return asyncio.run(run())


async def batch_rows(http, metrics_url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the API's batch-size histogram, to show how well requests were batched
    (per decoding step since continuous batching, per batch before)."""
    if not metrics_url:
        return None
    text = (await http.get(metrics_url)).text
    found = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^feedloop_batch_rows_(sum|count) (\S+)$", text, re.M)}
    return (found["sum"], found["count"]) if len(found) == 2 else None


# --- (a) this API, and an older commit's ----------------------------------------------------

def bench_api(system: str, source: Path, policy: Path, prompts: list[str], args, work: Path) -> list[Cell]:
    key = f"fl-bench-{uuid.uuid4().hex}"
    with ScratchDatabase(args.admin_url, work) as db:
        print(f"{system}: scratch database {db.name} on {db.where}", flush=True)
        with feedloop_serve(db.url, work, policy=policy, key=key, source=source,
                            FEEDLOOP_TORCH_THREADS=args.threads) as server:
            return measure_http(system, server.url + "/v1", key, "feedloop", prompts, args,
                                metrics_url=server.url + "/metrics")


# --- (b) raw batched model.generate ---------------------------------------------------------

def bench_generate(policy: Path, prompts: list[str], args) -> list[Cell]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(policy)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for p in prompts]
    eos, pad = tok.eos_token_id, tok.pad_token_id

    class FirstToken(BaseStreamer):
        """generate calls `put` with the prompts, then with every step's tokens."""

        def __init__(self):
            self.puts, self.at = 0, None

        def put(self, value):
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self):
            pass

    @torch.inference_mode()
    def one_batch(rows: list[list[int]], max_tokens: int) -> tuple[int, int, float]:
        """(completion tokens, answers that ended on EOS, when the first token was out)."""
        batch = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        first = FirstToken()
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad, streamer=first)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, T_new)
        # completion tokens as the servers count them: those before each row's first EOS
        ended = (new == eos).int().cumsum(-1) > 0
        return int((~ended).sum()), int(ended[:, -1].sum()), first.at

    order = itertools.count()
    one_batch([encoded[0]], 4)  # warm-up
    one_batch([encoded[i % len(encoded)] for i in range(max(args.clients, default=16))], 4)
    cells = []
    for n in args.clients:
        cell, start = Cell("generate", "closed", n, note=f"batch {n}"), time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            sent = time.perf_counter()
            tokens, stops, first = one_batch([encoded[next(order) % len(encoded)] for _ in range(n)], args.max_tokens)
            cell.tokens, cell.stops, cell.requests = cell.tokens + tokens, cell.stops + stops, cell.requests + n
            cell.ttfts += [first - sent] * n
        cell.seconds = time.perf_counter() - start
        cells.append(cell)
        print(f"  {'generate':<12} closed {n:>5}: {fmt(cell.tok_s)} tok/s, TTFT p50 {fmt(cell.ttft(0.5))} "
              f"p99 {fmt(cell.ttft(0.99))} ms", flush=True)
    for rate in args.rates:
        cell, times = Cell("generate", "open", rate, note=f"batches of up to {args.max_batch}"), arrivals(rate, args.seconds)
        start, i = time.perf_counter(), 0
        while i < len(times):
            now = time.perf_counter() - start
            if times[i] > now:
                time.sleep(times[i] - now)
                continue
            j = i
            while j < len(times) and times[j] <= now and j - i < args.max_batch:
                j += 1
            tokens, stops, first = one_batch([encoded[k % len(encoded)] for k in range(i, j)], args.max_tokens)
            cell.tokens, cell.stops, cell.requests = cell.tokens + tokens, cell.stops + stops, cell.requests + j - i
            cell.ttfts += [first - (start + times[k]) for k in range(i, j)]
            i = j
        cell.seconds = time.perf_counter() - start
        cells.append(cell)
        print(f"  {'generate':<12} open   {rate:>5g}: {fmt(cell.tok_s)} tok/s, TTFT p50 {fmt(cell.ttft(0.5))} "
              f"p99 {fmt(cell.ttft(0.99))} ms", flush=True)
    del model
    return cells


# --- (c) transformers serve --continuous-batching -------------------------------------------

def bench_transformers_serve(policy: Path, prompts: list[str], args, work: Path) -> list[Cell]:
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise RuntimeError("no `transformers` CLI next to this python (pip install 'transformers[serving]')")
    missing = [m for m in ("fastapi", "uvicorn", "openai", "rich") if not _importable(m)]
    if missing:
        raise RuntimeError(f"transformers serve needs {', '.join(missing)}: pip install 'transformers[serving]'")
    from transformers import GenerationConfig

    # CB takes its sampling settings from the first request's generation config (one config for
    # the whole manager); without one the checkpoint's config means greedy. Send ours every time.
    gen = GenerationConfig.from_pretrained(policy).to_diff_dict()
    gen.update(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens)
    gen = {k: v for k, v in gen.items() if not k.startswith("_") and k != "transformers_version"}
    port = free_port()
    server = Process("transformers serve",
                     [exe, "serve", str(policy), "--continuous-batching", "--device", "cpu",
                      "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                     loopback_env(OMP_NUM_THREADS=args.threads), port, work / "transformers-serve.log",
                     "/health")
    try:
        server.wait_ready(120)
        # Its usage counts the EOS token of an answer that stopped (this API and `generate` here
        # count the tokens before it), so the ratios are also given without it.
        return measure_http("ts-cb", server.url + "/v1", "unused", str(policy), prompts, args,
                            extra_body={"generation_config": json.dumps(gen)}, counts_eos=True)
    finally:
        server.stop()


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# --- report ---------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def run_system(name: str, args, fn) -> list[Cell]:
    """A reference that cannot run here gets its reason in its rows instead of failing the bench."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        reason = f"did not run: {type(e).__name__}: {e}".replace("\n", " ")[:200]
        print(f"  {name}: {reason}", flush=True)
        return [Cell(name, "closed", n, note=reason) for n in args.clients] + \
               [Cell(name, "open", r, note=reason) for r in args.rates]


def report(cells: list[Cell], args, policy: Path, baseline: str | None) -> None:
    print(f"\ncheckpoint {policy}, max_tokens {args.max_tokens}, temperature 1.0, {args.seconds:g}s per "
          f"cell, {args.threads} torch threads; TTFT in ms\n")
    header = f"{'system':<12} {'load':<6} {'level':>5} {'requests':>8} {'refused':>7} {'tokens':>7} " \
             f"{'seconds':>7} {'tok/s':>8} {'TTFT p50':>8} {'p99':>8}  note"
    print(header)
    print("-" * len(header))
    for c in cells:
        print(f"{c.system:<12} {c.load:<6} {c.level:>5g} {c.requests:>8} {c.refused:>7} {c.tokens:>7} "
              f"{fmt(c.seconds):>7} {fmt(c.tok_s):>8} {fmt(c.ttft(0.5)):>8} {fmt(c.ttft(0.99)):>8}  {c.note}")
    by = {(c.system, c.load, c.level): c for c in cells}

    def ratio(ref: str, load: str, level: float, what: str) -> float | None:
        api, other = by.get(("api", load, level)), by.get((ref, load, level))
        if not (api and other and api.tok_s and other.tok_s):
            return None
        if what == "tok/s":
            return api.tok_s / other.tok_s
        if what == "tok/s, EOS not counted":
            return api.tok_s / ((other.tokens - other.stops) / other.seconds)
        a, o = api.ttft(0.99), other.ttft(0.99)
        return a / o if a and o else None

    refs = ["generate", "ts-cb"] + ([f"api@{baseline}"] if baseline else [])
    print("\nratios, this API / reference (tok/s: >1 means the API is faster; TTFT p99: <1 means it answers sooner):")
    for load, levels in (("closed", args.clients), ("open", args.rates)):
        for ref in refs:
            whats = ["tok/s"] + (["tok/s, EOS not counted"] if ref == "ts-cb" else []) + ["TTFT p99"]
            for what in whats:
                row = "  ".join(f"{fmt(ratio(ref, load, lv, what), '.2f'):>5} at {lv:g}" for lv in levels)
                print(f"  {load:<6} api / {ref:<12} {what:<22} {row}")
    goals = [("closed 16 clients: tok/s >= 1.5 x ts-cb", ratio("ts-cb", "closed", 16, "tok/s"), 1.5, ">="),
             ("closed 16 clients: tok/s >= 1.0 x generate", ratio("generate", "closed", 16, "tok/s"), 1.0, ">="),
             ("closed 1 client: tok/s >= 1.0 x generate", ratio("generate", "closed", 1, "tok/s"), 1.0, ">=")]
    if baseline:
        goals.append((f"closed 16 clients: TTFT p99 <= 0.5 x api@{baseline}",
                      ratio(f"api@{baseline}", "closed", 16, "TTFT p99"), 0.5, "<="))
    print("\ngoals:")
    for name, value, bound, op in goals:
        met = value is not None and (value >= bound if op == ">=" else value <= bound)
        print(f"  {name:<52} {fmt(value, '.2f'):>5}  {'met' if met else 'NOT met'}")


def main() -> None:
    args = parse_args()
    policy = ensure_policy(args.policy)
    prompts = load_prompts()
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-"))
    print(f"bench: {len(prompts)} prompts, logs in {work}", flush=True)
    cells = []
    if "api" in args.systems:
        cells += run_system("api", args, lambda: bench_api("api", ROOT, policy, prompts, args, work))
    if args.baseline and "baseline" in args.systems:
        name = f"api@{args.baseline}"
        cells += run_system(name, args, lambda: bench_api(
            name, checkout(args.baseline, work / "baseline"), policy, prompts, args, work))
    if "generate" in args.systems:
        cells += run_system("generate", args, lambda: bench_generate(policy, prompts, args))
    if "ts-cb" in args.systems:
        cells += run_system("ts-cb", args, lambda: bench_transformers_serve(policy, prompts, args, work))
    report(cells, args, policy, args.baseline)


if __name__ == "__main__":
    main()
