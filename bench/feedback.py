"""Feedback events/s and latency at 64 concurrent clients against this API, next to pgbench's
rate for a single-row insert of the same shape, measured in the same run on the same database.

  api         a real `python -m service serve` process on a scratch database holding
              --completions recorded answers, owned round-robin by one user key per client; each
              client sends its next POST /v1/feedback (a thumbs or a rating, half and half, on a
              random completion of its own key) as soon as the last one returned, for --seconds,
              over one keep-alive HTTP/1.1 connection (a raw asyncio client, so the load
              generator costs little of the CPU the server needs)
  pgbench     pgbench -M prepared -c 64 for --seconds: the same upsert into `feedback` (same
              table, indexes, conflict rule and event sequence), one statement per transaction
  pgbench-tx  pgbench running every statement the API runs for one event: the key lookup, then
              the event's one statement (its completion found with the watermark lock taken, the
              upsert; autocommit, so one transaction)

The API server is stopped before pgbench runs, so each has the machine to itself.

    python bench/feedback.py [--seconds 8] [--clients 64] [--completions 16384] [--workers N]

Loopback only; the scratch database is dropped and the server stopped at the end.
"""
import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from common import ScratchDatabase, feedloop_serve, server_bench_parser
from store import exchanges, keys, locks  # common put the repository on sys.path
from store.db import migrate
from store.sql import Q

PROMPTS = 16  # distinct prompts the recorded answers answer


def parse_args() -> argparse.Namespace:
    p = server_bench_parser(__doc__)
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per system")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (and pgbench connections)")
    p.add_argument("--completions", type=int, default=16384, help="recorded answers to give feedback on")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="API worker processes (FEEDLOOP_WORKERS; feedback needs no engine)")
    return p.parse_args()


