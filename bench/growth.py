"""Does the record's size show in the online paths or a round? One scratch database is seeded
with SQL `generate_series` to each size in turn (exchanges of two choices, one feedback row
each: thumbs or rating, several authors; the history reaches back --days at the largest size,
one exchange every days / largest size, into the month partitions of migration 013), then at
each size the same work is measured:

  chat      what a chat request writes (`store.exchanges.record_exchange`, two choices, one
            transaction), from --clients concurrent connections, --ops times
  feedback  what POST /v1/feedback runs (`store.feedback.record_feedback`: ownership lookup,
            the watermark lock, the upsert, commit) on answers drawn from the newest --recent
            exchanges: the same work at every size, as a deployment's feedback mostly comes
            soon after the answer (the UI's thumbs)
  fb old    the same on answers drawn uniformly from the whole history: at 10M most of them are
            on pages outside Postgres's buffers, so this shows the cache, not the queries
  round     a round's derivation: the stored pairs rolled forward over the feedback events the
            two feedback phases just wrote (the same number at every size), counted, and the new
            pairs read (a round before the phases read the seeded history); with the pages of
            the tables it touched (pg_statio), and how many of them came from outside Postgres's
            buffers: the same pages at every size is the same work
  stats     GET /v1/admin/stats' work (`store.derive.feedback_stats`), median of 21 calls after
            10 on the same connection; timed after the round, since stats rolls the stored pairs
            forward too and would otherwise take the round's work

For chat and both feedback phases the pages one operation touched are counted as the round's
are: the same pages at every size is the same work, whatever the machine's load does to the time
(two shared cores vary by more than the 1.1 this is judged by), and the pages read from outside
the buffers are what a bigger `shared_buffers` would save.

The store functions the API and trainer call are timed directly: HTTP and generation cost the
same at every size, so leaving them out shows what the size changes. The first derivation of the
seeded history (every pair, once, as when migration 012 meets an old database) is timed too, for
contrast. Before the timed phases the new pairs are vacuumed and a checkpoint is taken, so at every
size the phases start with nothing of the seed's or the derivation's writes left to flush (at 10M
those are gigabytes, which the checkpointer would otherwise write out during the phases).
Ratios are largest size / smallest, and with three sizes or more largest / the one before it.

    python bench/growth.py [--sizes 10000,1000000] [--ops 400] [--clients 8]
    python bench/growth.py --sizes 10000,10000000     # the issue's 10M (about 4 GB of tables)
    python bench/growth.py --sizes 10000,1000000,10000000   # and 10M against 1M

The scratch database is dropped at the end.
"""
import argparse
import asyncio
import contextlib
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from common import ADMIN_URL, ScratchDatabase
from schemas.openai import completion_id  # common put the repository on sys.path
from schemas.records import CompletionRecord, FeedbackCreate
from store import derive, exchanges, feedback, runs
from store.db import migrate

AUTHORS = 16
PER_PROMPT = 4  # requests per distinct prompt: 8 answers judged against each other
# psycopg prepares a statement at its 6th use on a connection and Postgres keeps a generic plan
# after 5 executions of it: a serving pool's connections are long past both
STATS_WARMUP = 10
# Pages of the project's tables a statement touched: in Postgres's buffers, and read from outside
# them (the OS cache or the disk). The same pages at every size is the same work; time that still
# grows is where the pages come from.
PAGES = """
SELECT coalesce(sum(heap_blks_hit + coalesce(idx_blks_hit, 0) + coalesce(toast_blks_hit, 0)
                    + coalesce(tidx_blks_hit, 0)), 0)::bigint AS hit,
       coalesce(sum(heap_blks_read + coalesce(idx_blks_read, 0) + coalesce(toast_blks_read, 0)
                    + coalesce(tidx_blks_read, 0)), 0)::bigint AS read
FROM pg_statio_user_tables"""

