"""Bring your own model, per family (Llama, Qwen3, Mistral with a window shorter than the
sequences, Gemma 3, Phi-3, GPT-NeoX, OPT with dropout 0.1): each tiny random-init model, with a
ChatML tokenizer whose end of turn is not its EOS and which has no pad, is imported, served
greedily exactly as `model.generate` answers, fine-tuned, turned into a reward model whose packed
scores equal its published copy's one-at-a-time scores, and trained by PPO with rollout log-probs
equal to a full forward: once with every weight trained, once with LoRA over one shared base."""
import asyncio
import copy
from datetime import datetime, timezone

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lm.checkpoint import load_policy, load_tokenizer
from lm.chat import encode_prompt
from lm.decoding import left_pad
from lm.importing import import_model
from lm.turns import end_of_turn_ids
from schemas.checkpoint import content_hash, read_manifest
from schemas.openai import SamplingParams
from schemas.records import ModelVersion, TrainingPair
from service.local_engine import LocalEngine
from tests.byo_models import ARCHITECTURES, EOS, EOT, WINDOW, build
from trainer import ppo, reward
from trainer.common import publish_policy
from trainer.lora import ADAPTER_DIR, AdapterView, HeadView, LoraSettings, SharedBase, new_head
from trainer.rollout import join, response_logits, sample
from trainer.sft import SFTConfig, encode_demonstration
from trainer.sft import train as sft_train

PROMPTS = [[{"role": "user", "content": "hello there, how are you today?"}],
           [{"role": "user", "content": "tell me a short story about a cat"}],
           [{"role": "user", "content": "what is the capital of france?"}],
           [{"role": "user", "content": "good morning to you"}]]
DEMOS = [{"prompt": p, "completion": "paris is the capital of france"} for p in PROMPTS]


def pair(i: int, prompt, chosen: str, rejected: str) -> TrainingPair:
    return TrainingPair(prompt=prompt, chosen=chosen, rejected=rejected, source="pairwise",
                        prompt_hash=f"h{i}", group=f"g{i}")


