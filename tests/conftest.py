"""Test infrastructure: a real PostgreSQL (the machine's through DATABASE_URL, else an embedded
pgserver), a migrated template database cloned per test, the bootstrap policy built once by the
real trainer CLI, and real `feedloop serve` processes talking HTTP."""
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_KEY = "fl-test-operator-key"
os.environ.setdefault("FEEDLOOP_TORCH_THREADS", "1")  # two cores: server and tests share them


# --- database -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def admin_url(tmp_path_factory) -> str:
    """A server where tests may create databases."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import pgserver
    # pgserver runs postgres as its own user: every parent of the data directory must be
    # traversable by it, which pytest's private tmp directories are not.
    pgdata = Path(tempfile.mkdtemp(prefix="feedloop-test-pg-"))
    pgdata.chmod(0o755)
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    yield server.get_uri()
    server.cleanup()


def _with_db(url: str, name: str) -> str:
    return str(psycopg.conninfo.make_conninfo(url, dbname=name))


@pytest.fixture(scope="session")
def template_db(admin_url) -> str:
    """A database with every migration applied, cloned by `new_database`."""
    from store.db import migrate
    name = f"feedloop_tmpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate(_with_db(admin_url, name))
    yield name
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def new_database(admin_url, template_db):
    """Factory: a fresh migrated database (a clone of the template); dropped at session end."""
    made = []

    def make() -> str:
        name = f"feedloop_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        made.append(name)
        return _with_db(admin_url, name)

    yield make
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(new_database) -> str:
    return new_database()


# --- the bootstrap policy -------------------------------------------------------------------

BOOTSTRAP_INPUTS = ["trainer/bootstrap.py", "trainer/sft.py", "trainer/optim.py", "trainer/tokenizer.py",
                    "lm/chat.py", "lm/checkpoint.py", "schemas/bundled.py", "schemas/data/demonstrations.jsonl"]


def _source_digest() -> str:
    """The bootstrap's inputs: its code and bundled data. Same inputs, same checkpoint."""
    h = hashlib.sha256()
    for name in BOOTSTRAP_INPUTS:
        if (ROOT / name).exists():
            h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def policy_path() -> Path:
    """The real bootstrap, built once by `python -m trainer bootstrap` (cached by its inputs)."""
    out = ROOT / ".feedloop" / "test-cache" / f"bootstrap-{_source_digest()}"
    if not out.exists():
        built = subprocess.run([sys.executable, "-m", "trainer", "bootstrap", "--no-register", "--out", str(out)],
                               cwd=ROOT, env=dict(os.environ, FEEDLOOP_TORCH_THREADS="2"))
        if built.returncode and not out.exists():  # another session publishing the same one first is fine
            raise RuntimeError("bootstrap failed")
    return out


V2_ANSWER = "I am the second version."


@pytest.fixture(scope="session")
def v2_path(policy_path, tmp_path_factory) -> Path:
    """A policy that answers 'Hello!' differently: the bootstrap fine-tuned by the real SFT."""
    from trainer.sft import SFTConfig, fine_tune
    return fine_tune(policy_path, tmp_path_factory.mktemp("v2") / "policy",
                     SFTConfig(epochs=30, batch_size=1, lr=1e-3, device="cpu"),
                     [{"prompt": "Hello!", "completion": V2_ANSWER}], config={"test": "v2"})


def register(db_url: str, path: Path, status: str = "candidate", **target) -> int:
    """Register a checkpoint in the server's database as v1's child (optionally with its serving
    target: `endpoint`, `model_id`); returns its id."""
    import asyncio

    from store.registry import register_checkpoint

    async def go():
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            async with conn.transaction():
                v = await register_checkpoint(conn, path=path, kind="policy", status=status,
                                              actor="test", parent_id=1, reference_id=1, **target)
            return v.id
    return asyncio.run(go())


def trained_answers(prompt: str) -> set[str]:
    """The bundled demonstrations' answers to `prompt`: greedily, the bootstrap policy says one."""
    from schemas.bundled import bundled_demonstrations
    return {d["completion"] for d in bundled_demonstrations() if d["prompt"] == prompt}


# --- servers --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `feedloop serve` process on its own port and database."""

    def __init__(self, db_url: str, home: Path, **env):
        self.db_url, self.port = db_url, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"server-{self.port}.log"
        self.env = dict(os.environ, DATABASE_URL=db_url, FEEDLOOP_HOME=str(home),
                        FEEDLOOP_PORT=str(self.port), FEEDLOOP_INIT_API_KEY=OPERATOR_KEY,
                        **{k: str(v) for k, v in env.items()})
        self.proc = None

    def start(self, timeout: float = 90) -> "Server":
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=self.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client(self, key: str = OPERATOR_KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def create_key(self, role: str = "user", name: str = "test") -> str:
        with self.client() as c:
            r = c.post("/v1/admin/keys", json={"name": name, "role": role})
            r.raise_for_status()
            return r.json()["key"]


@pytest.fixture(scope="module")
def server(new_database, policy_path, tmp_path_factory):
    """One server per test module, on a fresh database, serving the bootstrap policy as v1."""
    s = Server(new_database(), tmp_path_factory.mktemp("home"), FEEDLOOP_POLICY_PATH=policy_path).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def user_key(server) -> str:
    return server.create_key("user", "alice")


@pytest.fixture
def operator(server) -> httpx.Client:
    with server.client(OPERATOR_KEY) as c:
        yield c


@pytest.fixture
def user(server, user_key) -> httpx.Client:
    with server.client(user_key) as c:
        yield c


@pytest.fixture
def openai_client(server, user_key):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)


def answer_from(fingerprint: str, ask, timeout: float = 60):
    """Ask (`ask()` returns a chat completion) until the answer comes from version `fingerprint`
    (a swap reaches serving asynchronously); that answer."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = ask()
        if r.system_fingerprint == fingerprint:
            return r
        time.sleep(0.1)
    raise AssertionError(f"still not serving {fingerprint}")
