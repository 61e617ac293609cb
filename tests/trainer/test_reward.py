"""The reward-model trainer: split, batching, scoring position, loss by hand, a known rule learned
end to end, and an all-or-nothing save."""
import hashlib
import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from schemas.checkpoint import read_manifest
from schemas.records import TrainingPair
from trainer import reward as R
from trainer.bootstrap import BootstrapConfig, new_policy
from schemas.bundled import bundled_demonstrations, bundled_prompts
from trainer.tokenizer import build_tokenizer

WORD = "banana"  # the synthetic users' rule: they prefer the answer that mentions it


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # two cores, shared with other tests and engineers


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random policy saved like a real one, so training goes through `from_pretrained`."""
    torch.manual_seed(0)
    demos = bundled_demonstrations()
    tokenizer = build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos])
    model = new_policy(BootstrapConfig(n_layer=2, n_head=2, n_embd=64, n_positions=128), tokenizer)
    out = tmp_path_factory.mktemp("policy")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pair(prompt: str, chosen: str, rejected: str, *, source="pairwise", group=None, margin=0.0):
    h = hashlib.sha256(prompt.encode()).hexdigest()[:16]
    return TrainingPair(prompt=[{"role": "user", "content": prompt}], chosen=chosen, rejected=rejected,
                        margin=margin, source=source, prompt_hash=h, group=group or h)


def synthetic_pairs(n_prompts: int, seed: int = 0) -> list[TrainingPair]:
    """Users who prefer answers mentioning WORD, giving feedback three ways: a pairwise choice, a
    ranking of four answers (two with the word tied above two without: 4 pairs in one group),
    and thumbs (one up, two down: 2 pairs)."""
    rng = random.Random(seed)
    demos = bundled_demonstrations()
    prompts = [d["prompt"] for d in demos] + bundled_prompts()
    rng.shuffle(prompts)
    answers = [d["completion"] for d in demos if WORD not in d["completion"]]

    def liked() -> str:  # a plain answer with the word put somewhere inside
        words = rng.choice(answers).split(" ")
        words.insert(rng.randrange(len(words) + 1), WORD)
        return " ".join(words)

    pairs = []
    for i, prompt in enumerate(prompts[:n_prompts]):
        if i % 3 == 0:
            pairs.append(pair(prompt, liked(), rng.choice(answers), source="pairwise"))
        elif i % 3 == 1:
            good, bad = [liked(), liked()], [rng.choice(answers), rng.choice(answers)]
            pairs += [pair(prompt, g, b, source="ranking", group=f"ranking-{i}") for g in good for b in bad]
        else:
            up = liked()
            pairs += [pair(prompt, up, rng.choice(answers), source="thumbs", group=f"thumbs-{i}")
                      for _ in range(2)]
    return pairs


# --- data -----------------------------------------------------------------------------------

def test_split_keeps_each_prompt_on_one_side_and_is_stable():
    pairs = [pair(f"prompt {i % 60}", f"good {i}", f"bad {i}") for i in range(300)]
    train, held = R.split_pairs(pairs, 0.2, seed=0)
    assert len(train) + len(held) == len(pairs)
    assert not {p.prompt_hash for p in train} & {p.prompt_hash for p in held}
    assert 0.05 < len({p.prompt_hash for p in held}) / 60 < 0.4
    # deterministic, and a prompt does not change sides when more data arrives later
    assert R.split_pairs(list(reversed(pairs)), 0.2, seed=0)[1] == list(reversed(held))
    more = pairs + [pair(f"new prompt {i}", "a", "b") for i in range(50)]
    held_later = {p.prompt_hash for p in R.split_pairs(more, 0.2, seed=0)[1]}
    assert {p.prompt_hash for p in held} <= held_later
    # too few prompts for the fraction: still one held out, never all
    few = [pair("only a", "x", "y"), pair("only b", "x", "y")]
    assert [len(s) for s in R.split_pairs(few, 0.1)] == [1, 1]
    assert R.split_pairs(few, 0.0)[1] == []
    assert R.split_pairs(few[:1], 0.99) == (few[:1], [])  # one prompt: trained on, not held out


def test_groups_stay_in_one_batch(policy_dir):
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rng = random.Random(1)
    pairs = []
    for g in range(40):  # groups of 1 to 10 pairs (rankings of up to K=5)
        pairs += [pair(f"p{g}", f"c{g} {j}" * rng.randint(1, 9), f"r{g} {j}", group=f"g{g}")
                  for j in range(rng.choice([1, 3, 6, 10]))]
    enc = R.encode_pairs(R.Encoder(tokenizer, 128), pairs)
    batches = R.make_batches(enc, batch_size=8, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(len(pairs)))  # each pair once
    batch_of = {}
    for k, b in enumerate(batches):
        for i in b:
            assert batch_of.setdefault(enc.group[i], k) == k, "a group was split across batches"
        assert len(b) <= 8 or len({enc.group[i] for i in b}) == 1
    # a batch runs each distinct (prompt, answer) once, and each pair points at its own two
    for b in batches:
        packed, chosen, rejected, margin, group, _ = R.batch_tensors(enc, b, tokenizer.pad_token_id)
        distinct = {enc.chosen[i] for i in b} | {enc.rejected[i] for i in b}
        assert len(packed.rows) == len(distinct)
        ends = packed.input_ids[packed.rows, packed.cols]
        assert (ends == tokenizer.eos_token_id).all()
        names = [enc.group[i] for i in b]  # one index per group, the same for all its pairs
        assert len(set(zip(group.tolist(), names))) == len(set(names)) == int(group.max()) + 1


# --- model and loss -------------------------------------------------------------------------

def test_padding_side_does_not_change_the_score(policy_dir):
    model, tokenizer = R.load_for_training(policy_dir)
    model.eval()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    enc = R.Encoder(tokenizer, 128)
    seqs = [enc.seqs[i] for i in enc.add([([{"role": "user", "content": "Hi"}], "Hello!"),
                                          ([{"role": "user", "content": "What is 2 plus 2?"}],
                                           "2 plus 2 is 4, and 4 plus 4 is 8.")])]
    assert all(s[-1] == tokenizer.eos_token_id for s in seqs)
    assert len(seqs[0]) < len(seqs[1])
    with torch.no_grad():
        alone = torch.cat([R.rewards(model, *R.collate([s], tokenizer.pad_token_id)) for s in seqs])
        right = R.rewards(model, *R.collate(seqs, tokenizer.pad_token_id, "right"))
        left = R.rewards(model, *R.collate(seqs, tokenizer.pad_token_id, "left"))
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    assert alone[0] != alone[1]
    # the public scorer agrees, one by one or batched (no normalisation yet: bias 0, scale 1)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What is 2 plus 2?"}]]
    answers = ["Hello!", "2 plus 2 is 4, and 4 plus 4 is 8."]
    torch.testing.assert_close(R.score(model, tokenizer, prompts, answers), alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.score(model, tokenizer, prompts, answers, batch_size=1), alone,
                               rtol=1e-5, atol=1e-5)


def test_packing_shares_prompts_without_changing_any_score(policy_dir):
    """Training and scoring pack each prompt once with its answers after it; every score must
    equal the sequence's score when it runs alone."""
    model, tokenizer = R.load_for_training(policy_dir)
    model.eval()
    rng = random.Random(0)
    answers = [d["completion"] for d in bundled_demonstrations()[:40]]
    prompts = [[{"role": "user", "content": p}] for p in ("Hi", "What is the capital of France?",
                                                          "Tell me a long story about a cat.")]
    items = [(p, rng.choice(answers)) for p in prompts for _ in range(4)]
    items += [(prompts[0], a) for a in answers[:9]]  # more answers than fit one row: split blocks
    items += [(prompts[1], " ".join(answers[:4]))]  # longer than max_length on its own
    enc = R.Encoder(tokenizer, max_length=32)  # some get their prompt cut, some lose it entirely
    idx = enc.add(items)
    assert enc.truncated > 0 and 0 in enc.prompt_lens
    seqs, plens = [enc.seqs[i] for i in idx], [enc.prompt_lens[i] for i in idx]
    packed = R.pack(seqs, plens, tokenizer.pad_token_id)
    assert len(packed.input_ids) < len(seqs)  # rows hold several sequences
    assert packed.input_ids.numel() < sum(len(s) for s in seqs)  # shared prompts: fewer tokens
    with torch.no_grad():
        together = R.packed_rewards(model, model.score, packed)
        alone = torch.cat([R.rewards(model, *R.collate([s], tokenizer.pad_token_id)) for s in seqs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # eager attention takes the mask as additive floats: same scores
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(R.packed_rewards(model, model.score, packed), alone, rtol=1e-4, atol=1e-4)


def test_bradley_terry_and_centering_by_hand():
    r_chosen, r_rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    margin = torch.tensor([0.0, 0.5, 0.0])
    # -log(sigmoid(d)) = log(1 + exp(-d)) for d = 1, -1.5, 0
    expected = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.5)), math.log(2.0)]
    assert [round(x, 4) for x in expected] == [0.3133, 1.7014, 0.6931]
    # each pair its own group: the plain mean
    loss, per_pair = R.preference_loss(r_chosen, r_rejected, margin, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(per_pair, torch.tensor(expected))
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    # the first two pairs are one ranking: it weighs as one element, like the third pair
    loss, _ = R.preference_loss(r_chosen, r_rejected, margin, torch.tensor([0, 0, 1]))
    assert loss.item() == pytest.approx(((expected[0] + expected[1]) / 2 + expected[2]) / 2, abs=1e-6)
    # weights scale each pair's term, not renormalised: an older pair at half weight counts half
    loss, _ = R.preference_loss(r_chosen, r_rejected, margin, torch.tensor([0, 1, 2]), torch.tensor([1.0, 0.5, 0.0]))
    assert loss.item() == pytest.approx((expected[0] + 0.5 * expected[1]) / 3, abs=1e-6)
    # centering: mean of squared rewards, (1 + 4 + 9) / 3
    assert R.center_loss(torch.tensor([1.0, -2.0, 3.0])).item() == pytest.approx(14 / 3)
    # the gradient pushes chosen up and rejected down
    rc, rr = torch.tensor([0.0], requires_grad=True), torch.tensor([0.0], requires_grad=True)
    R.preference_loss(rc, rr, torch.zeros(1), torch.zeros(1, dtype=torch.long))[0].backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_nothing_to_train_on_is_a_clear_error(policy_dir):
    model, tokenizer = R.load_for_training(policy_dir)
    with pytest.raises(ValueError, match="no training pairs"):
        R.train(R.RewardConfig(device="cpu"), model, tokenizer, [])


# --- end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_learns_a_known_rule_and_saves_a_loadable_normalised_checkpoint(policy_dir, tmp_path):
    pairs = synthetic_pairs(240)
    model, tokenizer = R.load_for_training(policy_dir)
    cfg = R.RewardConfig(epochs=4, batch_size=32, heldout_frac=0.2, device="cpu", seed=0)
    metrics = R.train(cfg, model, tokenizer, pairs)

    assert metrics["reward/heldout_accuracy"] >= 0.9, metrics
    assert metrics["reward/pairs_heldout"] >= 50
    assert metrics["reward/train_accuracy"] >= 0.9
    counts = {s: sum(p.source == s for p in pairs) for s in ("pairwise", "ranking", "thumbs")}
    assert {s: metrics[f"reward/pairs_{s}"] for s in counts} == counts
    assert metrics["reward/pairs_train"] + metrics["reward/pairs_heldout"] == len(pairs)
    assert metrics["reward/sequences_per_pair"] < 2  # shared answers ran once per batch
    assert len(metrics["reward/curve"]) == metrics["reward/steps"]
    assert metrics["reward/curve"][-1] < metrics["reward/curve"][0]
    json.dumps(metrics)  # goes into a jsonb column as it is

    out = tmp_path / "reward-v2"
    manifest = R.save(model, tokenizer, out, cfg, metrics)
    assert manifest["kind"] == "reward" and read_manifest(out)["content_hash"] == manifest["content_hash"]
    assert manifest["config"]["center_coef"] == cfg.center_coef

    # Any loader: plain transformers, with the normalisation read from config.json.
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tok.pad_token_id
    # The default references: every answer of the training pairs.
    train_pairs = R.split_pairs(pairs, cfg.heldout_frac, cfg.seed)[0]
    references = sorted({(json.dumps(p.prompt), a) for p in train_pairs for a in (p.chosen, p.rejected)})
    prompts, answers = [json.loads(p) for p, _ in references], [a for _, a in references]
    assert metrics["reward/references"] == len(references)
    enc = R.Encoder(tok, 128)
    with torch.no_grad():
        raw = torch.cat([R.rewards(loaded, *R.collate([enc.seqs[i]], tok.pad_token_id))
                         for i in enc.add(list(zip(prompts, answers)))])
    normalised = (raw - loaded.config.reward_bias) / loaded.config.reward_scale
    assert abs(normalised.mean().item()) < 1e-3 and abs(normalised.std().item() - 1) < 1e-3

    # Our loader and scorer give the same normalised scores, and they carry the rule.
    rm, rm_tok = R.load_reward_model(out, "cpu")
    s = R.score(rm, rm_tok, prompts, answers, batch_size=16)
    torch.testing.assert_close(s, normalised, rtol=1e-4, atol=1e-4)
    q = [{"role": "user", "content": "Tell me something nice."}]
    liked, plain = R.score(rm, rm_tok, [q, q], [f"The sky is blue, {WORD}.", "The sky is blue."])
    assert liked > plain
    held = R.split_pairs(pairs, cfg.heldout_frac, cfg.seed)[1]
    r_c = R.score(rm, rm_tok, [p.prompt for p in held], [p.chosen for p in held])
    r_r = R.score(rm, rm_tok, [p.prompt for p in held], [p.rejected for p in held])
    assert (r_c > r_r).float().mean().item() == pytest.approx(metrics["reward/heldout_accuracy"])

    # Continuing from this reward model keeps its trained head (no fresh init).
    again, again_tok = R.load_for_training(out)
    torch.testing.assert_close(again.score.weight, loaded.score.weight)


@pytest.mark.slow
def test_normalises_on_given_references(policy_dir):
    pairs = synthetic_pairs(60, seed=1)
    model, tokenizer = R.load_for_training(policy_dir)
    demos = bundled_demonstrations()[:50]
    references = [([{"role": "user", "content": d["prompt"]}], d["completion"]) for d in demos]
    metrics = R.train(R.RewardConfig(epochs=1, device="cpu"), model, tokenizer, pairs, references)
    assert metrics["reward/references"] == 50
    s = R.score(model, tokenizer, [p for p, _ in references], [a for _, a in references])
    assert abs(s.mean().item()) < 1e-3 and abs(s.std().item() - 1) < 1e-3


def test_a_crash_while_saving_leaves_nothing(policy_dir, tmp_path, monkeypatch):
    model, tokenizer = R.load_for_training(policy_dir)
    out = tmp_path / "checkpoints" / "reward-v3"

    def crash(*args, **kwargs):  # after the weights are written, before the tokenizer and manifest
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        R.save(model, tokenizer, out, R.RewardConfig(), {"reward/loss": 0.1})
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no staging directory left behind either
