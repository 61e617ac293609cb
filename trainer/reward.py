"""Reward model (InstructGPT step 2): a scalar head on a transformer backbone, trained with the
Bradley-Terry loss on users' comparisons, then normalised so reference answers score mean 0, std 1.

The model is a Hugging Face sequence-classification model with one label, so anything that loads
`AutoModelForSequenceClassification` loads it. The score is read at the last real token of
`chat(prompt) + answer + end of turn` (`lm.turns`; pad differs from every end-of-turn id, so that
token is the end of turn). The normalisation
lives in the checkpoint's config.json: normalised = (raw - reward_bias) / reward_scale, which
`score` applies and any other loader can.

Throughput: a batch holds whole groups (one ranking's K(K-1)/2 pairs, InstructGPT sec. 3.5), each
distinct (prompt, answer) in it runs once, and sequences are packed: a prompt once, then its
answers, each seeing the prompt and itself only (a block mask; positions restart after the
prompt), several such blocks to a row. A ranking of K answers costs one prompt and K answers
instead of K(K-1) whole sequences. `rewards` is the plain one-sequence-per-row way to score that
any loader can use; the tests hold the two equal.
"""
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lm.chat import as_messages, context_length, encode_prompt
from lm.checkpoint import save_pretrained
from lm.turns import check_pad, turn_end_id
from lm.device import resolve_device
from schemas.records import TrainingPair
from trainer.common import disable_dropout, fp32_trainable, make_accelerator, on_terminal
from trainer.optim import adamw, set_lr, warmup_cosine

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    epochs: int = 3
    """passes over the training pairs (InstructGPT uses 1 on large data; small live data needs more)"""
    batch_size: int = 32
    """pairs per optimizer step; a group (one ranking) is never split, so a batch may run over"""
    lr: float = 3e-4
    """peak learning rate (AdamW), reached after warmup and decayed by cosine to lr/10"""
    warmup_frac: float = 0.05
    """share of steps spent warming up"""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on biases and norms)"""
    use_margin: bool = True
    """subtract each pair's margin inside the sigmoid: -logsigmoid(r_c - r_r - margin)"""
    center_coef: float = 0.01
    """reward centering (Eisenstein et al. 2023): coefficient x mean of squared rewards; 0 turns it off"""
    heldout_frac: float = 0.1
    """share of prompts (by prompt hash) whose pairs are held out for accuracy, never trained on"""
    seed: int = 0
    """seeds the batch order and the train/held-out split"""
    device: str = "auto"
    """torch device; auto picks an accelerator when present"""
    mixed_precision: str = "auto"
    """autocast: auto (bf16 on a GPU with bf16, fp16 on other GPUs, none on CPU), no, bf16, fp16;
    trainable weights and AdamW's state stay fp32 either way"""
    max_length: int | None = None
    """longest sequence in tokens (prompt + answer + EOS), cut from the left so the scored end
    survives; None means the model's context length"""
    eval_batch_size: int = 64
    """sequences per no-grad forward when evaluating, normalising and scoring"""


# --- data -----------------------------------------------------------------------------------

