"""What partitioning the exchange tables (migration 013) costs a deployment that already has a
record, and what retention costs then. A scratch database is migrated to 012, seeded with SQL
`generate_series` (exchanges of two choices spread evenly over --days, one feedback row for
each, a ranking for every 7th, a pairwise preference for every 9th, the stored pairs rolled
forward), then:

  migrate     the time migration 013 takes to rebuild the tables partitioned, rows included
  rows        every row kept (counts before and after)
  retention   the time dropping the months older than --retention-days takes, and what is left

    python bench/partitions.py [--exchanges 1000000] [--days 365] [--retention-days 180]

The scratch database is dropped at the end.
"""
import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psycopg

from common import ADMIN_URL, ScratchDatabase  # common put the repository on sys.path
from store import derive, feedback, partitions
from store.db import migrate

SEED = """
SET synchronous_commit = off;
-- seeding only: triggers off (the counters are written in one go at the end)
SET session_replication_role = replica;
INSERT INTO api_keys (key_hash, prefix, name, role) VALUES ('h', 'p', 'seed', 'user');
INSERT INTO model_versions (kind, path, content_hash, status) VALUES ('policy', '/seed', '0', 'archived');
INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id, stream,
                           batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT 'chatcmpl-' || g, 1, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'q' || g / 4)),
       md5((g / 4)::text), '{}', 1, false, 1, 1, 1, 0, 0,
       now() - make_interval(secs => %(days)s * 86400.0 * (%(n)s - g) / %(n)s)
FROM generate_series(1, %(n)s) g;
INSERT INTO completions (request_id, choice_index, text, finish_reason, completion_tokens, model_version_id)
SELECT g, i, 'answer ' || (g + i) %% 5, 'stop', 1, 1 FROM generate_series(1, %(n)s) g, generate_series(0, 1) i;
INSERT INTO feedback (completion_id, author_key_id, kind, value)
SELECT 2 * g - g %% 2, 1, CASE WHEN g %% 3 = 0 THEN 'rating' ELSE 'thumbs' END,
       CASE WHEN g %% 3 = 0 THEN 1 + g %% 7 WHEN g / 2 %% 2 = 0 THEN 1 ELSE -1 END
FROM generate_series(1, %(n)s) g;
INSERT INTO rankings (request_id, author_key_id, ordering) SELECT g, 1, '[1, 0]' FROM generate_series(1, %(n)s, 7) g;
INSERT INTO preferences (source, author_key_id, chosen_completion_id, rejected_completion_id, strength)
SELECT 'pairwise', 1, 2 * g - 1, 2 * g, 1 FROM generate_series(1, %(n)s, 9) g;
SET session_replication_role = origin;
INSERT INTO version_stats (version_id, shard, requests, completions, thumbs, rating)
SELECT 1, -2, %(n)s, 2 * %(n)s, count(*) FILTER (WHERE kind = 'thumbs'), count(*) FILTER (WHERE kind = 'rating')
FROM feedback;
"""
TABLES = ("chat_requests", "completions", "feedback", "rankings", "preferences", "training_pairs")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exchanges", type=int, default=1_000_000)
    p.add_argument("--days", type=float, default=365, help="the seeded exchanges span this many days up to now")
    p.add_argument("--retention-days", type=float, default=180)
    p.add_argument("--admin-url", default=ADMIN_URL, help="a server where the scratch database is created")
    return p.parse_args()


def counts(conn) -> dict[str, int]:
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def seed(url: str, n: int, days: float) -> float:
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in SEED.split(";\n"):
            if statement.strip():
                conn.execute(statement, dict(n=n, days=days))
        # stored pairs as a deployment at 012 has them (one for every other exchange, its two choices)
        conn.execute("INSERT INTO training_pairs (pair_key, source, grp, event_id, judged_at, prompt_hash,"
                     " chosen_completion_id, rejected_completion_id, versions, margin, origin)"
                     " SELECT 'thumbs:' || 2 * g - 1 || '>' || 2 * g, 'thumbs', 'thumbs:' || 2 * g - 1 || '>' || 2 * g,"
                     " g, now(), md5((g / 4)::text), 2 * g - 1, 2 * g, '{1}', 0, '{}'"
                     " FROM generate_series(1, %(n)s, 2) g", dict(n=n))
        conn.execute("UPDATE training_pairs_state SET watermark = (SELECT last_value FROM feedback_events)")
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - t0


async def expire(url: str, days: float) -> tuple[list[str], float, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        t0 = time.perf_counter()
        dropped = await partitions.expire(conn, retention_days=days)
        took = time.perf_counter() - t0
        await derive.refresh_pairs(conn, upto=await feedback.current_watermark(conn))  # rounds go on
        return dropped, took, await derive.count_new_pairs(conn, after=0)


def main() -> None:
    args = parse_args()
    db = ScratchDatabase(args.admin_url, Path(tempfile.mkdtemp(prefix="feedloop-bench-partitions-")))
    try:
        print(f"database: {db.where}; {args.exchanges:,} exchanges over {args.days:g} days", flush=True)
        migrate(db.url, below=13)
        print(f"seed (at 012): {seed(db.url, args.exchanges, args.days):.1f} s", flush=True)
        with psycopg.connect(db.url, autocommit=True) as conn:
            before = counts(conn)
        t0 = time.perf_counter()
        applied = migrate(db.url)
        took = time.perf_counter() - t0
        with psycopg.connect(db.url, autocommit=True) as conn:
            after = counts(conn)
            months = conn.execute("SELECT count(*) FROM pg_inherits WHERE inhparent = 'chat_requests'::regclass"
                                  ).fetchone()[0]
        print(f"migrate {applied}: {took:.1f} s; chat_requests in {months} partitions (default included)")
        print(f"{'table':<16}{'before':>12}{'after':>12}")
        for t in TABLES:
            print(f"{t:<16}{before[t]:>12,}{after[t]:>12,}")
        dropped, took, pairs = asyncio.run(expire(db.url, args.retention_days))
        with psycopg.connect(db.url, autocommit=True) as conn:
            left = counts(conn)
        print(f"retention {args.retention_days:g} days: dropped {len(dropped)} months in {took:.2f} s "
              f"({', '.join(dropped)}); left: " + ", ".join(f"{t} {left[t]:,}" for t in TABLES)
              + f"; stored pairs after a roll-forward: {pairs:,}")
    finally:
        db.close()


if __name__ == "__main__":
    main()
