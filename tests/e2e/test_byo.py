"""Bring your own model end to end, through real processes: a plain Hugging Face Llama directory
as FEEDLOOP_POLICY_PATH is imported at first start and serves; users chat and give feedback; a
round trains LoRA adapters over it; the candidate is promoted and served; and the promoted
directory, loaded by plain `AutoModelForCausalLM.from_pretrained`, says what the engine served."""
import json
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.checkpoint import content_hash, read_manifest
from tests.byo_models import build
from tests.conftest import Server, answer_from
from tests.e2e.test_loop import TINY_ROUND, give_feedback, train_once

pytestmark = pytest.mark.slow

LORA_ROUND = dict(TINY_ROUND, lora={"enabled": True, "rank": 4, "alpha": 8},
                  ppo=dict(TINY_ROUND["ppo"], steps=2, max_new_tokens=12))
ASK = [{"role": "user", "content": "tell me a short story about a cat"}]


def test_an_imported_llama_goes_round_the_loop_with_lora(new_database, tmp_path):
    src = build("llama", tmp_path / "hub" / "my-llama")
    before = content_hash(src)
    (tmp_path / "home").mkdir()
    s = Server(new_database(), tmp_path / "home", FEEDLOOP_POLICY_PATH=src).start()
    try:
        give_feedback(s, n_prompts=8)
        env = dict(s.env, FEEDLOOP_ROUND_CONFIG=json.dumps(LORA_ROUND), FEEDLOOP_MIN_NEW_PAIRS="2",
                   FEEDLOOP_TORCH_THREADS="1")
        result = train_once(env)
        assert result["status"] == "succeeded", result
        vid = result["version"]
        with s.client() as op:
            models = {m["id"]: m for m in op.get("/v1/admin/models").json()["data"]}
            v1, v2 = models[1], models[vid]
            assert v1["path"].startswith(str(tmp_path / "home")) and v2["status"] == "candidate"
            assert v2["parent_id"] == 1 and v2["reference_id"] == 1  # LoRA's reference is its base
            assert op.post(f"/v1/admin/models/{vid}/promote").status_code == 200
            lineage = read_manifest(v2["path"])["config"]["lora"]
            assert lineage["base"] == v1["path"] and lineage["base_id"] == 1 and lineage["rank"] == 4
            assert (Path(v2["path"]) / "adapter" / "adapter_model.safetensors").exists()

        client = openai.OpenAI(base_url=s.url + "/v1", api_key=s.create_key(), max_retries=0)
        served = answer_from(f"v{vid}", lambda: client.chat.completions.create(
            model="feedloop", messages=ASK, temperature=0, max_tokens=12))
    finally:
        s.stop()
    assert content_hash(src) == before  # the source directory was never written

    tok = AutoTokenizer.from_pretrained(v2["path"])
    model = AutoModelForCausalLM.from_pretrained(v2["path"]).eval()  # plain transformers, adapters merged
    ids = tok.apply_chat_template(ASK, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served.choices[0].message.content == text.replace("\x00", "\ufffd")  # as the engine shows NUL