def split_pairs(pairs: list[TrainingPair], heldout_frac: float, seed: int = 0
                ) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """(train, heldout) by prompt hash: one prompt's pairs all sit on one side. A prompt's side
    depends only on (seed, prompt_hash), so it does not move as new data arrives round after round."""
    def u(prompt_hash: str) -> float:  # a uniform number in [0, 1) per prompt
        digest = hashlib.sha256(f"{seed}:{prompt_hash}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    hashes = sorted({p.prompt_hash for p in pairs}, key=u)
    held = {h for h in hashes if u(h) < heldout_frac}
    if not held and heldout_frac > 0 and len(hashes) >= 2:
        held = {hashes[0]}  # too few prompts for the fraction to catch one: hold out the lowest
    if hashes and len(held) == len(hashes):
        held.discard(hashes[-1])  # and never all of them
    return ([p for p in pairs if p.prompt_hash not in held], [p for p in pairs if p.prompt_hash in held])


@dataclass
class Encoded:
    """Pairs as indices into a table of distinct token sequences (chat(prompt) + answer + EOS)."""
    seqs: list[list[int]]
    prompt_lens: list[int]
    """how many leading tokens of each sequence are its prompt: the prefix its block shares"""
    chosen: list[int]
    rejected: list[int]
    margin: list[float]
    group: list[str]
    prompt_hash: list[str]
    weight: list[float]
    """per pair: how much it counts (recency, `TrainingPair.weight`)"""


class Encoder:
    """Tokenizes each prompt and each (prompt, answer) once; sequences are stored once."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.prompt_ids: dict[str, list[int]] = {}
        self.index: dict[tuple[str, str], int] = {}
        self.seqs: list[list[int]] = []
        self.prompt_lens: list[int] = []
        self.truncated = 0

    def add(self, items: list[tuple[list[dict], str]]) -> list[int]:
        """Sequence index of each (prompt, answer); new answers are tokenized in one call."""
        keys = [(json.dumps(as_messages(p), sort_keys=True), a) for p, a in items]
        for key, (prompt, _) in zip(keys, items):
            if key[0] not in self.prompt_ids:
                self.prompt_ids[key[0]] = encode_prompt(self.tokenizer, prompt)
        new = list(dict.fromkeys(k for k in keys if k not in self.index))
        if new:
            answers = self.tokenizer([a for _, a in new], add_special_tokens=False)["input_ids"]
            for key, answer_ids in zip(new, answers):
                prompt_ids = self.prompt_ids[key[0]]
                ids = prompt_ids + answer_ids + [turn_end_id(self.tokenizer)]
                cut = max(0, len(ids) - self.max_length)
                if cut:  # drop from the left: the score is read at the end, and recent context matters most
                    self.truncated += 1
                self.index[key] = len(self.seqs)
                self.seqs.append(ids[cut:])
                self.prompt_lens.append(max(0, len(prompt_ids) - cut))
        return [self.index[k] for k in keys]


def encode_pairs(encoder: Encoder, pairs: list[TrainingPair]) -> Encoded:
    idx = encoder.add([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs])
    n = len(pairs)
    return Encoded(encoder.seqs, encoder.prompt_lens, idx[:n], idx[n:], [p.margin for p in pairs],
                   [p.group for p in pairs], [p.prompt_hash for p in pairs], [p.weight for p in pairs])


def make_batches(enc: Encoded, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Pair indices per batch, whole groups only: InstructGPT trains one ranking's K(K-1)/2 pairs
    as one batch element (shuffled apart they overfit), and together they share their answers'
    forward passes. A group larger than `batch_size` is a batch of its own. Prompts are shuffled,
    and one prompt's groups follow each other, so they tend to share a batch and its prompt's
    forward pass (and answers that several groups compare, e.g. thumbs and a pairwise choice)."""
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for i, (h, g) in enumerate(zip(enc.prompt_hash, enc.group)):
        by_prompt.setdefault(h, {}).setdefault(g, []).append(i)
    prompts = list(by_prompt.values())
    rng.shuffle(prompts)
    order = []
    for groups in prompts:
        groups = list(groups.values())
        rng.shuffle(groups)
        order += groups
    batches, current = [], []
    for g in order:
        if current and len(current) + len(g) > batch_size:
            batches.append(current)
            current = []
        current = current + g
    if current:
        batches.append(current)
    return batches


@dataclass
class Packed:
    """Distinct sequences packed into rows: each prompt once, followed by its answers, which see
    the prompt and themselves but not each other; several such blocks share a row."""
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T) each answer continues from the end of its prompt
    allowed: torch.Tensor  # (R, 1, T, T) bool: query t may attend key s
    rows: torch.Tensor  # (S,) row of each sequence's last token, where its score is read
    cols: torch.Tensor  # (S,) column of it

    def to(self, device) -> "Packed":
        return Packed(*(t.to(device) for t in (self.input_ids, self.position_ids, self.allowed,
                                              self.rows, self.cols)))