@dataclass
class Result:
    system: str
    clients: int
    events: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.events / self.seconds if self.seconds and self.events else None

    def pct(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[q - 1] if q < 100 else max(self.latencies_ms)


# --- a scratch database with answers to judge ------------------------------------------------

def seed(url: str, clients: int, completions: int) -> tuple[list[str], int, str]:
    """One user key per client, and `completions` recorded answers (one choice each) owned
    round-robin by them: answer i (completion id i + 1) belongs to key i mod clients.
    Returns the keys and the first key's id."""
    migrate(url)
    tag = uuid.uuid4().hex[:8]
    secrets = [f"fl-bench-{tag}-{i}" for i in range(clients)]  # pgbench-tx rebuilds them: KEY_PREFIX + i
    hashes = [exchanges.prompt_hash([{"role": "user", "content": f"Question {i}?"}]) for i in range(PROMPTS)]
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        # seeding only: triggers off (the response-id check takes a lock per exchange, too many for
        # one transaction of thousands; the counters are not what this bench reads)
        conn.execute("SET LOCAL session_replication_role = replica")
        ids = [conn.execute("INSERT INTO api_keys (key_hash, prefix, name, role) VALUES (%s, %s, %s, 'user')"
                            " RETURNING id", (keys.hash_key(k), k[:7], f"bench-{i}")).fetchone()[0]
               for i, k in enumerate(secrets)]
        assert ids == list(range(ids[0], ids[0] + clients))
        version = conn.execute("INSERT INTO model_versions (kind, path, content_hash, status)"
                               " VALUES ('policy', '/bench', '0', 'archived') RETURNING id").fetchone()[0]
        conn.execute(
            "INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id,"
            " stream, batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms)"
            " SELECT 'chatcmpl-bench-' || i, %(key0)s + i %% %(clients)s,"
            "  jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'Question ' || i %% %(prompts)s || '?')),"
            "  (%(hashes)s::text[])[1 + i %% %(prompts)s], '{}', %(version)s, false, 1, 5, 3, 0, 1"
            " FROM generate_series(0, %(n)s - 1) AS i ORDER BY i",
            dict(key0=ids[0], clients=clients, prompts=PROMPTS, hashes=hashes, version=version, n=completions))
        conn.execute("INSERT INTO completions (request_id, request_created_at, choice_index, text, finish_reason,"
                     " completion_tokens, model_version_id)"
                     " SELECT id, created_at, 0, 'Answer ' || id, 'stop', 3, %s FROM chat_requests ORDER BY id",
                     (version,))
        # one transaction, one time: every exchange (so every feedback row) is in one partition
        [(exchange_at,)] = conn.execute("SELECT DISTINCT created_at::text FROM chat_requests").fetchall()
        first = conn.execute("SELECT min(id) FROM completions").fetchone()[0]
        assert first == 1, "completion ids start at 1 in a fresh database"
        conn.execute("ANALYZE")
    return secrets, ids[0], exchange_at


# --- (a) the API ----------------------------------------------------------------------------

async def post(reader, writer, path: str, key: str, body: dict) -> int:
    """One POST over a keep-alive connection; returns the status code."""
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def event(rng: random.Random, response_id: str) -> dict:
    if rng.random() < 0.5:
        return {"response_id": response_id, "choice_index": 0, "kind": "thumbs", "value": rng.choice((1, -1))}
    return {"response_id": response_id, "choice_index": 0, "kind": "rating", "value": rng.randint(1, 7)}


async def closed_loop(port: int, keys: list[str], completions: int, seconds: float, result: Result | None):
    """Each client: its next event as soon as the last returned, until `seconds` have passed."""
    clients = len(keys)
    start = time.perf_counter()

    async def client(c: int):
        rng = random.Random(c)
        mine = range(c, completions, clients)  # answers its key produced
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() - start < seconds:
                t0 = time.perf_counter()
                status = await post(reader, writer, "/v1/feedback", keys[c],
                                    event(rng, f"chatcmpl-bench-{rng.choice(mine)}"))
                if result is not None:
                    result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    result.events += status == 200
                    result.errors += status != 200
        finally:
            writer.close()

    await asyncio.gather(*(client(c) for c in range(clients)))
    if result is not None:
        result.seconds = time.perf_counter() - start


def cpu_seconds(pgid: int) -> float | None:
    """CPU time the processes of a process group (the server and its workers) have used (Linux
    /proc), to show where an API event's time goes."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid):
            total, found = total + int(fields[11]) + int(fields[12]), True
    return total / os.sysconf("SC_CLK_TCK") if found else None


def key_prefix(keys: list[str]) -> str:
    return keys[0].removesuffix("0")


def bench_api(url: str, keys: list[str], args, work: Path) -> Result:
    # no model: feedback never touches the engine, so the server is ready when it answers /health
    with feedloop_serve(url, work, policy=None, ready_path="/health", timeout=60,
                        FEEDLOOP_WORKERS=args.workers) as server:
        asyncio.run(closed_loop(server.port, keys, args.completions, 1.0, None))  # warm-up
        result = Result("api", args.clients)
        before = cpu_seconds(server.proc.pid)
        asyncio.run(closed_loop(server.port, keys, args.completions, args.seconds, result))
        used = cpu_seconds(server.proc.pid) - before if before is not None else None
        result.note = f"POST /v1/feedback over HTTP ({args.workers} workers): auth, ownership, upsert, commit"
        if used is not None and result.events:
            result.note += f"; server {used / result.seconds:.2f} cores, {1000 * used / result.events:.2f} ms CPU/event"
        print(f"  api      {fmt(result.rate)} events/s", flush=True)
        return result


# --- (b) pgbench on the same database --------------------------------------------------------

def pgbench_exe() -> str | None:
    return shutil.which("pgbench") or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True)), None)


def as_pgbench(sql: str, **literals: str) -> str:
    """A named query with its %(name)s parameters as pgbench variables (or given SQL literals)."""
    return re.sub(r"%\((\w+)\)s", lambda m: literals.get(m.group(1), f":{m.group(1)}"), sql).rstrip(";") + ";\n"


PICK = """\\set cid random(1, :n)
\\set author_key_id :key0 + (:cid - 1) % :clients
\\set thumbs random(0, 1)
\\set value 2 * random(0, 1) - 1
\\set rating random(1, 7)
"""


def scripts(work: Path, prefix: str, exchange_at: str) -> dict[str, list[Path]]:
    """Per system, the script files (thumbs and rating half and half, as the API gets them)."""
    out = {"pgbench": [], "pgbench-tx": []}
    for kind, value in (("thumbs", ":value"), ("rating", ":rating")):
        literals = dict(kind=f"'{kind}'", value=value, text="NULL", completion_id=":cid",
                        exchange_at=f"'{exchange_at}'::timestamptz",
                        lock=str(locks.EVENTS))
        upsert = ("INSERT INTO feedback (completion_id, exchange_at, author_key_id, kind, value, text)"
                  f" VALUES (:cid, {literals['exchange_at']}, :author_key_id, '{kind}', {value}, NULL)"
                  " ON CONFLICT (completion_id, author_key_id, kind, exchange_at) DO UPDATE"
                  " SET value = EXCLUDED.value, text = EXCLUDED.text, event_id = EXCLUDED.event_id, updated_at = now()"
                  " WHERE (feedback.value, feedback.text) IS DISTINCT FROM (EXCLUDED.value, EXCLUDED.text);\n")
        single = work / f"upsert-{kind}.sql"
        single.write_text(PICK + upsert)
        # what the API runs per event: the key lookup (its own pool borrow), then the event's statement
        # (autocommit: one transaction)
        tx = work / f"api-tx-{kind}.sql"
        key_hash = f"encode(sha256(convert_to('{prefix}' || :ki, 'UTF8')), 'hex')"
        tx.write_text(PICK + "\\set rid :cid - 1\n\\set ki (:cid - 1) % :clients\n"
                      + as_pgbench(Q["get_api_key_by_hash"], key_hash=key_hash)
                      + as_pgbench(Q["record_feedback"], response_ids="ARRAY['chatcmpl-bench-' || :rid]",
                                   choice_indexes="ARRAY[0]", owners="ARRAY[:author_key_id]",
                                   ats="ARRAY[NULL::timestamptz]", author_key_ids="ARRAY[:author_key_id]",
                                   kinds=f"ARRAY[{literals['kind']}]", values=f"ARRAY[{value}]",
                                   texts="ARRAY[NULL::text]", lock=literals["lock"]))
        out["pgbench"].append(single)
        out["pgbench-tx"].append(tx)
    return out


def bench_pgbench(system: str, files: list[Path], url: str, key0: int, args, work: Path) -> Result:
    exe = pgbench_exe()
    result = Result(system, args.clients)
    if exe is None:
        result.note = "did not run: no pgbench on PATH or in /usr/lib/postgresql/*/bin"
        return result
    logs = work / f"log-{system}"
    logs.mkdir()
    argv = [exe, "-n", "-M", "prepared", "-c", str(args.clients), "-j", "2", "-T", str(max(1, round(args.seconds))),
            "-D", f"n={args.completions}", "-D", f"key0={key0}", "-D", f"clients={args.clients}",
            "-l", "--log-prefix", str(logs / "tx")]
    for f in files:
        argv += ["-f", f"{f}@1"]
    done = subprocess.run(argv + [url], capture_output=True, text=True, timeout=args.seconds + 120,
                          env=dict(os.environ, PGCONNECT_TIMEOUT="10"))
    if done.returncode != 0:
        result.note = "did not run: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return result
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    for f in logs.iterdir():  # per transaction: client, number, latency in µs, script, epoch, µs
        result.latencies_ms += [int(t) / 1000 for t in (line.split()[2] for line in f.read_text().splitlines())
                                if t.isdigit()]
    result.events = int(processed.group(1)) if processed else len(result.latencies_ms)
    result.seconds = result.events / float(tps.group(1)) if tps else args.seconds
    result.errors = int(failed.group(1)) if failed else 0
    result.note = ("one upsert statement per transaction" if system == "pgbench"
                   else "key lookup, then lookup + lock + upsert in one statement")
    print(f"  {system:<8} {fmt(result.rate)} events/s", flush=True)
    return result


# --- report ---------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def report(results: list[Result], args, where: str, load: float) -> None:
    print(f"\nfeedback events/s — {args.clients} clients, {args.seconds:.0f}s each, {args.completions} "
          f"completions, {where}, {os.cpu_count()} CPUs, load average {load:.1f} before the run\n"
          "(other work on a busy machine takes more CPU from the one server process than from pgbench's backends)\n")
    header = f"{'system':<11} {'clients':>7} {'events':>7} {'seconds':>7} {'events/s':>9} {'p50 ms':>7} " \
             f"{'p99 ms':>7} {'errors':>6}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.system:<11} {r.clients:>7} {r.events:>7} {fmt(r.seconds):>7} {fmt(r.rate):>9} "
              f"{fmt(r.pct(50), '.2f'):>7} {fmt(r.pct(99), '.2f'):>7} {r.errors:>6}  {r.note}")
    by = {r.system: r for r in results}
    api = by.get("api")
    print("\nratios of events/s (this API / reference):")
    for ref in ("pgbench", "pgbench-tx"):
        other = by.get(ref)
        ratio = fmt(api.rate / other.rate, ".3f") if api and other and api.rate and other.rate else "-"
        print(f"  api / {ref:<10} {ratio}")


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-feedback-"))
    db = ScratchDatabase(args.admin_url, work)
    print(f"bench: scratch database {db.name} on {db.where}, logs in {work}", flush=True)
    try:
        keys, key0, exchange_at = seed(db.url, args.clients, args.completions)
        load = os.getloadavg()[0]
        results = [bench_api(db.url, keys, args, work)]
        for system, files in scripts(work, key_prefix(keys), exchange_at).items():
            results.append(bench_pgbench(system, files, db.url, key0, args, work))
        with psycopg.connect(db.url) as conn:
            rows = conn.execute("SELECT count(*), max(event_id) FROM feedback").fetchone()
        report(results, args, db.where, load)
        print(f"\nfeedback rows at the end: {rows[0]} (one per completion, author and kind); "
              f"events drawn: {rows[1]}")
    finally:
        db.close()


if __name__ == "__main__":
    main()
