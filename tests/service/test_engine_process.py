"""The embedded engine in a process of its own (service/engine_process.py): the same answers as
the engine in this process, cancels and the queue bound across the pipe, its metrics in this
process's registry, and what a load failure or a dead engine process gives."""
import asyncio
import os
import shutil
import signal
from datetime import datetime, timezone

import pytest
from prometheus_client import REGISTRY

from schemas.openai import SamplingParams
from schemas.records import ModelVersion
from service.engine import EngineClosed, EngineError, EngineOverloaded
from service.engine_process import ProcessEngine
from service.local_engine import LocalEngine

PROMPT = [{"role": "user", "content": "Tell me about the sun."}]
# A grammar that holds the answer to a long fixed text: it cannot end before it is cancelled.
LONG = "start: " + " ".join(['"x"'] * 400)


def version_at(path, vid=1) -> ModelVersion:
    return ModelVersion(id=vid, kind="policy", parent_id=None, reference_id=None, reward_model_id=None,
                        path=str(path), content_hash="", endpoint=None, status="active", canary_fraction=None,
                        training_run_id=None, metrics={}, created_at=datetime.now(timezone.utc),
                        promoted_at=None, promoted_by=None)


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "stop": [],
                             "seed": None, **kw})


async def answer(gen) -> tuple[list[str], list[str]]:
    await gen.admitted()
    texts, finish = [""] * gen.sampling.n, [None] * gen.sampling.n
    async for piece in gen:
        texts[piece.index] += piece.text
        finish[piece.index] = piece.finish_reason or finish[piece.index]
    return texts, finish


def submit(engine, **kw):
    return engine.submit(engine.encode(PROMPT), params(**kw), PROMPT)


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def engine(policy_path):
    e = ProcessEngine(version_at(policy_path, 901), max_batch_rows=2, max_queue=2, torch_threads=1)
    yield e
    e.close()


def test_seeded_answers_equal_the_engine_in_this_process(engine, policy_path):
    local = LocalEngine(version_at(policy_path, 902), max_batch_rows=2)
    try:
        async def both():
            kw = dict(n=2, seed=11, max_tokens=10)
            return await answer(submit(engine, **kw)), await answer(submit(local, **kw))
        (texts, finish), (local_texts, local_finish) = asyncio.run(both())
    finally:
        local.close()
    assert texts == local_texts and finish == local_finish
    assert all(f in ("stop", "length") for f in finish) and any(texts)


def test_the_api_process_gets_the_engine_metrics(engine):
    tokens, ttft = sample("feedloop_generated_tokens_total"), sample("feedloop_time_to_first_token_seconds_count")
    steps = sample("feedloop_batch_rows_count")

    async def one():
        gen = submit(engine, max_tokens=6, seed=3)
        await answer(gen)
        return gen

    gen = asyncio.run(one())
    assert sample("feedloop_time_to_first_token_seconds_count") == ttft + 1
    assert sample("feedloop_generated_tokens_total") > tokens
    assert sample("feedloop_batch_rows_count") > steps
    assert gen.batch_rows == 1 and gen.timings()["first_token_ms"] is not None
    assert sample("feedloop_queue_depth", version="v901") == 0


def test_a_cancel_reaches_the_engine_process(engine):
    async def main():
        gen = engine.submit(engine.encode(PROMPT), params(max_tokens=800, grammar=LONG), PROMPT)
        await gen.admitted()
        pieces = aiter(gen)
        first = await anext(pieces)
        gen.cancel()
        rest = [p async for p in pieces]
        return first, rest

    first, rest = asyncio.run(main())
    assert first.text.startswith("x") and first.finish_reason is None
    assert rest[-1].finish_reason == "cancelled" and rest[-1].tokens < 400


def test_a_full_queue_is_refused_at_submission(engine):
    async def main():
        running = [submit(engine, max_tokens=800, grammar=LONG) for _ in range(2)]  # the batch holds 2
        for gen in running:
            await gen.admitted()
        waiting = [submit(engine, max_tokens=4) for _ in range(engine.max_queue)]
        with pytest.raises(EngineOverloaded, match="queue of 2 is full"):
            submit(engine, max_tokens=4)
        for gen in running:
            gen.cancel()
        done = await asyncio.gather(*(answer(g) for g in running + waiting))
        return done

    done = asyncio.run(main())
    assert [f for _, (f,) in done[:2]] == ["cancelled", "cancelled"]
    assert all(f in ("stop", "length") for _, (f,) in done[2:])


def test_a_checkpoint_that_does_not_load_is_an_engine_error(policy_path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(policy_path, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(EngineError, match="failed to load in its engine process"):
        ProcessEngine(version_at(broken, 903))


def test_a_dead_engine_process_fails_what_it_had_and_what_comes_after(policy_path):
    """... and says it is lost, once, for serving to replace it (tests/e2e/test_faults.py)."""
    engine = ProcessEngine(version_at(policy_path, 904), max_batch_rows=2)
    told = []
    engine.on_lost = lambda: told.append(engine.lost)
    lost_before = sample("feedloop_engines_lost_total", version=engine.version.name)

    async def main():
        gen = engine.submit(engine.encode(PROMPT), params(max_tokens=800, grammar=LONG), PROMPT)
        await gen.admitted()
        assert engine.lost is None
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match="exited"):
            async for _ in gen:
                pass
        with pytest.raises(EngineError, match="exited"):
            submit(engine)
        assert told == [f"the engine process of {engine.version.name} exited (code -9)"]
        assert sample("feedloop_engines_lost_total", version=engine.version.name) == lost_before + 1

    try:
        asyncio.run(main())
    finally:
        engine.close()


@pytest.mark.parametrize("kind", [ProcessEngine, LocalEngine])
def test_a_closing_engine_takes_nothing_more(policy_path, kind):
    """What a route submits once close() began is refused with EngineClosed (the route submits it
    to the engine serving now), never queued behind the close where nobody would answer it."""
    engine = kind(version_at(policy_path, 905), max_batch_rows=2)

    async def main():
        taken = [submit(engine, max_tokens=4)]
        closing = asyncio.create_task(asyncio.to_thread(engine.close))
        for _ in range(100_000):  # submitting until close() has begun
            try:
                taken.append(submit(engine, max_tokens=4))
            except EngineClosed:
                break
            await asyncio.sleep(0)
        await closing
        with pytest.raises(EngineClosed):
            submit(engine, max_tokens=4)
        return await asyncio.gather(*(answer(gen) for gen in taken))

    answers = asyncio.run(main())
    # everything taken before close() began was answered
    assert all(finish[0] in ("stop", "length") for _, finish in answers)
