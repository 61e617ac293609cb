"""One notion of end of turn: a ChatML model whose `<|im_end|>` is not its EOS stops there in the
engine and in PPO's rollouts (cut, counted as ended, left out of the text), and training data
ends answers with it. Trainable weights of a bf16 checkpoint train in fp32."""
import asyncio

import pytest
import torch

from lm.chat import encode_prompt
from lm.checkpoint import load_policy, load_tokenizer
from lm.decoding import left_pad
from lm.importing import import_model
from lm.turns import end_of_turn_ids, turn_end_id
from schemas.openai import SamplingParams
from service.local_engine import LocalEngine
from tests.byo_models import EOS, EOT, build
from tests.trainer.test_architectures import DEMOS, PROMPTS, version_at
from trainer.rollout import decode, sample
from trainer.sft import SFTConfig
from trainer.sft import train as sft_train


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("turns")
    return import_model(build("llama", root / "hub"), root / "imports")[0]


def force_end_at(model, step: int, end_id: int):
    """Make the model pick `end_id` at its `step`-th one-token forward (a decoding step)."""
    calls = []

    def hook(module, args, kwargs, out):
        if kwargs["input_ids"].shape[1] == 1:
            calls.append(1)
            if len(calls) == step:
                out.logits[..., end_id] = 1e4
    return model.register_forward_hook(hook, with_kwargs=True)


def test_the_end_of_turn_set_is_the_templates_then_eos_then_generation_configs(llama):
    tok = load_tokenizer(llama)
    eot, eos = tok.convert_tokens_to_ids(EOT), tok.convert_tokens_to_ids(EOS)
    assert end_of_turn_ids(tok) == (eot, eos) and turn_end_id(tok) == eot != tok.eos_token_id


def test_rollouts_stop_at_the_end_of_turn_and_leave_it_out_of_the_text(llama):
    tok, model = load_tokenizer(llama), load_policy(llama).eval()
    eot = tok.convert_tokens_to_ids(EOT)
    ids, mask = left_pad([encode_prompt(tok, p) for p in PROMPTS[:2]], tok.pad_token_id)
    handle = force_end_at(model, 2, eot)  # prefill gives token 1, decoding step 1 token 2, step 2 <|im_end|>
    try:
        s = sample(model, ids, mask, max_new_tokens=8, temperature=0.0, end_ids=end_of_turn_ids(tok),
                   pad_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert s.has_eos.all() and s.response_mask.sum(1).tolist() == [3, 3] and s.responses.shape[1] == 3
    assert (s.responses[:, 2] == eot).all()
    assert decode(tok, s.responses, s.response_mask) == [tok.decode(r[:2]) for r in s.responses.tolist()]


def test_the_engine_stops_at_the_end_of_turn(llama):
    tok = load_tokenizer(llama)
    engine = LocalEngine(version_at(llama), max_batch_rows=2)
    handle = force_end_at(engine.model, 2, tok.convert_tokens_to_ids(EOT))
    try:
        async def answer():
            params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_tokens=8, stop=[], seed=None)
            gen = engine.submit(engine.encode(PROMPTS[0]), params, PROMPTS[0])
            await gen.admitted()
            return [p async for p in gen][-1]

        last = asyncio.run(answer())
    finally:
        handle.remove()
        engine.close()
    assert last.finish_reason == "stop" and last.tokens == 2


def test_a_bf16_checkpoint_trains_in_fp32(llama, tmp_path):
    load_policy(llama).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_policy(tmp_path / "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16  # transformers keeps the saved dtype
    before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    sft_train(SFTConfig(epochs=2, batch_size=4, lr=1e-3, device="cpu"), model, load_tokenizer(llama), DEMOS)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [(p.detach() != before[n]).float().mean().item() for n, p in model.named_parameters()
               if n in before and p.shape == before[n].shape]
    assert sum(changed) / len(changed) > 0.9  # not the pure-bf16 58 %: updates below bf16's resolution land
