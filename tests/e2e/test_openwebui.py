"""A real Open WebUI in front of a real feedloop: its users' thumbs, ratings, comments and
side-by-side votes come into feedloop's training data through `feedloop import openwebui`.

Open WebUI lives in a venv of its own (`make openwebui`, run here when missing; the test skips,
saying why, only when that install fails). It runs offline on loopback only: auth off (one admin),
Ollama off, no embedding model, no update check, and its one OpenAI connection is feedloop with the
README's X-Feedloop-Client-* headers. Its title and tags prompts are shortened
(TITLE/TAGS_GENERATION_PROMPT_TEMPLATE), and their answers' length (TASK_MODEL_PARAMS), so they fit
the bootstrap policy's 512-token context: those housekeeping calls reach feedloop and are recorded,
which is what the last checks need. Its builtin tools stay on, as by default: each user turn
carries 28 tool definitions (about 21 KB), more than the bootstrap's context holds, so feedloop
answers in text (X-Feedloop-Tools-Omitted). DATABASE_URL is kept from it: Open WebUI would take it
for its own database."""
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import psycopg
import pytest

from tests.conftest import OPERATOR_KEY, ROOT, free_port

pytestmark = pytest.mark.slow
VENV = ROOT / ".feedloop" / "openwebui-venv"
VERSION = "0.12.4"  # the Makefile's OPENWEBUI_VERSION
HEADERS = {"X-Feedloop-Client-Ref": "{{MESSAGE_ID}}", "X-Feedloop-Client-Chat": "{{CHAT_ID}}",
           "X-Feedloop-Client-Task": "{{TASK}}"}


@pytest.fixture(scope="module")
def openwebui_bin():
    """Open WebUI's `open-webui` command, installed into its own venv by `make openwebui` if missing."""
    if not (VENV / f".installed-{VERSION}").exists():
        made = subprocess.run(["make", "openwebui"], cwd=ROOT, capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"Open WebUI {VERSION} could not be installed (make openwebui):\n{made.stdout[-1500:]}"
                        f"{made.stderr[-1500:]}")
    return VENV / "bin" / "open-webui"


