"""PPO: the pieces against small hand-worked numbers (GAE, whitening, clipped losses, KL
estimators, the KL controller, per-token rewards), the sampler against Hugging Face's, prompt
selection, minibatch trimming; then, end to end on the bootstrap policy, that PPO learns a
property the policy rarely shows while the KL stays within budget, and that a large KL
coefficient holds the policy where it is."""
import dataclasses
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lm.chat import encode_prompt
from lm.decoding import left_pad
from trainer import ppo
from schemas.bundled import bundled_prompts
from trainer.rollout import decode, join, response_logits, response_values, sample
from trainer.common import publish_policy
from trainer.config import RoundConfig, with_overrides
from trainer.gates import GateConfig


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)  # two cores, shared with other tests and engineers


# --- GAE and whitening -------------------------------------------------------------------------

def test_gae_by_hand():
    # gamma 1, lambda 0.5. Row 0: reward only at the end, values 0.5:
    #   delta = [0, 0, 0.5]; A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0 + 0.5 * 0.25 = 0.125.
    # Row 1 ends after two tokens (column 2 is padding: its reward and value are ignored):
    #   delta1 = 2 - 1 = 1, delta0 = 0 + 1 - 1 = 0; A1 = 1, A0 = 0 + 0.5 * 1 = 0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [0.5, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [1.5, 2.0, 0.0]]))  # A + V


def test_gae_with_discount_and_lambda_one_is_the_discounted_return_minus_value():
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.3, -0.2, 0.1]])
    adv, ret = ppo.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=1.0)
    # lambda 1: A_t = sum_k gamma^k r_{t+k} - V_t; returns are the discounted returns.
    g = [1 + 0.9 * 0 + 0.81 * 2, 0 + 0.9 * 2, 2.0]
    assert torch.allclose(ret, torch.tensor([g]))
    assert torch.allclose(adv, torch.tensor([g]) - values)


def test_whitening_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Over 1, 2, 3, 4: mean 2.5, unbiased variance 5/3.
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    w = ppo.masked_whiten(x, mask)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-6)
    assert w[~mask.bool()].eq(0).all()
    assert torch.allclose(ppo.masked_whiten(x, mask, shift_mean=False)[mask.bool()], expected + 2.5, atol=1e-6)
    assert torch.isclose(ppo.masked_var(x, mask), torch.tensor(5 / 3))


# --- losses -----------------------------------------------------------------------------------------

def test_clipped_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1 with advantages 1, 1, -1 and clip 0.2:
    #   token 0: max(-1.5, -1.2) = -1.2 (clipped: no gradient pushes the ratio further up)
    #   token 1: max(-0.5, -0.8) = -0.5 (the pessimistic, unclipped term)
    #   token 2: max(1.1, 1.1) = 1.1
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = ppo.policy_loss(new, old, adv, torch.ones(1, 3), cliprange=0.2)
    assert torch.isclose(loss, torch.tensor((-1.2 - 0.5 + 1.1) / 3))
    assert torch.isclose(stats["ppo/clipfrac"], torch.tensor(1 / 3))
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1)]  # KL(old || new) estimate
    assert torch.isclose(stats["ppo/approx_kl"], torch.tensor(sum(k3) / 3))
    loss.backward()
    # d/dlogp of -A * ratio = -A * ratio; the clipped token gets none.
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.5, 1.1]]) / 3)


def test_policy_loss_ignores_masked_tokens():
    new, old = torch.tensor([[0.3, 5.0]]), torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -100.0]])
    loss, _ = ppo.policy_loss(new, old, adv, torch.tensor([[1, 0]]), cliprange=0.2)
    assert torch.isclose(loss, torch.tensor(-1.2))  # ratio e^0.3 = 1.35 clipped to 1.2


def test_clipped_value_loss_by_hand():
    # old values 0, returns 1, clip 0.2:
    #   token 0: vpred 0.5 -> clipped 0.2: max((0.5 - 1)^2, (0.2 - 1)^2) = 0.64
    #   token 1: vpred -0.1 within the clip: (1.1)^2 = 1.21
    vpred = torch.tensor([[0.5, -0.1]])
    loss, stats = ppo.value_loss(vpred, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), cliprange_value=0.2)
    assert torch.isclose(loss, torch.tensor(0.5 * (0.64 + 1.21) / 2))
    assert torch.isclose(stats["ppo/vf_clipfrac"], torch.tensor(0.5))