def pack(seqs: list[list[int]], prompt_lens: list[int], pad_id: int) -> Packed:
    """Pack sequences so shared prompts are computed once (a ranking of K answers runs its prompt
    once, not K times) and rows pad little. Row width: twice the longest sequence, so a prompt
    with two answers always fits; a prompt with more answers than fit is split into blocks that
    each repeat it. Blocks go into rows first-fit by decreasing length."""
    cap = 2 * max(len(s) for s in seqs)
    by_prompt: dict[tuple, list[int]] = {}
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        by_prompt.setdefault(tuple(s[:p]), []).append(i)
    blocks = []  # (prompt, [sequence index], length)
    for prompt, members in by_prompt.items():
        current, length = [], len(prompt)
        for i in members:
            answer = len(seqs[i]) - len(prompt)
            if current and length + answer > cap:
                blocks.append((prompt, current, length))
                current, length = [], len(prompt)
            current, length = current + [i], length + answer
        blocks.append((prompt, current, length))
    rows: list[list] = []  # [free space, blocks]
    for block in sorted(blocks, key=lambda b: -b[2]):
        row = next((r for r in rows if r[0] >= block[2]), None)
        if row is None:
            rows.append(row := [cap, []])
        row[0] -= block[2]
        row[1].append(block)

    width = cap - min(free for free, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    # Each token gets a block id and a segment id (0 = the block's prompt); pads get an id of
    # their own so they attend only to themselves (a fully masked row would give NaN in softmax).
    block_id = -torch.arange(1, width + 1).repeat(len(rows), 1)  # (R, T)
    segment = torch.zeros((len(rows), width), dtype=torch.long)
    end_row, end_col = [0] * len(seqs), [0] * len(seqs)
    for r, (_, row_blocks) in enumerate(rows):
        col = 0
        for b, (prompt, members, length) in enumerate(row_blocks):
            p = len(prompt)
            ids[r, col:col + p] = torch.tensor(prompt, dtype=torch.long)
            pos[r, col:col + p] = torch.arange(p)
            block_id[r, col:col + length] = b
            col += p
            for k, i in enumerate(members, start=1):
                answer = seqs[i][p:]
                ids[r, col:col + len(answer)] = torch.tensor(answer)
                pos[r, col:col + len(answer)] = torch.arange(p, p + len(answer))
                segment[r, col:col + len(answer)] = k
                col += len(answer)
                end_row[i], end_col[i] = r, col - 1
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    same_block = block_id[:, :, None] == block_id[:, None, :]  # (R, T, T)
    visible = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)  # own answer or prompt
    allowed = (causal & same_block & visible)[:, None]  # (R, 1, T, T)
    return Packed(ids, pos, allowed, torch.tensor(end_row), torch.tensor(end_col))


def batch_tensors(enc: Encoded, pair_idx: list[int], pad_id: int):
    """One batch: its distinct sequences packed (each run once), and per pair where its chosen
    and rejected sit among them, its margin, its group and its weight."""
    distinct = list(dict.fromkeys([enc.chosen[i] for i in pair_idx] + [enc.rejected[i] for i in pair_idx]))
    where = {s: j for j, s in enumerate(distinct)}
    packed = pack([enc.seqs[s] for s in distinct], [enc.prompt_lens[s] for s in distinct], pad_id)
    groups = {g: k for k, g in enumerate(dict.fromkeys(enc.group[i] for i in pair_idx))}
    chosen = torch.tensor([where[enc.chosen[i]] for i in pair_idx])  # (P,)
    rejected = torch.tensor([where[enc.rejected[i]] for i in pair_idx])  # (P,)
    margin = torch.tensor([enc.margin[i] for i in pair_idx], dtype=torch.float)  # (P,)
    group = torch.tensor([groups[enc.group[i]] for i in pair_idx])  # (P,)
    weight = torch.tensor([enc.weight[i] for i in pair_idx], dtype=torch.float)  # (P,)
    return packed, chosen, rejected, margin, group, weight


# --- model ----------------------------------------------------------------------------------

