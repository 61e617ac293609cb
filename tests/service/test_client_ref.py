"""A chat client's reference, conversation and task (the X-Feedloop-Client-* headers) are recorded
with the exchange and shown in its view; a client's housekeeping call (a non-empty task) takes no
feedback and is never one of PPO's prompts."""
import asyncio

import psycopg

from store import exchanges

REF, CHAT, TASK = "X-Feedloop-Client-Ref", "X-Feedloop-Client-Chat", "X-Feedloop-Client-Task"


def ask(client, content: str, headers: dict, **kw):
    return client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": content}],
                                          max_tokens=8, extra_headers=headers, **kw)


def in_store(server, fn):
    async def go():
        async with await psycopg.AsyncConnection.connect(server.db_url, autocommit=True) as conn:
            return await fn(conn)
    return asyncio.run(go())


def test_client_headers_are_recorded_and_shown(server, openai_client, operator):
    plain = ask(openai_client, "Hello!", {REF: "msg-1", CHAT: "chat-1", TASK: ""})  # Open WebUI: no task
    view = operator.get(f"/v1/admin/exchanges/{plain.id}").json()
    assert (view["client_ref"], view["client_chat_id"], view["client_task"]) == ("msg-1", "chat-1", None)
    stream = ask(openai_client, "Hello!", {REF: "msg-2"}, stream=True)
    streamed = [c.id for c in stream][0]
    view = operator.get(f"/v1/admin/exchanges/{streamed}").json()
    assert (view["client_ref"], view["client_chat_id"], view["client_task"]) == ("msg-2", None, None)
    found = in_store(server, lambda c: exchanges.find_client_exchange(c, client_ref="msg-1"))
    assert found["response_id"] == plain.id and found["client_chat_id"] == "chat-1"


def test_housekeeping_exchange_takes_no_feedback_and_is_no_ppo_prompt(server, openai_client, user):
    title = ask(openai_client, "Title for: Hello there", {REF: "msg-3", TASK: "title_generation"}, n=2)
    turn = ask(openai_client, "Hello there", {REF: "msg-3", TASK: ""})
    for path, body in [("/v1/feedback", {"response_id": title.id, "kind": "thumbs", "value": -1}),
                       ("/v1/feedback", {"response_id": title.id, "kind": "correction", "text": "Greetings"}),
                       ("/v1/rankings", {"response_id": title.id, "order": [1, 0]}),
                       ("/v1/preferences", {"chosen": {"response_id": title.id, "choice_index": 0},
                                            "rejected": {"response_id": title.id, "choice_index": 1}})]:
        r = user.post(path, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "client_task_exchange" and "title_generation" in r.json()["error"]["message"]
    with psycopg.connect(server.db_url) as conn:
        assert conn.execute("SELECT count(*) FROM feedback f JOIN completions c ON c.id = f.completion_id "
                            "JOIN chat_requests rq ON rq.id = c.request_id WHERE rq.response_id = %s",
                            (title.id,)).fetchone()[0] == 0
    assert user.post("/v1/feedback", json={"response_id": turn.id, "kind": "thumbs", "value": 1}).status_code == 200
    prompts = in_store(server, exchanges.recent_conversations)
    assert [{"role": "user", "content": "Hello there"}] in prompts
    assert [{"role": "user", "content": "Title for: Hello there"}] not in prompts
    # the same message id on a housekeeping call and on the user's turn: feedback joins the turn
    found = in_store(server, lambda c: exchanges.find_client_exchange(c, client_ref="msg-3"))
    assert found["response_id"] == turn.id


def test_a_client_header_too_long_is_a_400(user):
    r = user.post("/v1/chat/completions", headers={REF: "x" * 201},
                  json={"model": "feedloop", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"].lower() == REF.lower() and err["code"], err
