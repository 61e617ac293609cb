"""Hot swap under load: what a promotion costs 16 chatting clients, against the same clients before
it and against loading and warming the new checkpoint by itself, measured in the same run.

  server     a real `python -m service serve` process on a scratch database, serving the
             bootstrap policy as v1
  v2         the bootstrap fine-tuned by the project's SFT to answer "Hello!" differently,
             published as a checkpoint and registered as a candidate (as tests/service/test_registry.py
             builds its v2)
  load       --clients closed-loop workers on the official `openai` AsyncOpenAI client, each
             sending its next request (a bundled prompt, temperature 0, short --max-tokens) as
             soon as the last one returned
  promotion  after --warmup + --steady seconds, POST /v1/admin/models/{id}/promote with the
             operator key; the load goes on until --after seconds past the first answer whose
             `system_fingerprint` is v2
  reference  loading + warming v2 by itself (the server's own `build_engine`: verify the manifest,
             load, one warm-up step) in this process, with no other load, before the clients start
  --engine remote
             the same, but generation runs on a `transformers serve` process (CPU, no forced
             model: it loads each version by its checkpoint path) and the feedloop server
             forwards to it (FEEDLOOP_ENGINE=remote). The promotion checks v2's target first: the
             inference server loads v2 and answers for it, then the registry switches. The
             reference is `build_engine` on the same server for a fresh copy of v2 each time
             (tokenizer, then the target check: the server loads the copy and answers).

Phases, by when a request's answer arrived: steady = after the warm-up, before the promotion POST;
swap = from the promotion POST until --after seconds past the first answer from v2.

    python bench/swap.py [--engine local|remote] [--clients 16] [--steady 8] [--after 2] [--max-tokens 8]

Loopback only; the scratch database is dropped, the servers stopped and v2 deleted at the end.
Exits 1 when a request failed or v2 never answered.
"""
import argparse
import asyncio
import contextlib
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from common import (ScratchDatabase, ensure_policy, feedloop_serve, load_prompts, server_bench_parser,
                    transformers_serve)

V2_ANSWER = "I am the second version."


def parse_args() -> argparse.Namespace:
    p = server_bench_parser(__doc__, policy="v1's checkpoint; built by `python -m trainer bootstrap` when missing")
    p.add_argument("--engine", choices=["local", "remote"], default="local",
                   help="generate in the feedloop server, or on a `transformers serve` process it forwards to")
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before steady state is measured")
    p.add_argument("--steady", type=float, default=8.0, help="seconds of steady state before the promotion")
    p.add_argument("--after", type=float, default=2.0, help="seconds of load after the first answer from v2")
    p.add_argument("--timeout", type=float, default=60.0, help="most seconds to wait for an answer from v2")
    p.add_argument("--max-tokens", type=int, default=8, help="max completion tokens per request")
    p.add_argument("--load-repeats", type=int, default=3, help="reference loads of v2 (the median is shown)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, for the server and the reference")
    return p.parse_args()


@dataclass
class Answer:
    """One request as a client saw it (perf_counter seconds)."""
    start: float
    end: float
    fingerprint: str | None = None
    response_id: str | None = None
    tokens: int = 0
    """completion tokens (usage)"""
    error: str | None = None


# --- v2 -------------------------------------------------------------------------------------

def derive_v2(base: Path, out: Path) -> Path:
    """`base` fine-tuned by the project's SFT to answer "Hello!" with V2_ANSWER, published at `out`
    (as the `v2_path` fixture of tests/service/test_registry.py)."""
    from trainer.sft import SFTConfig, fine_tune
    return fine_tune(base, out, SFTConfig(epochs=30, batch_size=1, lr=1e-3, device="cpu"),
                     [{"prompt": "Hello!", "completion": V2_ANSWER}], config={"bench": "swap v2"})


async def register(db_url: str, path: Path):
    """v2 as a candidate whose parent and reference are v1 (the server registered v1 at start-up)."""
    import psycopg

    from store.registry import register_checkpoint

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        async with conn.transaction():
            return await register_checkpoint(conn, path=path, kind="policy", status="candidate",
                                             actor="bench/swap.py", parent_id=1, reference_id=1)


def reference_loads(version, repeats: int, work: Path, remote_url: str | None = None) -> list[float]:
    """Seconds `build_engine` takes to verify, load and warm `version` here, `repeats` times. With
    `remote_url`: to load the tokenizer and check the target, on that server, for a fresh copy of
    the checkpoint each time (so the server loads it cold, and v2 itself is not loaded before the
    promotion asks for it)."""
    from schemas.settings import Settings
    from service.serving import build_engine

    settings = Settings(device="cpu", engine="remote" if remote_url else "local", remote_url=remote_url)
    seconds = []
    for i in range(repeats):
        subject = version
        if remote_url:
            copy = work / f"v2-reference-{i}"
            shutil.copytree(version.path, copy)
            subject = version.model_copy(update={"path": str(copy)})
        t0 = time.perf_counter()
        engine = build_engine(subject, settings)
        seconds.append(time.perf_counter() - t0)
        engine.close()
    return seconds