def packed_rewards(model, head, packed: Packed) -> torch.Tensor:
    """Raw scalar reward of each packed sequence, (S,), read at its last token (the EOS).
    The head's per-token output is taken with a hook, because the model itself pools one score
    per row; going through `model(...)` keeps DDP's gradient sync when accelerate wraps it."""
    per_token = []
    hook = head.register_forward_hook(lambda module, args, out: per_token.append(out))
    try:
        config = getattr(model, "module", model).config  # under DDP the model is wrapped
        mask = packed_masks(config, packed.allowed, packed.position_ids, next(model.parameters()).dtype)
        model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
              use_cache=False)
    finally:
        hook.remove()
    return per_token[0][packed.rows, packed.cols, 0].float()  # (R, T, 1) -> (S,)


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding layers, or None when it has none."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def packed_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor, dtype):
    """The attention mask a packed batch is run with (a 4-D mask is used as given: the model adds
    neither causality nor its window). Sliding-window layers see only keys less than `window`
    positions back, as when the sequence runs alone; positions count within the sequence, so the
    window is applied to them, not to the packed columns. Models that mix full and sliding layers
    (`layer_types`: Gemma 2/3, Qwen 2/3) take one mask per layer type."""
    masks = {"full_attention": allowed}
    window = sliding_window(config)
    if window is not None:
        distance = position_ids[:, None, :, None] - position_ids[:, None, None, :]  # (R, 1, T, T) query - key
        masks["sliding_attention"] = allowed & (distance < window)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask
        masks = {k: torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                 for k, m in masks.items()}
    kinds = set(getattr(config, "layer_types", None) or [])
    if window is None or kinds == {"full_attention"}:
        return masks["full_attention"]
    if kinds and kinds <= set(masks):
        return {k: masks[k] for k in kinds}
    return masks["sliding_attention"]  # one window on every layer (Mistral)


def collate(seqs: list[list[int]], pad_id: int, padding_side: str = "right"):
    """One sequence per row, padded to the longest: (input_ids, attention_mask), each (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def rewards(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Raw reward per padded row, (B,), the way any `from_pretrained` user can compute it. The
    model reads its score at the rightmost non-pad token (pad != EOS, so that is the EOS);
    positions must be counted over real tokens, because GPT-2 would otherwise count left padding
    and shift every position of a left-padded row."""
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                 use_cache=False).logits.squeeze(-1).float()  # (B, 1) -> (B,)


def load_for_training(path: str | Path, seed: int = 0):
    """(model, tokenizer) to train: a policy checkpoint gets a new scalar head (drawn from `seed`)
    on its backbone; a previous reward model continues as it is (its old normalisation is
    replaced after training)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                     output_loading_info=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # where the model finds the last real token
    if "score.weight" in info["missing_keys"]:
        # A fresh head: std 1/sqrt(d+1) as in lm-human-preferences' reward head, so initial
        # rewards are O(1) rather than O(0.02) and the loss starts from a useful gradient.
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1),
                              generator=torch.Generator().manual_seed(seed))
    return model, tokenizer


# --- loss -----------------------------------------------------------------------------------

def preference_loss(r_chosen, r_rejected, margin, group, weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-pair loss). Bradley-Terry per pair: -logsigmoid(r_c - r_r - margin), (P,);
    averaged within each group, then over groups, so a ranking of K answers weighs as one
    element, not K(K-1)/2 (InstructGPT eq. 1's 1/C(K,2)). `weight` (P,) scales each pair's
    term (older feedback counts less); not renormalised, so a batch of old pairs moves the
    model less."""
    pair_loss = -F.logsigmoid(r_chosen - r_rejected - margin)  # (P,)
    weighted = pair_loss if weight is None else pair_loss * weight
    n_groups = int(group.max()) + 1
    group_sum = torch.zeros(n_groups, device=pair_loss.device).index_add(0, group, weighted)  # (G,)
    group_size = torch.zeros(n_groups, device=pair_loss.device).index_add(
        0, group, torch.ones_like(pair_loss))  # (G,)
    return (group_sum / group_size).mean(), pair_loss


def center_loss(r: torch.Tensor) -> torch.Tensor:
    """Mean of squared rewards over the batch's sequences: keeps raw rewards near zero
    (Eisenstein et al. 2023, "Helping or Herding?", eq. 2)."""
    return (r ** 2).mean()


# --- evaluation and normalisation ------------------------------------------------------------

