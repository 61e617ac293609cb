"""The README's curl examples, run as written (with $URL, $KEY and a real response id in place of
`chatcmpl-…`) against a real server: each answers in JSON, none with an error."""
import json
import re
import subprocess

from tests.conftest import ROOT


def readme_curls() -> list[str]:
    """Every `curl -s $URL/v1/…` line of the README's sh blocks."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for b in blocks for line in b.splitlines() if line.startswith("curl -s $URL/v1/")]


def test_readme_curl_examples_run_as_written(server, user_key):
    commands = readme_curls()
    assert len(commands) >= 6  # chat, a model, and the feedback examples
    env = {"URL": server.url, "KEY": user_key, "PATH": "/usr/bin:/bin"}
    response_id = None
    for command in commands:
        if "chatcmpl-…" in command:  # the feedback examples name the chat example's answer
            command = command.replace("chatcmpl-…", response_id)
        out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, (command, out.stderr)
        answer = json.loads(out.stdout)
        assert "error" not in answer, (command, answer)
        if answer.get("object") == "chat.completion":
            response_id = answer["id"]
