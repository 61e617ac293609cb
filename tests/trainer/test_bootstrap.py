"""The bootstrap policy: a Hugging Face directory built from our own data, deterministic."""
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from schemas.checkpoint import read_manifest
from trainer.bootstrap import BootstrapConfig, build
from trainer.sft import SFTConfig


def test_bootstrap_checkpoint_is_a_complete_hf_directory(policy_path):
    manifest = read_manifest(policy_path)
    assert manifest["kind"] == "policy" and manifest["metrics"]["sft/examples"] >= 300
    names = {p.name for p in policy_path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "feedloop.json"} <= names
    tok = AutoTokenizer.from_pretrained(policy_path)
    model = AutoModelForCausalLM.from_pretrained(policy_path)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|user|>Hi<|end|><|assistant|>"


def test_bootstrap_is_deterministic(tmp_path):
    small = lambda: BootstrapConfig(n_layer=1, n_embd=32, n_head=2, sft=SFTConfig(epochs=1, device="cpu"))
    a = build(small(), tmp_path / "a")
    b = build(small(), tmp_path / "b")
    assert a["content_hash"] == b["content_hash"]
    assert json.loads((tmp_path / "a" / "feedloop.json").read_text())["config"]["n_layer"] == 1
