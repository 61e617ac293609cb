"""Seconds per PPO update (rollout + scoring + all epochs) and peak memory of feedloop's trainer,
full fine-tuning and LoRA, against TRL 1.12's `trl.experimental.ppo.PPOTrainer`, on the same
models, prompts and settings, in one run.

    python bench/ppo.py [--updates 5] [--threads 1] [--repeats 2] [--models gpt2-2x128 gpt2-10m ...]
                        [--sides ours ours-shared ours-lora trl]

Setup, identical for every side: GPT-2 policies of 2x128, 4x256, about 10M (8x320) and about 50M
(12x576) parameters (random init, built here, never downloaded), a tokenizer trained on the bundled demonstrations, a reward model of the same shape
(`GPT2ForSequenceClassification`, one label) that also initialises the value model, a frozen copy
of the policy as reference; batch 16 bundled prompts, 32-token answers at temperature 0.7,
4 epochs of 4 minibatches, fp32, no gradient checkpointing, dropout off. An untrained policy
rarely emits EOS, so nearly every answer runs the full 32 tokens on both sides.

The LoRA side (`ours-lora`, `trainer.lora`) trains rank-16 adapters on every linear layer over one
frozen base that policy, reference (adapters off), value model and reward model share, as a round
with `{"lora": {"enabled": true}}` does: the value and reward heads start from the reward model's
head, the reward adapter from zero (its scores are the reward model's backbone with the policy's
weights, a different function from the full side's separate reward model: this side is timed for
its cost, not for what it learns).

The shared side (`ours-shared`) is full fine-tuning with `value_model="shared"`: no value model,
a new scalar head on the policy's own trunk, one forward and one backward for policy and value
(CleanRL's and trlx's layout). TRL's side keeps its separate value model, so `ours-shared`
against TRL is not like for like: it is the cheaper algorithm an operator can opt into.

Each (side, model) runs in its own subprocess, so peak memory is that process's peak RSS (and
peak CUDA allocation on a GPU). An update is timed from one to the next: ours between the starts
of consecutive rollouts, TRL's between its `on_step_end` callbacks (its per-step extras turned
off: sample generations, reporting, saving). Both wall time and the process's CPU time are taken,
medians over `--updates` updates after one warm-up update; each pair runs `--repeats` times,
alternating sides, and the run with the lower CPU median is kept. On a machine shared with other
work, wall time swings with their load; CPU time of a one-thread process hardly does.

TRL 1.12 (the last release with PPO) is looked for, in order: in this interpreter; in the
interpreter named by `FEEDLOOP_TRL_PYTHON`; in a side venv at `FEEDLOOP_TRL_VENV` (default
`/tmp/feedloop-trl-venv`), which is created when missing: a venv that sees this interpreter's
packages (torch, transformers) through a `.pth` and holds only `trl==1.12.0` and what it adds
(datasets, pandas...). Both sides thus run the same torch and transformers.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"gpt2-2x128": dict(n_layer=2, n_embd=128, n_head=4), "gpt2-4x256": dict(n_layer=4, n_embd=256, n_head=4),
          "gpt2-10m": dict(n_layer=8, n_embd=320, n_head=5), "gpt2-50m": dict(n_layer=12, n_embd=576, n_head=9)}
SIDES = ("ours", "ours-shared", "ours-lora", "trl")
TRL_VERSION = "1.12.0"
SETTINGS = dict(batch_size=16, max_new_tokens=32, ppo_epochs=4, num_minibatches=4, temperature=0.7, lr=1e-5,
                missing_eos_penalty=1.0, kl_coef=0.05)


# --- setup (parent) ------------------------------------------------------------------------------

def build_models(out: Path) -> None:
    """Tokenizer, then per model config: policy and reward model, saved as HF directories."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from schemas.bundled import bundled_demonstrations, bundled_prompts
    from lm.chat import encode_prompt
    from trainer.tokenizer import build_tokenizer

    demos = bundled_demonstrations()
    tok = build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos])
    for name, shape in MODELS.items():
        config = GPT2Config(vocab_size=len(tok), n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, num_labels=1, **shape)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(out / name / "policy")
        GPT2ForSequenceClassification(config).save_pretrained(out / name / "reward")
        tok.save_pretrained(out / name / "policy")
        tok.save_pretrained(out / name / "reward")
    prompts = bundled_prompts()
    (out / "prompts.json").write_text(json.dumps({
        "prompts": prompts, "ids": [encode_prompt(tok, p) for p in prompts]}))