# --- the load and the promotion -------------------------------------------------------------

@dataclass
class Run:
    answers: list[Answer]
    new: str
    """v2's fingerprint"""
    steady_from: float
    promoted_at: float
    """when the promotion POST was sent"""
    promote_seconds: float
    """how long the POST itself took"""
    promoted_wall: float
    """promoted_at on the wall clock, to compare with the server's log"""
    first_new: float | None
    swap_until: float | None


async def swap_under_load(url: str, user_key: str, operator_key: str, version_id: int,
                          prompts: list[str], args) -> Run:
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=user_key, max_retries=0, timeout=60,
                                http_client=openai.DefaultAsyncHttpxClient(trust_env=False))
    operator = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {operator_key}"},
                                 timeout=60, trust_env=False)
    answers, stop, order = [], asyncio.Event(), itertools.count()
    new = f"v{version_id}"

    async def chat_loop():
        while not stop.is_set():
            prompt = prompts[next(order) % len(prompts)]
            t0 = time.perf_counter()
            try:
                r = await client.chat.completions.create(
                    model="feedloop", messages=[{"role": "user", "content": prompt}],
                    max_tokens=args.max_tokens, temperature=0)
                answers.append(Answer(t0, time.perf_counter(), r.system_fingerprint, r.id,
                                      r.usage.completion_tokens))
            except Exception as e:  # noqa: BLE001 - any failure counts
                answers.append(Answer(t0, time.perf_counter(), error=f"{type(e).__name__}: {e}"[:200]))

    def first_new() -> float | None:
        return min((a.end for a in answers if a.fingerprint == new), default=None)

    tasks = [asyncio.create_task(chat_loop()) for _ in range(args.clients)]
    try:
        start = time.perf_counter()
        await asyncio.sleep(args.warmup)
        steady_from = time.perf_counter()
        await asyncio.sleep(args.steady)
        promoted_at, promoted_wall = time.perf_counter(), time.time()
        r = await operator.post(f"/v1/admin/models/{version_id}/promote", json={"reason": "bench/swap.py"})
        promote_seconds = time.perf_counter() - promoted_at
        r.raise_for_status()
        print(f"  promoted {new} at {promoted_at - start:.1f}s; waiting for its first answer …", flush=True)
        while first_new() is None and time.perf_counter() - promoted_at < args.timeout:
            await asyncio.sleep(0.02)
        first = first_new()
        swap_until = first + args.after if first is not None else None
        if swap_until is not None:
            await asyncio.sleep(max(0.0, swap_until - time.perf_counter()))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()
        await operator.aclose()
    return Run(answers, new, steady_from, promoted_at, promote_seconds, promoted_wall, first, swap_until)


def create_user_key(url: str, operator_key: str) -> str:
    import httpx

    r = httpx.post(url + "/v1/admin/keys", json={"name": "bench-swap", "role": "user"},
                   headers={"Authorization": f"Bearer {operator_key}"}, timeout=30, trust_env=False)
    r.raise_for_status()
    return r.json()["key"]


def misrecorded(db_url: str, answers: list[Answer]) -> int:
    """Answers whose recorded completion carries another version than their system_fingerprint."""
    import psycopg

    by_id = {a.response_id: a.fingerprint for a in answers if a.response_id}
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT r.response_id, c.model_version_id FROM chat_requests r"
                            " JOIN completions c ON c.request_id = r.id WHERE r.response_id = ANY(%s)",
                            (list(by_id),)).fetchall()
    recorded = {rid: f"v{vid}" for rid, vid in rows}
    return sum(recorded.get(rid) != fp for rid, fp in by_id.items())


def switched_at(log: Path, new: str) -> float | None:
    """When the server's log says it started serving `new` (wall clock), if it says so."""
    found = re.search(rf"^(\S+ \S+) INFO service\.serving: serving {new} \(was ",
                      log.read_text(errors="replace"), re.M)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else None


# --- report ---------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def pct(values: list[float], q: int) -> float | None:
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def phase_row(name: str, answers: list[Answer], seconds: float) -> tuple[float | None, float | None]:
    """Print one phase's row; returns its (p50, p99) in ms."""
    ms = [1000 * (a.end - a.start) for a in answers]
    versions = Counter(a.fingerprint or "failed" for a in answers)
    p50, p99 = pct(ms, 50), pct(ms, 99)
    tokens = sum(a.tokens for a in answers) / len(answers) if answers else None
    print(f"{name:<7} {seconds:>8.1f} {len(answers):>8} {fmt(len(answers) / seconds if seconds else None):>7} "
          f"{fmt(tokens):>7} {fmt(p50):>7} {fmt(p99):>7} {fmt(max(ms, default=None)):>7} "
          f"{versions['failed']:>6}  {', '.join(f'{v} {n}' for v, n in sorted(versions.items()) if v != 'failed')}")
    return p50, p99