SEED = """
SET synchronous_commit = off;
-- seeding only: triggers off (the counters are added in one go below)
SET session_replication_role = replica;
INSERT INTO chat_requests (id, response_id, api_key_id, messages, prompt_hash, params, model_version_id,
                           stream, batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT g + %(off)s,  -- response ids as the API makes them: a UUIDv7 of the exchange's time (schemas.openai)
       'chatcmpl-' || lpad(to_hex((extract(epoch FROM t.at) * 1000)::bigint), 12, '0') || '70008'
                   || lpad(to_hex(g), 15, '0'),
       %(key0)s + g %% %(authors)s,
       jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'Question ' || g / %(per_prompt)s || '?')),
       md5('q' || g / %(per_prompt)s), '{}', %(version)s, false, 1, 5, 6, 0, 1, t.at
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g
CROSS JOIN LATERAL (SELECT date_trunc('milliseconds', now() - make_interval(secs => (%(hi)s - g) * %(spacing)s)) AS at) t;
-- choices and feedback carry their exchange's time (the partition key, migration 013)
INSERT INTO completions (id, request_id, request_created_at, choice_index, text, finish_reason, completion_tokens,
                         model_version_id)
SELECT 2 * rq.id + i, rq.id, rq.created_at, i, 'Answer ' || (rq.id - %(off)s + i) %% 5, 'stop', 3, %(version)s
FROM chat_requests rq, generate_series(0, 1) i WHERE rq.id BETWEEN %(lo)s + %(off)s AND %(hi)s + %(off)s;
INSERT INTO feedback (completion_id, exchange_at, author_key_id, kind, value)
SELECT 2 * rq.id + g %% 2, rq.created_at, %(key0)s + g %% %(authors)s,
       CASE WHEN g %% 3 = 0 THEN 'rating' ELSE 'thumbs' END,
       CASE WHEN g %% 3 = 0 THEN 1 + g %% 7 WHEN g / 2 %% 2 = 0 THEN 1 ELSE -1 END
FROM chat_requests rq CROSS JOIN LATERAL (SELECT rq.id - %(off)s AS g) n
WHERE rq.id BETWEEN %(lo)s + %(off)s AND %(hi)s + %(off)s;
SET session_replication_role = origin;
SELECT setval('chat_requests_id_seq', %(hi)s + %(off)s), setval('completions_id_seq', 2 * (%(hi)s + %(off)s) + 1);
INSERT INTO version_stats AS s (version_id, shard, requests, completions, thumbs, thumbs_up, thumbs_down, rating,
                                rating_sum)
SELECT %(version)s, -2, %(hi)s::bigint - %(lo)s + 1, 2 * (%(hi)s::bigint - %(lo)s + 1),
       count(*) FILTER (WHERE kind = 'thumbs'), count(*) FILTER (WHERE kind = 'thumbs' AND value > 0),
       count(*) FILTER (WHERE kind = 'thumbs' AND value < 0), count(*) FILTER (WHERE kind = 'rating'),
       coalesce(sum(value) FILTER (WHERE kind = 'rating'), 0)
FROM feedback WHERE completion_id BETWEEN 2 * (%(lo)s + %(off)s) AND 2 * (%(hi)s + %(off)s) + 1
ON CONFLICT (version_id, shard) DO UPDATE SET
    requests = s.requests + EXCLUDED.requests, completions = s.completions + EXCLUDED.completions,
    thumbs = s.thumbs + EXCLUDED.thumbs, thumbs_up = s.thumbs_up + EXCLUDED.thumbs_up,
    thumbs_down = s.thumbs_down + EXCLUDED.thumbs_down, rating = s.rating + EXCLUDED.rating,
    rating_sum = s.rating_sum + EXCLUDED.rating_sum;
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,1000000", help="exchanges recorded at each measurement")
    p.add_argument("--ops", type=int, default=400, help="chat and feedback operations measured at each size")
    p.add_argument("--clients", type=int, default=8, help="concurrent connections")
    p.add_argument("--recent", type=int, default=10_000, help="the feedback phase judges the newest this many")
    p.add_argument("--days", type=float, default=180, help="how far back the largest size's history reaches")
    p.add_argument("--admin-url", default=ADMIN_URL, help="a server where the scratch database is created")
    return p.parse_args()


def setup(url: str, days: float) -> tuple[int, int]:
    """Author keys, one policy version and the months the history falls in; returns (first key
    id, version id)."""
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT ensure_exchange_partitions(since => now() - %s * interval '1 day')", (days,))
        ids = [conn.execute("INSERT INTO api_keys (key_hash, prefix, name, role) VALUES (%s, 'fl-', %s, 'user')"
                            " RETURNING id", (uuid.uuid4().hex, f"a{i}")).fetchone()[0] for i in range(AUTHORS)]
        version = conn.execute("INSERT INTO model_versions (kind, path, content_hash, status)"
                               " VALUES ('policy', '/bench', '0', 'active') RETURNING id").fetchone()[0]
    return ids[0], version


async def pages(conn) -> tuple[int, int]:
    """(hit, read): pages this database's tables gave so far, this connection's included (its
    pending counts flushed first: a backend reports them at most once a second otherwise)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    return await (await conn.execute(PAGES)).fetchone()