PAIRS = [pair(i, p, "the cat sat on the mat", "once upon a time there was a dog") for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def imported(request, tmp_path_factory):
    """(architecture, source dir, its content hash before, the imported checkpoint)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(request.param)
    src = build(request.param, root / "hub")
    before = content_hash(src)
    path, _ = import_model(src, root / "imports")
    return request.param, src, before, path


def version_at(path) -> ModelVersion:
    return ModelVersion(id=1, kind="policy", parent_id=None, reference_id=None, reward_model_id=None,
                        path=str(path), content_hash="", endpoint=None, status="active", canary_fraction=None,
                        training_run_id=None, metrics={}, created_at=datetime.now(timezone.utc),
                        promoted_at=None, promoted_by=None)


def test_import_leaves_the_source_and_gives_a_pad_that_ends_no_turn(imported):
    _, src, before, path = imported
    assert content_hash(src) == before and not (src / "feedloop.json").exists()  # never written
    manifest = read_manifest(path)  # verified: the hash covers what the checkpoint holds
    assert manifest["config"]["imported_from"] == str(src.resolve())
    tok = load_tokenizer(path)
    ends = end_of_turn_ids(tok)
    assert ends == (tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(EOS))
    assert tok.pad_token_id is not None and tok.pad_token_id not in ends
    assert AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().num_embeddings >= len(tok)
    assert import_model(src, path.parent)[0] == path  # the same content again: the same checkpoint


def test_the_engine_answers_greedily_as_model_generate_does(imported, monkeypatch):
    _, _, _, path = imported
    engine = LocalEngine(version_at(path), max_batch_rows=4)
    picked = []  # the tokens the engine chose, step by step (its text is streamed in pieces)
    advance = engine._advance
    monkeypatch.setattr(engine, "_advance", lambda rows, ids, *rest: (picked.append(ids[0]), advance(rows, ids, *rest))[1])
    try:
        async def answer(conv):
            params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=12, stop=[], seed=None)
            gen = engine.submit(engine.encode(conv), params, conv)
            await gen.admitted()
            return [p.finish_reason async for p in gen][-1]

        finish = asyncio.run(answer(PROMPTS[0]))
    finally:
        engine.close()
    tok, model = load_tokenizer(path), load_policy(path).eval()
    ids = encode_prompt(tok, PROMPTS[0])
    assert len(ids) > WINDOW  # the sliding window is narrower than what the model sees
    # generation_config.json stops generate at <|im_end|> or EOS, as the engine's end-of-turn set does
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert picked == out[:len(picked)] and len(picked) == len(out)
    assert finish == ("stop" if out[-1] in end_of_turn_ids(tok) else "length")


def models_for(path, lora: bool):
    """(policy, reference, reward model, shared base or None), as a round loads them."""
    if not lora:
        rm, _ = reward.load_for_training(path)
        return load_policy(path), load_policy(path).eval(), rm, None
    shared = SharedBase(load_policy(path), path, LoraSettings(enabled=True, rank=4, alpha=8))
    rm = HeadView(shared, "reward", new_head(shared.model.config, seed=0))
    return AdapterView(shared, "policy"), AdapterView(shared, None), rm, shared


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_reward_model_and_ppo_train_it(imported, lora, tmp_path):
    arch, _, _, path = imported
    torch.manual_seed(0)
    tok = load_tokenizer(path)
    eot = tok.convert_tokens_to_ids(EOT)
    policy, reference, rm, shared = models_for(path, lora)
    base_logits = AutoModelForCausalLM.from_pretrained(path)(torch.tensor([[1, 2, 3]])).logits

    # SFT: the answer and its end of turn (not EOS) are what is learned
    ids, labels = encode_demonstration(tok, DEMOS[0]["prompt"], DEMOS[0]["completion"])
    assert labels[-1] == ids[-1] == eot
    sft = sft_train(SFTConfig(epochs=4, batch_size=4, lr=1e-2, device="cpu"), policy, tok, DEMOS)
    assert sft["sft/curve"][-1] < sft["sft/curve"][0]

    # reward model: packed scores (windowed where the model slides) = the published copy's, one at a time
    reward.train(reward.RewardConfig(epochs=2, batch_size=4, heldout_frac=0.0, device="cpu"), rm, tok, PAIRS)
    reward.save(rm, tok, tmp_path / "reward", reward.RewardConfig(), {})
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward").eval()
    enc = reward.Encoder(tok, 256)
    idx = enc.add([(p.prompt, a) for p in PAIRS for a in (p.chosen, p.rejected)])
    assert min(len(s) for s in enc.seqs) > 2 * WINDOW and enc.seqs[idx[0]][-1] == eot
    packed = reward.raw_scores(rm, enc.seqs, enc.prompt_lens, tok.pad_token_id, 8, "cpu")
    with torch.no_grad():
        alone = torch.cat([reward.rewards(plain, *reward.collate([s], tok.pad_token_id)) for s in enc.seqs])
    assert torch.allclose(packed, alone, atol=1e-4), (packed, alone)

    # PPO, the value model started from the reward model
    if shared:
        shared.copy_adapter("reward", "value")
        value = HeadView(shared, "value", copy.deepcopy(rm.score))
    else:
        value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    rm.eval()
    cfg = ppo.PPOConfig(steps=1, batch_size=4, num_minibatches=2, ppo_epochs=1, max_new_tokens=6,
                        max_prompt_tokens=64, device="cpu", temperature=0.7)
    metrics = ppo.train(cfg, policy, reference, value, tok, PROMPTS,
                        lambda convs, answers: reward.score(rm, tok, convs, answers))
    assert metrics["ppo/steps"] == 1 and torch.isfinite(torch.tensor(metrics["ppo/pg_loss"]))
    if shared:  # PPO trained the value adapter (started as the reward adapter), not the reward adapter
        moved = [not torch.equal(v, r) for v, r in zip(shared.adapter_parameters("value"),
                                                      shared.adapter_parameters("reward"))]
        assert any(moved)

    # dropout is off, config-level too (OPT's 0.1): two train-mode forwards agree
    x = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    policy.train()
    with torch.no_grad():
        assert torch.equal(policy(input_ids=x).logits, policy(input_ids=x).logits)
    policy.eval()

    # rollout log-probs = a full forward over prompt + answer
    p_ids, p_mask = left_pad([encode_prompt(tok, c) for c in PROMPTS], tok.pad_token_id)
    s = sample(policy, p_ids, p_mask, max_new_tokens=8, temperature=0.7, end_ids=end_of_turn_ids(tok),
               pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    full_ids, full_mask, pos = join(p_ids, p_mask, s.responses, s.response_mask)
    with torch.no_grad():
        logits = response_logits(policy, full_ids, full_mask, pos, s.responses.shape[1], 0.7)
    logp = torch.log_softmax(logits, -1).gather(-1, s.responses[..., None]).squeeze(-1)
    assert torch.allclose(logp * s.response_mask, s.logprobs, atol=1e-4)

    if shared:  # the base is untouched (it is the reference); the published policy is a plain merged model
        with torch.no_grad():
            assert torch.allclose(reference(input_ids=torch.tensor([[1, 2, 3]])).logits, base_logits, atol=1e-5)
        publish_policy(policy, tok, tmp_path / "policy", configs={}, metrics={},
                       provenance={"lora": shared.lineage("policy")})
        assert (tmp_path / "policy" / ADAPTER_DIR / "adapter_config.json").exists()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=x).logits, policy(input_ids=x).logits, atol=1e-4)
        assert read_manifest(tmp_path / "policy")["config"]["lora"]["base"] == str(path)


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    """LoRA with activations recomputed in the backward: the same steps, the same adapter."""
    path = import_model(build("llama", tmp_path / "hub"), tmp_path / "imports")[0]
    tok, trained = load_tokenizer(path), []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        shared = SharedBase(load_policy(path), path, LoraSettings(enabled=True, rank=4, alpha=8,
                                                                  gradient_checkpointing=checkpointing))
        sft_train(SFTConfig(epochs=2, batch_size=4, lr=1e-2, device="cpu"), AdapterView(shared, "policy"), tok, DEMOS)
        trained.append({n: p.detach().clone() for n, p in shared.model.named_parameters() if ".policy." in n})
    assert all(torch.allclose(trained[0][n], trained[1][n], atol=1e-6) for n in trained[0])
    assert any(p.abs().sum() > 0 for n, p in trained[0].items() if "lora_B" in n)  # B starts at 0: it trained
