"""The round's orchestration on a real database, without any model work: the round lock, a skip
recorded with its reason, a queued request with a bad config closed as failed, and recovery of
runs a killed trainer left `running`."""
import asyncio

import psycopg

from schemas.settings import Settings
from store import locks, runs
from trainer.round import recover, run_round


def settings(tmp_path, **fields) -> Settings:
    return Settings(**{"home": tmp_path, "device": "cpu", "min_new_pairs": 4, "round_config": {}, **fields})


async def connect(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


def test_a_round_without_new_pairs_is_recorded_as_skipped(db_url, tmp_path):
    run = asyncio.run(run_round(db_url, settings(tmp_path), trigger="cli"))
    assert (run.kind, run.status, run.trigger) == ("round", "skipped", "cli")
    assert run.metrics == {"data/new_pairs": 0, "data/new_events": 0, "data/waited_seconds": 0.0,
                           "skip_reason": "0 new pairs, fewer than the minimum 4"}
    assert run.config["ppo"]["device"] == "cpu"  # the resolved config is recorded


def test_a_queued_request_with_a_bad_config_is_closed_as_failed(db_url, tmp_path):
    async def scenario():
        async with await connect(db_url) as conn:
            queued = await runs.queue_training_run(conn, kind="round", config={"ppo": {"step": 8}},
                                                   requested_by="key:1:op")
        run = await run_round(db_url, settings(tmp_path), trigger="operator", queued=True)
        assert run.id == queued.id and run.status == "failed"
        assert "unknown round config key 'step' in PPOConfig" in run.error
        assert await run_round(db_url, settings(tmp_path), trigger="operator", queued=True) is None  # none left

    asyncio.run(scenario())


def test_no_round_starts_while_another_holds_the_lock(db_url, tmp_path):
    async def scenario():
        async with await connect(db_url) as other:
            async with locks.holding(other, locks.ROUND) as got:
                assert got
                assert await run_round(db_url, settings(tmp_path), trigger="cli") is None
                async with await connect(db_url) as conn:
                    assert await recover(conn) == []  # a live round elsewhere is never touched
            async with await connect(db_url) as conn:
                assert await runs.list_training_runs(conn) == []

    asyncio.run(scenario())


def test_recover_fails_the_runs_a_killed_trainer_left_running(db_url):
    async def scenario():
        async with await connect(db_url) as conn:
            left = await runs.start_training_run(conn, kind="round", config={}, trigger="cli")
            assert await recover(conn) == [left.id]
            assert (await runs.get_training_run(conn, id=left.id)).status == "failed"
            assert await recover(conn) == []

    asyncio.run(scenario())


def test_auto_promotion_leaves_the_candidate_to_an_operator_when_a_deploy_hook_must_run(db_url, tmp_path,
                                                                                         policy_path, v2_path):
    """Only the API and the CLI run FEEDLOOP_DEPLOY_COMMAND before a switch; with one set, a
    passing candidate waits for them (and says why), without one it is promoted at once."""
    from store import registry
    from trainer.config import round_config
    from trainer.round import _register
    from trainer.stages import Inputs, Trained

    async def scenario(**fields):
        s = settings(tmp_path, promotion="auto", **fields)
        async with await connect(db_url) as conn:
            v1 = await registry.ensure_initial_policy(conn, path=policy_path, actor="test")
            run = await runs.start_training_run(conn, kind="round", config={}, trigger="cli")
            inputs = Inputs(pairs=[], demonstrations=[], prompts=[], policy=v1, reference=v1, root=v1, previous_reward=None,
                            out=tmp_path)
            await _register(conn, s, run, round_config(s), inputs, Trained(policy=v2_path))
            produced = (await runs.get_training_run(conn, id=run.id)).produced_version_id
            history = [p for p in await registry.list_promotions(conn) if p.version_id == produced]
            return await registry.get_model_version(conn, id=produced), history

    waiting, history = asyncio.run(scenario(deploy_command="true"))
    assert waiting.status == "candidate" and "a deploy hook must run first" in history[0].reason
    promoted, _ = asyncio.run(scenario())
    assert promoted.status == "active"


def test_a_scheduled_round_counts_feedback_events_of_every_kind_not_pairs(db_url, tmp_path):
    """Thumbs that all point one way, a comment and a correction yield no pair, yet they are
    evidence: with enough of them a scheduled round goes on to train (here: to find it has no
    pairs); with too few it waits, unless the oldest has waited the maximum interval."""
    from schemas.records import CompletionRecord, FeedbackCreate
    from store import exchanges, feedback, keys, registry

    async def scenario():
        async with await connect(db_url) as conn:
            async with conn.transaction():
                author = (await keys.create_api_key(conn, name="u", role="user")).id
                v = await registry.insert_model_version(conn, kind="policy", path="/nowhere", content_hash="0",
                                                        status="archived")
                await exchanges.record_exchange(
                    conn, response_id="chatcmpl-1", api_key_id=author, user=None,
                    messages=[{"role": "user", "content": "Hi"}], params={}, model_version_id=v.id, stream=False,
                    batch_rows=1, prompt_tokens=1, queue_ms=0, first_token_ms=None, total_ms=0,
                    choices=[CompletionRecord(choice_index=i, text=t, finish_reason="stop", completion_tokens=1,
                                              model_version_id=v.id) for i, t in enumerate(["a", "b"])])
            for body in (dict(choice_index=0, kind="thumbs", value=1), dict(choice_index=1, kind="thumbs", value=1),
                         dict(choice_index=0, kind="comment", text="fine"),
                         dict(choice_index=1, kind="correction", text="Hello!")):
                async with conn.transaction():
                    await feedback.record_feedback(conn, feedback=FeedbackCreate(response_id="chatcmpl-1", **body),
                                                   author_key_id=author, owned_by=None)

        def scheduled(**fields):
            return asyncio.run(run_round(db_url, settings(tmp_path, min_new_pairs=1, **fields), trigger="schedule"))

        waiting = await asyncio.to_thread(scheduled, min_new_feedback=5)
        assert waiting.status == "skipped" and waiting.metrics["data/new_events"] == 4
        assert waiting.metrics["skip_reason"].startswith("4 new feedback events, fewer than 5")
        # waiting, and when what came trains if nothing more does: the oldest event is seconds old
        assert waiting.metrics["data/waiting"] is True
        assert 86000 < waiting.metrics["data/trains_in_seconds"] <= 86400
        enough = await asyncio.to_thread(scheduled, min_new_feedback=4)  # evidence enough: on to the pairs
        assert enough.metrics["skip_reason"] == "0 new pairs, fewer than the minimum 1"
        assert "data/waiting" not in enough.metrics  # not waiting: nothing to train on
        waited = await asyncio.to_thread(scheduled, min_new_feedback=100, max_round_interval_seconds=0)
        assert waited.metrics["skip_reason"] == "0 new pairs, fewer than the minimum 1"
        assert waited.metrics["data/waited_seconds"] >= 0

    asyncio.run(scenario())
