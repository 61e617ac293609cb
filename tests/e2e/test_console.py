"""The console at `/` in a real browser (Debian's chromium, driven by Playwright) against a real
`feedloop serve`: sign in, a streamed multi-turn chat, every kind of feedback, compare n = 3 and
rank with a tie, the arena between the active version and a canary, an operator promoting a
candidate, a training run's curves, and the other operator pages. What the console did is checked
through the admin API, never through the page alone. A screenshot of each page is written to
.feedloop/console-screenshots/.

Playwright's own browser download is not used: `make test` installs Debian's `chromium` when it
is missing, and FEEDLOOP_CHROMIUM names another binary."""
import asyncio
import concurrent.futures
import json
import os
import shutil
from pathlib import Path

import httpx
import psycopg
import pytest
from playwright.sync_api import expect

from store import runs
from store.derive import wilson_interval
from tests.conftest import OPERATOR_KEY, ROOT, V2_ANSWER, register
from trainer.ppo import CURVE_KEYS

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("FEEDLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / ".feedloop" / "console-screenshots"
TIMEOUT_MS = 60_000  # generous: two CPU cores are shared by the server, the browser and the tests


def in_thread(fn, *args):
    """Run `fn` (which may call asyncio.run) off this thread: Playwright's sync API keeps an
    event loop registered as running on the test's own thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


# --- the browser ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: `make test` installs Debian's (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh tab (its own storage: nobody is signed in); an uncaught script error or anything the
    page's Content-Security-Policy refuses fails the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("console", lambda m: m.type == "error" and "Content Security Policy" in m.text and errors.append(m.text))
    yield tab
    context.close()
    assert errors == [], f"script errors or CSP violations in the console: {errors}"


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # a full-page shot of a scrolled page draws the sticky header midway
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(page, server, key: str) -> None:
    page.goto(server.url + "/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#nav a[aria-current=page]").wait_for()


def go(page, route: str) -> None:
    page.evaluate(f"location.hash = '#/{route}'")  # (CDP's evaluate is not bound by the page's CSP)
    page.locator(f"#main[data-page='{route.split('/')[0]}']").wait_for()


def chat(page, text: str, temperature: str | None = None):
    """Send `text` in the chat page; returns the finished answer's first card."""
    if temperature is not None:
        page.get_by_label("Temperature").fill(temperature)
    done = page.locator(".answer[data-done=true]").count()
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    answer = page.locator(".answer[data-done=true]").nth(done)
    answer.wait_for()
    return answer


def exchange(operator, response_id: str) -> dict:
    r = operator.get(f"/v1/admin/exchanges/{response_id}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def user_id(server, user_key) -> int:
    with server.client(user_key) as c:
        return c.get("/v1/me").json()["id"]


@pytest.fixture(scope="module")
def v2(server, v2_path) -> str:  # noqa: F811
    """A candidate that answers 'Hello!' with V2_ANSWER, registered beside v1."""
    return f"v{in_thread(register, server.db_url, v2_path)}"


# --- served by the API itself, over the public API ------------------------------------------

def test_the_console_is_served_by_the_api_with_its_assets(server, user_key):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="/console/js/app.js">' in page.text
    for asset, kind in (("js/app.js", "javascript"), ("console.css", "text/css"), ("icon.svg", "image/svg+xml")):
        r = httpx.get(f"{server.url}/console/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    assert httpx.get(server.url + "/console/../service/app.py").status_code == 404
    assert httpx.get(server.url + "/console/%2e%2e/app.py").status_code == 404
    # who a key is: what the console signs in with
    me = httpx.get(server.url + "/v1/me", headers={"Authorization": f"Bearer {user_key}"}).json()
    assert me["role"] == "user" and me["name"] == "alice" and "key" not in me
    assert httpx.get(server.url + "/v1/me").json()["error"]["code"] == "missing_api_key"


def test_sign_in_shows_the_apis_own_error_and_a_user_sees_user_pages(page, server, user_key):
    page.goto(server.url + "/")
    shot(page, "01-sign-in")
    page.get_by_label("API key").fill("fl-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert "Incorrect API key provided." in page.get_by_role("alert").first.inner_text()
    sign_in(page, server, user_key)
    assert page.locator("#nav a").all_inner_texts() == ["Chat", "Compare"]  # no operator pages
    assert page.locator("#who").inner_text() == "alice (user)"
    page.evaluate("location.hash = '#/models'")  # an operator page by address: back to chat
    page.wait_for_url("**/#/chat")
    assert page.locator("#main").get_attribute("data-page") == "chat"


# --- chat and feedback ----------------------------------------------------------------------

def test_streamed_multi_turn_chat_and_every_kind_of_feedback_is_recorded(page, server, operator, user_key, user_id):
    sign_in(page, server, user_key)
    first = chat(page, "Hello!", temperature="0")
    rid, text = first.get_attribute("data-response-id"), first.locator(".text").inner_text()
    assert first.locator(".version").inner_text() == "v1"
    recorded = exchange(operator, rid)
    assert recorded["stream"] is True and recorded["api_key_id"] == user_id
    assert recorded["params"]["temperature"] == 0 and recorded["choices"][0]["text"] == text
    with server.client(user_key) as c:  # greedy: the API without streaming says the same
        same = c.post("/v1/chat/completions", json={"model": "feedloop", "temperature": 0,
                                                    "messages": [{"role": "user", "content": "Hello!"}]})
    assert same.json()["choices"][0]["message"]["content"] == text

    bar = first.locator(".feedback")
    bar.get_by_role("button", name="Thumbs up").click()
    page.locator(f".feedback[data-response-id='{rid}'][data-thumbs='1']").wait_for()
    bar.get_by_role("button", name="Rate 5 of 7").click()
    page.locator(f".feedback[data-response-id='{rid}'][data-rating='5']").wait_for()
    bar.get_by_text("Comment", exact=True).click()
    bar.get_by_label("Comment").fill("Friendly, but it could ask what I need.")
    bar.get_by_role("button", name="Save comment").click()
    bar.locator(".saved[data-state=saved-comment]").wait_for()
    bar.get_by_text("Write a better answer").click()
    assert bar.get_by_label("Write a better answer").input_value() == text  # starts from the answer
    bar.get_by_label("Write a better answer").fill("Hello! What can I do for you today?")
    bar.get_by_role("button", name="Save better answer").click()
    bar.locator(".saved[data-state=saved-correction]").wait_for()
    got = {f["kind"]: (f["value"], f["text"], f["author_key_id"], f["choice_index"])
           for f in exchange(operator, rid)["feedback"]}
    assert got == {"thumbs": (1, None, user_id, 0), "rating": (5, None, user_id, 0),
                   "comment": (None, "Friendly, but it could ask what I need.", user_id, 0),
                   "correction": (None, "Hello! What can I do for you today?", user_id, 0)}
    bar.get_by_role("button", name="Thumbs down").click()  # a change of mind replaces the thumbs
    page.locator(f".feedback[data-response-id='{rid}'][data-thumbs='-1']").wait_for()
    assert [f["value"] for f in exchange(operator, rid)["feedback"] if f["kind"] == "thumbs"] == [-1]

    second = chat(page, "What is 7 plus 5?")
    assert exchange(operator, second.get_attribute("data-response-id"))["messages"] == [
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": text},
        {"role": "user", "content": "What is 7 plus 5?"}]
    # drawn again with the new turn, the first answer still shows what was given
    assert first.get_by_role("button", name="Thumbs down").get_attribute("aria-pressed") == "true"
    assert first.get_by_role("button", name="Rate 5 of 7").get_attribute("aria-pressed") == "true"
    shot(page, "02-chat")
    page.set_viewport_size({"width": 390, "height": 844})
    shot(page, "03-chat-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    # an error is shown as the API says it, and nothing is recorded
    page.get_by_label("Temperature").fill("5")
    page.get_by_label("Message").fill("Too hot?")
    page.get_by_label("Message").press("Enter")
    with server.client(user_key) as c:
        said = c.post("/v1/chat/completions", json={"model": "feedloop", "temperature": 5,
                                                    "messages": [{"role": "user", "content": "Too hot?"}]})
    assert said.status_code == 400
    page.get_by_role("alert").filter(has_text=said.json()["error"]["message"]).wait_for()


def test_keyboard_only_sign_in_chat_and_rating(page, server, operator, user_key):
    page.goto(server.url + "/")
    page.keyboard.type(user_key)  # the key field has the focus
    page.keyboard.press("Enter")
    page.locator("#main[data-page=chat]").wait_for()
    page.keyboard.type("Name a colour.")  # and now the message field
    page.keyboard.press("Enter")
    answer = page.locator(".answer[data-done=true]")
    answer.wait_for()
    answer.get_by_role("button", name="Rate 6 of 7").focus()
    page.keyboard.press("Enter")
    page.locator(".feedback[data-rating='6']").wait_for()
    rid = answer.get_attribute("data-response-id")
    assert [(f["kind"], f["value"]) for f in exchange(operator, rid)["feedback"]] == [("rating", 6)]


def test_chat_with_several_answers_goes_on_from_the_chosen_one(page, server, operator, user_key):
    sign_in(page, server, user_key)
    page.get_by_label("Answers (n)").fill("2")
    page.get_by_label("Seed").fill("3")
    first = chat(page, "Tell me a joke.", temperature="1.5")
    page.locator(".answer[data-done=true]").nth(1).wait_for()
    texts = page.locator(".answer .text").all_inner_texts()
    page.locator(".answer").nth(1).get_by_role("button", name="Continue with this answer").click()
    assert page.locator(".answer").nth(1).get_by_role("button", name="Continue with this answer").get_attribute("aria-pressed") == "true"
    page.get_by_label("Answers (n)").fill("1")
    nxt = chat(page, "Another one.")
    assert exchange(operator, nxt.get_attribute("data-response-id"))["messages"][1] == {"role": "assistant", "content": texts[1]}
    assert first.get_attribute("data-response-id") != nxt.get_attribute("data-response-id")


# --- compare and rank -----------------------------------------------------------------------

def export_rows(operator) -> list[dict]:
    r = operator.get("/v1/admin/export", params={"format": "preference"})
    assert r.status_code == 200
    return [json.loads(line) for line in r.text.splitlines()]


def test_compare_three_answers_rank_them_with_a_tie_and_pick_the_best(page, server, operator, user_key, user_id):
    sign_in(page, server, user_key)
    go(page, "compare")
    page.get_by_label("Prompt").fill("Say something kind.")
    page.get_by_label("Answers (n)").select_option("3")
    page.get_by_label("Temperature").fill("1.5")
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Ask").click()
    page.locator(".column[data-done=true]").nth(2).wait_for()
    assert page.locator(".column").count() == 3
    rid = page.locator(".column").first.get_attribute("data-response-id")
    texts = [t for t in page.locator(".column .text").all_inner_texts()]
    assert [c["text"] for c in exchange(operator, rid)["choices"]] == texts

    # C dragged up beside A (a tie for first), B put last with its list: (A = C) > B
    page.locator(".chip[data-choice='2']").drag_to(page.locator(".tier[data-place='0']"))
    page.get_by_label("Place of answer B").select_option("2")
    assert page.locator(".order").inner_text() == "Order: (A = C) > B"
    page.get_by_role("button", name="Save ranking").click()
    page.locator(".ranking[data-saved]").wait_for()
    shot(page, "04-compare-rank")
    rankings = exchange(operator, rid)["rankings"]
    assert [(r["order"], r["author_key_id"], r["pairs"]) for r in rankings] == [([[0, 2], 1], user_id, 2)]

    page.get_by_role("button", name="B is best").click()
    page.locator(".best[aria-pressed=true]").wait_for()
    prefs = exchange(operator, rid)["preferences"]
    assert sorted((p["chosen"]["choice_index"], p["rejected"]["choice_index"]) for p in prefs) == [(1, 0), (1, 2)]
    assert {p["source"] for p in prefs} == {"pairwise"} and {p["author_key_id"] for p in prefs} == {user_id}

    # the same rows the HTTP API makes: the operator sends the same ranking by hand, and the
    # derivation turns both into the same training pairs
    by_api = operator.post("/v1/rankings", json={"response_id": rid, "order": [[0, 2], 1]}).json()
    rows = export_rows(operator)
    console_group = f"ranking:{rankings[0]['id'].removeprefix('rk_')}"
    api_group = f"ranking:{by_api['id'].removeprefix('rk_')}"
    strip = lambda r: {k: v for k, v in r.items() if k not in ("group", "origin")}
    console_pairs = [strip(r) for r in rows if r["group"] == console_group]
    assert console_pairs == [strip(r) for r in rows if r["group"] == api_group]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in console_pairs] == [
        (texts[0], texts[1]), (texts[2], texts[1])]
    assert len([r for r in rows if r["source"] == "pairwise" and r["chosen"][0]["content"] == texts[1]]) == 2


# --- operators: arena, registry, runs -------------------------------------------------------

def test_arena_between_the_active_version_and_a_canary_hides_names_until_the_vote(page, server, operator, v2):
    sign_in(page, server, OPERATOR_KEY)
    assert page.locator("#nav a").all_inner_texts() == ["Chat", "Compare", "Arena", "Models", "Runs", "Feedback",
                                                        "Exchanges", "Keys", "Export"]
    go(page, "models")
    page.locator(f"button.act.canary[data-version='{v2}']").click()
    page.get_by_label("Share of `feedloop` traffic (%)").fill("50")
    page.get_by_label("Reason (optional)").fill("try it on half")
    page.get_by_role("button", name="Start canary").click()
    page.locator(f".progress[data-done='{v2}:canary']").wait_for()
    models = {m["name"]: m for m in operator.get("/v1/admin/models").json()["data"]}
    assert models[v2]["status"] == "canary" and models[v2]["canary_fraction"] == 0.5
    assert operator.get("/v1/admin/models/history").json()["data"][0]["reason"] == "try it on half"

    go(page, "arena")
    page.locator(f"select[name=b] option[value='{v2}']").wait_for(state="attached")
    assert page.locator("select[name=a]").input_value() == "v1" and page.locator("select[name=b]").input_value() == v2
    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Prompt").fill("Hello!")
    page.get_by_role("button", name="Ask both").click()
    page.get_by_role("button", name="Left is better").wait_for()
    assert page.locator(".duel .version").all_inner_texts() == ["hidden until you vote"] * 2
    assert "v1" not in page.locator(".duel").inner_text() and v2 not in page.locator(".duel").inner_text()
    texts = page.locator(".duel .text").all_inner_texts()
    shot(page, "05-arena-before-vote")
    page.get_by_role("button", name="Left is better").click()
    page.locator(".reveal").wait_for()
    left = page.locator(".duel .version").first.inner_text()
    right = page.locator(".duel .version").last.inner_text()
    assert {left, right} == {"v1", v2} and texts[left == "v1"] == V2_ANSWER  # v2's answer was on its side
    winner_rid = page.locator(".duel [data-side=left]").get_attribute("data-response-id")
    pref, = exchange(operator, winner_rid)["preferences"]
    assert pref["chosen"]["response_id"] == winner_rid and pref["rejected"]["response_id"] != winner_rid
    shot(page, "06-arena-revealed")

    stats = {s["model_version"]: s for s in operator.get("/v1/admin/stats").json()["data"]}
    assert (stats[left]["arena_wins"], stats[left]["arena_losses"], stats[left]["arena_win_rate"]) == (1, 0, 1.0)
    assert (stats[right]["arena_wins"], stats[right]["arena_losses"], stats[right]["arena_win_rate"]) == (0, 1, 0.0)
    assert stats[left]["arena_win_rate_interval"] == pytest.approx(list(wilson_interval(1, 1)))
    go(page, "feedback")
    card = page.locator(f".version-card[data-version='{left}'] .win-rate")
    card.wait_for()
    lo, hi = wilson_interval(1, 1)
    assert card.inner_text() == f"100 % of 1 votes, 95 % CI {lo * 100:.0f} %–{hi * 100:.0f} %"
    assert page.locator(f".version-card[data-version='{v2}']").count() == 1
    shot(page, "07-feedback-per-version")


def test_wilson_interval():
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(1, 1)
    assert 0.2 < lo < 0.21 and hi == 1.0  # one vote says little
    lo, hi = wilson_interval(60, 100)
    assert 0.5 < lo < 0.6 < hi < 0.7


def test_an_operator_promotes_a_candidate_and_the_chat_shows_the_new_version(page, server, operator, v2):
    sign_in(page, server, OPERATOR_KEY)
    go(page, "models")
    page.locator(f"button.act.promote[data-version='{v2}']").click()
    page.get_by_label("Reason (optional)").fill("won the arena")
    page.get_by_role("button", name="Promote").last.click()
    page.locator(f".progress[data-done='{v2}:active']").wait_for()
    page.locator(f"tr[data-version='{v2}'][data-status=active]").wait_for()
    models = {m["name"]: m["status"] for m in operator.get("/v1/admin/models").json()["data"]}
    assert models == {"v1": "archived", v2: "active"}
    entry = operator.get("/v1/admin/models/history").json()["data"][0]
    assert (entry["action"], f"v{entry['version_id']}", entry["reason"]) == ("promote", v2, "won the arena")
    assert page.locator("table.audit tbody tr").first.inner_text().split("\t")[1:3] == [v2, "promote"]
    shot(page, "08-models")

    # a rollback needs a reason: the dialog will not send without one
    page.locator(f"button.act.rollback[data-version='{v2}']").click()
    page.get_by_role("button", name="Roll back").last.click()
    expect(page.locator("dialog[open]")).to_have_count(1)  # still asking
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("dialog")).to_have_count(0)  # closing is asynchronous: waited for, not sampled

    go(page, "chat")
    answer = chat(page, "Hello!", temperature="0")
    assert answer.locator(".version").inner_text() == v2
    assert answer.locator(".text").inner_text() == V2_ANSWER


def finished_run(db_url: str, steps: int = 12) -> int:
    """A round as the trainer records it (store.runs), with every curve the console draws."""
    curve = lambda f: [round(f(i), 4) for i in range(steps)]
    curves = {"reward/score": curve(lambda i: -0.5 + 0.1 * i), "reward/total": curve(lambda i: -0.6 + 0.08 * i),
              "ppo/kl": curve(lambda i: 0.4 * i), "ppo/entropy": curve(lambda i: 2.5 - 0.05 * i),
              "ppo/vf_loss": curve(lambda i: 1 / (1 + i)), "ppo/clipfrac": curve(lambda i: 0.1),
              "reward/curve": curve(lambda i: 0.7 - 0.03 * i), "reward/curve_accuracy": curve(lambda i: 0.5 + 0.03 * i)}
    # the keys a real round stores (trainer.stages.Trained.keep): PPO's per-step curves and the reward model's
    assert set(curves) <= set(CURVE_KEYS) | {"reward/curve", "reward/curve_accuracy"}

    async def go():
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            run = await runs.start_training_run(conn, kind="round", trigger="schedule",
                                                config={"gates": {"kl_budget": 6.0}, "ppo": {"target_kl": 4.0}})
            await runs.finish_training_run(conn, id=run.id, status="succeeded", watermark=0, curves=curves,
                                           metrics={"reward/accuracy": 0.83, "ppo/kl": 4.4})
            return run.id
    return asyncio.run(go())


def test_a_training_runs_curves_render_and_a_round_can_be_queued(page, server, operator):
    run_id = in_thread(finished_run, server.db_url)
    sign_in(page, server, OPERATOR_KEY)
    go(page, f"runs/{run_id}")
    detail = page.locator(f".run-detail[data-run='{run_id}']")
    detail.wait_for()
    for title in ("Reward (reward-model score of the answers)", "KL to the reference (nats per answer)",
                  "Entropy (per token)", "Value loss", "Reward model accuracy (per step)"):
        assert detail.locator(f"figure[data-title='{title}'] polyline.series").first.get_attribute("data-points") == "12"
    kl = detail.locator("figure[data-title='KL to the reference (nats per answer)']")
    assert kl.locator("line.limit.budget").count() == 1 and "budget 6" in kl.inner_text()
    assert detail.locator("details.more-curves figure").count() == 1  # ppo/clipfrac, out of the way
    shot(page, "09-runs-curves")

    page.get_by_role("button", name="Queue a round").click()
    page.locator(f".run-detail[data-run='{run_id + 1}'][data-status=queued]").wait_for()
    queued = operator.get("/v1/admin/training/runs").json()["data"][0]
    assert (queued["id"], queued["status"]) == (run_id + 1, "queued") and queued["requested_by"].endswith(":init")
    page.locator(".progress", has_text=f"run {queued['id']} queued").wait_for()
    # the page follows the run live: the trainer's claim shows up without a reload
    with psycopg.connect(server.db_url, autocommit=True) as conn:
        conn.execute("UPDATE training_runs SET status = 'running', started_at = now() WHERE id = %s", (queued["id"],))
    page.locator(f".run-detail[data-run='{queued['id']}'][data-status=running]").wait_for()
    with psycopg.connect(server.db_url, autocommit=True) as conn:  # no trainer here: leave nothing running
        conn.execute("UPDATE training_runs SET status = 'failed', finished_at = now(), error = 'test' WHERE id = %s",
                     (queued["id"],))


def test_exchanges_keys_and_export_pages(page, server, operator, user):
    judged = user.post("/v1/chat/completions", json={"model": "feedloop", "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": "Name a fruit."}]}).json()["id"]
    user.post("/v1/feedback", json={"response_id": judged, "kind": "correction", "text": "A pear."}).raise_for_status()
    sign_in(page, server, OPERATOR_KEY)
    go(page, "exchanges")
    page.locator(f"tr[data-response-id='{judged}']").wait_for()
    listed = operator.get("/v1/admin/exchanges").json()["data"]
    assert page.locator("table.exchanges tbody tr").count() == min(25, len(listed))
    assert "correction 1" in page.locator(f"tr[data-response-id='{judged}']").inner_text()
    page.locator(f"tr[data-response-id='{judged}'] a").click()
    page.locator(f".exchange-detail[data-response-id='{judged}']").wait_for()
    assert "correction: A pear." in page.locator(".exchange-detail").inner_text()
    shot(page, "10-exchanges")

    go(page, "keys")
    page.get_by_label("Name").fill("bob")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("code.new-key").inner_text()
    with server.client(secret) as c:
        assert c.get("/v1/me").json()["name"] == "bob"
    shot(page, "11-keys")

    go(page, "export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Export").click()
    rows = export_rows(operator)
    assert page.locator(".progress").get_attribute("data-rows") == str(len(rows))
    assert [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()] == rows
    shot(page, "12-export")


def test_listing_exchanges_pages_and_filters(server, operator, user):
    ids = [user.post("/v1/chat/completions", json={"model": "feedloop", "max_tokens": 4, "n": 2, "temperature": 1.0,
                                                   "messages": [{"role": "user", "content": f"Count to {k}."}]}).json()["id"]
           for k in (1, 2, 3)]
    first = operator.get("/v1/admin/exchanges", params={"limit": 2}).json()
    after = operator.get("/v1/admin/exchanges", params={"limit": 2, "before": first["data"][-1]["response_id"]}).json()
    assert [x["response_id"] for x in first["data"] + after["data"][:1]] == ids[::-1]  # newest first, page by page
    newest = first["data"][0]
    assert (newest["prompt"], newest["choices"], newest["turns"], newest["stream"]) == ("Count to 3.", 2, 1, False)
    assert newest["feedback"] == {"thumbs_up": 0, "thumbs_down": 0, "rating": 0, "comment": 0, "correction": 0,
                                  "ranking": 0, "preference": 0}
    user.post("/v1/feedback", json={"response_id": ids[2], "choice_index": 1, "kind": "thumbs", "value": 1})
    user.post("/v1/rankings", json={"response_id": ids[2], "order": [1, 0]})
    counted = operator.get("/v1/admin/exchanges", params={"limit": 1}).json()["data"][0]["feedback"]
    assert (counted["thumbs_up"], counted["ranking"]) == (1, 1)
    everything = operator.get("/v1/admin/exchanges", params={"limit": 500}).json()["data"]
    by_version = {m["id"]: operator.get("/v1/admin/exchanges", params={"model_version_id": m["id"], "limit": 500}).json()["data"]
                  for m in operator.get("/v1/admin/models").json()["data"]}
    assert all({x["model_version_id"] for x in xs} <= {vid} for vid, xs in by_version.items())
    assert sorted(x["response_id"] for xs in by_version.values() for x in xs) == sorted(x["response_id"] for x in everything)
    r = operator.get("/v1/admin/exchanges", params={"before": "chatcmpl-nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "before"
    assert operator.get("/v1/admin/exchanges", params={"limit": 0}).json()["error"]["param"] == "limit"
    assert user.get("/v1/admin/exchanges").json()["error"]["code"] == "operator_only"