def trl_python() -> str:
    """An interpreter with TRL 1.12 beside this one's torch and transformers (created if need be)."""
    probe = "import trl, sys; sys.exit(0 if trl.__version__ == %r else 1)" % TRL_VERSION
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        return sys.executable
    if os.environ.get("FEEDLOOP_TRL_PYTHON"):
        return os.environ["FEEDLOOP_TRL_PYTHON"]
    venv = Path(os.environ.get("FEEDLOOP_TRL_VENV", "/tmp/feedloop-trl-venv"))
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", probe], capture_output=True).returncode:
        print(f"creating {venv} with trl=={TRL_VERSION} (once)", file=sys.stderr)
        base = Path(getattr(sys, "_base_executable", sys.executable))
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
        site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        # A .pth line starting with `import` runs: this interpreter's site-packages (and their own
        # .pth files, editable installs included) come after the venv's own.
        Path(site_dir, "_feedloop_base.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"trl=={TRL_VERSION}"], check=True)
    return str(python)


# --- workers (one process per side and model) -------------------------------------------------

def _peak_memory() -> dict:
    import torch
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _clocks() -> tuple[float, float]:
    """(wall, CPU of this process): on a shared machine CPU time is what contention leaves alone."""
    return time.perf_counter(), time.process_time()


def _per_update(stamps: list[tuple[float, float]]) -> dict:
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "walls": wall, "cpus": cpu}


