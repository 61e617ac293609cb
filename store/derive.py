"""Training data out: the one derivation of training pairs, demonstrations and KTO examples from
the feedback (export and the trainer both read it), pair counts, and per-version stats.

Derivation (`derive_pairs`), each pair carrying its source rows in `origin`:
  pairwise  a user's preference between two completions of one prompt, as given; margin = strength
  import    an imported pair, as given; margin from the file (default 0)
  ranking   a ranking of K choices: every two choices in different tiers, best first, so
            K(K-1)/2 pairs without ties and none between tied choices; margin 0; the ranking is
            the pairs' `group` (InstructGPT trains one ranking's pairs together)
  thumbs    per completion, its thumbs summed over authors; a completion that nets up against each
            completion of the same prompt (prompt hash) that nets down; margin 0
  rating    per completion, the mean of its ratings; completions of the same prompt with different
            means: the higher is chosen, margin = difference / RATING_SCALE
Thumbs and rating pairs are made among a prompt's most recently judged answers only (by each
answer's latest thumbs or rating; 128 of them, `judged_answers_per_prompt()` in migration 020), so
a prompt asked thousands of times costs a round what any other does and a new judgement always
pairs. They need different texts: the same words judged twice (greedy decoding, two
users) teach the reward model nothing but noise. Rows are judged by their current value (one per
completion, author and kind), so a thumbs that flips moves its pairs.
Demonstrations (`derive_demonstrations`): imported ones, and users' corrected answers with the
conversation they answer. A correction is not also paired as chosen over the answer it corrects:
a human-written answer against a sampled one teaches the reward model to tell people from the
policy rather than good from bad; the correction trains SFT, and the user's thumbs or rating on
the original still yields pairs. KTO examples (`derive_kto`): one per completion whose thumbs net
up (desirable) or down.
"""
import json
import math
from contextlib import asynccontextmanager
from datetime import datetime
from typing import AsyncIterator

from schemas.errors import Invalid
from schemas.records import (Demonstration, ExportFormat, KtoExample, StatsPublic, TrainingPair,
                             VersionStats, ranking_tiers)
from store import feedback, runs
from store.sql import execute, fetch_all, fetch_one, stream_all

RATING_SCALE = 6.0  # 7 against 1 is margin 1, as a pairwise preference of strength 1 is
NO_LIMIT = 2**63 - 1


