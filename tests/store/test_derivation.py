"""The one derivation of training data against a plain reference: random sequences of feedback
(thumbs, ratings, corrections, comments, rankings with ties, pairwise preferences, imports; with
repeats, flips and several authors), written through the store functions in two phases with a
watermark between them, derive exactly the pairs, demonstrations and KTO examples the rules in
store/derive.py say, all of them and the new ones."""
import asyncio
import json
from collections import Counter
from fractions import Fraction

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.errors import Invalid
from store import derive, exchanges, feedback, keys, registry
from schemas.records import (CompletionRecord, CompletionRef, FeedbackCreate, PreferenceCreate,
                             PreferenceImport, RankingCreate, ranking_pair_count)

# response id -> (prompt, texts of its choices); "x" twice: the same words from two requests
WORLD = {
    "chatcmpl-a1": ("Tell me a joke.", ["x", "y", "z"]),
    "chatcmpl-a2": ("Tell me a joke.", ["x", "w"]),
    "chatcmpl-b1": ("Name a colour.", ["red", "blue", "red"]),
    "chatcmpl-b2": ("Name a colour.", ["green"]),
}
AUTHORS = 3
COMPLETIONS = [(rid, i) for rid, (_, texts) in WORLD.items() for i in range(len(texts))]
BY_PROMPT = {p: [c for c in COMPLETIONS if WORLD[c[0]][0] == p] for p, _ in WORLD.values()}
RANKABLE = [rid for rid, (_, texts) in WORLD.items() if len(texts) >= 2]


def text(c) -> str:
    return WORLD[c[0]][1][c[1]]


def prompt_of(c) -> str:
    return WORLD[c[0]][0]


# --- random feedback ------------------------------------------------------------------------

author = st.integers(0, AUTHORS - 1)
TWINS = [c for c in COMPLETIONS if sum(text(d) == text(c) for d in COMPLETIONS) > 1]
completion = st.one_of(st.sampled_from(COMPLETIONS), st.sampled_from(TWINS))  # same words judged apart, often
thumbs = st.tuples(st.just("thumbs"), author, completion, st.sampled_from([1, -1]))
rating = st.tuples(st.just("rating"), author, completion, st.integers(1, 7))
remark = st.tuples(st.sampled_from(["correction", "comment"]), author, completion,
                   st.sampled_from(["Better answer.", "Another one."]))


@st.composite
def ranking(draw):
    rid = draw(st.sampled_from(RANKABLE))
    n = len(WORLD[rid][1])
    perm, cuts = draw(st.permutations(range(n))), draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
    tiers, tier = [], [perm[0]]
    for i, cut in zip(perm[1:], cuts):
        if cut:
            tiers.append(tier)
            tier = []
        tier.append(i)
    tiers.append(tier)
    return ("ranking", draw(author), rid, tiers)


@st.composite
def preference(draw):
    prompt = draw(st.sampled_from(sorted(BY_PROMPT)))
    chosen, rejected = draw(st.permutations(BY_PROMPT[prompt]))[:2]
    return ("preference", draw(author), chosen, rejected, draw(st.sampled_from([0.0, 0.5, 1.0])))


imported = st.tuples(st.just("import"), st.sampled_from(sorted(BY_PROMPT)), st.sampled_from("pqr"),
                     st.sampled_from("pqr"), st.sampled_from([0.0, 0.25])).filter(lambda t: t[2] != t[3])
op = st.one_of(thumbs, thumbs, rating, rating, remark, ranking(), preference(), imported)


# --- the reference: plain Python over the current values -------------------------------------