@torch.no_grad()
def raw_scores(model, seqs: list[list[int]], prompt_lens: list[int], pad_id: int, batch_size: int,
               device, only: list[int] | None = None) -> torch.Tensor:
    """Raw reward of each sequence (or of those in `only`; NaN elsewhere), (N,), in table order;
    `batch_size` sequences per forward, taken in prompt order so one prompt's answers share a pack."""
    out = torch.full((len(seqs),), float("nan"))
    order = sorted(range(len(seqs)) if only is None else set(only),
                   key=lambda i: (seqs[i][:prompt_lens[i]], len(seqs[i])))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        packed = pack([seqs[i] for i in chunk], [prompt_lens[i] for i in chunk], pad_id)
        out[chunk] = packed_rewards(model, model.score, packed.to(device)).cpu()
    return out


def pair_metrics(r: torch.Tensor, enc: Encoded, use_margin: bool) -> tuple[float, float, float]:
    """(accuracy, mean Bradley-Terry loss, effective number of pairs) of pairs scored by a table
    of raw rewards, each pair counting its weight; the effective number (sum w)^2 / sum w^2 is
    what the gates' interval on the accuracy rests on."""
    r_c, r_r = r[enc.chosen], r[enc.rejected]
    margin = torch.tensor(enc.margin) if use_margin else torch.zeros(len(enc.chosen))
    w = torch.tensor(enc.weight, dtype=torch.float)
    mean = lambda x: ((x * w).sum() / w.sum()).item()
    return (mean((r_c > r_r).float()), mean(-F.logsigmoid(r_c - r_r - margin)),
            (w.sum() ** 2 / (w ** 2).sum()).item())


def normalise(model, r_references: torch.Tensor) -> tuple[float, float]:
    """Set reward_bias/reward_scale in the model's config so references score mean 0, std 1."""
    bias = r_references.mean().item()
    scale = r_references.std().item() if len(r_references) > 1 else 1.0
    scale = scale if math.isfinite(scale) and scale > 1e-6 else 1.0  # all equal: only shift
    model.config.reward_bias, model.config.reward_scale = bias, scale
    return bias, scale


# --- training -------------------------------------------------------------------------------