@pytest.fixture(scope="module")
def openwebui(server, openwebui_bin, tmp_path_factory):
    """Open WebUI on its own port, its one connection feedloop (a user key of its own)."""
    data, port = tmp_path_factory.mktemp("openwebui"), free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PYTHONPATH")},
        DATA_DIR=str(data), WEBUI_SECRET_KEY="feedloop-test", WEBUI_AUTH="False",
        ENABLE_OLLAMA_API="False", ENABLE_OPENAI_API="True", OPENAI_API_BASE_URLS=server.url + "/v1",
        OPENAI_API_KEYS=server.create_key("user", "openwebui"),
        OPENAI_API_CONFIGS=json.dumps({"0": {"headers": HEADERS}}),
        # offline, loopback only: no hub, no update check, no embedding model, no telemetry
        OFFLINE_MODE="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BYPASS_EMBEDDING_AND_RETRIEVAL="true",
        RAG_EMBEDDING_ENGINE="openai", RAG_OPENAI_API_BASE_URL="http://127.0.0.1:9/v1",
        ENABLE_VERSION_UPDATE_CHECK="false", ANONYMIZED_TELEMETRY="false", DO_NOT_TRACK="true",
        SCARF_NO_ANALYTICS="true", ENABLE_EVALUATION_ARENA_MODELS="False",
        TITLE_GENERATION_PROMPT_TEMPLATE="Title for: {{MESSAGES:END:2}}",
        TAGS_GENERATION_PROMPT_TEMPLATE="Tags for: {{MESSAGES:END:2}}",
        # a title asks for 1000 tokens by default: more than the bootstrap's context leaves, which
        # feedloop refuses as OpenAI does (context_length_exceeded)
        TASK_MODEL_PARAMS=json.dumps({"max_tokens": 32}))
    log = data / "openwebui.log"
    proc = subprocess.Popen([str(openwebui_bin), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=data, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Open WebUI did not start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        # auth off: signing in with nothing gives the one admin's token
        token = httpx.post(url + "/api/v1/auths/signin", json={"email": "", "password": ""}).json()["token"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
            yield client, token
    finally:
        proc.terminate()
        try:
            proc.wait(5)  # it keeps background workers: do not wait long for a graceful end
        except subprocess.TimeoutExpired:
            proc.kill()


def chat(owui: httpx.Client, prompt: str, models: list[str]) -> tuple[str, dict[str, str]]:
    """A new chat as Open WebUI's own page starts one (one answer per model, side by side when
    several, with its title and tags tasks); the chat id and each model's answer id, once answered."""
    user_id = str(uuid.uuid4())
    answers = {m: str(uuid.uuid4()) for m in models}
    r = owui.post("/api/chat/completions", json={
        "model": models[0], "stream": False, "parent_id": None, "session_id": "test-session",
        "messages": [{"role": "user", "content": prompt}],
        "user_message": {"id": user_id, "role": "user", "content": prompt, "parentId": None,
                         "childrenIds": [], "models": models, "timestamp": int(time.time())},
        "message_ids": [{"model_id": m, "message_id": a} for m, a in answers.items()],
        "background_tasks": {"title_generation": True, "tags_generation": True}})
    r.raise_for_status()
    chat_id = r.json()["chat_id"]
    deadline = time.time() + 120
    while time.time() < deadline:
        messages = owui.get(f"/api/v1/chats/{chat_id}").json()["chat"]["history"]["messages"]
        if all(messages.get(a, {}).get("done") for a in answers.values()):
            errors = [messages[a].get("error") for a in answers.values() if messages[a].get("error")]
            assert not errors, errors
            return chat_id, answers
        time.sleep(0.5)
    raise AssertionError(f"Open WebUI's chat {chat_id} was not answered: {messages}")


def give_feedback(owui: httpx.Client, chat_id: str, message_id: str, data: dict) -> dict:
    """Feedback as Open WebUI's page sends it: the answer's model, its siblings' models when the
    user message has several answers, the chat as a snapshot."""
    snapshot = owui.get(f"/api/v1/chats/{chat_id}").json()
    messages = snapshot["chat"]["history"]["messages"]
    siblings = [m for m in messages[messages[message_id]["parentId"]]["childrenIds"] if m != message_id]
    body = {"type": "rating",
            "data": data | {"model_id": messages[message_id]["model"]}
                    | ({"sibling_model_ids": [messages[m]["model"] for m in siblings]} if siblings else {}),
            "meta": {"arena": False, "model_id": messages[message_id]["model"], "message_id": message_id,
                     "message_index": 2, "chat_id": chat_id},
            "snapshot": {"chat": snapshot}}
    r = owui.post("/api/v1/evaluations/feedback", json=body)
    r.raise_for_status()
    return r.json()


def run_import(server, url: str, token: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "service", "import", "openwebui", "--url", url, "--api-key", token],
                          cwd=ROOT, env=dict(os.environ, DATABASE_URL=server.db_url), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def exchanges_by_ref(db_url: str) -> dict[tuple[str, str | None], dict]:
    """Recorded exchanges by (client ref, client task)."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT response_id, client_ref, client_chat_id, client_task, messages "
                            "FROM chat_requests ORDER BY id").fetchall()
    return {(r[1], r[3]): {"response_id": r[0], "chat_id": r[2], "messages": r[4]} for r in rows}


def wait_for_housekeeping(db_url: str, tasks: set[str], timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = exchanges_by_ref(db_url)
        if tasks <= {task for _, task in found}:
            return found
        time.sleep(0.5)
    raise AssertionError(f"Open WebUI's {tasks} calls never reached feedloop: {list(found)}")


def export_pairs(operator: httpx.Client) -> list[dict]:
    r = operator.get("/v1/admin/export", params={"format": "preference"})
    r.raise_for_status()
    return [json.loads(line) for line in r.text.splitlines() if line]


def test_open_webui_feedback_flows_into_training_data(server, openwebui, operator):
    owui, token = openwebui
    chat_one, answers_one = chat(owui, "Hello!", ["feedloop"])
    chat_two, answers_two = chat(owui, "What is your name?", ["feedloop", "v1"])  # side by side

    # feedloop recorded each answer under Open WebUI's message id and chat id, the user's turns
    # with no task; Open WebUI's own title and tags calls carry a task
    recorded = wait_for_housekeeping(server.db_url, {"title_generation", "tags_generation"})
    one = recorded[(answers_one["feedloop"], None)]
    left, right = recorded[(answers_two["feedloop"], None)], recorded[(answers_two["v1"], None)]
    assert (one["chat_id"], left["chat_id"], right["chat_id"]) == (chat_one, chat_two, chat_two)
    housekeeping = [e for (ref, task), e in recorded.items() if task]
    assert {e["chat_id"] for e in housekeeping} <= {chat_one, chat_two}, recorded

    # a thumbs-down with a comment, a reason, tags and a 1-10 rating; a side-by-side vote for v1's answer
    thumbs_down = give_feedback(owui, chat_one, answers_one["feedloop"],
                                {"rating": -1, "comment": "Too curt.", "reason": "Not helpful", "tags": ["tone"],
                                 "details": {"rating": 3}})
    give_feedback(owui, chat_two, answers_two["v1"], {"rating": 1, "comment": "v1 is friendlier"})
    # answers feedloop never saw with the headers (more than a page of Open WebUI's list: 30)
    for i in range(31):
        owui.post("/api/v1/evaluations/feedback", json={"type": "rating", "data": {"rating": 1},
                                                        "meta": {"message_id": f"elsewhere-{i}"}}).raise_for_status()

    report = run_import(server, str(owui.base_url), token)
    assert (report["items"], report["joined"], report["unjoined_count"], report["refused_count"]) == (33, 2, 31, 0)
    assert sorted(u["message_id"] for u in report["unjoined"]) == sorted(f"elsewhere-{i}" for i in range(31))
    assert report["changed"] == {"thumbs": 2, "rating": 1, "comment": 2, "preference": 1}

    # feedloop's exchange view shows each on the right completion, by the Open WebUI user
    view = operator.get(f"/v1/admin/exchanges/{one['response_id']}").json()
    assert view["client_ref"] == answers_one["feedloop"] and view["client_task"] is None
    got = {f["kind"]: f for f in view["feedback"]}
    assert got["thumbs"]["value"] == -1
    assert got["rating"]["value"] == 2  # 3 of 1..10 is 2 of 1..7
    assert got["comment"]["text"] == "Too curt.\nreason: Not helpful\ntags: tone"
    authors = {k["id"]: k for k in operator.get("/v1/admin/keys").json()["data"]}
    author = authors[got["thumbs"]["author_key_id"]]
    assert author["name"] == "Open WebUI: User <admin@localhost>" and author["revoked_at"] is not None
    vote = operator.get(f"/v1/admin/exchanges/{right['response_id']}").json()
    assert [(p["chosen"]["response_id"], p["rejected"]["response_id"]) for p in vote["preferences"]] \
        == [(right["response_id"], left["response_id"])]
    assert {f["kind"]: f["value"] for f in vote["feedback"]} == {"thumbs": 1, "comment": None}

    # the derived training pairs include the vote
    pairs = export_pairs(operator)
    preference_id = int(vote["preferences"][0]["id"].removeprefix("pf_"))
    assert [p for p in pairs if json.loads(p["origin"]).get("preference") == preference_id][0]["source"] == "pairwise"

    # a second import changes nothing
    before = [operator.get(f"/v1/admin/exchanges/{e['response_id']}").json() for e in (one, left, right)]
    again = run_import(server, str(owui.base_url), token)
    assert again["changed"] == dict.fromkeys(("thumbs", "rating", "comment", "preference"), 0)
    assert again["recorded"] == report["recorded"]
    # and so does the trainer service's scheduled job (the function its scheduler calls)
    from schemas.settings import Settings
    from trainer.scheduler import openwebui_import
    job = openwebui_import(server.db_url, Settings(openwebui_url=str(owui.base_url), openwebui_api_key=token,
                                                   openwebui_import_seconds=60))
    assert job.changed == again["changed"] and job.recorded == report["recorded"]
    assert [operator.get(f"/v1/admin/exchanges/{e['response_id']}").json() for e in (one, left, right)] == before
    assert export_pairs(operator) == pairs

    # an item edited in Open WebUI replaces its value: 9 of 1..10 is 6 of 1..7
    edited = {k: thumbs_down[k] for k in ("type", "data", "meta")}
    edited["data"] = edited["data"] | {"details": {"rating": 9}}
    owui.post(f"/api/v1/evaluations/feedback/{thumbs_down['id']}", json=edited).raise_for_status()
    third = run_import(server, str(owui.base_url), token)
    assert third["changed"] == {"thumbs": 0, "rating": 1, "comment": 0, "preference": 0}
    ratings = [f for f in operator.get(f"/v1/admin/exchanges/{one['response_id']}").json()["feedback"]
               if f["kind"] == "rating"]
    assert [(f["value"], f["id"]) for f in ratings] == [(6, got["rating"]["id"])]

    # Open WebUI's title and tags calls are never PPO prompts nor in a pair, and take no feedback
    from store.exchanges import recent_conversations

    async def ppo_prompts():
        async with await psycopg.AsyncConnection.connect(server.db_url) as conn:
            return await recent_conversations(conn)
    prompts = asyncio.run(ppo_prompts())
    assert one["messages"] in prompts and left["messages"] in prompts
    for e in housekeeping:
        assert e["messages"] not in prompts
        assert all(p["prompt"] != e["messages"] for p in pairs)
        r = operator.post("/v1/feedback", json={"response_id": e["response_id"], "kind": "thumbs", "value": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "client_task_exchange"