class Reference:
    """Current values, each with the phase in which it last changed (a repeat changes nothing)."""

    def __init__(self):
        self.feedback, self.rankings, self.preferences, self.imports = {}, {}, {}, {}

    def apply(self, o, phase: int) -> None:
        kind = o[0]
        if kind in ("thumbs", "rating", "correction", "comment"):
            _, a, c, v = o
            self._set(self.feedback, (c, a, kind), v, phase)
        elif kind == "ranking":
            _, a, rid, tiers = o
            self._set(self.rankings, (rid, a), tuple(tuple(t) for t in tiers), phase)
        elif kind == "preference":
            _, a, ch, rj, s = o
            self._set(self.preferences, (a, frozenset([ch, rj])), (ch, rj, s), phase)
        elif kind == "import":
            _, prompt, ch, rj, margin = o
            self.imports.setdefault((prompt, ch, rj), (margin, phase))  # a repeat is a duplicate

    @staticmethod
    def _set(table, key, value, phase):
        if key not in table or table[key][0] != value:
            table[key] = (value, phase)

    def _judged(self, kind):
        """completion -> ([values], newest phase) over all authors"""
        out = {}
        for (c, _, k), (v, phase) in self.feedback.items():
            if k == kind:
                values, p = out.get(c, ([], 0))
                out[c] = (values + [v], max(p, phase))
        return out

    def pairs(self) -> Counter:
        """(source, chosen, rejected, margin, new) -> how many"""
        pairs = Counter()
        for (a, _), ((ch, rj, s), phase) in self.preferences.items():
            pairs["pairwise", ch, rj, s, phase == 2] += 1
        for (prompt, ch, rj), (margin, phase) in self.imports.items():
            pairs["import", (prompt, ch), (prompt, rj), margin, phase == 2] += 1
        for (rid, _), (tiers, phase) in self.rankings.items():
            for k, better in enumerate(tiers):
                for worse in tiers[k + 1:]:
                    for i in better:
                        for j in worse:
                            pairs["ranking", (rid, i), (rid, j), 0.0, phase == 2] += 1
        thumbs = {c: (sum(v), p) for c, (v, p) in self._judged("thumbs").items()}
        for u, (nu, pu) in thumbs.items():
            for d, (nd, pd) in thumbs.items():
                if nu > 0 and nd < 0 and prompt_of(u) == prompt_of(d) and text(u) != text(d):
                    pairs["thumbs", u, d, 0.0, max(pu, pd) == 2] += 1
        ratings = {c: (Fraction(sum(v), len(v)), p) for c, (v, p) in self._judged("rating").items()}
        for h, (mh, ph) in ratings.items():
            for l, (ml, pl) in ratings.items():
                if mh > ml and prompt_of(h) == prompt_of(l) and text(h) != text(l):
                    pairs["rating", h, l, round(float((mh - ml) / 6), 9), max(ph, pl) == 2] += 1
        return pairs

    def demonstrations(self) -> Counter:
        return Counter((c, v, phase == 2) for (c, _, k), (v, phase) in self.feedback.items()
                       if k == "correction")

    def kto(self) -> Counter:
        return Counter((c, net > 0, p == 2) for c, (net, p) in
                       ((c, (sum(v), p)) for c, (v, p) in self._judged("thumbs").items()) if net != 0)


# --- the database side ----------------------------------------------------------------------