def seed(url: str, lo: int, hi: int, key0: int, version: int, spacing: float) -> tuple[float, int]:
    """Seeds exchanges lo..hi; returns (seconds, what to add to an exchange's number for its id)."""
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        # ids continue after the requests the measurements recorded
        off = conn.execute("SELECT coalesce(max(id), 0) FROM chat_requests").fetchone()[0] - (lo - 1)
        params = dict(lo=lo, hi=hi, off=off, key0=key0, authors=AUTHORS, per_prompt=PER_PROMPT, version=version,
                      spacing=spacing)
        for statement in SEED.split(";\n"):  # one at a time: bound parameters take one statement
            if statement.strip():
                conn.execute(statement, params)
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0, off


async def pool_pages(pool, clients: int) -> tuple[int, int]:
    """`pages` with every connection of the pool's counts flushed (each holds its own until it
    reports them)."""
    async with contextlib.AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(pool.connection()) for _ in range(clients)]
        for conn in conns[1:]:
            await conn.execute("SELECT pg_stat_force_next_flush()")
        return await pages(conns[0])


async def timed_ops(pool, clients: int, ops: int, op) -> list[float]:
    """`ops` calls of `op(conn, rng)` from `clients` concurrent connections: latencies in ms."""
    latencies, left = [], iter(range(ops))

    async def client(c: int):
        rng = random.Random(c)
        for _ in left:
            async with pool.connection() as conn:
                t0 = time.perf_counter()
                await op(conn, rng)
                latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client(c) for c in range(clients)))
    return latencies


def judged(url: str, size: int, offsets: list[tuple[int, int]], ops: int, newest: int) -> list[tuple[str, int]]:
    """`ops` seeded exchanges drawn uniformly from the `newest` (response id, exchange number), read
    before timing: a feedback phase judges them."""
    rng = random.Random(size + newest)
    numbers = [rng.randrange(max(1, size - newest + 1), size + 1) for _ in range(ops)]
    ids = [g + next(off for lo, off in reversed(offsets) if g >= lo) for g in numbers]
    with psycopg.connect(url) as conn:
        found = dict(conn.execute("SELECT id, response_id FROM chat_requests WHERE id = ANY(%s)", (ids,)).fetchall())
    return [(found[i], g) for i, g in zip(ids, numbers)]


