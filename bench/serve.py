"""Completion tokens/s at 1 and 16 concurrent clients for this API, against two references
measured in the same run on the same checkpoint:

  api        a real `python -m service serve` process (fresh scratch database), loaded with the
             official `openai` AsyncOpenAI client, non-streamed requests
  generate   raw batched `model.generate` in this process (transformers, left padding); the
             "clients" column is its batch size
  ts-cb      `transformers serve --continuous-batching` on the same checkpoint directory

Every system gets the same prompts (schemas/data/prompts.jsonl, chat template applied), the same
`max_tokens`, temperature 1.0 / top_p 1.0 / no top-k, and the same torch thread count. There is no
`ignore_eos`, so answers end where the model says; throughput counts the completion tokens each
system reports (`usage.completion_tokens`; for `generate`, the tokens before EOS). Each cell is a
closed loop: N clients each send their next request as soon as the last one returns, until
`--seconds` have passed; the clock stops when the last in-flight request returns.

    python bench/serve.py [--policy DIR] [--seconds 8] [--max-tokens 48]

Loopback only; the scratch database is dropped and every server stopped at the end.
"""
import argparse
import asyncio
import itertools
import json
import re
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from common import (Process, ScratchDatabase, ensure_policy, feedloop_serve, free_port, load_prompts, loopback_env,
                    server_bench_parser)


def parse_args() -> argparse.Namespace:
    p = server_bench_parser(__doc__, policy="checkpoint directory; built by `python -m trainer bootstrap` when missing")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per cell")
    p.add_argument("--max-tokens", type=int, default=48, help="max completion tokens per request")
    p.add_argument("--clients", default="1,16", help="concurrency levels (generate: batch sizes)")
    # One thread: a model this small gains nothing from intra-op parallelism, and on a busy
    # machine OpenMP workers waiting on each other make every step many times slower.
    p.add_argument("--threads", type=int, default=1, help="torch threads for every system measured")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


@dataclass
class Cell:
    """One measurement: a system at one concurrency."""
    system: str
    clients: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    stops: int = 0
    """answers that ended on EOS (or a stop string) rather than on max_tokens"""
    note: str = ""

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and self.requests else None


# --- load over HTTP -------------------------------------------------------------------------

async def closed_loop(client, model: str, prompts: list[str], clients: int, seconds: float,
                      max_tokens: int, extra_body: dict | None) -> tuple[int, int, int, float]:
    """`clients` workers, each sending its next request when the last returns, until `seconds`;
    returns (requests, completion tokens, answers ended by `stop`, seconds until the last returned)."""
    order = itertools.count()
    done = {"requests": 0, "tokens": 0, "stops": 0}
    start = time.perf_counter()

    async def worker():
        while time.perf_counter() - start < seconds:
            prompt = prompts[next(order) % len(prompts)]
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=1.0, top_p=1.0, extra_body=extra_body)
            done["requests"] += 1
            done["tokens"] += r.usage.completion_tokens
            done["stops"] += r.choices[0].finish_reason == "stop"

    await asyncio.gather(*(worker() for _ in range(clients)))
    return done["requests"], done["tokens"], done["stops"], time.perf_counter() - start


def measure_http(system: str, base_url: str, key: str, model: str, prompts: list[str], args,
                 extra_body: dict | None = None, metrics_url: str | None = None,
                 counts_eos: bool = False) -> list[Cell]:
    import openai

    async def run() -> list[Cell]:
        http = openai.DefaultAsyncHttpxClient(trust_env=False)
        client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300,
                                    http_client=http)
        cells = []
        try:
            # warm-up: the first request (and first batch) pays one-off costs on every server
            for n in (1, max(args.clients)):
                await asyncio.gather(*(client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": p}], max_tokens=4,
                    temperature=1.0, top_p=1.0, extra_body=extra_body) for p in prompts[:n]))
            for n in args.clients:
                before = await batch_rows(http, metrics_url)
                requests, tokens, stops, seconds = await closed_loop(client, model, prompts, n, args.seconds,
                                                                     args.max_tokens, extra_body)
                cell = Cell(system, n, requests, tokens, seconds, stops)
                after = await batch_rows(http, metrics_url)
                if before and after and after[1] > before[1]:
                    cell.note = f"mean batch {(after[0] - before[0]) / (after[1] - before[1]):.1f} rows"
                if counts_eos:
                    cell.note = f"usage counts EOS: {fmt((tokens - stops) / seconds)} tok/s without it"
                cells.append(cell)
                print(f"  {system:<9} {n:>3} clients: {fmt(cell.tok_s)} tok/s", flush=True)
        finally:
            await client.close()
        return cells

    return asyncio.run(run())