class World:
    """A database holding WORLD's exchanges, and the loop and connection the store runs on."""

    def __init__(self, url: str):
        self.url, self.loop = url, asyncio.new_event_loop()
        self.conn = self.run(psycopg.AsyncConnection.connect(url, autocommit=True))
        self.run(self.setup())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def setup(self):
        conn = self.conn
        async with conn.transaction():
            self.authors = [(await keys.create_api_key(conn, name=f"a{i}", role="user")).id
                            for i in range(AUTHORS)]
            version = await registry.insert_model_version(conn, kind="policy", path="/nowhere",
                                                       content_hash="0", status="archived")
            for rid, (prompt, texts) in WORLD.items():
                await exchanges.record_exchange(
                    conn, response_id=rid, api_key_id=self.authors[0], user=None,
                    messages=[{"role": "user", "content": prompt}], params={}, model_version_id=version.id,
                    stream=False, batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None,
                    total_ms=0, choices=[CompletionRecord(choice_index=i, text=t, finish_reason="stop",
                                                          completion_tokens=1, model_version_id=version.id)
                                         for i, t in enumerate(texts)])
        rows = await (await conn.execute(
            "SELECT c.id, rq.response_id, c.choice_index FROM completions c"
            " JOIN chat_requests rq ON rq.id = c.request_id")).fetchall()
        self.completion = {cid: (rid, i) for cid, rid, i in rows}

    async def reset(self):
        await self.conn.execute("TRUNCATE feedback, rankings, preferences, demonstrations, idempotency_keys,"
                                " training_pairs, judged_answers, version_stats")
        # what TRUNCATE does not tell the triggers: no pairs, and the exchanges' counts alone
        await self.conn.execute("UPDATE training_pairs_state SET watermark ="
                                " (SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM feedback_events)")
        await self.conn.execute("INSERT INTO version_stats (version_id, shard, requests, completions)"
                                " SELECT model_version_id, 0, count(DISTINCT request_id), count(*)"
                                " FROM completions GROUP BY 1")

    async def apply(self, o):
        conn, kind = self.conn, o[0]
        async with conn.transaction():
            if kind in ("thumbs", "rating", "correction", "comment"):
                _, a, (rid, i), v = o
                body = FeedbackCreate(response_id=rid, choice_index=i, kind=kind,
                                      **({"text": v} if isinstance(v, str) else {"value": v}))
                await feedback.record_feedback(conn, feedback=body, author_key_id=self.authors[a], owned_by=None)
            elif kind == "ranking":
                _, a, rid, tiers = o
                await feedback.record_ranking(conn, ranking=RankingCreate(response_id=rid, order=tiers),
                                              author_key_id=self.authors[a], owned_by=None)
            elif kind == "preference":
                _, a, (crid, ci), (rrid, ri), s = o
                body = PreferenceCreate(chosen=CompletionRef(response_id=crid, choice_index=ci),
                                        rejected=CompletionRef(response_id=rrid, choice_index=ri), strength=s)
                await feedback.record_preference(conn, preference=body, author_key_id=self.authors[a],
                                                 owned_by=None)
            else:
                _, prompt, ch, rj, margin = o
                row = PreferenceImport(prompt=[{"role": "user", "content": prompt}], chosen=ch, rejected=rj,
                                       margin=margin)
                await feedback.import_preferences(conn, rows=[row], author_key_id=self.authors[0])

    def key(self, p, watermark: int):
        if p.source == "import":
            prompt = p.prompt[0]["content"]
            ends = (prompt, p.chosen), (prompt, p.rejected)
        else:
            ends = tuple(self.completion[c] for c in p.origin["completions"])
            assert (p.chosen, p.rejected) == tuple(text(c) for c in ends)
        assert p.prompt_hash == exchanges.prompt_hash(p.prompt)
        return (p.source, *ends, round(p.margin, 9), p.origin["event_id"] > watermark)


@pytest.fixture(scope="module")
def world(new_database):
    w = World(new_database())
    yield w
    w.run(w.conn.close())
    w.loop.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=st.lists(op, max_size=20), second=st.lists(op, max_size=12))
