"""Feedback in, training data out. Typed keyword-only queries over Postgres (SQL in
`queries/feedback.sql`) that take the caller's connection, so the caller owns the transaction;
and the one derivation of training data that export and the trainer both read.

Event ids and the watermark. Every feedback-like row (feedback, rankings, preferences,
demonstrations) draws its `event_id` from one sequence, and a row that changes draws a new one.
A derived pair's event is the highest event of its source rows, so "new since the last round" is
`event > watermark` whatever the rows' ages: a new thumbs-down on one answer pairs with an old
thumbs-up on another and the pair is new. Writers join a shared advisory lock before drawing an
id and keep it until they commit; `current_watermark` takes it exclusively for a moment, so every
id at or below the watermark it returns belongs to a row that is committed or rolled back for good.

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
Thumbs and rating pairs need different texts: the same words judged twice (greedy decoding, two
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
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from psycopg import AsyncConnection, pq
from psycopg.types.json import Jsonb

from schemas import store
from schemas.openai import no_nul
from schemas.records import (CompletionRef, Demonstration, DemonstrationImport, ExportFormat,
                             FeedbackCreate, FeedbackPublic, ImportLineError, KtoExample,
                             PreferenceCreate, PreferenceImport, PreferencePublic, RankingCreate,
                             RankingPublic, StatsPublic, TrainingPair, VersionStats, ranking_tiers)
from schemas.store import Q, Conflict, NotFound, _all, _one, prompt_hash

EVENTS_LOCK = 0x65766E74  # advisory lock key ("evnt"): writers share it, the watermark takes it alone
RATING_SCALE = 6.0  # 7 against 1 is margin 1, as a pairwise preference of strength 1 is
NO_LIMIT = 2**63 - 1
T = TypeVar("T")


class Invalid(ValueError):
    """A well-formed request that breaks a feedback rule (HTTP 400 naming `param`)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class UnknownCompletion(NotFound):
    """No such completion or response, or not the caller's: the same answer either way."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _in_transaction(conn: AsyncConnection) -> None:
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise RuntimeError("feedback writes run inside the caller's transaction: `async with conn.transaction()`")


async def _join_event_writers(conn: AsyncConnection) -> None:
    """Before drawing event ids: held until the caller's transaction ends (see the module doc)."""
    _in_transaction(conn)
    await conn.execute(Q["join_event_writers"], {"lock": EVENTS_LOCK})


# --- the things feedback is about -----------------------------------------------------------

async def find_completion(conn, *, ref: CompletionRef, owned_by: int | None,
                          param: str | None = None) -> dict:
    """The completion `ref` names when key `owned_by` produced it (any key's when None), to judge
    in the caller's transaction (which this joins to the event writers); UnknownCompletion
    otherwise, with one message for unknown and someone else's."""
    _in_transaction(conn)
    row = await _one(conn, "find_completion", response_id=ref.response_id,
                     choice_index=ref.choice_index, owner=owned_by, lock=EVENTS_LOCK)
    if row is None:
        raise UnknownCompletion(f"No completion with response_id '{ref.response_id}' and choice_index "
                                f"{ref.choice_index}.", param=param)
    return row


# --- writes: one current value per (completion or response, author, kind) --------------------

async def record_feedback(conn, *, feedback: FeedbackCreate, author_key_id: int,
                          owned_by: int | None) -> FeedbackPublic:
    """Thumbs, rating, comment or correction on one completion; a repeat replaces the author's
    value of that kind (and is new data only when the value changed)."""
    completion = await find_completion(conn, ref=feedback, owned_by=owned_by)
    key = dict(completion_id=completion["id"], author_key_id=author_key_id, kind=feedback.kind)
    row = await _one(conn, "upsert_feedback", **key, value=feedback.value, text=feedback.text)
    if row is None:  # the same value again: nothing changed
        row = await _one(conn, "get_feedback", **key)
    return FeedbackPublic(**row)


async def record_ranking(conn, *, ranking: RankingCreate, author_key_id: int,
                         owned_by: int | None) -> RankingPublic:
    """The choices of one response best first (ties allowed): every choice exactly once."""
    _in_transaction(conn)
    request = await _one(conn, "find_request", response_id=ranking.response_id, owner=owned_by,
                         lock=EVENTS_LOCK)
    if request is None:
        raise UnknownCompletion(f"No response with id '{ranking.response_id}'.", param="response_id")
    n = request["choices"]
    if n < 2:
        raise Invalid("response_id", f"Response '{ranking.response_id}' has {n} choice; a ranking orders "
                                     "the choices of a response with n >= 2.")
    ranked = sorted(i for tier in ranking.tiers() for i in tier)
    if ranked != list(range(n)):
        raise Invalid("order", f"order must be a permutation of the response's {n} choices: each of "
                               f"0..{n - 1} exactly once (got {ranked}).")
    key = dict(request_id=request["id"], author_key_id=author_key_id)
    row = await _one(conn, "upsert_ranking", **key, ordering=Jsonb(ranking.order))
    if row is None:
        row = await _one(conn, "get_ranking", **key)
    return RankingPublic(**row)