# --- KL -------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    # k1 = log p/q; k3 = (q/p - 1) - log(q/p)
    assert torch.allclose(ppo.kl_penalty(logp, ref, "k1"), torch.tensor([[math.log(2), -math.log(2)]]))
    assert torch.allclose(ppo.kl_penalty(logp, ref, "k3"),
                          torch.tensor([[-0.5 + math.log(2), 1 - math.log(2)]]))
    # Exact KL over a two-token vocabulary: p = (1/2, 1/2), q = (1/4, 3/4).
    exact = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = ppo.token_kl(torch.log(torch.tensor([[[0.5, 0.5]]])), torch.log(torch.tensor([[[0.25, 0.75]]])))
    assert torch.isclose(kl, torch.tensor([[exact]]))


def test_sampled_kl_estimators_are_unbiased():
    g = torch.Generator().manual_seed(0)
    p, q = torch.softmax(torch.randn(6, generator=g), 0), torch.softmax(torch.randn(6, generator=g), 0)
    exact = (p * (p / q).log()).sum()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[tokens], q.log()[tokens]
    for estimator in ("k1", "k3"):
        assert abs(ppo.kl_penalty(lp, lq, estimator).mean() - exact) < 0.01
    assert ppo.kl_penalty(lp, lq, "k3").min() >= 0


def test_token_rewards_put_the_score_on_the_last_answer_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = ppo.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.2 - 1.0, 0.0, 0.0]]))


def test_score_penalises_answers_without_eos():
    scores, penalised = ppo.score(lambda convs, answers: [1.0, 2.0], [[], []], ["a", "b"],
                                  torch.tensor([True, False]), missing_eos_penalty=1.5)
    assert scores.tolist() == [1.0, 2.0] and penalised.tolist() == [1.0, 0.5]


def test_adaptive_kl_controller_by_hand():
    ctl = ppo.AdaptiveKLController(kl_coef=0.1, target=4.0, horizon=32)
    ctl.update(current_kl=8.0, n_answers=16)  # error clipped to +0.2: beta *= 1 + 0.2 * 16/32
    assert math.isclose(ctl.value, 0.11)
    ctl.update(current_kl=4.4, n_answers=16)  # error 0.1: beta *= 1.05
    assert math.isclose(ctl.value, 0.1155)
    ctl.update(current_kl=0.0, n_answers=16)  # error -0.2: beta *= 0.9
    assert math.isclose(ctl.value, 0.10395)
    ctl.update(current_kl=0.0, n_answers=16)  # 0.093555 is below the initial beta: held there
    assert ctl.value == 0.1


def test_adaptive_kl_controller_continues_from_a_parents_beta_down_to_its_floor():
    ctl = ppo.AdaptiveKLController(kl_coef=0.1, target=4.0, horizon=32, start=0.3)
    assert ctl.value == 0.3
    for _ in range(20):
        ctl.update(current_kl=0.0, n_answers=16)
    assert ctl.value == 0.1
    assert ppo.AdaptiveKLController(kl_coef=0.1, target=4.0, horizon=32, start=0.01).value == 0.1


def test_config_derives_minibatch_size_and_refuses_ragged_minibatches():
    assert ppo.PPOConfig(batch_size=64, num_minibatches=4).minibatch_size == 16
    with pytest.raises(ValueError):
        ppo.PPOConfig(batch_size=10, num_minibatches=4)


def test_a_minibatch_drops_the_columns_all_its_rows_pad():
    # P = 3 prompt columns (left-padded) and R = 3 answer columns (right-padded).
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0],   # prompt of 2 tokens, answer of 2
                         [0, 0, 1, 1, 0, 0]])  # prompt of 1 token, answer of 1
    per_token = torch.arange(6.0).reshape(2, 3)
    b = ppo.Batch(ids, mask, ids[:, 3:], torch.tensor([[1, 1, 0], [1, 0, 0]]), per_token, per_token + 10,
                  per_token + 20, per_token + 30)
    mb = ppo._trim(b, torch.tensor([1]))  # row 1 alone: columns 2..3, one answer column
    assert isinstance(mb, ppo.Batch)
    assert (mb.ids.tolist(), mb.mask.tolist(), mb.position_ids.tolist()) == ([[8, 9]], [[1, 1]], [[0, 1]])
    assert (mb.responses.tolist(), mb.response_mask.tolist()) == ([[9]], [[1]])
    assert [getattr(mb, k).tolist() for k in ("logprobs", "values", "advantages", "returns")] == [
        [[3.0]], [[13.0]], [[23.0]], [[33.0]]]
    both = ppo._trim(b, torch.tensor([0, 1]))  # columns 1..4: row 0's prompt starts at 1, its answer has 2
    assert both.ids.tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert both.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 1, 1]]  # counted over real tokens
    assert both.returns.tolist() == [[30.0, 31.0], [33.0, 34.0]]


