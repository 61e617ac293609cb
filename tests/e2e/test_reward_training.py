"""Issue 4 end to end: synthetic users with a known rule (they prefer answers that use the word
"is") give rankings, pairwise choices and thumbs through the real API; `feedloop train reward`
trains on what the one derivation yields, and the registered version learned the rule."""
import json
import subprocess
import sys

import openai
import psycopg
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import ROOT
from schemas.bundled import bundled_demonstrations, training_prompts
from store.derive import wilson_interval
from trainer.gates import z_of

pytestmark = pytest.mark.slow


def likes(answer: str) -> bool:
    return "is" in answer.lower().replace(".", " ").replace(",", " ").split()


def test_reward_model_learns_users_rule_from_all_sources(server, user_key, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)
    with server.client(user_key) as http:
        # every bundled prompt, each asked twice (two seeds): most of the bootstrap's answers are
        # all liked or all not, so a pair comes from about one prompt in five
        prompts = training_prompts() + list(dict.fromkeys(d["prompt"] for d in bundled_demonstrations()))
        for i, prompt in enumerate(prompts + prompts):
            r = client.chat.completions.create(model="feedloop", n=8, temperature=1.3, max_tokens=20, seed=i,
                                               messages=[{"role": "user", "content": prompt}])
            good = [c.index for c in r.choices if likes(c.message.content)]
            bad = [c.index for c in r.choices if not likes(c.message.content)]
            if not good or not bad:
                continue
            ref = lambda k: {"response_id": r.id, "choice_index": k}
            if i % 3 == 0:  # a ranking: every liked answer above every other (ties within each side)
                body, path = {"response_id": r.id, "order": [good, bad]}, "/v1/rankings"
                assert http.post(path, json=body).status_code == 200
            elif i % 3 == 1:
                assert http.post("/v1/preferences", json={"chosen": ref(good[0]), "rejected": ref(bad[0])}).status_code == 200
            else:
                for k, value in [(good[0], 1), (bad[0], -1)]:
                    assert http.post("/v1/feedback", json={**ref(k), "kind": "thumbs", "value": value}).status_code == 200

    env = dict(server.env, FEEDLOOP_HOME=str(tmp_path), FEEDLOOP_MIN_NEW_PAIRS="10", FEEDLOOP_TORCH_THREADS="2",
               FEEDLOOP_ROUND_CONFIG=json.dumps({"reward": {"epochs": 8, "batch_size": 16, "heldout_frac": 0.2}}))
    out = subprocess.run([sys.executable, "-m", "trainer", "train", "reward"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with psycopg.connect(server.db_url) as conn:
        metrics, version_id = conn.execute(
            "SELECT metrics, produced_version_id FROM training_runs WHERE kind = 'reward'").fetchone()
        path, kind, status = conn.execute("SELECT path, kind, status FROM model_versions WHERE id = %s",
                                          (version_id,)).fetchone()
    assert kind == "reward" and status == "active"
    for source in ("ranking", "pairwise", "thumbs"):
        assert metrics[f"reward/pairs_{source}"] > 0, metrics
    # The bar is on what the held-out pairs show with 95 % confidence, as the gates judge a reward
    # model: at least 0.65, where chance is 0.5. With 150 of the prompts asked once, a fresh install
    # of 2026-12-01 (another bootstrap) gave 329 pairs, 56 held out from 16 prompts, and accuracy
    # 0.54 while training accuracy was 1.0 (0.78-0.95 before, across bootstraps); with every prompt
    # asked twice 782 pairs, 148 held out from 29 prompts, 0.94-0.95 (lower bound 0.90).
    n = metrics["reward/heldout_effective_pairs"]
    low, _ = wilson_interval(round(metrics["reward/heldout_accuracy"] * n), round(n), z=z_of(0.95))
    assert low >= 0.65, (low, metrics)

    # The registered checkpoint is a plain Hugging Face sequence classifier that ranks by the rule.
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.reward_scale > 0
    pairs = [("What is the sun?", "The sun is a star.", "The sun: a star."),
             ("Name a colour.", "Blue is a colour.", "Blue, a colour."),
             ("What is 2 plus 2?", "2 plus 2 is 4.", "2 plus 2 makes 4."),
             ("Say hello.", "Hello, this is me!", "Hello there!"),
             ("What is the capital of France?", "The capital of France is Paris.", "Paris, in France."),
             ("Describe a cat.", "A cat is soft.", "Cats are soft.")]

    def raw(prompt, answer):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False) + answer + tok.eos_token
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).logits.item()

    assert sum(raw(p, liked) > raw(p, other) for p, liked, other in pairs) >= 4