async def record_preference(conn, *, preference: PreferenceCreate, author_key_id: int,
                            owned_by: int | None) -> PreferencePublic:
    """One completion preferred over another of the same prompt; margin = strength. One current
    preference per author and pair, whichever way round."""
    chosen = await find_completion(conn, ref=preference.chosen, owned_by=owned_by, param="chosen")
    rejected = await find_completion(conn, ref=preference.rejected, owned_by=owned_by, param="rejected")
    if chosen["prompt_hash"] != rejected["prompt_hash"]:
        raise Invalid("rejected", "chosen and rejected answer different prompts; a preference compares "
                                  "two completions of the same conversation.")
    key = dict(author_key_id=author_key_id, chosen_id=chosen["id"], rejected_id=rejected["id"])
    row = await _one(conn, "upsert_preference", **key, strength=preference.strength,
                     margin=preference.strength)
    if row is None:
        row = await _one(conn, "get_preference", **key)
    return PreferencePublic(**row)


# --- idempotency ----------------------------------------------------------------------------

async def claim_idempotency_key(conn, *, author_key_id: int, key: str, route: str,
                                request_hash: str) -> dict | None:
    """None: the key is this request's now (store its answer with `save_idempotent_response`
    before committing). Otherwise the answer to the first request with this key, to replay.
    A request in flight with the same key is waited for. Conflict: the key was used for a
    different request."""
    _in_transaction(conn)
    params = dict(author_key_id=author_key_id, key=key)
    for _ in range(3):  # a claimer that rolled back leaves the key free: claim it then
        if await _one(conn, "claim_idempotency_key", **params, route=route, request_hash=request_hash):
            return None
        prior = await _one(conn, "get_idempotency_key", **params)
        if prior is not None:
            if (prior["route"], prior["request_hash"]) != (route, request_hash):
                raise Conflict(f"Idempotency-Key '{key}' was used for a different request; "
                               "send a new key with a new request.")
            return prior["response"]
    raise Conflict(f"Idempotency-Key '{key}' is in use by a concurrent request; retry.")


async def save_idempotent_response(conn, *, author_key_id: int, key: str, response: dict) -> None:
    await conn.execute(Q["save_idempotent_response"],
                       {"author_key_id": author_key_id, "key": key, "response": Jsonb(response)})


# --- imports: TRL's dataset formats, validated line by line ---------------------------------

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(value: str, param: str) -> str:
    try:
        return no_nul(value)
    except ValueError as e:
        raise Invalid(param, str(e)) from None


def _conversation(value: Any, param: str) -> list[dict[str, str]]:
    """A prompt: plain text (one user turn) or a list of {"role", "content"} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise Invalid(param, "is empty")
        return [{"role": "user", "content": _text(value, param)}]
    if not isinstance(value, list) or not value:
        raise Invalid(param, "must be a string or a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise Invalid(f"{param}[{i}]", 'a message is {"role": "system" | "user" | "assistant", '
                                           '"content": string}')
        messages.append({"role": ROLES[m["role"]], "content": _text(m["content"], f"{param}[{i}]")})
    return messages


def _answer(value: Any, param: str) -> str:
    """An answer: plain text, or TRL's conversational form, one assistant message."""
    if isinstance(value, str):
        return _text(value, param)
    messages = _conversation(value, param)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise Invalid(param, 'a conversational answer is one assistant message: '
                             '[{"role": "assistant", "content": ...}]')
    return messages[0]["content"]


def _split_implicit(value: Any, param: str) -> tuple[list[dict[str, str]], str]:
    """TRL's implicit-prompt form: the whole conversation, ending in the assistant's answer."""
    messages = _conversation(value, param)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise Invalid(param, "without a `prompt`, this is the whole conversation ending in an assistant message")
    return messages[:-1], messages[-1]["content"]