# --- prompts --------------------------------------------------------------------------------------

def test_prompts_for_ppo_dedupes_keeps_order_drops_long_and_tops_up(policy_path):
    tok = AutoTokenizer.from_pretrained(policy_path)
    u = lambda text: [{"role": "user", "content": text}]
    recorded = [
        u("newest question"),
        [{"role": "user", "content": [{"type": "text", "text": "newest "}, {"type": "text", "text": "question"}]}],
        u("word " * 200),  # too long
        u("older question"),
        u("newest question"),  # duplicate
        u("hi") + [{"role": "assistant", "content": "hello"}],  # ends with an answer: not a prompt
        [{"role": "system", "content": "be brief", "name": "x"}, {"role": "user", "content": "why?"}],
    ]
    got = ppo.prompts_for_ppo(recorded, tok, max_prompt_tokens=64, n=6)
    assert got[:3] == [u("newest question"), u("older question"),
                       [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}]]
    assert got[3:] == [u(p) for p in bundled_prompts()[:3]]  # topped up, in the bundled order
    assert len(ppo.prompts_for_ppo([], tok, 64, 10_000)) == len(set(bundled_prompts()))
    assert ppo.prompts_for_ppo(recorded, tok, 64, 2) == got[:2]


# --- sampling and re-scoring -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy(policy_path):
    return AutoModelForCausalLM.from_pretrained(policy_path).eval()


@pytest.fixture(scope="module")
def tokenizer(policy_path):
    return AutoTokenizer.from_pretrained(policy_path)


def test_batched_greedy_sampling_matches_hugging_face_generate_row_by_row(policy, tokenizer):
    prompts = ["Hi", "What is the capital of Spain?", "Tell me a story about a bird.", "How much is 5 plus 19?"]
    seqs = [encode_prompt(tokenizer, p) for p in prompts]
    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    s = sample(policy, ids, mask, max_new_tokens=20, temperature=0.0, end_ids=[tokenizer.eos_token_id],
               pad_id=tokenizer.pad_token_id)
    for i, seq in enumerate(seqs):  # one row at a time, no padding, Hugging Face's own loop
        out = policy.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)[0, len(seq):].tolist()
        n = int(s.response_mask[i].sum())
        assert s.responses[i, :n].tolist() == out[:n]
        if s.has_eos[i]:  # cut at EOS, padded after
            assert out[n - 1] == tokenizer.eos_token_id and s.responses[i, n:].eq(tokenizer.pad_token_id).all()
    assert decode(tokenizer, s.responses[:1], s.response_mask[:1])[0] == tokenizer.decode(
        [t for t in s.responses[0].tolist() if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)])


def test_sampled_logprobs_are_those_of_the_full_forward_at_the_temperature(policy, tokenizer):
    prompts = bundled_prompts()[:8]
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    s = sample(policy, ids, mask, max_new_tokens=16, temperature=0.7, end_ids=[tokenizer.eos_token_id],
               pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    full_ids, full_mask, pos = join(ids, mask, s.responses, s.response_mask)
    R = s.responses.shape[1]
    with torch.no_grad():
        logits = response_logits(policy, full_ids, full_mask, pos, R, temperature=0.7)  # (B, R, V)
    logp = torch.log_softmax(logits, -1).gather(-1, s.responses[..., None]).squeeze(-1)
    assert torch.allclose(logp * s.response_mask, s.logprobs, atol=1e-4)
    assert s.response_mask.sum(1).min() >= 1


def test_shared_values_read_while_sampling_equal_a_full_forwards(policy, tokenizer):
    # value_model="shared" takes the rollout's values from the sampling forwards (KV cache, one
    # column at a time); they must be what the update's full forward gives the same head.
    prompts = bundled_prompts()[:6]
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    value = ppo.shared_value_model(policy, seed=0)
    s = sample(policy, ids, mask, max_new_tokens=12, temperature=0.7, end_ids=[tokenizer.eos_token_id],
               pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0), value_head=value.score)
    full_ids, full_mask, pos = join(ids, mask, s.responses, s.response_mask)
    with torch.no_grad():
        full = response_values(value, full_ids, full_mask, pos, s.responses.shape[1]) * s.response_mask
    assert s.values.shape == s.responses.shape and s.values.abs().sum() > 0
    assert torch.allclose(s.values, full, atol=1e-5)