def test_derivation_matches_the_reference(world, first, second):
    ref = Reference()
    world.run(world.reset())
    for o in first:
        world.run(world.apply(o))
        ref.apply(o, phase=1)
    watermark = world.run(feedback.current_watermark(world.conn))
    upto_now = world.run(derive.derive_pairs(world.conn, upto=watermark))
    assert Counter(world.key(p, watermark) for p in upto_now) == ref.pairs()
    for o in second:
        world.run(world.apply(o))
        ref.apply(o, phase=2)

    pairs = world.run(derive.derive_pairs(world.conn))
    assert Counter(world.key(p, watermark) for p in pairs) == ref.pairs()
    new = world.run(derive.derive_pairs(world.conn, after=watermark))
    expected_new = Counter({k: n for k, n in ref.pairs().items() if k[-1]})
    assert Counter(world.key(p, watermark) for p in new) == expected_new
    counted = world.run(derive.count_new_pairs(world.conn, after=watermark))
    assert type(counted) is int and counted == sum(expected_new.values())

    # a ranking's pairs share its group: K(K-1)/2 of them less the ties; other pairs are alone
    sizes = Counter(p.group for p in pairs if p.source == "ranking").values()
    assert sorted(sizes) == sorted(n for n in (ranking_pair_count([list(t) for t in tiers])
                                               for tiers, _ in ref.rankings.values()) if n)
    alone = [p.group for p in pairs if p.source != "ranking"]
    assert len(set(alone)) == len(alone)

    demos = world.run(derive.derive_demonstrations(world.conn))
    assert Counter((world.completion[d.origin["completion"]], d.completion, d.origin["event_id"] > watermark)
                   for d in demos) == ref.demonstrations()
    kto = world.run(derive.derive_kto(world.conn))
    assert Counter((world.completion[k.origin["completion"]], k.label, k.origin["event_id"] > watermark)
                   for k in kto) == ref.kto()


def test_the_watermark_waits_for_writers_in_flight(world):
    """An event id drawn by a transaction still open is not below a watermark handed out: reading
    the watermark waits for that writer, so a round never skips a row that commits late."""
    async def scenario():
        body = FeedbackCreate(response_id="chatcmpl-a1", choice_index=0, kind="thumbs", value=1)
        async with await psycopg.AsyncConnection.connect(world.url, autocommit=True) as writer:
            async with writer.transaction():
                await feedback.record_feedback(writer, feedback=body, author_key_id=world.authors[1], owned_by=None)
                drawn = (await (await writer.execute("SELECT max(event_id) FROM feedback")).fetchone())[0]
                reading = asyncio.create_task(feedback.current_watermark(world.conn))
                await asyncio.sleep(0.3)
                assert not reading.done()  # the writer has not committed yet
            watermark = await asyncio.wait_for(reading, 10)
        assert watermark >= drawn
        assert [p for p in await derive.derive_kto(world.conn, upto=watermark)
                if p.origin["event_id"] == drawn]  # committed, and inside the watermark

    world.run(world.reset())
    world.run(scenario())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(op, st.sampled_from(["write", "write, round", "round, write"])),
                      min_size=1, max_size=30))
def test_the_stored_pairs_are_the_full_derivation_at_every_watermark(world, steps):
    """Feedback arrives one row at a time; at random watermarks a round reads the stored pairs
    (rolled forward from the rows past the last watermark only), sometimes with a row written
    after it read the watermark. What it sees, all pairs and the new ones since the previous
    round, and their count, equals the full derivation from every row at that watermark, and
    the reference when nothing was written late."""
    ref = Reference()
    world.run(world.reset())
    last = world.run(feedback.current_watermark(world.conn))
    for o, when in steps + [(None, "round")]:
        if when != "round, write" and o is not None:
            world.run(world.apply(o))
            ref.apply(o, phase=2)
        if when == "write":
            continue
        watermark = world.run(feedback.current_watermark(world.conn))
        full = world.run(derive.derive_pairs_in_full(world.conn, upto=watermark))
        new_full = world.run(derive.derive_pairs_in_full(world.conn, after=last, upto=watermark))
        new = world.run(derive.derive_pairs(world.conn, after=last, upto=watermark))
        assert sorted(map(_comparable, new)) == sorted(map(_comparable, new_full))
        assert world.run(derive.count_new_pairs(world.conn, after=last, upto=watermark)) == len(new_full)
        stored = world.run(derive.derive_pairs(world.conn, upto=watermark))
        assert sorted(map(_comparable, stored)) == sorted(map(_comparable, full))
        if when == "round":
            assert Counter(world.key(p, 0) for p in stored) == Counter(
                {k[:-1] + (True,): n for k, n in ref.pairs().items()})
        window = world.run(derive.pair_window(world.conn, upto=watermark))
        assert sorted(map(_comparable, window)) == sorted(map(_comparable, full))
        assert all(p.judged_at is not None for p in window)
        assert world.run(counters(world)) == world.run(counted_from_rows(world))
        # a row the round's watermark does not cover, written once it has read: the next round
        # must see it. (Written between the watermark and the reads, a row that replaces one, a
        # changed ranking, leaves no single right answer: the old value is gone from the table.)
        if when == "round, write":
            world.run(world.apply(o))
            ref.apply(o, phase=2)
        last = watermark
    # a round after nothing new reads nothing
    assert world.run(derive.derive_pairs(world.conn, after=world.run(feedback.current_watermark(world.conn)))) == []