def parse_preference(obj: Any) -> PreferenceImport:
    """One line of a preference file: {"prompt", "chosen", "rejected"} in TRL's standard
    (strings) or conversational (messages) form, or the implicit-prompt form without "prompt";
    an optional numeric "margin"."""
    if not isinstance(obj, dict):
        raise Invalid(None, 'a line is a JSON object: {"prompt", "chosen", "rejected"}')
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise Invalid(field, "is missing")
    if "prompt" in obj:
        prompt = _conversation(obj["prompt"], "prompt")
        chosen, rejected = _answer(obj["chosen"], "chosen"), _answer(obj["rejected"], "rejected")
    else:
        prompt, chosen = _split_implicit(obj["chosen"], "chosen")
        other, rejected = _split_implicit(obj["rejected"], "rejected")
        if other != prompt:
            raise Invalid("rejected", "chosen and rejected must continue the same conversation")
    if chosen == rejected:
        raise Invalid("rejected", "chosen and rejected are the same answer")
    margin = obj.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise Invalid("margin", "must be a finite number")
    return PreferenceImport(prompt=prompt, chosen=chosen, rejected=rejected, margin=float(margin))


def parse_demonstration(obj: Any) -> DemonstrationImport:
    """One line of a demonstration file: TRL's prompt-completion form {"prompt", "completion"}
    (strings or messages) or its conversational form {"messages"} ending in the answer."""
    if not isinstance(obj, dict):
        raise Invalid(None, 'a line is a JSON object: {"prompt", "completion"} or {"messages"}')
    if "messages" in obj:
        prompt, completion = _split_implicit(obj["messages"], "messages")
        param = "messages"
    else:
        for field in ("prompt", "completion"):
            if field not in obj:
                raise Invalid(field, 'is missing (a line is {"prompt", "completion"} or {"messages"})')
        prompt, completion = _conversation(obj["prompt"], "prompt"), _answer(obj["completion"], "completion")
        param = "completion"
    if not completion.strip():
        raise Invalid(param, "the answer is empty")
    return DemonstrationImport(prompt=prompt, completion=completion)


def parse_jsonl(text: str, parse: Callable[[Any], T]) -> tuple[list[T], list[ImportLineError], int]:
    """(valid rows, errors by 1-based line number, non-blank lines read)."""
    rows, errors, lines = [], [], 0
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(ImportLineError(line=number, param=None, message=f"not JSON: {e.msg} (column {e.colno})"))
            continue
        try:
            rows.append(parse(obj))
        except Invalid as e:
            errors.append(ImportLineError(line=number, param=e.param,
                                          message=f"'{e.param}' {e}" if e.param else str(e)))
    return rows, errors, lines


async def import_preferences(conn, *, rows: list[PreferenceImport], author_key_id: int) -> int:
    """Store imported pairs in the caller's transaction; returns how many were new (a pair
    imported before, or twice in one file, is kept once)."""
    if not rows:
        return 0
    await _join_event_writers(conn)
    payload = [dict(r.model_dump(), prompt_hash=prompt_hash(r.prompt)) for r in rows]
    return len(await _all(conn, "insert_imported_preferences", author_key_id=author_key_id,
                          rows=Jsonb(payload)))


async def import_demonstrations(conn, *, rows: list[DemonstrationImport], author_key_id: int) -> int:
    """Store imported demonstrations in the caller's transaction; returns how many were new."""
    if not rows:
        return 0
    await _join_event_writers(conn)
    payload = [dict(r.model_dump(), prompt_hash=prompt_hash(r.prompt)) for r in rows]
    return len(await _all(conn, "insert_imported_demonstrations", author_key_id=author_key_id,
                          rows=Jsonb(payload)))


# --- the watermark --------------------------------------------------------------------------

async def current_watermark(conn) -> int:
    """The highest event id drawn so far, once every writer that might hold one at or below it
    has finished: all data up to it is committed and will not change under that id."""
    await conn.execute(Q["wait_for_event_writers"], {"lock": EVENTS_LOCK})
    try:
        return (await _one(conn, "last_event_id"))["event_id"]
    finally:
        await conn.execute(Q["release_event_writers"], {"lock": EVENTS_LOCK})


# --- THE derivation -------------------------------------------------------------------------

