"""The embedded engine's scheduler, observed through the model's own forward calls rather than
the clock: who joins the running batch when, how many prompt tokens the model ran, what a seed
gives alone and in a busy batch, and what a full queue answers."""
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import psycopg
import pytest

from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import EngineOverloaded
from service.local_engine import LocalEngine

PROMPT = [{"role": "user", "content": "Tell me about the sun."}]
OTHER = [{"role": "user", "content": "What is 7 plus 5?"}]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 16, "stop": [],
                             "seed": None, **kw})


@pytest.fixture(scope="module")
def engine(policy_path):
    version = ModelVersion(id=1, kind="policy", parent_id=None, reference_id=None, reward_model_id=None,
                           path=str(policy_path), content_hash="", endpoint=None, status="active",
                           canary_fraction=None, training_run_id=None, metrics={},
                           created_at=datetime.now(timezone.utc), promoted_at=None, promoted_by=None)
    e = LocalEngine(version, max_batch_rows=8, max_queue=4, queue_timeout=30.0)
    e.warm()
    yield e
    e.close()


class Forwards:
    """Records (rows, columns) of every forward the model runs; optionally holds the worker at
    its `hold_at`-th forward until `release` is set; optionally never lets it pick EOS, so every
    answer runs to its max_tokens."""

    def __init__(self, engine, *, hold_at: int | None = None, no_eos: bool = False):
        self.calls: list[tuple[int, int]] = []
        self.prompt_tokens = 0
        self.hold_at, self.held, self.release = hold_at, threading.Event(), threading.Event()
        self.handles = [engine.model.register_forward_pre_hook(self._before, with_kwargs=True)]
        if no_eos:
            self.eos = list(engine.end_ids)
            self.handles.append(engine.model.register_forward_hook(self._no_eos, with_kwargs=True))

    def _before(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.calls.append(tuple(ids.shape))
        if ids.shape[1] > 1:  # a prefill: count the prompt tokens it really runs (padding aside)
            self.prompt_tokens += int(kwargs["attention_mask"].sum())
        if len(self.calls) == self.hold_at:
            self.held.set()
            assert self.release.wait(60), "the test never released the worker"

    def _no_eos(self, module, args, kwargs, out):
        out.logits[..., self.eos] = float("-inf")

    def remove(self):
        self.release.set()
        for h in self.handles:
            h.remove()


@pytest.fixture
def forwards(engine):
    made = []

    def make(**kw) -> Forwards:
        made.append(Forwards(engine, **kw))
        return made[-1]

    yield make
    for f in made:
        f.remove()


async def answer(gen) -> list[str]:
    await gen.admitted()
    texts = [""] * gen.sampling.n
    async for piece in gen:
        texts[piece.index] += piece.text
    return texts


def submit(engine, conversation, **kw):
    return engine.submit(engine.encode(conversation), params(**kw), conversation)


def test_a_short_request_joins_the_running_batch_and_leaves_before_the_long_one(engine, forwards):
    # Held at the long answer's first decoding step until the short request is queued.
    f = forwards(hold_at=2, no_eos=True)

    async def main():
        long = submit(engine, PROMPT, max_tokens=60)
        await asyncio.to_thread(f.held.wait, 60)
        short = submit(engine, OTHER, max_tokens=4)
        f.release.set()
        finished = []

        async def finish(name, gen):
            await answer(gen)
            finished.append(name)

        await asyncio.gather(finish("long", long), finish("short", short))
        return finished, long, short

    finished, long, short = asyncio.run(main())
    assert finished == ["short", "long"]
    assert short.batch_rows == 2 and long.batch_rows == 2
    # The long one's prefill and first decoding step; then the short one's prompt alone (the long
    # row waits that step); then one forward for both rows until the short one's four tokens are
    # out (one from its prefill, three decoded), then the long one alone for the rest of its 60.
    assert f.calls[:3] == [(1, len(engine.encode(PROMPT))), (1, 1), (1, len(engine.encode(OTHER)))]
    assert f.calls[3:6] == [(2, 1)] * 3
    assert f.calls[6:] == [(1, 1)] * (60 - 1 - 1 - 3)


def test_n_choices_prefill_their_prompt_once(engine, forwards):
    f = forwards(no_eos=True)

    async def main():
        shared = await answer(submit(engine, PROMPT, n=4, temperature=1.0, seed=7, max_tokens=8))
        alone = [(await answer(submit(engine, PROMPT, temperature=1.0, seed=7 + i, max_tokens=8)))[0]
                 for i in range(4)]
        return shared, alone

    calls = len(f.calls)
    shared, alone = asyncio.run(main())
    prompt = len(engine.encode(PROMPT))
    first = f.calls[calls:calls + 8]
    assert first[0] == (1, prompt) and first[1:] == [(4, 1)] * 7  # one prefill row, four decoding rows
    assert f.prompt_tokens == 5 * prompt  # once for the n = 4 request, once for each single one
    # Choice i draws with seed + i from the shared prefill: the text seed + i gives alone.
    assert shared == alone and len(set(shared)) > 1


def test_a_seed_gives_the_same_text_alone_and_in_a_busy_batch(engine, forwards):
    # A top_p = 1 row beside a nucleus row, and one with a nucleus: each draws the same alone as
    # beside rows with other temperatures, nuclei and prompts. (No EOS: every row runs its length.)
    f = forwards(no_eos=True)
    seeded = [dict(temperature=1.2, top_p=1.0, seed=11, max_tokens=24, n=2),
              dict(temperature=0.9, top_p=0.8, seed=12, max_tokens=24)]

    async def alone():
        return [await answer(submit(engine, PROMPT, **kw)) for kw in seeded]

    async def busy():
        f.hold_at = len(f.calls) + 2  # the others are in the batch, far from done, when ours come
        others = [submit(engine, OTHER, temperature=1.5, top_p=0.9, max_tokens=40, n=2),
                  submit(engine, PROMPT, temperature=0.7, max_tokens=40)]
        await asyncio.to_thread(f.held.wait, 60)
        ours = [submit(engine, PROMPT, **kw) for kw in seeded]
        f.release.set()
        texts = await asyncio.gather(*(answer(g) for g in ours))
        await asyncio.gather(*(answer(g) for g in others))
        return texts, ours

    first = asyncio.run(alone())
    texts, ours = asyncio.run(busy())
    assert texts == first
    assert all(g.batch_rows > 3 for g in ours), [g.batch_rows for g in ours]  # they did share steps with the others


def test_a_full_queue_refuses_and_a_deadline_turns_away(engine, forwards):
    f = forwards(hold_at=1)  # the worker stops at the first request's prefill

    async def main():
        running = submit(engine, PROMPT, max_tokens=4)
        await asyncio.to_thread(f.held.wait, 60)
        waiting = [submit(engine, OTHER, max_tokens=4) for _ in range(engine.max_queue)]
        with pytest.raises(EngineOverloaded):
            submit(engine, OTHER, max_tokens=4)
        engine.queue_timeout = 0.0  # everything that waits is now past its deadline
        f.release.set()
        await answer(running)
        for g in waiting:
            with pytest.raises(EngineOverloaded):
                await g.admitted()
        engine.queue_timeout = 30.0
        return await answer(submit(engine, OTHER, max_tokens=4))  # and the queue is open again

    assert asyncio.run(main())


def test_a_request_whose_client_left_while_it_waited_never_runs(engine, forwards):
    f = forwards(hold_at=1)

    async def main():
        running = submit(engine, PROMPT, max_tokens=4)
        await asyncio.to_thread(f.held.wait, 60)
        left = submit(engine, OTHER, n=2, max_tokens=4)
        left.cancel()
        f.release.set()
        await answer(running)
        await left.admitted()
        return [p.finish_reason async for p in left]

    assert asyncio.run(main()) == ["cancelled", "cancelled"]
    assert all(cols == 1 for rows, cols in f.calls[1:])  # no prefill but the running one's


# --- through the route: 503 in OpenAI's shape, nothing recorded ---------------------------------

@pytest.fixture
def app_client(db_url, policy_path, tmp_path, monkeypatch):
    """The real app in this process, its engine a thread of it (so the test can hold the model),
    on its own database, with one batch row and one place in the queue."""
    from fastapi.testclient import TestClient

    from schemas.settings import get_settings
    from service.app import create_app
    from tests.conftest import OPERATOR_KEY

    for name, value in dict(DATABASE_URL=db_url, FEEDLOOP_POLICY_PATH=str(policy_path),
                            FEEDLOOP_HOME=str(tmp_path), FEEDLOOP_INIT_API_KEY=OPERATOR_KEY,
                            FEEDLOOP_MAX_BATCH_ROWS="1", FEEDLOOP_MAX_QUEUE="1",
                            FEEDLOOP_ENGINE_PROCESS="false").items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with TestClient(create_app(), headers={"Authorization": f"Bearer {OPERATOR_KEY}"}) as client:
            yield client
    finally:
        get_settings.cache_clear()


def test_a_full_queue_answers_503_with_retry_after_and_records_nothing(app_client, db_url):
    engine = app_client.app.state.serving.active
    f = Forwards(engine, hold_at=1)  # the first request's prefill holds the worker
    body = {"model": "feedloop", "max_tokens": 4, "messages": PROMPT}
    chat = lambda **kw: app_client.post("/v1/chat/completions", json=body | kw)

    def recorded() -> int:
        with psycopg.connect(db_url) as conn:
            return conn.execute("SELECT count(*) FROM chat_requests").fetchone()[0]

    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat)
            assert f.held.wait(60)
            waiting = pool.submit(chat, stream=True)
            for _ in range(600):  # until it is in the queue (the one place there is)
                if engine._queued:
                    break
                time.sleep(0.05)
            for refused in (chat(), chat(stream=True)):
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json() == {"error": {
                    "message": "The engine is overloaded: its queue of 1 is full. Please retry shortly.",
                    "type": "service_unavailable", "param": None, "code": "engine_overloaded"}}
            metrics = app_client.get("/metrics").text
            assert 'feedloop_queue_depth{version="v1"} 1.0' in metrics
            assert 'feedloop_engine_rejected_total{reason="queue_full"}' in metrics
            assert recorded() == 0
            engine.queue_timeout = 0.0  # the waiting one is past its deadline when the worker looks
            f.release.set()
            assert running.result().status_code == 200
            late = waiting.result()  # a stream refused before its headers: a plain 503
            assert late.status_code == 503 and late.json()["error"]["code"] == "engine_overloaded"
            assert "no place in the batch within 0s" in late.json()["error"]["message"]
        assert recorded() == 1  # the one that ran
        metrics = app_client.get("/metrics").text
        for series in ("feedloop_time_to_first_token_seconds_count", "feedloop_batch_occupancy",
                       "feedloop_generated_tokens_per_second", "feedloop_batch_rows_count"):
            assert series in metrics
    finally:
        f.remove()
