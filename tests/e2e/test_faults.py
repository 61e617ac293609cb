"""Database faults and crashes against a real server and a PostgreSQL this module starts, stops and
restarts itself (tests/pgcluster.py: its own cluster on its own port, never the machine's
server), under a few clients chatting and giving feedback:

- a restart, a 10 s outage and a 60 s outage: no 500 ever; while the database is away requests
  fail fast (503 with Retry-After, within 2 s); answers generated meanwhile are spooled and
  recorded once it is back; /ready is 200 within 2 s of the database accepting connections;
  no acknowledged write is lost;
- `kill -9` of the engine process under load: what it was generating fails fast (503 with
  Retry-After), a fresh engine of the same version serves within seconds, and nothing acknowledged
  is lost;
- `kill -9` of the API under load, and during an outage with spooled answers: after a restart
  every acknowledged write is there and no exchange is half-written."""
from pathlib import Path
import os
import signal
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from tests.conftest import OPERATOR_KEY, Server
from tests.pgcluster import Cluster

pytestmark = pytest.mark.slow
FAIL_FAST_S = 2.0
READY_WITHIN_S = 2.0


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    c.start()
    yield c
    c.remove()


@pytest.fixture(scope="module")
def db_url(cluster):
    from store.db import migrate
    url = cluster.database(f"faults_{uuid.uuid4().hex[:8]}")
    migrate(url)
    return url


@pytest.fixture(scope="module")
def api(db_url, policy_path, tmp_path_factory):
    s = Server(db_url, tmp_path_factory.mktemp("faults"), FEEDLOOP_POLICY_PATH=policy_path,
               FEEDLOOP_POLL_SECONDS=2).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def user_key(api):
    return api.create_key("user", "load")