def train(cfg: RewardConfig, model, tokenizer, pairs: list[TrainingPair],
          references: list[tuple[list[dict], str]] | None = None) -> dict:
    """Train `model` (from `load_for_training`) in place on `pairs`, then normalise it so that
    `references` [(prompt messages, answer)] score mean 0, std 1 (default: every answer in the
    training pairs; InstructGPT normalises on demonstrations, so pass those when there are).
    Returns metrics; raises ValueError when there is nothing to train on."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    model.config.pad_token_id = tokenizer.pad_token_id
    check_pad(tokenizer)  # the last real token (the end of turn) is found by pad
    disable_dropout(model)

    train_pairs, heldout_pairs = split_pairs(pairs, cfg.heldout_frac, cfg.seed)
    if not train_pairs:
        raise ValueError(f"no training pairs ({len(pairs)} pairs, {len(heldout_pairs)} held out)")
    max_length = cfg.max_length or context_length(model.config) or 1024
    encoder = Encoder(tokenizer, max_length)
    train_enc = encode_pairs(encoder, train_pairs)
    heldout_enc = encode_pairs(encoder, heldout_pairs)

    head = model.score  # the scalar head, read per token by `packed_rewards`; taken before DDP wraps the model
    fp32_trainable(model)
    optimizer = adamw(model, cfg.lr, cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    fit = train_epochs(cfg, model, head, optimizer, accelerator, train_enc, rng, tokenizer.pad_token_id)
    train_seconds = time.time() - t0
    model = accelerator.unwrap_model(model)
    model.eval()

    metrics = heldout_metrics(cfg, model, encoder, heldout_enc, tokenizer.pad_token_id, accelerator.device)
    # Normalise on the references: raw rewards are only defined up to a shift (the BT loss sees
    # differences), and PPO wants them on a known scale.
    bias, scale, n_references = normalise_on(cfg, model, tokenizer, encoder, train_enc, references,
                                             accelerator.device)
    n_train, seen = len(train_pairs), fit["pairs_seen"]
    metrics.update({
        "reward/loss": fit["loss"],  # last epoch, mean BT loss per pair
        "reward/train_accuracy": fit["accuracy"],  # last epoch, before each step
        "reward/center_loss": fit["center_loss"],  # last epoch, mean squared raw reward
        **data_metrics(pairs, train_pairs, heldout_pairs, train_enc, encoder),
        "reward/steps": fit["steps"],
        "reward/sequences_per_pair": round(fit["sequences"] / seen, 4),  # 2 without shared answers
        "reward/tokens_per_pair": round(fit["tokens"] / seen, 2),  # packed, padding included
        "reward/pairs_per_second": round(n_train * cfg.epochs / train_seconds, 2),
        "reward/bias": bias,
        "reward/scale": scale,
        "reward/references": n_references,
        "reward/seconds": round(time.time() - t0, 2),
        "reward/curve": fit["curve"],
        "reward/curve_accuracy": fit["curve_accuracy"],
        "reward/config": asdict(cfg),
    })
    return metrics


def train_epochs(cfg: RewardConfig, model, head, optimizer, accelerator, enc: Encoded, rng: random.Random,
                 pad_id: int) -> dict:
    """`cfg.epochs` passes over the training pairs, one optimizer step per batch of whole groups.
    Returns the last epoch's mean loss, accuracy and centering loss, the per-step curves and the
    counts behind the throughput metrics."""
    # Each epoch's batches are dealt round-robin to the processes (one process: all of them).
    epoch_batches = [make_batches(enc, cfg.batch_size, rng) for _ in range(cfg.epochs)]
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(epoch_batches[0]) / world)
    total = cfg.epochs * steps_per_epoch
    model.train()
    curve, curve_acc, step, sequences, pairs_seen, tokens = [], [], 0, 0, 0, 0
    bar = tqdm(total=total, desc="reward", disable=not on_terminal() or not accelerator.is_main_process,
               leave=False)
    for epoch, batches in enumerate(epoch_batches):
        epoch_loss = epoch_correct = epoch_pairs = epoch_center = 0.0
        for k in range(steps_per_epoch):
            b = batches[(k * world + rank) % len(batches)]
            batch = [t.to(accelerator.device) for t in batch_tensors(enc, b, pad_id)]
            set_lr(optimizer, warmup_cosine(step, total, cfg.lr, cfg.warmup_frac))
            loss, r, correct, pair_loss, center = train_step(cfg, model, head, optimizer, accelerator, *batch)

            curve.append(round(loss.item(), 4))
            curve_acc.append(round(correct / len(b), 4))
            epoch_loss, epoch_center = epoch_loss + pair_loss.sum().item(), epoch_center + center.item()
            epoch_correct, epoch_pairs = epoch_correct + correct, epoch_pairs + len(b)
            sequences, pairs_seen = sequences + len(r), pairs_seen + len(b)
            tokens += batch[0].input_ids.numel()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.3f}", acc=f"{epoch_correct / epoch_pairs:.2f}")
        if not on_terminal() and accelerator.is_main_process:
            log.info("reward epoch %d/%d loss %.4f accuracy %.3f", epoch + 1, cfg.epochs,
                     epoch_loss / epoch_pairs, epoch_correct / epoch_pairs)
    bar.close()
    return {"loss": epoch_loss / epoch_pairs, "accuracy": epoch_correct / epoch_pairs,
            "center_loss": epoch_center / steps_per_epoch, "steps": step, "sequences": sequences,
            "pairs_seen": pairs_seen, "tokens": tokens, "curve": curve, "curve_accuracy": curve_acc}


def train_step(cfg: RewardConfig, model, head, optimizer, accelerator, packed: Packed, chosen, rejected,
               margin, group, weight) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch: Bradley-Terry loss + center_coef * centering loss.
    Returns (loss, rewards (S,), pairs ranked right, per-pair loss (P,), centering loss)."""
    r = packed_rewards(model, head, packed)  # (S,) one reward per distinct sequence
    r_chosen, r_rejected = r[chosen], r[rejected]  # (P,)
    bt_loss, pair_loss = preference_loss(r_chosen, r_rejected,
                                         margin if cfg.use_margin else torch.zeros_like(margin), group, weight)
    center = center_loss(r)
    loss = bt_loss + cfg.center_coef * center
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, r, (r_chosen > r_rejected).sum().item(), pair_loss, center