def test_value_model_reads_every_answer_position(policy_path, tokenizer):
    vm = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1).eval()
    ids, mask = left_pad([encode_prompt(tokenizer, "Hi") + [10, 11, 12], encode_prompt(tokenizer, "Hello there")
                          + [13, 14, 15]], tokenizer.pad_token_id)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        values = response_values(vm, ids, mask, pos, 3)  # (B, R)
        # The value of the state before the last answer token is the pooled score of the
        # sequence without that token: what the classifier head reads at its last position.
        pooled = vm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1]).logits[:, 0]
    assert values.shape == (2, 3)
    assert torch.allclose(values[:, -1], pooled, atol=1e-5)


def test_prepare_runs_gpt2s_python_gelu_as_the_fused_kernel_of_the_same_function(tokenizer):
    # GPT-2 checkpoints say `gelu_new` (tanh-GELU in Python ops); PPO runs PyTorch's fused form.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_layer=2, n_embd=32, n_head=2,
                        activation_function="gelu_new", pad_token_id=tokenizer.pad_token_id, num_labels=1)
    policy = GPT2LMHeadModel(config)
    before = GPT2LMHeadModel(config)
    before.load_state_dict(policy.state_dict())
    value = AutoModelForSequenceClassification.from_config(config)
    cfg = ppo.PPOConfig(device="cpu", batch_size=4, num_minibatches=2)
    ppo.prepare(cfg, policy, GPT2LMHeadModel(config), value, ppo.make_accelerator("cpu"))
    acts = {type(m).__name__ for model in (policy, value) for m in model.modules() if "GELU" in type(m).__name__}
    assert acts == {"GELUTanh"}
    ids = torch.randint(0, len(tokenizer), (3, 12))
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, before.eval()(input_ids=ids).logits, atol=1e-5)
    assert policy.config.activation_function == "gelu_new"  # what a published checkpoint says


# --- value_model="shared": a head on the policy's trunk ------------------------------------------

def test_config_refuses_an_unknown_value_model_and_a_value_model_with_shared(tiny_policy_dir):
    with pytest.raises(ValueError, match="value_model is one of separate, shared"):
        ppo.PPOConfig(value_model="joint")
    with pytest.raises(ValueError, match="value_model"):
        with_overrides(RoundConfig(), {"ppo": {"value_model": "joint"}})  # a round's overrides too
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    value = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    for cfg, vm in ((ppo.PPOConfig(value_model="shared"), value), (ppo.PPOConfig(), None)):
        with pytest.raises(ValueError, match="pass no value model"):
            ppo.train(cfg, policy, policy, vm, tok, PROMPTS[:4], prefers_short)