class Load:
    """`chatters` clients asking tiny questions and `raters` clients giving a thumbs on answers
    they were given, each request timed; what was acknowledged is kept to check against the
    database afterwards."""

    def __init__(self, server: Server, key: str, chatters: int = 2, raters: int = 1):
        self.server, self.key = server, key
        # (kind, status, seconds, headers, when it was sent: perf_counter)
        self.results: list[tuple[str, int, float, dict | None, float]] = []
        self.chats: dict[str, int] = {}  # acknowledged response id -> n
        self.thumbs: dict[str, tuple[str, int]] = {}  # acknowledged feedback id -> (response id, value)
        self.rated: set[str] = set()
        self.lock, self.stop_event = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._chat, daemon=True) for _ in range(chatters)]
        self.threads += [threading.Thread(target=self._rate, daemon=True) for _ in range(raters)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(30)

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def _timed(self, kind: str, call) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            r = call()
        except httpx.HTTPError as e:  # the API itself was killed: not a response
            with self.lock:
                self.results.append((kind, -1, time.perf_counter() - started, {"error": repr(e)}, started))
            time.sleep(0.2)
            return None
        with self.lock:
            self.results.append((kind, r.status_code, time.perf_counter() - started, dict(r.headers), started))
        if r.status_code == 503:
            time.sleep(0.1)
        return r

    def _chat(self) -> None:
        with self._client() as c:
            while not self.stop_event.is_set():
                n = 1 + len(self.results) % 2
                r = self._timed("chat", lambda: c.post("/v1/chat/completions", json={
                    "model": "feedloop", "max_tokens": 3, "n": n, "messages": [{"role": "user", "content": "Hi"}]}))
                if r is not None and r.status_code == 200:
                    with self.lock:
                        self.chats[r.json()["id"]] = n

    def _rate(self) -> None:
        with self._client() as c:
            while not self.stop_event.is_set():
                with self.lock:
                    todo = next((rid for rid in self.chats if rid not in self.rated), None)
                    if todo:
                        self.rated.add(todo)
                if todo is None:
                    time.sleep(0.05)
                    continue
                value = 1 if len(self.rated) % 2 else -1
                body = {"response_id": todo, "choice_index": 0, "kind": "thumbs", "value": value}
                key = uuid.uuid4().hex
                while not self.stop_event.is_set():  # retried with its idempotency key until answered
                    r = self._timed("feedback", lambda: c.post("/v1/feedback", json=body,
                                                               headers={"Idempotency-Key": key}))
                    if r is not None and r.status_code == 200:
                        with self.lock:
                            self.thumbs[r.json()["id"]] = (todo, value)
                        break
                    if r is not None and r.status_code not in (503,):
                        break

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, status, *_ in self.results:
            out[status] = out.get(status, 0) + 1
        return out


def assert_no_500s_and_503s_fail_fast(load: Load):
    assert not [r for r in load.results if r[1] >= 500 and r[1] != 503], load.statuses()
    unavailable = [r for r in load.results if r[1] == 503]
    assert all(r[3].get("retry-after") for r in unavailable)
    slow = [r for r in unavailable if r[2] > FAIL_FAST_S]
    assert not slow, f"503s slower than {FAIL_FAST_S} s: {[round(r[2], 2) for r in slow]}"


def wait_ready_after(server: Server, since: float) -> float:
    """Seconds from `since` (the database accepting connections again) to /ready's 200."""
    deadline = since + 30
    while time.perf_counter() < deadline:
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return time.perf_counter() - since
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("not ready 30 s after the database came back")


def assert_nothing_lost(server: Server, load: Load, timeout: float = 30):
    """Every acknowledged chat is recorded whole (spooled ones once drained), every acknowledged
    thumbs is there with its value, and no exchange anywhere is half-written."""
    deadline = time.time() + timeout
    while True:
        with psycopg.connect(server.db_url) as conn:
            recorded = dict(conn.execute(
                "SELECT r.response_id, count(c.id) FROM chat_requests r LEFT JOIN completions c "
                "ON c.request_id = r.id GROUP BY r.response_id").fetchall())
            half = conn.execute("SELECT count(*) FROM chat_requests r WHERE (r.params->>'n')::int <> "
                                "(SELECT count(*) FROM completions c WHERE c.request_id = r.id)").fetchone()[0]
            thumbs = {f"fb_{i}": v for i, v in conn.execute("SELECT id, value FROM feedback")}
        missing = [rid for rid in load.chats if rid not in recorded]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"{len(missing)} acknowledged chats not recorded"
    assert half == 0, "half-written exchanges"
    assert all(recorded[rid] == n for rid, n in load.chats.items())
    lost = [fid for fid in load.thumbs if fid not in thumbs]
    assert not lost, f"{len(lost)} acknowledged thumbs lost"
    assert all(thumbs[fid] == value for fid, (_, value) in load.thumbs.items())


def long_chats(server: Server, key: str, count: int) -> list:
    """Chats that pass their key check now and finish generating a moment later: in flight when
    the database goes away, so their answers need the spool."""
    results = []

    def ask():
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "feedloop", "max_tokens": 96, "temperature": 1.0,
                             "messages": [{"role": "user", "content": "Tell me a long story."}]})
        results.append(r)

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for t in threads:
        t.start()
    return threads, results


def test_an_idle_server_does_not_notice_a_restart(api, cluster, user_key):
    with api.client(user_key) as c:
        assert c.get("/v1/models").status_code == 200
        cluster.restart()
        assert httpx.get(api.url + "/ready").status_code == 200  # the first probe after it
        assert [c.get("/v1/models").status_code for _ in range(20)] == [200] * 20


def test_a_restart_under_load(api, cluster, user_key):
    with Load(api, user_key) as load:
        time.sleep(2)
        cluster.restart()
        back = time.perf_counter()
        took = wait_ready_after(api, back)
        time.sleep(2)
    print(f"restart: ready {took:.2f} s after; statuses {load.statuses()}")
    assert took <= READY_WITHIN_S, took
    assert_no_500s_and_503s_fail_fast(load)
    assert load.chats and load.thumbs
    assert_nothing_lost(api, load)