def _prompt(messages: list[dict]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _window(after: int, upto: int | None) -> dict:
    if after < 0 or (upto is not None and upto < after):
        raise ValueError(f"bad event window ({after}, {upto}]")
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
    rows with events <= upto (None: all so far), in event order. The rules are in the module doc."""
    window, pairs = _window(after, upto), []
    for r in await _all(conn, "derive_explicit_pairs", **window):
        origin = {"event_id": r["event_id"], "preference": r["id"]}
        if r["chosen_id"] is not None:
            origin["completions"] = [r["chosen_id"], r["rejected_id"]]
        pairs.append(TrainingPair(prompt=_prompt(r["prompt"]), chosen=r["chosen"], rejected=r["rejected"],
                                  margin=r["margin"], source=r["source"], prompt_hash=r["prompt_hash"],
                                  group=f"preference:{r['id']}", origin=origin))
    for r in await _all(conn, "derive_ranking_rows", **window):
        pairs += _ranking_pairs(r)
    pairs += [_judged_pair(r, "thumbs") for r in await _all(conn, "derive_thumbs_pairs", **window)]
    pairs += [_judged_pair(r, "rating")
              for r in await _all(conn, "derive_rating_pairs", **window, rating_scale=RATING_SCALE)]
    pairs.sort(key=lambda p: p.origin["event_id"])  # stable: sources keep their order within an event
    return pairs


async def count_new_pairs(conn, *, after: int) -> int:
    """How many pairs `derive_pairs(after=after)` yields now."""
    return len(await derive_pairs(conn, after=after))


async def derive_demonstrations(conn, *, after: int = 0, upto: int | None = None) -> list[Demonstration]:
    """Imported demonstrations and users' corrected answers with events in (after, upto]."""
    demos = []
    for r in await _all(conn, "derive_demonstrations", **_window(after, upto)):
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
            for r in await _all(conn, "derive_kto_rows", **_window(after, upto))]


# --- export: TRL's conversational formats ---------------------------------------------------

def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


async def export_rows(conn, *, format: ExportFormat, after: int = 0, upto: int | None = None) -> list[dict]:
    """Rows as TRL's trainers take them: `preference` (prompt, chosen, rejected, margin) for
    RewardTrainer/DPOTrainer, `kto` (prompt, completion, label) for KTOTrainer, `sft` (prompt,
    completion) for SFTTrainer. Extra columns (source, origin as a JSON string) are ignored by
    TRL and keep every row traceable to its source rows."""
    if format == "preference":
        return [{"prompt": p.prompt, "chosen": _assistant(p.chosen), "rejected": _assistant(p.rejected),
                 "margin": float(p.margin), "source": p.source, "prompt_hash": p.prompt_hash,
                 "group": p.group, "origin": json.dumps(p.origin)}
                for p in await derive_pairs(conn, after=after, upto=upto)]
    if format == "kto":
        return [{"prompt": k.prompt, "completion": _assistant(k.completion), "label": k.label,
                 "prompt_hash": k.prompt_hash, "origin": json.dumps(k.origin)}
                for k in await derive_kto(conn, after=after, upto=upto)]
    if format == "sft":
        return [{"prompt": d.prompt, "completion": _assistant(d.completion), "source": d.source,
                 "origin": json.dumps(d.origin)}
                for d in await derive_demonstrations(conn, after=after, upto=upto)]
    raise ValueError(f"unknown export format {format!r}")


def jsonl_line(row: dict) -> str:
    """One exported row as a JSONL line (the API and the CLI write the same bytes)."""
    return json.dumps(row, ensure_ascii=False) + "\n"


# --- stats ----------------------------------------------------------------------------------

async def feedback_stats(conn) -> StatsPublic:
    """Per policy version: requests, feedback by kind, thumbs-up rate, and the pairs available to
    train on since the last round (a pair counts for each version on either side of it)."""
    last = await store.last_round_watermark(conn)
    new_pairs = await derive_pairs(conn, after=last)
    new_demos = await derive_demonstrations(conn, after=last)
    completions = {c for p in new_pairs for c in p.origin.get("completions", [])}
    version_of = {r["id"]: r["model_version_id"]
                  for r in await _all(conn, "completion_versions", ids=sorted(completions))}
    per_version = Counter(v for p in new_pairs
                          for v in {version_of[c] for c in p.origin.get("completions", [])})
    data = []
    for r in await _all(conn, "feedback_stats_by_version"):
        judged = r["thumbs_up"] + r["thumbs_down"]
        data.append(VersionStats(
            model_version=f"v{r['id']}", model_version_id=r["id"], status=r["status"],
            requests=r["requests"], completions=r["completions"],
            feedback={k: r[k] for k in ("thumbs", "rating", "comment", "correction", "ranking", "preference")},
            thumbs_up=r["thumbs_up"], thumbs_down=r["thumbs_down"],
            thumbs_up_rate=r["thumbs_up"] / judged if judged else None, mean_rating=r["mean_rating"],
            pairs_since_last_round=per_version.get(r["id"], 0)))
    return StatsPublic(watermark=(await _one(conn, "last_event_id"))["event_id"], last_round_watermark=last,
                       pairs_since_last_round=len(new_pairs),
                       demonstrations_since_last_round=len(new_demos), data=data)
