"""The generation engine alone, in this process, no HTTP: completion tokens/s of this project's
continuous-batching scheduler (service.local_engine.LocalEngine) against transformers' own
(`ContinuousBatchingManager`, the paged cache behind `generate_batch` and
`transformers serve --continuous-batching`) and against static batches of raw `model.generate`,
on the same checkpoint and prompts, measured in the same run. It is how the engine's design was
chosen: the two schedulers side by side before any server's overhead.

  closed N   N clients, each submitting its next request as soon as the last one finished,
             for `--seconds` (`generate`: batches of N)
  burst N    N requests submitted at once, until all are done

Every system samples at temperature 1.0 / top_p 1.0 with `--max-tokens`; throughput counts the
completion tokens before EOS.

    python bench/engine.py [--policy DIR] [--seconds 8] [--max-tokens 48]
"""
import argparse
import asyncio
import itertools
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from common import BENCH_POLICY, ensure_policy, load_prompts


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", type=Path, default=BENCH_POLICY, help="checkpoint directory")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per closed-loop cell")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--clients", default="1,16", help="closed-loop concurrency levels")
    p.add_argument("--burst", type=int, default=64, help="requests submitted at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


class Tally:
    def __init__(self):
        self.requests, self.tokens, self.lock = 0, 0, threading.Lock()

    def add(self, tokens: int) -> None:
        with self.lock:
            self.requests, self.tokens = self.requests + 1, self.tokens + tokens


def closed(submit_and_wait, prompts, clients: int, seconds: float) -> Tally:
    """`clients` threads, each running one request after another until `seconds` have passed."""
    tally, order, start = Tally(), itertools.count(), time.perf_counter()

    def client():
        while time.perf_counter() - start < seconds:
            tally.add(submit_and_wait(prompts[next(order) % len(prompts)]))

    return _run(tally, start, [client] * clients)


def burst(submit_and_wait, prompts, n: int) -> Tally:
    """`n` requests at once, one thread each."""
    tally, start = Tally(), time.perf_counter()
    return _run(tally, start, [lambda i=i: tally.add(submit_and_wait(prompts[i % len(prompts)]))
                               for i in range(n)])


def _run(tally: Tally, start: float, targets) -> Tally:
    """Each target on its own thread, all joined; the tally's seconds count from `start`."""
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds = time.perf_counter() - start
    return tally


# --- the systems: each a blocking `submit_and_wait(prompt ids) -> completion tokens` ----------

def this_engine(policy: Path, args):
    from schemas.openai import SamplingParams
    from schemas.records import ModelVersion
    from service.local_engine import LocalEngine

    version = ModelVersion(id=1, kind="policy", parent_id=None, reference_id=None, reward_model_id=None,
                           path=str(policy), content_hash="", endpoint=None, status="active",
                           canary_fraction=None, training_run_id=None, metrics={},
                           created_at=datetime.now(timezone.utc), promoted_at=None, promoted_by=None)
    engine = LocalEngine(version, max_batch_rows=32, max_queue=1024)
    engine.warm()
    loop = asyncio.new_event_loop()  # Generations report to an event loop, as they do in the server
    threading.Thread(target=loop.run_forever, daemon=True).start()
    sampling = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, stop=[], seed=None)

    async def run(ids):
        gen = engine.submit(ids, sampling, [])
        await gen.admitted()
        tokens = 0
        async for piece in gen:
            tokens = piece.tokens
        return tokens

    def submit_and_wait(ids):
        return asyncio.run_coroutine_threadsafe(run(ids), loop).result()

    def close():
        engine.close()
        loop.call_soon_threadsafe(loop.stop)

    return submit_and_wait, close


def transformers_cb(policy: Path, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    manager = model.init_continuous_batching(generation_config=config)
    manager.warmup()  # sizes the paged cache and captures what it can, once
    manager.start()
    eos = tok.eos_token_id
    loop = asyncio.new_event_loop()  # results come back to an event loop, as `transformers serve` has them
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def run(ids):
        rid, done = f"req-{uuid.uuid4().hex}", loop.create_future()
        manager.register_result_handler(rid, lambda out: out.is_finished() and not done.done()
                                        and done.set_result(out))
        manager.add_request(ids, request_id=rid, max_new_tokens=args.max_tokens)
        out = await done
        return sum(1 for t in out.generated_tokens if t != eos)

    def submit_and_wait(ids):
        return asyncio.run_coroutine_threadsafe(run(ids), loop).result()

    def close():
        manager.stop(block=True)
        loop.call_soon_threadsafe(loop.stop)

    return submit_and_wait, close


def static_generate(policy: Path, args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(policy).eval()

    @torch.inference_mode()
    def batch(rows: list[list[int]]) -> int:
        b = tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        out = model.generate(**b, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=args.max_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        new = out[:, b["input_ids"].shape[1]:]
        return int((~((new == tok.eos_token_id).int().cumsum(-1) > 0)).sum())

    return batch


def main() -> None:
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    policy = ensure_policy(args.policy)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(policy)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for p in load_prompts()]
    rows = []
    for name, build in (("engine", this_engine), ("hf-cb", transformers_cb)):
        t = time.perf_counter()
        submit_and_wait, close = build(policy, args)
        print(f"{name}: ready in {time.perf_counter() - t:.1f}s", flush=True)
        burst(submit_and_wait, prompts, 8)  # warm-up
        for n in args.clients:
            rows.append((name, f"closed {n}", closed(submit_and_wait, prompts, n, args.seconds)))
        rows.append((name, f"burst {args.burst}", burst(submit_and_wait, prompts, args.burst)))
        close()
    batch = static_generate(policy, args)
    batch(prompts[:8])
    order = itertools.count()
    for n in args.clients + [args.burst]:
        tally, start = Tally(), time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            tally.tokens += batch([prompts[next(order) % len(prompts)] for _ in range(min(n, 32))])
            tally.requests += min(n, 32)
            if n == args.burst and tally.requests >= n:
                break
        tally.seconds = time.perf_counter() - start
        rows.append(("generate", f"{'burst' if n == args.burst else 'closed'} {n}", tally))
    print(f"\ncompletion tokens/s, in process, max_tokens {args.max_tokens}, {args.threads} torch threads\n")
    print(f"{'system':<9} {'load':<9} {'requests':>8} {'tokens':>7} {'seconds':>7} {'tok/s':>8}")
    for name, load, t in rows:
        print(f"{name:<9} {load:<9} {t.requests:>8} {t.tokens:>7} {t.seconds:>7.1f} {t.tokens / t.seconds:>8.1f}")
    by = {(name, load): t.tokens / t.seconds for name, load, t in rows}
    print("\nratios, engine / reference:")
    for load in [f"closed {n}" for n in args.clients] + [f"burst {args.burst}"]:
        print(f"  {load:<9}  / hf-cb {by[('engine', load)] / by[('hf-cb', load)]:.2f}   "
              f"/ generate {by[('engine', load)] / by[('generate', load)]:.2f}")


if __name__ == "__main__":
    main()