def _prompt(messages: list[dict]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _window(after: int, upto: int | None) -> dict:
    if after < 0 or (upto is not None and upto < after):
        raise Invalid(f"bad event window ({after}, {upto}]: after >= 0 and upto >= after", param="upto")
    return dict(after=after, upto=NO_LIMIT if upto is None else upto)


def _ranking_pairs(row: dict) -> list[TrainingPair]:
    """K choices in tiers, best first: a pair for every two choices in different tiers."""
    tiers, pairs = ranking_tiers(row["ordering"]), []
    for rank, better in enumerate(tiers):
        for worse in tiers[rank + 1:]:
            for i in better:
                for j in worse:
                    pairs.append(TrainingPair(
                        prompt=_prompt(row["prompt"]), chosen=row["texts"][i], rejected=row["texts"][j],
                        margin=0.0, source="ranking", prompt_hash=row["prompt_hash"],
                        group=f"ranking:{row['id']}",
                        origin={"event_id": row["event_id"], "ranking": row["id"], "choices": [i, j],
                                "completions": [row["completion_ids"][i], row["completion_ids"][j]]}))
    return pairs


def _judged_pair(row: dict, source: str) -> TrainingPair:
    """A thumbs or rating pair between two completions, with every judgement behind it."""
    return TrainingPair(
        prompt=_prompt(row["prompt"]), chosen=row["chosen"], rejected=row["rejected"],
        margin=row.get("margin", 0.0), source=source, prompt_hash=row["prompt_hash"],
        group=f"{source}:{row['chosen_id']}>{row['rejected_id']}",
        origin={"event_id": row["event_id"], "feedback": row["feedback_ids"],
                "completions": [row["chosen_id"], row["rejected_id"]]})


async def derive_pairs(conn, *, after: int = 0, upto: int | None = None) -> list[TrainingPair]:
    """Every training pair whose newest source row has its event in (after, upto], judged by the
    rows with events <= upto (None: all so far), in event order. The rules are in the module doc.
    Read from the stored pairs, rolled forward to `upto` first; an `upto` older than the store
    is derived in full."""
    return [p async for p in stream_pairs(conn, after=after, upto=upto)]


async def stream_pairs(conn, *, after: int = 0, upto: int | None = None) -> AsyncIterator[TrainingPair]:
    """`derive_pairs` one at a time, read in batches: for exports of any size."""
    _window(after, upto)
    if await _stored_upto(conn, upto) is None:
        for p in await derive_pairs_in_full(conn, after=after, upto=upto):
            yield p
        return
    async with _without_jit(conn):
        async for r in stream_all(conn, "stored_pairs", after=after):
            yield _stored_pair(r)


async def count_new_pairs(conn, *, after: int, upto: int | None = None) -> int:
    """How many pairs `derive_pairs(after=after, upto=upto)` yields: a count of stored rows."""
    window = _window(after, upto)
    if await _stored_upto(conn, upto) is None:
        return (await fetch_one(conn, "count_pairs", **window, rating_scale=RATING_SCALE))["n"]
    return (await fetch_one(conn, "count_stored_pairs", after=after))["n"]


async def pair_window(conn, *, upto: int, limit: int | None = None,
                      since: datetime | None = None) -> list[TrainingPair]:
    """The reward model's training window: the newest `limit` pairs (all when None) with events
    up to `upto`, only those judged since `since` when given, newest first, each with `judged_at`
    (its age, for recency weighting). A ranking's pairs come whole, so a window may run over
    `limit`. Read from the stored pairs rolled forward to `upto` or further (another caller may
    have got further: a pair whose rows changed since `upto` is then left out, and is new to the
    next round)."""
    if limit is not None and limit < 1:
        raise Invalid(f"a pair window holds at least one pair (got limit={limit})", param="limit")
    await refresh_pairs(conn, upto=upto)
    async with _without_jit(conn):
        return [_stored_pair(r) for r in await fetch_all(conn, "pair_window", upto=upto, limit=limit, since=since)]


@asynccontextmanager
async def _without_jit(conn):
    """A transaction (or a savepoint of the caller's) that JIT compiles nothing: the roll-forward
    and the stored pairs' texts probe each row's month with subqueries (training_pair_rows),
    which JIT compiles over and over (measured at 1M exchanges: a round's 1,845 new pairs read in
    98 ms without, 240-310 with; its 50,000-pair window 1.5 s without, 3.3-3.7 s with)."""
    async with conn.transaction():
        await execute(conn, "without_jit")
        yield


async def refresh_pairs(conn, *, upto: int) -> int:
    """Roll the stored pairs forward to watermark `upto` (every event at or below it committed:
    `feedback.current_watermark`), reading only the rows whose events are past the store's
    watermark: a changed preference or ranking is re-derived alone, a new thumbs or rating
    re-judges its prompt's completions. Returns the store's watermark (above `upto` when a
    later round got there first)."""
    async with _without_jit(conn):
        stored = (await fetch_one(conn, "lock_pairs_state"))["watermark"]
        if upto <= stored:
            return stored
        # Rows changed past `upto` (written after the watermark was read) are forgotten and left
        # out here, and re-derived by the next roll-forward: their events are past this one's.
        window = dict(after=stored, upto=upto)
        await execute(conn, "forget_explicit_pairs", after=stored)
        await execute(conn, "store_explicit_pairs", **window)
        await execute(conn, "forget_ranking_pairs", after=stored)
        await execute(conn, "store_ranking_pairs", **window)
        prompts = (await fetch_one(conn, "note_judged_answers", after=stored))["prompts"]
        if stored == 0:  # the first roll-forward touches every prompt: all of them read in one pass
            await execute(conn, "forget_all_judged_pairs")
            await execute(conn, "store_judged_pairs", prompts=None, upto=upto, rating_scale=RATING_SCALE)
        elif prompts:
            await execute(conn, "forget_judged_pairs", prompts=prompts)
            await execute(conn, "store_judged_pairs", prompts=prompts, upto=upto, rating_scale=RATING_SCALE)
        await execute(conn, "set_pairs_watermark", upto=upto)
        return upto


async def _stored_upto(conn, upto: int | None) -> int | None:
    """The watermark the stored pairs answer `upto` at (None: now) after rolling them forward;
    None when `upto` is older than the store (derive in full then)."""
    now = await feedback.current_watermark(conn)
    target = now if upto is None else min(upto, now)  # past `now`: nothing more is committed yet
    return target if await refresh_pairs(conn, upto=target) == target else None


def _stored_pair(r: dict) -> TrainingPair:
    return TrainingPair(prompt=_prompt(r["prompt"]), chosen=r["chosen"], rejected=r["rejected"],
                        margin=r["margin"], source=r["source"], prompt_hash=r["prompt_hash"], group=r["grp"],
                        origin=r["origin"], judged_at=r["judged_at"])


async def derive_pairs_in_full(conn, *, after: int = 0, upto: int | None = None) -> list[TrainingPair]:
    """`derive_pairs` from every row up to `upto`, not from the store: for an old watermark, and
    the reference the stored pairs are tested against."""
    window, pairs = _window(after, upto), []
    for r in await fetch_all(conn, "derive_explicit_pairs", **window):
        origin = {"event_id": r["event_id"], "preference": r["id"]}
        if r["chosen_id"] is not None:
            origin["completions"] = [r["chosen_id"], r["rejected_id"]]
        pairs.append(TrainingPair(prompt=_prompt(r["prompt"]), chosen=r["chosen"], rejected=r["rejected"],
                                  margin=r["margin"], source=r["source"], prompt_hash=r["prompt_hash"],
                                  group=f"preference:{r['id']}", origin=origin))
    for r in await fetch_all(conn, "derive_ranking_rows", **window):
        pairs += _ranking_pairs(r)
    pairs += [_judged_pair(r, "thumbs") for r in await fetch_all(conn, "derive_thumbs_pairs", **window)]
    pairs += [_judged_pair(r, "rating")
              for r in await fetch_all(conn, "derive_rating_pairs", **window, rating_scale=RATING_SCALE)]
    pairs.sort(key=lambda p: p.origin["event_id"])  # stable: sources keep their order within an event
    return pairs


async def derive_demonstrations(conn, *, after: int = 0, upto: int | None = None) -> list[Demonstration]:
    """Imported demonstrations and users' corrected answers with events in (after, upto]."""
    demos = []
    for r in await fetch_all(conn, "derive_demonstrations", **_window(after, upto)):
        origin = {"event_id": r["event_id"]}
        origin.update({"demonstration": r["id"]} if r["source"] == "import"
                      else {"feedback": r["id"], "completion": r["completion_id"]})
        demos.append(Demonstration(prompt=_prompt(r["prompt"]), completion=r["completion"],
                                   source=r["source"], origin=origin))
    return demos


async def derive_kto(conn, *, after: int = 0, upto: int | None = None) -> list[KtoExample]:
    """One example per completion whose thumbs (events <= upto) net up (label true) or down,
    when one of them is newer than `after`."""
    return [KtoExample(prompt=_prompt(r["prompt"]), completion=r["completion"], label=r["label"],
                       prompt_hash=r["prompt_hash"],
                       origin={"event_id": r["event_id"], "feedback": r["feedback_ids"],
                               "completion": r["completion_id"]})
            for r in await fetch_all(conn, "derive_kto_rows", **_window(after, upto))]


# --- export: TRL's conversational formats ---------------------------------------------------

def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


async def export_rows(conn, *, format: ExportFormat, after: int = 0,
                      upto: int | None = None) -> AsyncIterator[dict]:
    """Rows as TRL's trainers take them, one at a time (preference pairs stream from the store;
    KTO examples, one per judged completion, are derived at once): `preference` (prompt, chosen,
    rejected, margin) for RewardTrainer/DPOTrainer, `kto` (prompt, completion, label) for
    KTOTrainer, `sft` (prompt, completion) for SFTTrainer. Extra columns (source, origin as a
    JSON string) are ignored by TRL and keep every row traceable to its source rows."""
    if format == "preference":
        async for p in stream_pairs(conn, after=after, upto=upto):
            yield {"prompt": p.prompt, "chosen": _assistant(p.chosen), "rejected": _assistant(p.rejected),
                   "margin": float(p.margin), "source": p.source, "prompt_hash": p.prompt_hash,
                   "group": p.group, "origin": json.dumps(p.origin)}
    elif format == "kto":
        for k in await derive_kto(conn, after=after, upto=upto):
            yield {"prompt": k.prompt, "completion": _assistant(k.completion), "label": k.label,
                   "prompt_hash": k.prompt_hash, "origin": json.dumps(k.origin)}
    elif format == "sft":
        for d in await derive_demonstrations(conn, after=after, upto=upto):
            yield {"prompt": d.prompt, "completion": _assistant(d.completion), "source": d.source,
                   "origin": json.dumps(d.origin)}
    else:
        raise ValueError(f"unknown export format {format!r}")


async def export_count(conn, *, format: ExportFormat, after: int = 0, upto: int | None = None) -> int:
    """How many rows `export_rows` yields, counted before streaming them."""
    if format == "preference":
        return await count_new_pairs(conn, after=after, upto=upto)
    if format == "sft":
        return (await fetch_one(conn, "count_demonstrations", **_window(after, upto)))["n"]
    return len(await derive_kto(conn, after=after, upto=upto))


def jsonl_line(row: dict) -> str:
    """One exported row as a JSONL line (the API and the CLI write the same bytes)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


# --- stats ----------------------------------------------------------------------------------

def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96): unlike the normal
    approximation it stays inside [0, 1] and is honest about few votes (3 of 3 is not "100 %")."""
    if trials == 0:
        return None
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


async def feedback_stats(conn) -> StatsPublic:
    """Per policy version: requests, feedback by kind, thumbs-up rate, mean rating, head-to-head
    wins against other versions' answers to the same prompt (arena votes) with a Wilson interval,
    and the pairs available to train on since the last round (a pair counts for each version on
    either side of it). Read from counters the database keeps as rows are written and from the
    stored pairs past the last round: the cost follows the new rows, not the history."""
    last = await runs.last_round_watermark(conn)
    new_pairs = await count_new_pairs(conn, after=last)  # rolls the stored pairs forward
    per_version = {r["id"]: r["pairs"] for r in await fetch_all(conn, "count_stored_pairs_by_version", after=last)}
    data = []
    for r in await fetch_all(conn, "version_stats"):
        judged = r["thumbs_up"] + r["thumbs_down"]
        wins, losses = r["wins"], r["losses"]
        data.append(VersionStats(
            model_version=f"v{r['id']}", model_version_id=r["id"], status=r["status"],
            requests=r["requests"], completions=r["completions"],
            feedback={k: r[k] for k in ("thumbs", "rating", "comment", "correction", "ranking", "preference")},
            thumbs_up=r["thumbs_up"], thumbs_down=r["thumbs_down"],
            thumbs_up_rate=r["thumbs_up"] / judged if judged else None, mean_rating=r["mean_rating"],
            pairs_since_last_round=per_version.get(r["id"], 0),
            arena_wins=wins, arena_losses=losses,
            arena_win_rate=wins / (wins + losses) if wins + losses else None,
            arena_win_rate_interval=wilson_interval(wins, wins + losses)))
    return StatsPublic(watermark=(await fetch_one(conn, "last_event_id"))["event_id"], last_round_watermark=last,
                       pairs_since_last_round=new_pairs,
                       demonstrations_since_last_round=(await fetch_one(conn, "count_demonstrations",
                                                                        **_window(last, None)))["n"],
                       data=data)
