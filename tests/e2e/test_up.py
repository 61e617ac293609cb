"""`feedloop up`, the embedded default: its own PostgreSQL (pgserver), the policy, the API and the
trainer service, from one command; a second start reuses everything."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def start_up(home: Path, port: int) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}  # the embedded default
    env.update(FEEDLOOP_HOME=str(home), FEEDLOOP_PORT=str(port), FEEDLOOP_TRAIN_INTERVAL_SECONDS="1")
    log = home / f"up-{time.time_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "service", "up"], cwd=ROOT, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


def wait_ready(url: str, proc, log: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text()[-3000:])


def stop(proc) -> None:
    """SIGTERM to `feedloop up` alone: it must take its trainer child down with it."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in its process group?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the trainer outlived feedloop up")


def test_up_brings_the_loop_up_and_restarts_on_what_it_has(policy_path):
    # pgserver runs postgres as its own user: the data directory's parents must be traversable.
    home = Path(tempfile.mkdtemp(prefix="feedloop-up-"))
    home.chmod(0o755)
    try:
        # The bootstrap the first start would build (tested elsewhere), placed where it looks.
        shutil.copytree(policy_path, home / "checkpoints" / "bootstrap")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, log = start_up(home, port)
        try:
            wait_ready(url, proc, log)
            out = log.read_text()
            assert f"feedloop is starting at {url}" in out
            key = re.search(r"operator API key \(shown once.*\): (fl-\S+)", out).group(1)
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                r = c.post("/v1/chat/completions", json={"model": "feedloop", "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Hello!"}]})
                assert r.status_code == 200 and r.json()["system_fingerprint"] == "v1"
                # the trainer service runs beside it: it records a skipped round (the run row exists,
                # as `running`, a moment before it is finished)
                finished = lambda runs: runs and runs[-1]["status"] != "running"
                deadline = time.time() + 60
                while time.time() < deadline and not finished(c.get("/v1/admin/training/runs").json()["data"]):
                    time.sleep(0.5)
                runs = c.get("/v1/admin/training/runs").json()["data"]
                assert runs and runs[-1]["status"] == "skipped" and runs[-1]["trigger"] == "schedule"
        finally:
            stop(proc)
        assert (home / "pg").is_dir()

        proc, log = start_up(home, port)  # again: same database, same policy, no new key
        try:
            wait_ready(url, proc, log)
            second = log.read_text()
            assert "operator API key (shown once" not in second
            assert "bootstrapping" not in second  # the policy built the first time is reused
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
                assert c.get("/v1/admin/models").json()["count"] == 1
        finally:
            stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