async def measure(url: str, size: int, key0: int, version: int, targets: dict[str, list[tuple[str, int]]],
                  args) -> dict:
    async with AsyncConnectionPool(url, min_size=args.clients, max_size=args.clients, open=False,
                                   kwargs=dict(autocommit=True)) as pool:
        await pool.wait()

        async def chat(conn, rng):
            choices = [CompletionRecord(choice_index=i, text=f"Fresh answer {rng.random()}", finish_reason="stop",
                                        completion_tokens=3, model_version_id=version) for i in range(2)]
            async with conn.transaction():
                await exchanges.record_exchange(
                    conn, response_id=completion_id(), api_key_id=key0, user=None,
                    messages=[{"role": "user", "content": f"Question {rng.randrange(size // PER_PROMPT)}?"}],
                    params={}, model_version_id=version, stream=False, batch_rows=1, prompt_tokens=5,
                    queue_ms=0, first_token_ms=None, total_ms=1, choices=choices)

        async def judge(conn, rng, left):
            response_id, g = next(left)  # a seeded exchange, judged by the key that asked it
            kind = rng.choice(("thumbs", "rating"))
            body = FeedbackCreate(response_id=response_id, choice_index=rng.randrange(2), kind=kind,
                                  value=rng.choice((1, -1)) if kind == "thumbs" else rng.randint(1, 7))
            async with conn.transaction():
                await feedback.record_feedback(conn, feedback=body, author_key_id=key0 + g % AUTHORS,
                                               owned_by=key0 + g % AUTHORS)

        async with pool.connection() as conn:  # the history's pairs, as a round left them
            t0 = time.perf_counter()
            await derive.refresh_pairs(conn, upto=await feedback.current_watermark(conn))
            first = time.perf_counter() - t0
            print(f"  derived the history's pairs in {first:.1f}s; measuring", flush=True)
            # autovacuum's work after a bulk derivation (a server may run without it), then the seed's and
            # the derivation's writes flushed: the timed phases pay for their own writes, not for these
            await conn.execute("VACUUM ANALYZE training_pairs")
            await conn.execute("CHECKPOINT")
            last = await feedback.current_watermark(conn)
            await runs.finish_training_run(  # the round that read it: stats count what came after
                conn, id=(await runs.start_training_run(conn, kind="round", config={}, trigger="bench")).id,
                status="skipped", watermark=last, metrics={})
        judging = {name: iter(drawn) for name, drawn in targets.items()}
        phases = dict(chat=chat, feedback=lambda c, r: judge(c, r, judging["recent"]),
                      old=lambda c, r: judge(c, r, judging["old"]))
        timed, per_op = {}, {}
        for name, op in phases.items():  # each phase's latencies, and the pages one operation touched
            before = await pool_pages(pool, args.clients)
            timed[name] = await timed_ops(pool, args.clients, args.ops, op)
            per_op[name] = [(b - a) / args.ops for a, b in zip(before, await pool_pages(pool, args.clients))]
        async with pool.connection() as conn:
            # the round first: stats rolls the stored pairs forward too, and would take its work
            upto = await feedback.current_watermark(conn)
            before = await pages(conn)
            t0 = time.perf_counter()
            await derive.refresh_pairs(conn, upto=upto)
            new_pairs = await derive.count_new_pairs(conn, after=last, upto=upto)
            assert len(await derive.derive_pairs(conn, after=last, upto=upto)) == new_pairs
            round_ms = (time.perf_counter() - t0) * 1000
            round_hit, round_read = (b - a for a, b in zip(before, await pages(conn)))
            pairs = (await (await conn.execute("SELECT count(*) FROM training_pairs")).fetchone())[0]
            stats_ms = []
            for _ in range(STATS_WARMUP + 21):
                t0 = time.perf_counter()
                await derive.feedback_stats(conn)
                stats_ms.append((time.perf_counter() - t0) * 1000)
            stats_ms = stats_ms[STATS_WARMUP:]
    return dict(size=size, first_s=first, **timed, pages_per_op=per_op,
                stats=statistics.median(stats_ms), round=round_ms, round_pages=round_hit + round_read,
                round_read=round_read, new_events=upto - last, new_pairs=new_pairs, pairs=pairs)


