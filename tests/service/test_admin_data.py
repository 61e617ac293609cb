"""Training data in and out through a real server: JSONL imports in TRL's formats (all or
nothing, or partial), exports that `datasets` loads, `feedloop export`, and per-version stats."""
import json
import os
import subprocess
import sys

import openai
import psycopg
import pytest
from datasets import load_dataset

from tests.conftest import ROOT

PREFERENCES = [
    {"prompt": "What is 2 plus 2?", "chosen": "4", "rejected": "5"},  # standard
    {"prompt": [{"role": "user", "content": "Capital of France?"}],  # conversational, with a margin
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon."}], "margin": 0.5},
    {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],  # implicit prompt
     "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
]
DEMONSTRATIONS = [
    {"prompt": "Say hi.", "completion": "Hi!"},
    {"prompt": [{"role": "user", "content": "2 plus 3?"}], "completion": [{"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                  {"role": "assistant", "content": "Apple."}]},
]


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def post_jsonl(client, kind: str, rows, **params):
    return client.post(f"/v1/admin/imports/{kind}", content=jsonl(rows), params=params,
                       headers={"content-type": "application/x-ndjson"})


def export(operator, fmt: str, tmp_path, **params):
    """An export as the API streams it, and as `datasets` loads it."""
    r = operator.get("/v1/admin/export", params={"format": fmt, **params})
    assert r.status_code == 200, r.text
    path = tmp_path / f"{fmt}-{r.headers['x-feedloop-watermark']}.jsonl"
    path.write_bytes(r.content)
    rows = load_dataset("json", data_files=str(path), split="train") if r.content else []
    assert len(rows) == int(r.headers["x-feedloop-rows"])
    return r, rows


def count(server, table: str) -> int:
    with psycopg.connect(server.db_url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def ask(client, content="Tell me a joke.", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": content}], **kw)


def user_msg(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# --- imports --------------------------------------------------------------------------------

def test_import_preferences_then_export_loads_with_datasets(server, operator, tmp_path):
    r = post_jsonl(operator, "preferences", PREFERENCES)
    assert r.status_code == 200, r.text
    assert r.json() | {"errors": []} == {"object": "import", "kind": "preferences", "lines": 3, "imported": 3,
                                         "duplicates": 0, "errors": []}
    again = post_jsonl(operator, "preferences", PREFERENCES).json()  # nothing counted twice
    assert (again["imported"], again["duplicates"]) == (0, 3)

    _, rows = export(operator, "preference", tmp_path)
    imported = [row for row in rows if row["source"] == "import"]
    assert [(row["prompt"], row["chosen"], row["rejected"], row["margin"]) for row in imported] == [
        (user_msg("What is 2 plus 2?"), assistant("4"), assistant("5"), 0.0),
        (user_msg("Capital of France?"), assistant("Paris."), assistant("Lyon."), 0.5),
        (user_msg("Hi"), assistant("Hello!"), assistant("Go away."), 0.0)]
    assert all(json.loads(row["origin"])["preference"] for row in imported)


def test_a_bad_line_refuses_the_whole_file_unless_partial(server, operator):
    lines = [PREFERENCES[0] | {"prompt": "Another question?"},
             {"prompt": "Where is the rejected one?", "chosen": "Here."},
             "{not json",
             {"prompt": "Same twice?", "chosen": "yes", "rejected": "yes"},
             {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": "a", "rejected": "b"},
             {"prompt": "Postgres text holds no NUL", "chosen": "a\u0000", "rejected": "b"}]
    before = count(server, "preferences")
    r = post_jsonl(operator, "preferences", lines)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_import" and err["param"] == "lines[2].rejected"
    assert all(f"line {n}:" in err["message"] for n in (2, 3, 4, 5, 6)) and "line 1:" not in err["message"]
    assert count(server, "preferences") == before

    r = post_jsonl(operator, "preferences", lines, partial="true")
    assert r.status_code == 200, r.text
    result = r.json()
    assert (result["lines"], result["imported"], result["duplicates"]) == (6, 1, 0)
    assert [(e["line"], e["param"]) for e in result["errors"]] == \
        [(2, "rejected"), (3, None), (4, "rejected"), (5, "prompt[0]"), (6, "chosen")]
    assert count(server, "preferences") == before + 1


def test_empty_or_undecodable_imports_are_refused(server, operator):
    for body in (b"", b"\n  \n", b"\xff\xfe{}"):
        r = operator.post("/v1/admin/imports/demonstrations", content=body)
        assert r.status_code == 400 and r.json()["error"]["code"] in ("empty_import", "invalid_encoding")


def test_demonstrations_and_corrections_export_for_sft(server, operator, user, user_key, tmp_path):
    r = post_jsonl(operator, "demonstrations", DEMONSTRATIONS)
    assert r.status_code == 200 and r.json()["imported"] == 3, r.text
    assert post_jsonl(operator, "demonstrations", [{"prompt": "x"}]).json()["error"]["param"] == "lines[1].completion"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)
    rid = ask(client, "Name a colour.").id
    fixed = user.post("/v1/feedback", json={"response_id": rid, "choice_index": 0, "kind": "correction",
                                            "text": "Blue."})
    assert fixed.status_code == 200, fixed.text

    _, rows = export(operator, "sft", tmp_path)
    assert [(row["prompt"], row["completion"], row["source"]) for row in rows] == [
        (user_msg("Say hi."), assistant("Hi!"), "import"),
        (user_msg("2 plus 3?"), assistant("5"), "import"),
        ([{"role": "system", "content": "Be brief."}] + user_msg("Name a fruit."), assistant("Apple."), "import"),
        (user_msg("Name a colour."), assistant("Blue."), "correction")]
    assert json.loads(rows[3]["origin"])["feedback"] == int(fixed.json()["id"].removeprefix("fb_"))


def test_kto_export_from_thumbs(server, operator, user, user_key, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)
    answer = ask(client, "Tell me about the sun.", n=2, temperature=2.0, seed=7)
    texts = [c.message.content for c in answer.choices]
    mark = int(operator.get("/v1/admin/export", params={"format": "kto"}).headers["x-feedloop-watermark"])
    for i, value in ((0, 1), (1, -1)):
        assert user.post("/v1/feedback", json={"response_id": answer.id, "choice_index": i, "kind": "thumbs",
                                               "value": value}).status_code == 200
    _, rows = export(operator, "kto", tmp_path, after=mark)
    assert [(row["prompt"], row["completion"], row["label"]) for row in rows] == [
        (user_msg("Tell me about the sun."), assistant(texts[0]), True),
        (user_msg("Tell me about the sun."), assistant(texts[1]), False)]
    _, pairs = export(operator, "preference", tmp_path, after=mark)
    assert [(p["source"], p["chosen"], p["rejected"]) for p in pairs] == \
        [("thumbs", assistant(texts[0]), assistant(texts[1]))]


def test_cli_export_writes_what_the_api_serves(server, operator, tmp_path):
    r = operator.get("/v1/admin/export", params={"format": "preference"})
    out = tmp_path / "cli.jsonl"
    done = subprocess.run([sys.executable, "-m", "service", "export", "--format", "preference", "--out", str(out),
                           "--upto", r.headers["x-feedloop-watermark"]],
                          cwd=ROOT, env=dict(os.environ, DATABASE_URL=server.db_url), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == r.content and r.content.count(b"\n") == int(r.headers["x-feedloop-rows"]) > 0


# --- stats ----------------------------------------------------------------------------------

def test_stats_per_version_and_pairs_since_the_last_round(server, operator, user, user_key):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)
    before = operator.get("/v1/admin/stats").json()
    answer = ask(client, "Say something kind.", n=2, temperature=2.0, seed=11)
    for i, value in ((0, 1), (1, -1)):
        user.post("/v1/feedback", json={"response_id": answer.id, "choice_index": i, "kind": "thumbs", "value": value})
    user.post("/v1/feedback", json={"response_id": answer.id, "choice_index": 0, "kind": "rating", "value": 7})
    after = operator.get("/v1/admin/stats").json()
    v1_before, v1 = before["data"][0], after["data"][0]
    assert v1["model_version"] == "v1" and v1["status"] == "active"
    assert v1["requests"] == v1_before["requests"] + 1 and v1["completions"] == v1_before["completions"] + 2
    assert v1["feedback"]["thumbs"] == v1_before["feedback"]["thumbs"] + 2
    assert v1["feedback"]["rating"] == v1_before["feedback"]["rating"] + 1
    assert v1["thumbs_up"] == v1_before["thumbs_up"] + 1
    assert v1["thumbs_up_rate"] == pytest.approx(v1["thumbs_up"] / (v1["thumbs_up"] + v1["thumbs_down"]))
    assert after["pairs_since_last_round"] >= before["pairs_since_last_round"] + 1
    assert v1["pairs_since_last_round"] <= after["pairs_since_last_round"]

    with psycopg.connect(server.db_url, autocommit=True) as conn:  # a round consumed everything so far
        conn.execute("INSERT INTO training_runs (kind, status, watermark, started_at, finished_at)"
                     " VALUES ('round', 'succeeded', %s, now(), now())", (after["watermark"],))
    consumed = operator.get("/v1/admin/stats").json()
    assert consumed["last_round_watermark"] == after["watermark"]
    assert consumed["pairs_since_last_round"] == 0 and consumed["data"][0]["pairs_since_last_round"] == 0
    user.post("/v1/feedback", json={"response_id": answer.id, "choice_index": 1, "kind": "rating", "value": 2})
    fresh = operator.get("/v1/admin/stats").json()  # a new rating pairs with the old one: one new pair
    assert fresh["pairs_since_last_round"] == 1 and fresh["data"][0]["pairs_since_last_round"] == 1


def test_data_routes_need_an_operator_and_valid_parameters(server, user, operator):
    for method, path in (("post", "/v1/admin/imports/preferences"), ("post", "/v1/admin/imports/demonstrations"),
                         ("get", "/v1/admin/export"), ("get", "/v1/admin/stats")):
        r = getattr(user, method)(path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "operator_only"
    r = operator.get("/v1/admin/export", params={"format": "csv"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"
    r = operator.get("/v1/admin/export", params={"after": 5, "upto": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "upto"
