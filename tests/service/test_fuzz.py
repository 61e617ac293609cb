"""Schemathesis against a real server, as a user and as an operator: every operation in the
OpenAPI document, its coverage phase (boundary and invalid values) and then random cases, with
hooks (tests/fuzz_hooks.py) that send real response ids half the time. Any 5xx, or any error body
not in OpenAI's shape, fails the suite. The budget is bounded: FEEDLOOP_FUZZ_SECONDS a role
(45 by default), about 2,500 cases a role on two cores."""
import json
import os
import subprocess
import sys

import psycopg
import pytest

from tests.conftest import OPERATOR_KEY, ROOT

SECONDS = int(os.environ.get("FEEDLOOP_FUZZ_SECONDS", "45"))


@pytest.fixture(scope="module")
def fuzz_data(server, user_key):
    with server.client(user_key) as c:
        ids = [c.post("/v1/chat/completions", json={"model": "feedloop", "max_tokens": 4, "n": n,
                                                    "messages": [{"role": "user", "content": "Hi"}]}).json()["id"]
               for n in (1, 2, 4)]
    with psycopg.connect(server.db_url) as conn:
        protected = [r[0] for r in conn.execute("SELECT id FROM api_keys")]
    return ids, protected


def run_schemathesis(server, key: str, fuzz_data, report) -> dict:
    ids, protected = fuzz_data
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.fuzz_hooks", PYTHONPATH=str(ROOT),
               FUZZ_RESPONSE_IDS=",".join(ids), FUZZ_PROTECTED_KEY_IDS=",".join(map(str, protected)))
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
           "-H", f"Authorization: Bearer {key}", "--phases", "coverage,fuzzing", "--max-time", str(SECONDS),
           "--checks", "not_a_server_error,openai_error_shape", "--generation-allow-x00", "true",
           "--request-timeout", "60", "--no-color", "--report-json-path", str(report)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS + 240)
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    print(f"schemathesis: {cases['generated']} cases, {cases['with_failures']} with failures, "
          f"{len(summary['errors'])} errors in {summary['running_time']:.0f} s")
    assert run.returncode == 0 and not summary["failures"] and not summary["errors"], run.stdout[-6000:]
    return summary


@pytest.mark.parametrize("role", ["user", "operator"])
def test_no_input_gets_a_5xx_or_an_error_out_of_shape(server, user_key, fuzz_data, role, tmp_path):
    key = user_key if role == "user" else OPERATOR_KEY
    summary = run_schemathesis(server, key, fuzz_data, tmp_path / "report.json")
    assert summary["operations"]["tested"] == summary["operations"]["selected"] >= 20
    assert summary["test_cases"]["generated"] > 200
    assert "unhandled error" not in server.log.read_text()
