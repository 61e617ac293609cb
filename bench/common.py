"""What the benches share: a free loopback port, the environment for child processes, the
bootstrap policy, a scratch database and server processes (`feedloop serve` among them).

Benches run as `python bench/<name>.py`, which puts this folder first on `sys.path`, so they
`from common import …`. Importing this module also puts the repository root on `sys.path`, for
`schemas`, `service` and `trainer`. It runs nothing by itself (`make bench` runs every file here).
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
ADMIN_URL = os.environ.get("DATABASE_URL") or LOCAL_POSTGRES
"""where scratch databases are created (an embedded pgserver when it cannot be reached)"""
BENCH_POLICY = ROOT / ".feedloop" / "bench" / "bootstrap"


def server_bench_parser(doc: str, *, policy: str | None = None) -> argparse.ArgumentParser:
    """The options every bench that starts servers takes: --admin-url, and --policy (with this
    help) for those that serve a checkpoint. The first paragraph of `doc` describes the script."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--admin-url", default=ADMIN_URL,
                   help="a Postgres where a scratch database may be created (else embedded pgserver)")
    if policy:
        p.add_argument("--policy", type=Path, default=BENCH_POLICY, help=policy)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra) -> dict[str, str]:
    """The environment for child processes: offline, no proxies for loopback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_prompts() -> list[str]:
    """The bundled prompts (schemas/data/prompts.jsonl)."""
    from schemas.bundled import bundled_prompts

    return bundled_prompts()


# --- the checkpoint -------------------------------------------------------------------------

def ensure_policy(path: Path = BENCH_POLICY) -> Path:
    """The bootstrap policy at `path`, built by the trainer's CLI when missing."""
    if (path / "config.json").exists():
        return path.resolve()
    print(f"building the bootstrap policy at {path} (once) …", flush=True)
    subprocess.run([sys.executable, "-m", "trainer", "bootstrap", "--no-register", "--out", str(path)],
                   check=True, cwd=ROOT, env=loopback_env())
    return path.resolve()


def checkout(ref: str, into: Path) -> Path:
    """The repository's files at `ref` (a commit, tag or branch), exported into `into`: an older
    version of the code to run beside this one, with the same Python environment."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# --- a scratch database ---------------------------------------------------------------------

class ScratchDatabase:
    """A fresh database on the given server (dropped on close), or an embedded pgserver in `home`
    when that server cannot be reached."""

    def __init__(self, admin_url: str, home: Path):
        import psycopg

        self.name, self.pgserver = f"feedloop_bench_{uuid.uuid4().hex[:10]}", None
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
            self.admin_url, self.where = admin_url, "local postgres"
        except psycopg.OperationalError as e:
            import pgserver

            print(f"postgres at {admin_url} not reachable ({str(e).strip().splitlines()[0]}); "
                  "using an embedded pgserver", flush=True)
            home.chmod(0o755)  # pgserver runs postgres as its own user
            self.pgserver = pgserver.get_server(home / "pg", cleanup_mode="stop")
            self.admin_url, self.where = self.pgserver.get_uri(), "embedded pgserver"
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        self.url = str(psycopg.conninfo.make_conninfo(self.admin_url, dbname=self.name))

    def close(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        if self.pgserver is not None:
            self.pgserver.cleanup()

    def __enter__(self) -> "ScratchDatabase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- server processes -----------------------------------------------------------------------

class Process:
    """A server subprocess on a loopback port, its output in a log file; ready when `ready_path`
    answers 200. It runs in its own session, so `stop` ends it and its children only."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path,
                 ready_path: str, cwd: Path = ROOT):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=open(log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.ready_path = ready_path

    def wait_ready(self, timeout: float) -> None:
        """Return once ready; a process that exits or is not ready in time is stopped, then raised."""
        try:
            self._poll_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _poll_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 3) -> str:
        text = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def transformers_serve(work: Path, *args: str, threads: int = 1, timeout: float = 120) -> Process:
    """`transformers serve` on CPU on a free loopback port, started and ready, offline. Without a
    model in `args` it loads each model by the name (here: the checkpoint path) it is asked for."""
    import shutil

    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if exe is None:
        raise RuntimeError("no `transformers` CLI next to this python (pip install 'transformers[serving]')")
    port = free_port()
    server = Process("transformers serve", [exe, "serve", *args, "--device", "cpu", "--host", "127.0.0.1",
                                            "--port", str(port)],
                     loopback_env(OMP_NUM_THREADS=threads), port, work / f"transformers-serve-{port}.log", "/health")
    server.wait_ready(timeout)
    return server


def feedloop_serve(db_url: str, work: Path, *, policy: Path | None, key: str | None = None,
                   ready_path: str = "/ready", timeout: float = 120, source: Path = ROOT, **env) -> Process:
    """`python -m service serve` on a free loopback port against `db_url`, started and ready.
    `policy` becomes FEEDLOOP_POLICY_PATH (None: no model, so wait on /health instead); `key`
    becomes FEEDLOOP_INIT_API_KEY, an operator key; `source` is the tree whose code runs (this
    one, or an older commit's from `checkout`); `env` adds FEEDLOOP_* settings."""
    port = free_port()
    child_env = loopback_env(DATABASE_URL=db_url, FEEDLOOP_HOME=work / "home", FEEDLOOP_HOST="127.0.0.1",
                             FEEDLOOP_PORT=port, **env)
    child_env.pop("FEEDLOOP_POLICY_PATH", None)
    if policy is not None:
        child_env["FEEDLOOP_POLICY_PATH"] = str(policy)
    if key is not None:
        child_env["FEEDLOOP_INIT_API_KEY"] = key
    server = Process("feedloop serve", [sys.executable, "-m", "service", "serve"], child_env, port,
                     work / f"api-{port}.log", ready_path, cwd=source)
    server.wait_ready(timeout)
    return server
