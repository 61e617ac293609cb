"""Feedback through a real server: every kind round-trips and shows in the exchange view; the
ownership, validation and idempotency rules; what a ranking yields for training."""
import asyncio
import threading

import openai
import psycopg
import pytest

from store import derive, feedback


def ask(client, content="Tell me a joke.", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": content}], **kw)


def count(server, table: str) -> int:
    with psycopg.connect(server.db_url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def counts(server) -> tuple[int, ...]:
    return tuple(count(server, t) for t in ("feedback", "rankings", "preferences", "idempotency_keys"))


def derived_pairs(server, **window):
    """The training pairs as the trainer reads them (the store's one derivation)."""
    async def pairs():
        async with await psycopg.AsyncConnection.connect(server.db_url, autocommit=True) as conn:
            return await derive.derive_pairs(conn, **window)
    return asyncio.run(pairs())


def watermark(server) -> int:
    async def read():
        async with await psycopg.AsyncConnection.connect(server.db_url, autocommit=True) as conn:
            return await feedback.current_watermark(conn)
    return asyncio.run(read())


def exchange(operator, response_id: str) -> dict:
    r = operator.get(f"/v1/admin/exchanges/{response_id}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def ex(server, user_key):
    """Exchanges of the `user` key: one answer, two and four choices, another prompt."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=user_key, max_retries=0)
    return {"one": ask(client).id, "two": ask(client, n=2, temperature=1.5).id,
            "four": ask(client, n=4, temperature=1.5).id,
            "other_prompt": ask(client, "Name a colour.").id}


def ref(response_id, choice_index=0):
    return {"response_id": response_id, "choice_index": choice_index}


# --- every kind round-trips -----------------------------------------------------------------

def test_thumbs_round_trip_and_a_second_replaces_the_first(server, user, operator, openai_client):
    rid = ask(openai_client).id
    first = user.post("/v1/feedback", json={**ref(rid), "kind": "thumbs", "value": 1})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["object"] == "feedback" and body["id"].startswith("fb_")
    assert (body["response_id"], body["choice_index"], body["kind"], body["value"]) == (rid, 0, "thumbs", 1)
    again = user.post("/v1/feedback", json={**ref(rid), "kind": "thumbs", "value": 1})  # the same: no change
    assert again.json() == body
    flipped = user.post("/v1/feedback", json={**ref(rid), "kind": "thumbs", "value": -1}).json()
    assert flipped["id"] == body["id"] and flipped["value"] == -1
    assert [(f["kind"], f["value"], f["id"]) for f in exchange(operator, rid)["feedback"]] == \
        [("thumbs", -1, body["id"])]


@pytest.mark.parametrize("kind,field,value", [("rating", "value", 6), ("comment", "text", "Too short."),
                                              ("correction", "text", "Why did the chicken cross the road?")])
def test_other_kinds_round_trip(server, user, operator, ex, kind, field, value):
    r = user.post("/v1/feedback", json={**ref(ex["two"], 1), "kind": kind, field: value})
    assert r.status_code == 200, r.text
    assert r.json()[field] == value
    shown = [f for f in exchange(operator, ex["two"])["feedback"] if f["kind"] == kind]
    assert [(f["choice_index"], f[field]) for f in shown] == [(1, value)]


def test_ranking_of_four_yields_six_pairs(server, user, operator, ex):
    r = user.post("/v1/rankings", json={"response_id": ex["four"], "order": [2, 0, 3, 1]})
    assert r.status_code == 200, r.text
    ranking = r.json()
    assert ranking["object"] == "ranking" and ranking["order"] == [2, 0, 3, 1] and ranking["pairs"] == 6
    view = exchange(operator, ex["four"])
    assert [(k["id"], k["order"]) for k in view["rankings"]] == [(ranking["id"], [2, 0, 3, 1])]
    texts = [c["text"] for c in view["choices"]]
    pairs = [p for p in derived_pairs(server) if p.group == f"ranking:{ranking['id'].removeprefix('rk_')}"]
    assert len(pairs) == 6 and {p.source for p in pairs} == {"ranking"}
    better = {2: 0, 0: 1, 3: 2, 1: 3}  # choice -> rank
    assert sorted(tuple(p.origin["choices"]) for p in pairs) == \
        sorted((i, j) for i in range(4) for j in range(4) if better[i] < better[j])
    for p in pairs:
        i, j = p.origin["choices"]
        assert (p.chosen, p.rejected) == (texts[i], texts[j])
        assert p.prompt == [{"role": "user", "content": "Tell me a joke."}] and p.prompt_hash == view["prompt_hash"]


def test_ranking_with_ties_pairs_only_across_tiers(server, user, ex):
    owner = server.create_key("user", "ranker")  # a second ranking of the same response: its own row
    with server.client(owner) as c:
        assert c.post("/v1/rankings", json={"response_id": ex["four"], "order": [0, 1, 2, 3]}).status_code == 404
    r = user.post("/v1/rankings", json={"response_id": ex["four"], "order": [[0, 1], [2], 3]})
    assert r.status_code == 200, r.text
    assert r.json()["order"] == [[0, 1], 2, 3] and r.json()["pairs"] == 5  # the user's ranking, replaced
    again = user.post("/v1/rankings", json={"response_id": ex["four"], "order": [[0, 1], 2, 3]})
    assert again.json() == r.json()
    pairs = [p for p in derived_pairs(server) if p.group == f"ranking:{r.json()['id'].removeprefix('rk_')}"]
    assert len(pairs) == 5 and [0, 1] not in [sorted(p.origin["choices"]) for p in pairs]


def test_preference_round_trip_and_flip(server, user, operator, ex):
    body = {"chosen": ref(ex["two"], 1), "rejected": ref(ex["two"], 0), "strength": 0.5}
    r = user.post("/v1/preferences", json=body)
    assert r.status_code == 200, r.text
    pref = r.json()
    assert pref["object"] == "preference" and pref["margin"] == 0.5 and pref["source"] == "pairwise"
    assert (pref["chosen"], pref["rejected"]) == (body["chosen"], body["rejected"])
    assert user.post("/v1/preferences", json=body).json() == pref  # the same again: unchanged
    flipped = user.post("/v1/preferences", json={"chosen": ref(ex["two"], 0), "rejected": ref(ex["two"], 1)}).json()
    assert flipped["id"] == pref["id"] and flipped["chosen"] == ref(ex["two"], 0) and flipped["strength"] == 1.0
    assert [(p["id"], p["chosen"]["choice_index"]) for p in exchange(operator, ex["two"])["preferences"]] == \
        [(pref["id"], 0)]


def test_a_new_thumbs_down_pairs_with_an_old_thumbs_up(server, user, openai_client):
    a, b = (ask(openai_client, "Say something kind.", temperature=2.0, seed=s, max_tokens=16) for s in (1, 2))
    up_text, down_text = a.choices[0].message.content, b.choices[0].message.content
    assert up_text != down_text
    assert user.post("/v1/feedback", json={**ref(a.id), "kind": "thumbs", "value": 1}).status_code == 200
    mark = watermark(server)  # a training round would read up to here
    assert user.post("/v1/feedback", json={**ref(b.id), "kind": "thumbs", "value": -1}).status_code == 200
    new = [p for p in derived_pairs(server, after=mark) if p.source == "thumbs"]
    assert [(p.chosen, p.rejected) for p in new] == [(up_text, down_text)]
    assert new[0].origin["event_id"] > mark and len(new[0].origin["feedback"]) == 2


# --- ownership ------------------------------------------------------------------------------

def test_someone_elses_exchange_is_answered_like_an_unknown_one(server, user, ex):
    bob = server.create_key("user", "bob")
    theirs = ask(openai.OpenAI(base_url=server.url + "/v1", api_key=bob, max_retries=0)).id
    before = counts(server)
    for rid in (theirs, "chatcmpl-doesnotexist"):
        attempts = [user.post("/v1/feedback", json={**ref(rid), "kind": "thumbs", "value": 1}),
                    user.post("/v1/rankings", json={"response_id": rid, "order": [0, 1]}),
                    user.post("/v1/preferences", json={"chosen": ref(ex["one"]), "rejected": ref(rid)})]
        for r in attempts:
            assert r.status_code == 404, r.text
            assert r.json()["error"]["type"] == "not_found_error"
        messages = [r.json()["error"]["message"].replace(rid, "ID") for r in attempts]
        if rid == theirs:
            theirs_messages = messages
    assert messages == theirs_messages  # nothing tells "exists, not yours" from "does not exist"
    assert attempts[2].json()["error"]["param"] == "rejected"
    missing_choice = user.post("/v1/feedback", json={**ref(ex["one"], 5), "kind": "thumbs", "value": 1})
    assert missing_choice.status_code == 404
    assert counts(server) == before


def test_operators_may_judge_any_exchange(server, operator, ex):
    r = operator.post("/v1/feedback", json={**ref(ex["one"]), "kind": "rating", "value": 3})
    assert r.status_code == 200 and r.json()["author_key_id"] != exchange(operator, ex["one"])["api_key_id"]


# --- validation: 400 naming the field, nothing written --------------------------------------

BAD = [
    # (route, body from the exchanges, param)
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "thumbs", "value": 0}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "thumbs", "value": 2}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "thumbs"}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "rating", "value": 8}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "rating", "value": 4.5}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "comment"}, "text"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "correction", "text": "  "}, "text"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "comment", "text": "hm", "value": 1}, "value"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "thumbs", "value": 1, "text": "!"}, "text"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "smile", "value": 1}, "kind"),
    ("/v1/feedback", lambda ex: {"choice_index": 0, "kind": "thumbs", "value": 1}, "response_id"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"], -1), "kind": "thumbs", "value": 1}, "choice_index"),
    ("/v1/feedback", lambda ex: {**ref(ex["one"]), "kind": "thumbs", "value": 1, "vote": 1}, "vote"),
    ("/v1/rankings", lambda ex: {"response_id": ex["four"], "order": [0, 1, 2]}, "order"),
    ("/v1/rankings", lambda ex: {"response_id": ex["four"], "order": [0, 1, 2, 7]}, "order"),
    ("/v1/rankings", lambda ex: {"response_id": ex["four"], "order": [0, 1, 2, 2]}, "order"),
    ("/v1/rankings", lambda ex: {"response_id": ex["four"], "order": [[0, 1], [], 2, 3]}, "order"),
    ("/v1/rankings", lambda ex: {"response_id": ex["one"], "order": [0]}, "response_id"),
    ("/v1/preferences", lambda ex: {"chosen": ref(ex["two"]), "rejected": ref(ex["two"])}, "rejected"),
    ("/v1/preferences", lambda ex: {"chosen": ref(ex["one"]), "rejected": ref(ex["other_prompt"])}, "rejected"),
    ("/v1/preferences", lambda ex: {"chosen": ref(ex["two"]), "rejected": ref(ex["two"], 1), "strength": 2},
     "strength"),
    ("/v1/preferences", lambda ex: {"chosen": ref(ex["two"])}, "rejected"),
]


@pytest.mark.parametrize("route,body,param", BAD)
def test_invalid_feedback_is_refused_naming_the_field(server, user, ex, route, body, param):
    before = counts(server)
    r = user.post(route, json=body(ex), headers={"Idempotency-Key": f"bad-{route}-{param}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"], err
    assert counts(server) == before  # not even the idempotency key


# --- idempotency ----------------------------------------------------------------------------

def test_a_retried_post_returns_the_first_answer_and_writes_once(server, user, ex):
    body, key = {**ref(ex["four"], 3), "kind": "thumbs", "value": 1}, {"Idempotency-Key": "retry-1"}
    first = user.post("/v1/feedback", json=body, headers=key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    with psycopg.connect(server.db_url) as conn:
        event = conn.execute("SELECT max(last_value) FROM feedback_events").fetchone()[0]
    retry = user.post("/v1/feedback", json=body, headers=key)
    assert retry.status_code == 200 and retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    # the value changes without the key; a late retry still answers as the first time and writes nothing
    assert user.post("/v1/feedback", json={**body, "value": -1}).json()["value"] == -1
    late = user.post("/v1/feedback", json=body, headers=key)
    assert late.json() == first.json()
    with psycopg.connect(server.db_url) as conn:
        assert conn.execute("SELECT max(last_value) FROM feedback_events").fetchone()[0] == event + 1
        assert conn.execute("SELECT value FROM feedback f JOIN completions c ON c.id = f.completion_id"
                            " JOIN chat_requests r ON r.id = c.request_id WHERE r.response_id = %s"
                            " AND c.choice_index = 3 AND f.kind = 'thumbs'", (ex["four"],)).fetchall() == [(-1,)]


def test_concurrent_retries_write_once(server, user_key, ex):
    body = {"chosen": ref(ex["four"], 1), "rejected": ref(ex["four"], 2), "strength": 0.25}
    results, before = [], count(server, "preferences")

    def post():
        with server.client(user_key) as c:
            results.append(c.post("/v1/preferences", json=body, headers={"Idempotency-Key": "burst-1"}))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 8
    assert len({r.text for r in results}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in results) == 7
    assert count(server, "preferences") == before + 1


def test_the_same_key_with_another_body_is_a_conflict(server, user, operator, ex):
    key = {"Idempotency-Key": "reused-1"}
    assert user.post("/v1/feedback", json={**ref(ex["one"]), "kind": "comment", "text": "a"}, headers=key).status_code == 200
    before = counts(server)
    r = user.post("/v1/feedback", json={**ref(ex["one"]), "kind": "comment", "text": "b"}, headers=key)
    assert r.status_code == 409
    assert r.json()["error"]["type"] == "conflict_error" and r.json()["error"]["param"] == "Idempotency-Key"
    r = user.post("/v1/rankings", json={"response_id": ex["four"], "order": [0, 1, 2, 3]}, headers=key)
    assert r.status_code == 409
    assert counts(server) == before
    # keys are per API key: another key may use the same string
    assert operator.post("/v1/feedback", json={**ref(ex["one"]), "kind": "comment", "text": "b"},
                         headers=key).status_code == 200


def test_concurrent_feedback_is_each_committed_when_answered(server, user_key, openai_client):
    """Many POSTs at once (written in groups: service/feedback_writer.py): every 200 is already
    in the database when its caller reads it, one in the burst that may not be judged is its
    own 404 and changes nothing, and no event is drawn twice."""
    rids = [ask(openai_client, n=4, temperature=1.5).id for _ in range(3)]
    events = [({**ref(rid, i), "kind": kind, "value": value}, kind, value)
              for rid in rids for i in range(4) for kind, value in (("thumbs", -1), ("rating", 5))]
    before, drawn_before = count(server, "feedback"), watermark(server)
    results = []

    def post(body, kind, value):
        with server.client(user_key) as c, psycopg.connect(server.db_url) as conn:
            barrier.wait()  # all at once
            r = c.post("/v1/feedback", json=body)
            stored = None
            if r.status_code == 200:
                stored = conn.execute("SELECT kind, value FROM feedback WHERE id = %s",
                                      (int(r.json()["id"].removeprefix("fb_")),)).fetchone()
            results.append((r.status_code, stored, (kind, value)))

    threads = [threading.Thread(target=post, args=e) for e in events]
    threads.append(threading.Thread(target=post, args=({**ref("chatcmpl-nope"), "kind": "thumbs", "value": 1},
                                                       "thumbs", 1)))
    barrier = threading.Barrier(len(threads))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _, _ in results) == [200] * len(events) + [404]
    assert all(stored == expected for s, stored, expected in results if s == 200)
    assert count(server, "feedback") == before + len(events)
    assert watermark(server) == drawn_before + len(events)
