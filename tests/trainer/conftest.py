"""A tiny policy for tests of the round's plumbing: the bootstrap's tokenizer and architecture,
too small to learn anything, quick to build, train a step and sample from."""
import pytest

from schemas.bundled import bundled_demonstrations
from trainer.bootstrap import BootstrapConfig, new_policy
from trainer.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory):
    demos = bundled_demonstrations()
    tokenizer = build_tokenizer([d["prompt"] for d in demos] + [d["completion"] for d in demos], 512)
    model = new_policy(BootstrapConfig(n_layer=1, n_head=2, n_embd=16, n_positions=256), tokenizer)
    out = tmp_path_factory.mktemp("tiny") / "policy"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