def lora_models(model_dir: Path, device: str):
    """(policy, reference, value model, reward model): adapters over one shared GPT-2 base."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from trainer.lora import AdapterView, HeadView, LoraSettings, SharedBase

    base = AutoModelForCausalLM.from_pretrained(model_dir / "policy").to(device)
    shared = SharedBase(base, model_dir / "policy", LoraSettings(enabled=True, rank=16, alpha=32))
    head = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward").score
    return (AdapterView(shared, "policy"), AdapterView(shared, None),
            HeadView(shared, "value", copy.deepcopy(head)).to(device), HeadView(shared, "reward", head).to(device))


def run_ours(model_dir: Path, prompts: dict, updates: int, lora: bool = False, shared: bool = False) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from lm.chat import encode_prompt
    from trainer import ppo

    tok = AutoTokenizer.from_pretrained(model_dir / "policy")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if lora:
        policy, ref, value, rm = lora_models(model_dir, device)
        rm.eval()
    else:
        policy = AutoModelForCausalLM.from_pretrained(model_dir / "policy")
        ref = AutoModelForCausalLM.from_pretrained(model_dir / "policy")
        value = None if shared else AutoModelForSequenceClassification.from_pretrained(model_dir / "reward")
        rm = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward").eval()
        rm.to(device)

    @torch.no_grad()
    def reward_fn(convs, answers):
        # The round's reward function: chat-formatted prompt + answer + EOS, score at the last token.
        seqs = [encode_prompt(tok, c) + tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for c, a in zip(convs, answers)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs], device=device)
        mask = (ids != tok.pad_token_id).long()
        if lora:  # the head's output at every position: read it at the last real token
            return rm(input_ids=ids, attention_mask=mask)[torch.arange(len(seqs)), mask.sum(1) - 1, 0]
        return rm(input_ids=ids, attention_mask=mask).logits[:, 0]

    # An update starts with its rollout: stamp both clocks there (the trainer is not changed).
    stamps, rollout = [], ppo.rollout

    def stamped_rollout(*a, **k):
        stamps.append(_clocks())
        return rollout(*a, **k)

    ppo.rollout = stamped_rollout
    cfg = ppo.PPOConfig(steps=updates + 2, device=device, adaptive_kl=False, anneal_lr=False, warmup_steps=0,
                        max_prompt_tokens=128, value_model="shared" if shared else "separate", **SETTINGS)
    metrics = ppo.train(cfg, policy, ref, value, tok, [[{"role": "user", "content": p}] for p in prompts["prompts"]],
                        reward_fn)
    return {**_per_update(stamps[1:]),  # from the second update's start: one warm-up update
            "own_wall": statistics.median(metrics["ppo/curves"]["time/update_seconds"][1:-1]),
            "answer_tokens": statistics.mean(metrics["ppo/curves"]["rollout/response_length"]), **_peak_memory()}


def run_trl(model_dir: Path, prompts: dict, updates: int, out_dir: Path) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir / "policy")
    tok.padding_side = "left"  # TRL generates after the prompts: left padding
    policy = AutoModelForCausalLM.from_pretrained(model_dir / "policy")
    ref = AutoModelForCausalLM.from_pretrained(model_dir / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward")
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir / "reward")
    data = Dataset.from_dict({"input_ids": prompts["ids"]})
    s = SETTINGS
    args = PPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["num_minibatches"], num_ppo_epochs=s["ppo_epochs"], response_length=s["max_new_tokens"],
        temperature=s["temperature"], learning_rate=s["lr"], kl_coef=s["kl_coef"], stop_token="eos",
        missing_eos_penalty=s["missing_eos_penalty"], total_episodes=s["batch_size"] * (updates + 1),
        num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
        gradient_checkpointing=False, bf16=False, fp16=False, seed=0, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)

    stamps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(_clocks())

        def on_step_end(self, *a, **k):
            stamps.append(_clocks())

    # TRL calls gc.collect() a few times per update; timed (not changed) to explain where time goes.
    import gc
    collect, gc_seconds = gc.collect, []

    def timed_collect(*a, **k):
        t = time.perf_counter()
        try:
            return collect(*a, **k)
        finally:
            gc_seconds.append(time.perf_counter() - t)

    gc.collect = timed_collect
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         value_model=value, train_dataset=data, eval_dataset=data, callbacks=[Clock()])
    trainer.train()
    gc.collect = collect
    return {**_per_update(stamps[1:]),  # from the end of the first (warm-up) update
            "gc_seconds_per_update": sum(gc_seconds) / (updates + 1), **_peak_memory()}


def worker(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    prompts = json.loads((args.work / "prompts.json").read_text())
    model_dir = args.work / args.model
    if args.worker.startswith("ours"):
        result = run_ours(model_dir, prompts, args.updates, lora=args.worker == "ours-lora",
                          shared=args.worker == "ours-shared")
    else:
        with tempfile.TemporaryDirectory() as out:
            result = run_trl(model_dir, prompts, args.updates, Path(out))
    print("RESULT " + json.dumps(result), flush=True)


# --- parent ---------------------------------------------------------------------------------------

def run_side(python: str, side: str, model: str, work: Path, args) -> dict:
    cmd = [python, __file__, "--worker", side, "--model", model, "--work", str(work),
           "--updates", str(args.updates), "--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} on {model} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=5, help="timed updates per run (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every worker")
    p.add_argument("--repeats", type=int, default=2, help="runs per side and model; fastest median kept")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES), help="which sides run (default: all)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    trl_py = trl_python() if "trl" in args.sides else None
    import torch
    print(f"bench/ppo.py: torch {torch.__version__}, {args.threads} thread(s), "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; TRL {TRL_VERSION} via {trl_py or '(not run)'}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()))
    rows = {}  # model -> side -> the run with the lower CPU median
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        build_models(work)
        for model in args.models:
            best = rows[model] = {}
            for _ in range(args.repeats):
                for side in [s for s in SIDES if s in args.sides]:
                    r = run_side(trl_py if side == "trl" else sys.executable, side, model, work, args)
                    if side not in best or r["cpu"] < best[side]["cpu"]:
                        best[side] = r
    print_table(rows, args)


def print_table(rows: dict, args) -> None:
    first = next(iter(next(iter(rows.values())).values()))
    mem = "peak_cuda_mb" if "peak_cuda_mb" in first else "peak_rss_mb"
    print(f"\n{'model':<12} {'side':<12} {'wall s':>8} {'CPU s':>8} {'wall/TRL':>9} {'CPU/TRL':>8} "
          f"{'peak MB':>8} {'mem/ours':>9} {'TRL gc':>7}")
    for model, sides in rows.items():
        trl, ours = sides.get("trl"), sides.get("ours")
        for side, r in sides.items():
            wall, cpu = (f"{r[k] / trl[k]:.2f}" if trl else "-" for k in ("wall", "cpu"))
            mem_ours = f"{r[mem] / ours[mem]:.2f}" if ours else "-"
            gc = f"{r['gc_seconds_per_update']:.3f}" if side == "trl" else ""
            print(f"{model:<12} {side:<12} {r['wall']:>8.3f} {r['cpu']:>8.3f} {wall:>9} {cpu:>8} "
                  f"{r[mem]:>8.0f} {mem_ours:>9} {gc:>7}")
    print(f"CPU/TRL = side / TRL (goal <= 0.50). Medians over {args.updates} updates after a warm-up, best of "
          f"{args.repeats} alternating runs; CPU time is the worker's own, which other load on a shared machine "
          f"leaves alone. Peak memory: the worker's {'CUDA allocation' if mem == 'peak_cuda_mb' else 'RSS'}; "
          f"mem/ours = its peak over full fine-tuning's (LoRA's goal at 50M <= 0.50). TRL gc: seconds TRL spends "
          f"in its own gc.collect() calls per update. ours: separate value model (InstructGPT, like TRL); "
          f"ours-shared: value head on the policy's trunk (not like for like); ours-lora: rank 16 on every linear "
          f"layer over one shared base. Mean answer length (ours): "
          + ", ".join(f"{r['answer_tokens']:.1f}" for sides in rows.values() for k, r in sides.items() if k == "ours")
          + " tokens.")


if __name__ == "__main__":
    main()