@pytest.mark.parametrize("outage", [10, 60])
def test_an_outage_under_load(api, cluster, user_key, outage):
    with Load(api, user_key) as load:
        time.sleep(2)
        threads, spooled = long_chats(api, user_key, 2)
        time.sleep(0.3)
        cluster.stop()
        time.sleep(outage)
        with api.client(user_key) as c:  # failing fast, in OpenAI's shape, with Retry-After
            r = c.get("/v1/models")
            assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"]
            assert httpx.get(api.url + "/ready").json()["error"]["message"] == "The database is not reachable."
        cluster.start()
        back = time.perf_counter()
        took = wait_ready_after(api, back)
        time.sleep(2)
        for t in threads:
            t.join(60)
    slowest = max((r[2] for r in load.results if r[1] == 503), default=0)
    print(f"{outage} s outage: ready {took:.2f} s after; statuses {load.statuses()}; slowest 503 {slowest:.2f} s")
    assert took <= READY_WITHIN_S, took
    assert_no_500s_and_503s_fail_fast(load)
    assert [r.status_code for r in spooled] == [200, 200], [r.text for r in spooled]
    load.chats.update({r.json()["id"]: 1 for r in spooled})
    assert load.statuses().get(503), "nothing was tried during the outage"
    assert_nothing_lost(api, load)


def grandchildren(pid: int) -> list[int]:
    """The engine processes of an API process: forked by its forkserver, one of its children."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    children = {p for p, parent in parents.items() if parent == pid}
    return sorted(p for p, parent in parents.items() if parent in children)


def engines_lost(server: Server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('feedloop_engines_lost_total{version="v1"}'))


def test_kill_9_of_the_engine_process_under_load(api, user_key):
    [engine] = grandchildren(api.proc.pid)
    with Load(api, user_key) as load:
        time.sleep(2)
        os.kill(engine, signal.SIGKILL)
        killed = time.perf_counter()
        while time.perf_counter() - killed < 60:  # until a chat is answered by a fresh engine
            with load.lock:
                back = [r for r in load.results if r[0] == "chat" and r[1] == 200 and r[4] > killed]
            if back:
                break
            time.sleep(0.05)
        time.sleep(1)
    print(f"engine kill -9: a chat sent {back[0][4] - killed:.2f} s after was answered; statuses {load.statuses()}")
    assert back and back[0][4] - killed < 30, "no fresh engine within 30 s of the engine process's death"
    assert not [r for r in load.results if r[1] == -1], "requests left without an answer"
    assert_no_500s_and_503s_fail_fast(load)
    [fresh] = grandchildren(api.proc.pid)
    assert fresh != engine
    assert engines_lost(api) == 1
    with api.client(user_key) as c:
        assert c.post("/v1/chat/completions", json={"model": "v1", "max_tokens": 3,
                                                    "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
    assert_nothing_lost(api, load)


def test_kill_9_of_the_api_under_load_and_with_a_spool(api, cluster, user_key):
    with Load(api, user_key) as load:
        time.sleep(3)
        os.kill(api.proc.pid, signal.SIGKILL)
        api.proc.wait()
    api.start()  # same home, same database
    print(f"kill -9: {len(load.chats)} chats and {len(load.thumbs)} thumbs acknowledged; {load.statuses()}")
    assert_nothing_lost(api, load)
    # answers spooled while the database is away survive a kill -9 and are recorded at the next start
    threads, spooled = long_chats(api, user_key, 2)
    time.sleep(0.3)
    cluster.stop()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in spooled] == [200, 200], [r.text for r in spooled]
    os.kill(api.proc.pid, signal.SIGKILL)
    api.proc.wait()
    cluster.start()
    api.start()
    with psycopg.connect(api.db_url) as conn:
        recorded = {r[0] for r in conn.execute("SELECT response_id FROM chat_requests")}
    assert {r.json()["id"] for r in spooled} <= recorded
    with api.client(OPERATOR_KEY) as op:
        ex = op.get(f"/v1/admin/exchanges/{spooled[0].json()['id']}").json()
        assert ex["choices"][0]["text"] == spooled[0].json()["choices"][0]["message"]["content"]