def heldout_metrics(cfg: RewardConfig, model, encoder: Encoder, heldout_enc: Encoded, pad_id: int,
                    device) -> dict:
    """Accuracy and loss on the held-out pairs: prompts the model never saw in training."""
    if not heldout_enc.chosen:
        return {"reward/heldout_accuracy": None, "reward/heldout_loss": None, "reward/heldout_effective_pairs": 0.0}
    r_held = raw_scores(model, encoder.seqs, encoder.prompt_lens, pad_id, cfg.eval_batch_size, device,
                        only=heldout_enc.chosen + heldout_enc.rejected)
    acc, held_loss, n_eff = pair_metrics(r_held, heldout_enc, cfg.use_margin)
    return {"reward/heldout_accuracy": acc, "reward/heldout_loss": held_loss,
            "reward/heldout_effective_pairs": n_eff}


def normalise_on(cfg: RewardConfig, model, tokenizer, encoder: Encoder, train_enc: Encoded,
                 references: list[tuple[list[dict], str]] | None, device) -> tuple[float, float, int]:
    """`normalise` on the references (default: every distinct answer of the training pairs);
    returns (bias, scale, how many distinct references)."""
    if references is None:
        ref_enc, ref_idx = encoder, sorted(set(train_enc.chosen + train_enc.rejected))
    else:
        ref_enc = Encoder(tokenizer, encoder.max_length)
        ref_idx = sorted(set(ref_enc.add(references)))  # each distinct reference counts once
    r_ref = raw_scores(model, ref_enc.seqs, ref_enc.prompt_lens, tokenizer.pad_token_id, cfg.eval_batch_size,
                       device, only=ref_idx)[ref_idx]
    return (*normalise(model, r_ref), len(ref_idx))


def data_metrics(pairs: list[TrainingPair], train_pairs: list[TrainingPair], heldout_pairs: list[TrainingPair],
                 train_enc: Encoded, encoder: Encoder) -> dict:
    """What the reward model was trained on: pairs per source, the split, groups, truncation."""
    sources: dict[str, int] = {}
    for p in pairs:
        sources[p.source] = sources.get(p.source, 0) + 1
    return {
        **{f"reward/pairs_{s}": n for s, n in sorted(sources.items())},
        "reward/pairs": len(pairs),
        "reward/pairs_train": len(train_pairs),
        "reward/pairs_heldout": len(heldout_pairs),
        "reward/prompts_train": len({p.prompt_hash for p in train_pairs}),
        "reward/prompts_heldout": len({p.prompt_hash for p in heldout_pairs}),
        "reward/groups": len(set(train_enc.group)),
        "reward/sequences_truncated": encoder.truncated,
    }


# --- checkpoint -----------------------------------------------------------------------------

def save(model, tokenizer, out_dir: str | Path, cfg: RewardConfig, metrics: dict) -> dict:
    """Publish the trained model at `out_dir` (staged, hashed, renamed: all or nothing); returns
    the manifest. Per-step curves stay in the metrics (the training run), not in the manifest.
    With several processes, call it on the main one only."""
    summary = {k: v for k, v in metrics.items() if not k.startswith("reward/curve") and k != "reward/config"}
    # the model's config.json carries pad_token_id, reward_bias, reward_scale
    return save_pretrained(model, tokenizer, out_dir, kind="reward", config=asdict(cfg), metrics=summary)


def load_reward_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer) ready to `score`: eval mode, on `device`."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(resolve_device(device)).eval(), tokenizer


def score(model, tokenizer, prompts: list[list[dict]], answers: list[str], batch_size: int = 64
          ) -> torch.Tensor:
    """Normalised reward of each (prompt, answer), (N,) on the CPU: (raw - reward_bias) / reward_scale.
    An answer is scored as the model was trained, i.e. as a finished turn: answer + EOS."""
    max_length = context_length(model.config) or 1024
    encoder = Encoder(tokenizer, max_length)
    idx = encoder.add(list(zip(prompts, answers)))  # equal (prompt, answer)s are scored once
    device = next(model.parameters()).device
    r = raw_scores(model, encoder.seqs, encoder.prompt_lens, tokenizer.pad_token_id, batch_size, device)[idx]
    return (r - getattr(model.config, "reward_bias", 0.0)) / getattr(model.config, "reward_scale", 1.0)

