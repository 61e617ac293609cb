"""Importing a Hugging Face directory through the API and the CLI: a good one becomes a candidate
policy and its directory is left as it was; a bad one gets a 400 in OpenAI's error shape (the CLI:
exit code 1 and the same message) naming what is missing, and registers nothing."""
import os
import subprocess
import sys

import pytest

from schemas.checkpoint import content_hash
from tests.byo_models import EOT, build, build_seq2seq
from tests.conftest import ROOT, Server


@pytest.fixture(scope="module")
def server(new_database, tmp_path_factory):
    """A server whose first policy is a tiny Llama directory imported at start-up
    (FEEDLOOP_POLICY_PATH pointing at a plain Hugging Face directory)."""
    home = tmp_path_factory.mktemp("home")
    s = Server(new_database(), home, FEEDLOOP_POLICY_PATH=build("llama", home.parent / "first")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "good": build("qwen3", root / "good"),
        "no chat template": build("llama", root / "no-template", chat_template=None),
        "pad is the end of turn": build("llama", root / "pad-eot", pad=EOT),
        "not a causal LM": build_seq2seq(root / "t5"),
        "unreadable path": root / "does-not-exist",
        "name too long": root / ("0" * 300),  # the OS refuses the name itself (found by the fuzz test)
    }


BAD = {"no chat template": "no chat template", "pad is the end of turn": "also an end-of-turn token",
       "not a causal LM": "not a causal language model", "unreadable path": "not a readable directory",
       "name too long": "not a readable directory"}


def versions(operator) -> list[int]:
    return [m["id"] for m in operator.get("/v1/admin/models").json()["data"]]


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_import_is_a_400_naming_what_is_missing_and_registers_nothing(case, dirs, operator):
    before = versions(operator)
    r = operator.post("/v1/admin/models/import", json={"path": str(dirs[case])})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert BAD[case] in error["message"] and error["param"] == "path" and error["code"] == "invalid_model"
    assert error["type"] == "invalid_request_error"
    assert versions(operator) == before


def test_the_first_policy_was_imported_into_the_data_directory(operator, server):
    (v1,) = operator.get("/v1/admin/models").json()["data"]
    assert v1["status"] == "active" and v1["path"].startswith(str(server.env["FEEDLOOP_HOME"]))


def test_a_good_import_is_a_candidate_and_its_directory_is_left_as_it_was(dirs, operator, server):
    src = dirs["good"]
    before = content_hash(src)
    r = operator.post("/v1/admin/models/import", json={"path": str(src), "reason": "our qwen"})
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["kind"] == "policy" and v["status"] == "candidate"
    assert v["path"].startswith(str(server.env["FEEDLOOP_HOME"])) and content_hash(src) == before
    history = operator.get("/v1/admin/models/history").json()["data"]
    assert any(h["version_id"] == v["id"] and h["reason"] == "our qwen" for h in history)


def test_the_cli_imports_and_refuses_the_same_way(dirs, server):
    env = dict(server.env)
    feedloop = [sys.executable, "-c", "from service.cli import main; main()", "models", "import"]
    ok = subprocess.run([*feedloop, str(dirs["good"])], env=env, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "is candidate" in ok.stdout, ok.stderr[-2000:]
    bad = subprocess.run([*feedloop, str(dirs["no chat template"])], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "no chat template" in bad.stderr
