"""Supervised fine-tuning: the loss sees answer tokens only, and a handful of new demonstrations
is learned well enough that greedy decoding reproduces them."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.bootstrap import BootstrapConfig, new_policy
from schemas.bundled import bundled_demonstrations
from lm.chat import encode_prompt
from lm.decoding import left_pad
from trainer.rollout import decode, sample
from trainer.sft import IGNORE, SFTConfig, answer_loss, collate, encode_demonstration, train
from trainer.tokenizer import build_tokenizer

# Facts the bundled demonstrations do not contain, so the bootstrap policy cannot know them.
NEW = [
    {"prompt": "What is the secret word?", "completion": "The secret word is marmalade."},
    {"prompt": "Who built the lighthouse?", "completion": "Captain Ada built the lighthouse in 1802."},
    {"prompt": "Name the three moons of Zorb.", "completion": "They are Pim, Tok and Vell."},
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Best fruit?"}],
     "completion": "Quince."},
]


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # two cores, shared with other tests and engineers


@pytest.fixture(scope="module")
def tokenizer():
    demos = bundled_demonstrations()
    return build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos])


def test_labels_cover_the_answer_and_eos_only(tokenizer):
    ids, labels = encode_demonstration(tokenizer, "Hi there", "Hello! How can I help?")
    prompt = encode_prompt(tokenizer, "Hi there")
    answer = tokenizer("Hello! How can I help?", add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [tokenizer.eos_token_id]
    assert labels == [IGNORE] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert tokenizer.decode(prompt) == "<|user|>Hi there<|end|><|assistant|>"


def test_collate_pads_right_and_masks_padding_out_of_the_loss(tokenizer):
    a = encode_demonstration(tokenizer, "Hi", "Hello!")
    b = encode_demonstration(tokenizer, "What is 2 plus 2?", "2 plus 2 is 4.")
    ids, mask, labels = collate([a, b], tokenizer.pad_token_id)  # (B, T)
    width = max(len(a[0]), len(b[0]))
    assert ids.shape == mask.shape == labels.shape == (2, width)
    assert ids[0, len(a[0]):].eq(tokenizer.pad_token_id).all() and mask[0, len(a[0]):].eq(0).all()
    assert labels[0, len(a[0]):].eq(IGNORE).all() and mask[1].eq(1).all()
    assert labels[1].tolist() == b[1]


def test_answer_loss_is_the_mean_cross_entropy_over_answer_tokens(tokenizer):
    torch.manual_seed(0)
    model = new_policy(BootstrapConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), tokenizer)
    batch = [encode_demonstration(tokenizer, d["prompt"], d["completion"]) for d in bundled_demonstrations()[:3]]
    ids, mask, labels = collate(batch, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    # By hand: position t predicts token t + 1; only answer and EOS targets count.
    target = labels[:, 1:]
    keep = target != IGNORE
    by_hand = F.cross_entropy(logits[:, :-1][keep], target[keep])
    assert keep.sum() == sum(sum(1 for y in lab if y != IGNORE) for _, lab in batch)
    assert torch.allclose(answer_loss(model, ids, mask, labels), by_hand, atol=1e-5)
    # Changing a prompt token's label cannot matter: prompts are never targets.
    assert labels[0, 0] == IGNORE


def greedy(model, tokenizer, prompts, max_new_tokens=24) -> list[str]:
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    s = sample(model, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0,
               end_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    assert s.has_eos.all(), "a learned answer ends with EOS"
    return decode(tokenizer, s.responses, s.response_mask)


@pytest.mark.slow
def test_sft_makes_the_policy_reproduce_new_demonstrations(policy_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    model = AutoModelForCausalLM.from_pretrained(policy_path)
    prompts, answers = [d["prompt"] for d in NEW], [d["completion"] for d in NEW]
    before = greedy(model, tokenizer, prompts)
    assert not any(b == a for b, a in zip(before, answers))

    metrics = train(SFTConfig(epochs=40, batch_size=4, lr=1e-3, device="cpu"), model, tokenizer, NEW)
    assert metrics["sft/steps"] == 40 and metrics["sft/curve"][-1] < metrics["sft/curve"][0] / 10

    model.save_pretrained(tmp_path)  # and back: what serving would load
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert greedy(reloaded, AutoTokenizer.from_pretrained(tmp_path), prompts) == answers
