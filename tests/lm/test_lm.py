"""lm/: the chat encoding, the context length, the decoding loop and both samplers, on a tiny
random GPT-2 (no checkpoint needed)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig

from lm.chat import as_messages, context_length, encode_prompt
from lm.decoding import generate, left_pad, position_ids, prefill
from lm.detokenize import Detokenizer
from lm.sampling import draw, sample_batch, sample_rows
from trainer.tokenizer import build_tokenizer

TEXTS = ["Hello there, how are you?", "The sky is blue because of scattering.", "Cats sleep a lot."] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def test_encode_prompt_takes_text_or_a_conversation(tokenizer):
    ids = encode_prompt(tokenizer, "Hi")
    assert ids == encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids) == "<|user|>Hi<|end|><|assistant|>"
    assert as_messages("Hi") == [{"role": "user", "content": "Hi"}]


def test_context_length_reads_either_name():
    assert context_length(GPT2Config(n_positions=96)) == 96
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == 4096
    assert context_length(object()) is None


def test_left_pad_and_positions_count_real_tokens_only():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_generate_with_the_cache_matches_recomputing_every_step(model, tokenizer):
    """Greedy through the KV-cached loop equals greedy by re-running the whole left-padded
    sequence each step: the cache, growing mask and positions add nothing but speed."""
    prompts = [encode_prompt(tokenizer, p) for p in ("Hi", "Why is the sky blue?", "Cats")]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    cached = []

    def step(logits):  # (B, V) -> (B,)
        cached.append(logits.argmax(-1))
        return None if len(cached) == 8 else cached[-1]

    generate(model, ids, mask, step)
    full_ids, full_mask, plain = ids, mask, []
    with torch.no_grad():
        for _ in range(8):
            logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
            plain.append(logits[:, -1].argmax(-1))
            full_ids = torch.cat([full_ids, plain[-1][:, None]], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
    assert torch.stack(cached, 1).tolist() == torch.stack(plain, 1).tolist()


def test_rows_joining_leaving_and_copied_decode_as_they_would_alone(model, tokenizer):
    """A batch that takes rows in mid-flight (narrower than itself), copies a row (n choices of
    one prompt) and loses rows gives every row the greedy tokens it gets alone."""
    prompts = [encode_prompt(tokenizer, p) for p in ("Why is the sky blue?", "Hi", "Cats sleep a lot.")]

    def alone(prompt, steps):
        logits, batch = prefill(model, *left_pad([prompt], tokenizer.pad_token_id))
        out = []
        for _ in range(steps):
            out.append(int(logits.argmax(-1)))
            logits = batch.step(model, logits.argmax(-1))
        return out

    got = {0: [], 1: [], 2: [], 3: []}
    logits, batch = prefill(model, *left_pad([prompts[0]], tokenizer.pad_token_id))
    rows = [0]
    for step in range(10):
        if step == 2:  # a shorter prompt joins: it is padded to the batch's width
            joined, other = prefill(model, *left_pad([prompts[1]], tokenizer.pad_token_id))
            batch.extend(other)
            logits, rows = torch.cat([logits, joined]), rows + [1]
        if step == 4:  # another joins, with two choices: one prefill row, copied
            joined, other = prefill(model, *left_pad([prompts[2]], tokenizer.pad_token_id))
            other.take([0, 0])
            batch.extend(other)
            logits, rows = torch.cat([logits, joined, joined]), rows + [2, 3]
        if step == 7:  # the first, widest row leaves: the columns only it used go with it
            batch.take([1, 2, 3])
            logits, rows = logits[1:], rows[1:]
        tokens = logits.argmax(-1)
        for r, t in zip(rows, tokens.tolist()):
            got[r].append(t)
        logits = batch.step(model, tokens)
    assert got[0] == alone(prompts[0], 7)
    assert got[1] == alone(prompts[1], 8)
    assert got[2] == got[3] == alone(prompts[2], 6)
    assert batch.width == len(prompts[2]) + 6  # as wide as its longest row now


def test_sample_rows_replays_a_seed():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    mixed, _ = sample_rows(logits, [0.0, 1.0, 0.7], [1.0, 0.9, 1.0], gens())
    assert mixed[0] == int(logits[0].argmax())
    assert mixed == sample_rows(logits, [0.0, 1.0, 0.7], [1.0, 0.9, 1.0], gens())[0]
    # A row draws the same alone as beside others, whatever their temperatures and nuclei: with
    # continuous batching its batch-mates change from step to step.
    for i in range(3):
        alone, _ = sample_rows(logits[i:i + 1], [[0.0, 1.0, 0.7][i]], [[1.0, 0.9, 1.0][i]], gens()[i:i + 1])
        assert mixed[i] == alone[0]
    # ... and as `torch.multinomial` draws with that generator: seeds give what they gave before.
    probs = torch.softmax(logits[2] / 0.7, -1)
    assert mixed[2] == int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)))


def test_rows_without_a_seed_draw_from_the_shared_generator():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded, _ = sample_rows(logits, [0.0, 1.0, 0.7], [1.0, 0.9, 1.0], [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    shared = lambda: torch.Generator().manual_seed(5)
    mixed = lambda: sample_rows(logits, [0.0, 1.0, 0.7], [1.0, 0.9, 1.0],
                                [None, None, torch.Generator().manual_seed(3)], shared=shared())[0]
    got = mixed()
    assert got[0] == int(logits[0].argmax())  # greedy stays greedy
    assert got[2] == seeded[2]  # a seeded row draws as it does beside other seeded rows
    assert got == mixed()  # the shared generator's state decides the unseeded rows
    # an unseeded nucleus row draws inside its nucleus
    probs = torch.softmax(logits[1], -1)
    nucleus = set(probs.argsort(descending=True)[:int((probs.sort(descending=True).values.cumsum(0) < 0.9).sum()) + 1].tolist())
    draws = {sample_rows(logits[1:2], [1.0], [0.9], [None], shared=torch.Generator().manual_seed(s))[0][0] for s in range(40)}
    assert draws <= nucleus and len(draws) > 1


def test_answer_text_is_the_whole_answer_decoded(tokenizer):
    import random
    detok = Detokenizer(tokenizer)
    assert detok.incremental
    rng = random.Random(0)
    for _ in range(40):  # random tokens: special ones, and bytes that end mid-character
        answer, tokens = detok.answer(), []
        for _ in range(rng.randint(1, 30)):
            tokens.append(rng.randrange(len(tokenizer)))
            assert answer.add(tokens[-1]) == tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        assert answer.final() == tokenizer.decode(tokens, skip_special_tokens=True)


def test_sample_batch_logprobs_are_of_the_tempered_distribution():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    token, lp = sample_batch(logits, 0.5, torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits / 0.5, -1).gather(1, token[:, None]).squeeze(1)
    assert torch.allclose(lp, expected)
    greedy, _ = sample_batch(logits, 0.0)
    assert greedy.tolist() == logits.argmax(-1).tolist()


def test_draw_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.9]]).expand(20000, 3)
    counts = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=3)
    assert counts[1] == 0 and abs(counts[2].item() / 20000 - 0.9) < 0.01