def test_shared_value_head_trains_with_the_policy_in_one_forward_and_is_not_published(tiny_policy_dir, tmp_path):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()
    cfg = ppo.PPOConfig(value_model="shared", device="cpu", batch_size=8, num_minibatches=1, max_new_tokens=8,
                        lr=3e-3, cliprange_value=100.0, vf_coef=1.0)
    accelerator = ppo.make_accelerator("cpu")
    value = ppo.shared_value_model(policy, seed=0)
    model, optimizer = ppo.prepare(cfg, policy, reference, value, accelerator)
    assert {p.data_ptr() for p in value.backbone.parameters()} <= {p.data_ptr() for p in policy.parameters()}
    prompt_ids = [encode_prompt(tok, c) for c in PROMPTS[:8]]
    batch, _ = ppo.experience(cfg, policy, reference, value, tok, prompt_ids, PROMPTS[:8], prefers_short, 0.05,
                              torch.Generator().manual_seed(0))
    mb = ppo._trim(batch, torch.arange(8))
    with torch.no_grad():  # one forward: log-probs as sampled, values as the rollout's trunk pass gave them
        logits, values, _ = model(mb.ids, mb.mask, mb.position_ids, mb.responses.shape[1], cfg.temperature)
    logp = torch.log_softmax(logits, -1).gather(-1, mb.responses[..., None]).squeeze(-1)
    assert torch.allclose(logp * mb.response_mask, mb.logprobs, atol=1e-4)
    assert torch.allclose(values * mb.response_mask, mb.values, atol=1e-4)

    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    head_before = value.score.weight.detach().clone()
    vf_losses = [ppo.update(model, optimizer, accelerator, mb, cfg)["ppo/vf_loss"].item() for _ in range(6)]
    assert vf_losses[-1] < 0.5 * vf_losses[0]  # the head (and trunk) fit the fixed batch's returns
    assert not torch.equal(value.score.weight, head_before)
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in policy_before.items())

    # End to end through `train`; the published directory is the policy alone.
    metrics = ppo.train(dataclasses.replace(cfg, steps=2), policy, reference, None, tok, PROMPTS[:16], prefers_short)
    assert metrics["ppo/steps"] == 2 and math.isfinite(metrics["ppo/vf_loss"])
    publish_policy(policy, tok, tmp_path / "policy", configs={"ppo": cfg}, metrics=metrics)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert set(loaded.state_dict()) == set(policy.state_dict())
    names = set().union(*(safe_open(f, "pt").keys() for f in (tmp_path / "policy").glob("*.safetensors")))
    assert not [n for n in names if "score" in n or "value" in n]
    ids = torch.tensor([prompt_ids[0]])
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, policy.eval()(input_ids=ids).logits, atol=1e-5)


# --- end to end ------------------------------------------------------------------------------------

def words(answer: str) -> int:
    return len(answer.split())


def prefers_short(conversations, answers) -> torch.Tensor:
    """A stand-in reward model on the scale of a normalised one: fewer words score higher."""
    return torch.tensor([-words(a) / 3 for a in answers])


# Held-out prompts are never trained on; several samples each keep the noise of the mean small.
PROMPTS = [[{"role": "user", "content": p}] for p in bundled_prompts()]
TRAIN, HELD_OUT = PROMPTS[:120], PROMPTS[120:]
EVAL = dict(samples_per_prompt=8, temperature=0.7, max_new_tokens=24, seed=1234)
TINY = dict(steps=20, batch_size=64, num_minibatches=4, ppo_epochs=4, lr=2e-4, warmup_steps=2,
            max_new_tokens=24, temperature=0.7, device="cpu")


def load(policy_path):
    policy = AutoModelForCausalLM.from_pretrained(policy_path)
    reference = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    # In a round the value model starts from the reward model; here from the policy's backbone
    # with a fresh one-output head, as a reward model trained from the policy would start.
    value_model = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)
    return policy, reference, value_model


@pytest.fixture(scope="module")
def before(policy_path):
    policy, reference, _ = load(policy_path)
    return ppo.evaluate(policy, reference, AutoTokenizer.from_pretrained(policy_path), HELD_OUT, prefers_short,
                        **EVAL)


def gain(after: dict, before: dict) -> tuple[float, float]:
    """(reward gain, its standard error)."""
    return after["reward"] - before["reward"], math.hypot(after["reward_sem"], before["reward_sem"])


