"""Reward-model training throughput (pairs/s) for feedloop's trainer against TRL's `RewardTrainer`,
measured in the same run on the same model, the same pairs and the same hyper-parameters.

Model: the bootstrap policy's architecture (GPT-2, 4 layers x 128, our BPE tokenizer and chat
template), built locally from config, saved once, and loaded by both trainers as the same
sequence-classification model with the same head weights. Nothing is downloaded.

Pairs: synthetic users who prefer answers mentioning a word, over the bundled prompts and answers,
split by prompt hash into train and held-out. Two workloads:

  mixed      what the feedback derivation yields: a third of prompts get a ranking of 4 answers
             (6 pairs, one group), a third a pairwise choice (1 pair), a third thumbs (2 up x
             2 down: 4 pairs, one group)
  pairwise   independent pairs only, no answer shared between pairs: the case where grouping and
             de-duplication cannot help

Both trainers get the same batch size (pairs per step), epochs, AdamW lr / weight decay / warmup,
cosine decay, grad-norm clip 1.0, margin, centering coefficient, fp32, dropout off, one process,
`--threads` torch threads. TRL's CPU-hostile defaults are turned off for it (gradient
checkpointing, bf16), which only makes it faster. The clock covers pairs -> trained model:
tokenization and training for both; for feedloop also its normalisation pass over every training
answer (TRL has none). Model loading is outside the clock. Held-out accuracy of both models is
scored afterwards by the same function, to show the speed is not bought with quality.

    python bench/reward.py [--epochs 2] [--batch-size 32] [--prompts 510] [--threads 1]
"""
import argparse
import hashlib
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from schemas.records import TrainingPair  # noqa: E402
from trainer import reward as R  # noqa: E402
from trainer.bootstrap import BootstrapConfig, new_policy  # noqa: E402
from schemas.bundled import bundled_demonstrations, bundled_prompts  # noqa: E402
from trainer.tokenizer import build_tokenizer  # noqa: E402

WORD = "banana"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prompts", type=int, default=300, help="prompts per workload (<= 514 bundled)")
    p.add_argument("--workloads", default="mixed,pairwise")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each trainer; best is kept")
    # One thread: a model this small gains nothing from intra-op parallelism, and on a shared
    # machine OpenMP workers waiting on each other make every step many times slower.
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


# --- pairs ----------------------------------------------------------------------------------

def workload(kind: str, n_prompts: int, seed: int = 0) -> list[TrainingPair]:
    rng = random.Random(seed)
    demos = bundled_demonstrations()
    prompts = list(dict.fromkeys([d["prompt"] for d in demos] + bundled_prompts()))[:n_prompts]
    answers = [d["completion"] for d in demos if WORD not in d["completion"]]

    def answer(mentions: int) -> str:
        words = rng.choice(answers).split(" ")
        for _ in range(mentions):
            words.insert(rng.randrange(len(words) + 1), WORD)
        return " ".join(words)

    pairs = []
    for i, prompt in enumerate(prompts):
        h = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        msgs = [{"role": "user", "content": prompt}]

        def add(chosen, rejected, source, group):
            pairs.append(TrainingPair(prompt=msgs, chosen=chosen, rejected=rejected, source=source,
                                      prompt_hash=h, group=group))

        if kind == "pairwise":
            for j in range(3):  # three independent comparisons, nothing shared
                add(answer(1), answer(0), "pairwise", f"{i}-{j}")
        elif i % 3 == 0:  # a ranking of 4: more mentions ranked higher, 6 ordered pairs
            ranked = [answer(m) for m in (3, 2, 1, 0)]
            for a in range(4):
                for b in range(a + 1, 4):
                    add(ranked[a], ranked[b], "ranking", f"ranking-{i}")
        elif i % 3 == 1:
            add(answer(1), answer(0), "pairwise", f"pair-{i}")
        else:  # thumbs: 2 up x 2 down
            ups, downs = [answer(1), answer(1)], [answer(0), answer(0)]
            for u in ups:
                for d in downs:
                    add(u, d, "thumbs", f"thumbs-{i}")
    return pairs


# --- the two trainers -----------------------------------------------------------------------