def pct(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def report(rows: list[dict], seeded: dict[int, float], args) -> None:
    print(f"\ngrowth — {args.ops} chat and feedback operations from {args.clients} connections at each size\n")
    header = (f"{'exchanges':>10} {'seed s':>7} {'chat p50':>8} {'chat p99':>8} {'fb p50':>7} {'fb p99':>7} "
              f"{'old p50':>7} {'old p99':>7} {'stats ms':>8} {'round ms':>8} {'pages':>7} {'read':>6} {'new ev':>6} "
              f"{'new pairs':>9} {'pairs':>9} {'1st derive s':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['size']:>10} {seeded[r['size']]:>7.1f} {pct(r['chat'], 50):>8.2f} {pct(r['chat'], 99):>8.2f} "
              f"{pct(r['feedback'], 50):>7.2f} {pct(r['feedback'], 99):>7.2f} {pct(r['old'], 50):>7.2f} "
              f"{pct(r['old'], 99):>7.2f} {r['stats']:>8.2f} {r['round']:>8.1f} {r['round_pages']:>7} {r['round_read']:>6} "
              f"{r['new_events']:>6} {r['new_pairs']:>9} {r['pairs']:>9} {r['first_s']:>12.1f}")
    print("\npages of the tables one operation touched: in Postgres's buffers + read from outside them")
    for r in rows:
        print(f"{r['size']:>10} " + "  ".join(f"{name} {hit:.1f} + {read:.2f}"
                                             for name, (hit, read) in r["pages_per_op"].items()))
    # largest / smallest, and with three sizes or more largest / the one before it: the smallest
    # history's tables are small enough to scan whole, cheaper than any index, so past it the
    # ratio between two sizes that both read by index says what the size itself costs
    pairs = [(rows[-1], rows[0])] + ([(rows[-1], rows[-2])] if len(rows) > 2 else [])
    print(f"\n{'ratios':<34}" + "".join(f"{str(big['size']) + ' / ' + str(small['size']):>21}" for big, small in pairs))
    for name, f in (("chat p50", lambda r: pct(r["chat"], 50)), ("chat p99", lambda r: pct(r["chat"], 99)),
                    ("feedback p50", lambda r: pct(r["feedback"], 50)),
                    ("feedback p99", lambda r: pct(r["feedback"], 99)),
                    ("feedback on old answers p50", lambda r: pct(r["old"], 50)),
                    ("feedback on old answers p99", lambda r: pct(r["old"], 99)),
                    ("stats", lambda r: r["stats"]), ("round derivation", lambda r: r["round"]),
                    ("pages a chat touched", lambda r: sum(r["pages_per_op"]["chat"])),
                    ("pages a feedback touched", lambda r: sum(r["pages_per_op"]["feedback"])),
                    ("pages the round touched", lambda r: r["round_pages"]),
                    ("the round's pages per new pair", lambda r: r["round_pages"] / max(1, r["new_pairs"])),
                    ("first derivation of the history", lambda r: r["first_s"])):
        print(f"  {name:<32}" + "".join(f"{f(big) / f(small):>21.3f}" for big, small in pairs))

def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    db = ScratchDatabase(args.admin_url, Path(tempfile.mkdtemp(prefix="feedloop-bench-growth-")))
    print(f"bench: scratch database {db.name} on {db.where}", flush=True)
    try:
        key0, version = setup(db.url, args.days)
        spacing = args.days * 86400 / max(sizes)  # seconds between two exchanges' times
        rows, seeded, have, offsets = [], {}, 0, []
        for size in sizes:
            seeded[size], off = seed(db.url, have + 1, size, key0, version, spacing)
            offsets.append((have + 1, off))
            have = size
            print(f"  seeded {size} exchanges in {seeded[size]:.1f}s", flush=True)
            targets = dict(recent=judged(db.url, size, offsets, args.ops, args.recent),
                           old=judged(db.url, size, offsets, args.ops, size))
            rows.append(asyncio.run(measure(db.url, size, key0, version, targets, args)))
        report(rows, seeded, args)
    finally:
        db.close()


if __name__ == "__main__":
    main()