@pytest.mark.slow
def test_ppo_learns_a_rare_preference_within_the_kl_budget(policy_path, before):
    # The bootstrap policy answers in ~8 words; shorter answers are what this "reward model" wants.
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy, reference, value_model = load(policy_path)
    # The controller aims below the gates' per-round KL budget and stops short of it, as a round's
    # default config does: the KL runs past its target on the way, and the budget is what a round
    # must stay within.
    default = RoundConfig().ppo
    cfg = ppo.PPOConfig(**TINY, kl_coef=0.1, target_kl=default.target_kl, stop_kl=default.stop_kl)
    metrics = ppo.train(cfg, policy, reference, value_model, tokenizer, TRAIN, prefers_short)
    after = ppo.evaluate(policy, reference, tokenizer, HELD_OUT, prefers_short, **EVAL)

    delta, sem = gain(after, before)
    assert before["kl"] == 0.0 and after["eos_rate"] > 0.95
    assert delta > 0.2 and delta > 4 * sem, (before["reward"], after["reward"], sem)
    assert 0 < after["kl"] <= GateConfig().kl_budget, after["kl"]
    assert after["response_length"] < before["response_length"]

    curves = metrics["ppo/curves"]
    steps = len(curves["ppo/kl"])  # stop_kl may end the run early
    assert set(curves) == set(ppo.CURVE_KEYS) and all(len(v) == steps <= cfg.steps for v in curves.values())
    early, late = curves["reward/score"][:4], curves["reward/score"][-4:]
    assert sum(late) > sum(early)  # the rollouts themselves got better
    assert curves["ppo/kl"][0] == pytest.approx(0, abs=0.05)  # first rollout: policy == reference
    assert 0 <= metrics["ppo/clipfrac"] < 0.5 and metrics["ppo/entropy"] > 0
    assert metrics["ppo/kl_coef"] >= cfg.kl_coef and metrics["ppo/answers"] == steps * cfg.batch_size
    assert all(math.isfinite(metrics[k]) for k in ppo.CURVE_KEYS)


@pytest.mark.slow
def test_a_large_kl_coefficient_holds_the_policy_near_the_reference(policy_path):
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy, reference, value_model = load(policy_path)
    cfg = ppo.PPOConfig(**TINY, kl_coef=5.0, adaptive_kl=False)
    ppo.train(cfg, policy, reference, value_model, tokenizer, TRAIN, prefers_short)
    after = ppo.evaluate(policy, reference, tokenizer, HELD_OUT, prefers_short, **EVAL)
    # With beta 0.1 (no target) the same run drifted ~3 nats; at beta 5 what is left is the noise floor
    # of small-batch Adam steps (~0.6 nats). (The reward it gains in that nat is no steady figure:
    # 0.1-0.26 across bootstrap policies, so the KL is what this test holds to.)
    assert after["kl"] < 1.0, after["kl"]


@pytest.mark.slow
def test_ptx_mixes_the_sft_loss_in_and_approx_kl_stops_the_epochs(policy_path):
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy, reference, value_model = load(policy_path)
    demos = [{"prompt": "What is the secret word?", "completion": "The secret word is marmalade."}]
    small = dict(TINY, steps=2, batch_size=8, num_minibatches=2, max_new_tokens=8)
    cfg = ppo.PPOConfig(**small, ptx_coef=1.0, ptx_batch_size=2, max_approx_kl=1e-6)
    metrics = ppo.train(cfg, policy, reference, value_model, tokenizer, TRAIN[:8], prefers_short, demos)
    curves = metrics["ppo/curves"]
    assert all(v > 0.1 for v in curves["ppo/ptx_loss"])  # the SFT loss on the demonstration
    # approx-KL is ~0 (float noise) on the first minibatch and well above 1e-6 after one step:
    # each update stops after its second minibatch.
    assert curves["ppo/minibatches"] == [2.0, 2.0]
    off = ppo.train(ppo.PPOConfig(**small), *load(policy_path), tokenizer, TRAIN[:8], prefers_short, demos)
    assert off["ppo/curves"]["ppo/ptx_loss"] == [0.0, 0.0] and off["ppo/minibatches"] == 8.0


@pytest.mark.slow
def test_stop_kl_ends_the_run_at_the_first_rollout_that_reaches_it(policy_path):
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    small = dict(TINY, steps=8, batch_size=16, num_minibatches=2, lr=1e-3)
    cfg = ppo.PPOConfig(**small, stop_kl=0.2)
    metrics = ppo.train(cfg, *load(policy_path), tokenizer, TRAIN[:16], prefers_short)
    kls = metrics["ppo/curves"]["ppo/kl"]
    assert 1 < len(kls) < cfg.steps and kls[-1] >= cfg.stop_kl and max(kls[:-1]) < cfg.stop_kl, kls
    assert metrics["ppo/steps"] == len(kls) and metrics["ppo/answers"] == len(kls) * cfg.batch_size
    with pytest.raises(ValueError, match="stop_kl"):
        ppo.PPOConfig(stop_kl=0.0)