async def batch_rows(http, metrics_url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the API's batch-size histogram, to show how well requests were batched."""
    if not metrics_url:
        return None
    text = (await http.get(metrics_url)).text
    found = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^feedloop_batch_rows_(sum|count) (\S+)$", text, re.M)}
    return (found["sum"], found["count"]) if len(found) == 2 else None


# --- (a) this API ---------------------------------------------------------------------------

def bench_api(policy: Path, prompts: list[str], args, work: Path) -> list[Cell]:
    key = f"fl-bench-{uuid.uuid4().hex}"
    with ScratchDatabase(args.admin_url, work) as db:
        print(f"api: scratch database {db.name} on {db.where}", flush=True)
        with feedloop_serve(db.url, work, policy=policy, key=key, FEEDLOOP_TORCH_THREADS=args.threads) as server:
            return measure_http("api", server.url + "/v1", key, "feedloop", prompts, args,
                                metrics_url=server.url + "/metrics")


# --- (b) raw batched model.generate ---------------------------------------------------------

def bench_generate(policy: Path, prompts: list[str], args) -> list[Cell]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(policy)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for p in prompts]
    eos, pad = tok.eos_token_id, tok.pad_token_id

    @torch.inference_mode()
    def one_batch(rows: list[list[int]], max_tokens: int) -> int:
        batch = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=pad)
        new = out[:, batch["input_ids"].shape[1]:]  # (B, T_new)
        # completion tokens as the servers count them: those before each row's first EOS
        ended = (new == eos).int().cumsum(-1) > 0
        return int((~ended).sum())

    order = itertools.count()
    one_batch([encoded[0]], 4)  # warm-up
    one_batch([encoded[i % len(encoded)] for i in range(max(args.clients))], 4)
    cells = []
    for n in args.clients:
        cell, start = Cell("generate", n), time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            cell.tokens += one_batch([encoded[next(order) % len(encoded)] for _ in range(n)], args.max_tokens)
            cell.requests += n
        cell.seconds = time.perf_counter() - start
        cell.note = f"batch {n}"
        cells.append(cell)
        print(f"  {'generate':<9} {n:>3} batch:   {fmt(cell.tok_s)} tok/s", flush=True)
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


def run_system(name: str, clients: list[int], fn) -> list[Cell]:
    """A reference that cannot run here gets its reason in its rows instead of failing the bench."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the reason is the result
        reason = f"did not run: {type(e).__name__}: {e}".replace("\n", " ")[:200]
        print(f"  {name}: {reason}", flush=True)
        return [Cell(name, n, note=reason) for n in clients]


def report(cells: list[Cell], args, policy: Path) -> None:
    print(f"\ncompletion tokens/s — checkpoint {policy}, max_tokens {args.max_tokens}, temperature 1.0, "
          f"{args.seconds:.0f}s per cell, {args.threads} torch threads\n")
    header = f"{'system':<10} {'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>7} {'tok/s':>8} " \
             f"{'tok/req':>7}  note"
    print(header)
    print("-" * len(header))
    for c in cells:
        per_req = c.tokens / c.requests if c.requests else None
        print(f"{c.system:<10} {c.clients:>7} {c.requests:>8} {c.tokens:>7} {fmt(c.seconds):>7} "
              f"{fmt(c.tok_s):>8} {fmt(per_req):>7}  {c.note}")
    by = {(c.system, c.clients): c for c in cells}
    print("\nratios of tokens/s (this API / reference; >1 means the API is faster):")
    for ref, label in (("generate", "generate"), ("ts-cb", "ts-cb"), ("ts-cb", "ts-cb, EOS not counted")):
        for n in args.clients:
            api, other = by.get(("api", n)), by.get((ref, n))
            ratio = "-"
            if api and other and api.tok_s and other.tok_s:
                other_rate = (other.tokens - other.stops) / other.seconds if "EOS" in label else other.tok_s
                ratio = fmt(api.tok_s / other_rate, ".2f")
            print(f"  api / {label:<22} at {n:>2} clients: {ratio}")


def main() -> None:
    args = parse_args()
    policy = ensure_policy(args.policy)
    prompts = load_prompts()
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-"))
    print(f"bench: {len(prompts)} prompts, logs in {work}", flush=True)
    cells = run_system("api", args.clients, lambda: bench_api(policy, prompts, args, work))
    cells += run_system("generate", args.clients, lambda: bench_generate(policy, prompts, args))
    cells += run_system("ts-cb", args.clients, lambda: bench_transformers_serve(policy, prompts, args, work))
    report(cells, args, policy)


if __name__ == "__main__":
    main()