def run_feedloop(policy_dir: Path, pairs, args) -> tuple[float, object]:
    model, tokenizer = R.load_for_training(policy_dir)
    cfg = R.RewardConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         heldout_frac=0.0, device="cpu", max_length=256)
    t0 = time.perf_counter()
    R.train(cfg, model, tokenizer, pairs)
    return time.perf_counter() - t0, model


def run_trl(policy_dir: Path, pairs, args, out_dir: str) -> tuple[float, object]:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    model, tokenizer = R.load_for_training(policy_dir)  # the same weights, head included
    config = RewardConfig(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.05,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0, max_length=256,
        center_rewards_coefficient=0.01, gradient_checkpointing=False, bf16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    rows = [{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}], "margin": p.margin}
            for p in pairs]
    t0 = time.perf_counter()
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # it prints the final log dict
    trainer.train()
    seconds = time.perf_counter() - t0
    # Same tokens as ours: chat(prompt) + answer + EOS.
    first = trainer.train_dataset[0]
    enc = R.Encoder(tokenizer, 256)
    assert first["chosen_ids"] == enc.seqs[enc.add([(pairs[0].prompt, pairs[0].chosen)])[0]], \
        "TRL tokenized the pairs differently"
    return seconds, trainer.model


def heldout_accuracy(model, tokenizer, pairs) -> float:
    model.eval()
    prompts = [p.prompt for p in pairs]
    r_c = R.score(model, tokenizer, prompts, [p.chosen for p in pairs])
    r_r = R.score(model, tokenizer, prompts, [p.rejected for p in pairs])
    return (r_c > r_r).float().mean().item()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # transformers' load reports and TRL's notices
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers
    import trl
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        policy_dir = Path(tmp) / "policy"
        torch.manual_seed(0)
        demos = bundled_demonstrations()
        tokenizer = build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos])
        new_policy(BootstrapConfig(), tokenizer).save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
        cfg = BootstrapConfig()
        print(f"model: GPT-2 {cfg.n_layer} layers x {cfg.n_embd}, vocab {len(tokenizer)}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
              f"{args.threads} thread(s), batch {args.batch_size} pairs, {args.epochs} epochs")

        # Warm both code paths once (allocator, kernels, imports) so neither pays first-run costs.
        warm = workload("mixed", 12)
        run_feedloop(policy_dir, warm, argparse.Namespace(**{**vars(args), "epochs": 1}))
        run_trl(policy_dir, warm, argparse.Namespace(**{**vars(args), "epochs": 1}), tmp + "/trl-warm")

        rows = []
        for kind in args.workloads.split(","):
            train, held = R.split_pairs(workload(kind, args.prompts), 0.1, seed=0)
            n = len(train) * args.epochs
            # Alternate the two and keep each one's best time: the machine is shared, and a
            # neighbour's burst should not decide the ratio.
            ours_s = trl_s = float("inf")
            for _ in range(args.repeats):
                s, ours_model = run_feedloop(policy_dir, train, args)
                ours_s = min(ours_s, s)
                s, trl_model = run_trl(policy_dir, train, args, f"{tmp}/trl-{kind}")
                trl_s = min(trl_s, s)
            rows.append((kind, len(train), len(held), n / ours_s, n / trl_s,
                         heldout_accuracy(ours_model, tokenizer, held),
                         heldout_accuracy(trl_model, tokenizer, held)))

    print()
    print(f"{'workload':<10} {'pairs':>6} {'held':>5} {'feedloop pairs/s':>17} {'TRL pairs/s':>12} "
          f"{'ratio':>6} {'held-out acc (ours / TRL)':>26}")
    for kind, n_train, n_held, ours, theirs, acc_ours, acc_trl in rows:
        print(f"{kind:<10} {n_train:>6} {n_held:>5} {ours:>17.1f} {theirs:>12.1f} "
              f"{ours / theirs:>5.2f}x {acc_ours:>15.3f} / {acc_trl:.3f}")
    print("\ngoal: >= 3x TRL on the mixed workload (what the feedback derivation yields)")


if __name__ == "__main__":
    main()
