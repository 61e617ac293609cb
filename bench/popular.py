"""Does a prompt asked thousands of times cost a round more? A scratch database holds, for each
--answers count, one prompt asked that many times with every answer judged (thumbs up and down
by turns), and one asked 8 times, the same; the stored pairs are rolled forward. Then for each
prompt one more thumbs comes in and a round rolls the pairs forward: its time, the pages of the
tables it touched (pg_statio, as bench/growth.py counts them) and the pairs the prompt has.
A prompt's pairs are made among its 128 most recently judged answers (migration 020), so past 128
answers the round's work should not grow; ratios are against the largest --answers count's
smallest, and against the 8-answer prompt.

    python bench/popular.py [--answers 200,2000]

The scratch database is dropped at the end.
"""
import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import psycopg

from common import ADMIN_URL, ScratchDatabase
from growth import pages, setup  # common put the repository on sys.path
from store import derive, feedback

SEED = """
INSERT INTO chat_requests (response_id, api_key_id, messages, prompt_hash, params, model_version_id, stream,
                           batch_rows, prompt_tokens, completion_tokens, queue_ms, total_ms, created_at)
SELECT 'chatcmpl-' || %(name)s || '-' || g, %(key)s,
       jsonb_build_array(jsonb_build_object('role', 'user', 'content', %(name)s)), md5(%(name)s), '{}',
       %(version)s, false, 1, 1, 1, 0, 0, now() - make_interval(mins => g)
FROM generate_series(1, %(n)s) g;
INSERT INTO completions (request_id, request_created_at, choice_index, text, finish_reason, completion_tokens,
                         model_version_id)
SELECT id, created_at, 0, 'Answer ' || id, 'stop', 1, %(version)s FROM chat_requests WHERE prompt_hash = md5(%(name)s);
INSERT INTO feedback (completion_id, exchange_at, author_key_id, kind, value)
SELECT c.id, c.request_created_at, %(key)s, 'thumbs', CASE WHEN c.id %% 2 = 0 THEN 1 ELSE -1 END
FROM completions c JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE rq.prompt_hash = md5(%(name)s)
"""
NEW_THUMBS = """
INSERT INTO feedback (completion_id, exchange_at, author_key_id, kind, value)
SELECT c.id, c.request_created_at, %(key)s + 1, 'thumbs', 1
FROM completions c JOIN chat_requests rq ON rq.id = c.request_id AND rq.created_at = c.request_created_at
WHERE rq.prompt_hash = md5(%(name)s) ORDER BY c.id LIMIT 1
"""


async def one_round(url: str, name: str, key: int) -> dict:
    """One new thumbs on the prompt `name`, then a round's roll-forward: ms, pages, the prompt's pairs."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(NEW_THUMBS, dict(name=name, key=key))
        upto = await feedback.current_watermark(conn)
        before = await pages(conn)
        t0 = time.perf_counter()
        await derive.refresh_pairs(conn, upto=upto)
        ms = (time.perf_counter() - t0) * 1000
        after = await pages(conn)
        pairs = (await (await conn.execute("SELECT count(*) FROM training_pairs WHERE prompt_hash = md5(%s)",
                                           (name,))).fetchone())[0]
    return dict(ms=ms, pages=sum(after) - sum(before), pairs=pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", default="200,2000", help="judged answers of each popular prompt")
    p.add_argument("--admin-url", default=ADMIN_URL, help="a server where the scratch database is created")
    args = p.parse_args()
    counts = [8] + [int(n) for n in args.answers.split(",")]
    db = ScratchDatabase(args.admin_url, Path(tempfile.mkdtemp(prefix="feedloop-bench-popular-")))
    print(f"bench: scratch database {db.name} on {db.where}", flush=True)
    try:
        key, version = setup(db.url, days=1)
        with psycopg.connect(db.url, autocommit=True) as conn:
            for n in counts:
                for statement in SEED.split(";\n"):
                    conn.execute(statement, dict(name=f"prompt of {n}", key=key, version=version, n=n))
            conn.execute("VACUUM ANALYZE")

        async def first():
            async with await psycopg.AsyncConnection.connect(db.url, autocommit=True) as conn:
                await derive.refresh_pairs(conn, upto=await feedback.current_watermark(conn))
        asyncio.run(first())
        rows = {n: asyncio.run(one_round(db.url, f"prompt of {n}", key)) for n in counts}
    finally:
        db.close()
    print(f"\n{'judged answers':>14} {'round ms':>9} {'pages':>8} {'its pairs':>10}")
    for n, r in rows.items():
        print(f"{n:>14} {r['ms']:>9.1f} {r['pages']:>8} {r['pairs']:>10}")
    big, small = rows[counts[-1]], rows[counts[1]]
    print(f"\nratios {counts[-1]} / {counts[1]} answers: round time {big['ms'] / small['ms']:.3f}, "
          f"pages {big['pages'] / small['pages']:.3f}")
    print(f"ratios {counts[-1]} / 8 answers:    round time {big['ms'] / rows[8]['ms']:.3f}, "
          f"pages {big['pages'] / rows[8]['pages']:.3f}")


if __name__ == "__main__":
    main()