def line(label: str, value) -> None:
    print(f"{label:<58} {value}")


def ratio(a: float | None, b: float | None) -> str:
    return fmt(a / b if a is not None and b else None, ".2f")


def report(run: Run, loads: list[float], wrong: int, switched: float | None, args, where: str,
           load_avg: float) -> None:
    engine = "local engine" if args.engine == "local" else "remote engine on `transformers serve` (CPU)"
    print(f"\nhot swap under {args.clients} clients — {engine}, max_tokens {args.max_tokens}, temperature 0, "
          f"{args.threads} torch thread(s), {where}, {os.cpu_count()} CPUs, load average {load_avg:.1f} "
          "before the run\n")
    header = f"{'phase':<7} {'seconds':>8} {'requests':>8} {'req/s':>7} {'tok/req':>7} {'p50 ms':>7} " \
             f"{'p99 ms':>7} {'max ms':>7} {'failed':>6}  answered by"
    print(header)
    print("-" * len(header))
    steady = [a for a in run.answers if run.steady_from <= a.end < run.promoted_at]
    steady_p50, steady_p99 = phase_row("steady", steady, run.promoted_at - run.steady_from)
    swap_p50 = swap_p99 = None
    if run.swap_until is not None:
        swap = [a for a in run.answers if run.promoted_at <= a.end <= run.swap_until]
        swap_p50, swap_p99 = phase_row("swap", swap, run.swap_until - run.promoted_at)

    failed = [a for a in run.answers if a.error]
    to_first = run.first_new - run.promoted_at if run.first_new is not None else None
    median_load = statistics.median(loads)
    late = sum(a.fingerprint == "v1" and a.end > run.first_new for a in run.answers) if to_first is not None else 0
    print()
    line("failed requests (whole run, warm-up and tail included)", f"{len(failed)} of {len(run.answers)}")
    for error in sorted({a.error for a in failed})[:5]:
        print(f"  {error}")
    line(f"promotion POST -> first answer from {run.new}",
         f"{to_first:.2f} s" if to_first is not None else f"none within {args.timeout:.0f} s")
    line("  the POST itself", f"{run.promote_seconds:.2f} s")
    if switched is not None:
        line("  promotion POST -> server switched (from its log)", f"{switched - run.promoted_wall:.2f} s")
    alone = "loading + warming" if args.engine == "local" else "target check (a cold load there)"
    line(f"{alone} {run.new} by itself (median of {len(loads)})",
         f"{median_load:.2f} s  ({', '.join(f'{s:.2f}' for s in loads)})")
    line(f"v1 answers arriving after the first from {run.new} (in flight)", late)
    line("answers recorded with another version than they carry", wrong)
    print("\nratios:")
    line("  p50 latency, swap / steady", ratio(swap_p50, steady_p50))
    line("  p99 latency, swap / steady", ratio(swap_p99, steady_p99))
    line(f"  promotion -> first new answer / {alone} alone", ratio(to_first, median_load))


def main() -> None:
    args = parse_args()
    load_avg = os.getloadavg()[0]
    policy = ensure_policy(args.policy)
    prompts = load_prompts()
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-swap-"))
    print(f"bench: logs in {work}", flush=True)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()  # load reports and progress bars
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    v2 = derive_v2(policy, work / "v2")
    print(f"  v2 derived by SFT in {time.perf_counter() - t0:.1f}s", flush=True)
    operator_key = f"fl-bench-{uuid.uuid4().hex}"
    try:
        with ScratchDatabase(args.admin_url, work) as db, contextlib.ExitStack() as stack:
            print(f"  scratch database {db.name} on {db.where}", flush=True)
            env, remote_url = {"FEEDLOOP_TORCH_THREADS": args.threads}, None
            if args.engine == "remote":
                remote = stack.enter_context(transformers_serve(work, threads=args.threads))
                remote_url = remote.url
                env.update(FEEDLOOP_ENGINE="remote", FEEDLOOP_REMOTE_URL=remote_url)
                print(f"  transformers serve at {remote_url} (log {remote.log})", flush=True)
            server = stack.enter_context(feedloop_serve(db.url, work, policy=policy, key=operator_key, **env))
            version = asyncio.run(register(db.url, v2))
            loads = reference_loads(version, args.load_repeats, work, remote_url)
            print(f"  reference: {'loading + warming' if remote_url is None else 'tokenizer + target check of'} "
                  f"{version.name} took {', '.join(f'{s:.2f}' for s in loads)} s", flush=True)
            user_key = create_user_key(server.url, operator_key)
            run = asyncio.run(swap_under_load(server.url, user_key, operator_key, version.id, prompts, args))
            switched = switched_at(server.log, run.new)
            stack.close()  # the servers stop before the database is read and dropped
            wrong = misrecorded(db.url, run.answers)
            report(run, loads, wrong, switched, args, db.where, load_avg)
    finally:
        shutil.rmtree(v2, ignore_errors=True)
    if any(a.error for a in run.answers) or run.first_new is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