def test_a_prompt_pairs_its_most_recently_judged_answers(new_database):
    """A prompt asked more often than judged_answers_per_prompt() (migration 020) pairs its newest
    judged answers only, by their latest judgement, so re-judging it costs the same however often
    it was asked: a judgement on an old answer makes it the newest, and the one judged longest ago
    leaves the pairs. Stored and full derivations agree at every watermark, also one that a
    judgement written after it has overtaken (the store has seen it, the watermark has not)."""
    world = World(new_database())  # its own: the popular prompt's exchanges stay out of WORLD's
    limit = world.run(_scalar(world, "SELECT judged_answers_per_prompt()"))
    answers = [f"chatcmpl-hello{i}" for i in range(limit + 2)]
    world.run(_ask(world, "Say hello.", answers))
    for i, rid in enumerate(answers):  # judged in order: up, down, up, ...
        world.run(world.apply(("thumbs", 0, (rid, 0), 1 if i % 2 == 0 else -1)))
    ids = dict(world.run(_rows(world, "SELECT rq.response_id, c.id FROM completions c"
                                      " JOIN chat_requests rq ON rq.id = c.request_id")))

    def paired(pairs) -> set[str]:
        by_id = {v: k for k, v in ids.items()}
        return {by_id[c] for p in pairs for c in p.origin["completions"]}

    def agree(upto: int) -> list:
        stored = world.run(derive.derive_pairs(world.conn, upto=upto))
        assert sorted(map(_comparable, stored)) == sorted(
            map(_comparable, world.run(derive.derive_pairs_in_full(world.conn, upto=upto))))
        return stored

    pairs = agree(world.run(feedback.current_watermark(world.conn)))
    assert paired(pairs) == set(answers[2:]) and len(pairs) == (limit // 2) ** 2
    world.run(world.apply(("thumbs", 1, (answers[1], 0), -1)))  # the second oldest is now the newest
    before = world.run(feedback.current_watermark(world.conn))
    world.run(world.apply(("thumbs", 1, (answers[0], 0), 1)))  # past `before`: the store sees it first
    assert paired(agree(before)) == {answers[1]} | set(answers[3:])
    assert paired(agree(world.run(feedback.current_watermark(world.conn)))) == set(answers[:2]) | set(answers[4:])
    world.run(world.conn.close())
    world.loop.close()


async def _scalar(world, query: str):
    return (await (await world.conn.execute(query)).fetchone())[0]


async def _rows(world, query: str) -> list[tuple]:
    return await (await world.conn.execute(query)).fetchall()


async def _ask(world, prompt: str, response_ids: list[str]) -> None:
    """An exchange of one answer (its own words) for each response id."""
    version = await _scalar(world, "SELECT id FROM model_versions LIMIT 1")
    async with world.conn.transaction():
        for i, rid in enumerate(response_ids):
            await exchanges.record_exchange(
                world.conn, response_id=rid, api_key_id=world.authors[0], user=None,
                messages=[{"role": "user", "content": prompt}], params={}, model_version_id=version,
                stream=False, batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None, total_ms=0,
                choices=[CompletionRecord(choice_index=0, text=f"Hello number {i}.", finish_reason="stop",
                                          completion_tokens=1, model_version_id=version)])

async def counters(world) -> dict:
    """What stats show per version: the counters the triggers kept."""
    stats = await derive.feedback_stats(world.conn)
    return {v.model_version_id: (v.requests, v.completions, v.feedback, v.thumbs_up, v.thumbs_down,
                                 v.mean_rating and round(v.mean_rating, 9)) for v in stats.data}


async def counted_from_rows(world) -> dict:
    """The same, counted from every row (the version's feedback, rankings and pairwise preferences)."""
    row = await (await world.conn.execute("""
        SELECT mv.id, (SELECT count(*) FROM chat_requests WHERE model_version_id = mv.id),
               (SELECT count(*) FROM completions WHERE model_version_id = mv.id),
               f.thumbs, f.rating, f.comment, f.correction,
               (SELECT count(*) FROM rankings r JOIN chat_requests rq ON rq.id = r.request_id
                WHERE rq.model_version_id = mv.id),
               (SELECT count(*) FROM preferences WHERE source = 'pairwise'),
               f.up, f.down, f.mean
        FROM model_versions mv, LATERAL (
            SELECT count(*) FILTER (WHERE kind = 'thumbs') AS thumbs, count(*) FILTER (WHERE kind = 'rating') AS rating,
                   count(*) FILTER (WHERE kind = 'comment') AS comment,
                   count(*) FILTER (WHERE kind = 'correction') AS correction,
                   count(*) FILTER (WHERE kind = 'thumbs' AND value > 0) AS up,
                   count(*) FILTER (WHERE kind = 'thumbs' AND value < 0) AS down,
                   (avg(value) FILTER (WHERE kind = 'rating'))::double precision AS mean
            FROM feedback f JOIN completions c ON c.id = f.completion_id WHERE c.model_version_id = mv.id) f
        WHERE mv.kind = 'policy'""")).fetchone()
    v, requests, completions, thumbs, rating, comment, correction, ranking, preference, up, down, mean = row
    return {v: (requests, completions, dict(thumbs=thumbs, rating=rating, comment=comment, correction=correction,
                                            ranking=ranking, preference=preference), up, down,
                mean and round(mean, 9))}


def _comparable(p):
    """A pair as the two derivations both give it (the stored one adds its age)."""
    return json.dumps(p.model_dump(exclude={"judged_at"}), sort_keys=True)


def test_the_reward_window_is_the_newest_pairs_in_whole_groups(world):
    """A window of N pairs: the newest events first, a ranking's pairs all in or all out, each
    pair with the time its newest row was written; `since` leaves older judgements out."""
    world.run(world.reset())
    world.run(world.apply(("preference", 0, ("chatcmpl-a1", 0), ("chatcmpl-a1", 1), 1.0)))
    world.run(world.apply(("ranking", 1, "chatcmpl-a1", [[2], [0], [1]])))  # three pairs, one event
    upto = world.run(feedback.current_watermark(world.conn))
    newest = world.run(derive.pair_window(world.conn, upto=upto, limit=1))
    assert [p.source for p in newest] == ["ranking"] * 3 and len({p.group for p in newest}) == 1
    both = world.run(derive.pair_window(world.conn, upto=upto, limit=4))
    assert [p.source for p in both] == ["ranking"] * 3 + ["pairwise"]
    assert all(p.judged_at is not None for p in both)
    assert both[0].judged_at >= both[-1].judged_at
    since = world.run(derive.pair_window(world.conn, upto=upto, since=both[0].judged_at))
    assert sorted(map(_comparable, since)) == sorted(map(_comparable, newest))
    with pytest.raises(Invalid):
        world.run(derive.pair_window(world.conn, upto=upto, limit=0))
