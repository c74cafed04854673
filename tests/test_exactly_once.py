"""Regression tests for issue 8: every path of a job ends in exactly one stored result."""

from __future__ import annotations

from typing import Any

import pytest
import structlog
from redis.asyncio import Redis

from producer import AgentJob, Producer, Settings, Status, keys
from producer.models import job_id_for
from tests.helpers import records, run_batch
from worker import metrics


async def _one(producer: Producer, settings: Settings, custom_id: str = "a") -> Any:
    batch = await producer.submit([AgentJob(custom_id=custom_id, input="What is 2+2?")])
    await run_batch(producer, settings, batch.id, timeout=30)
    return (await records(producer, batch.id))[custom_id]


async def test_a_job_logging_non_json_values_is_stored(
    producer: Producer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the record failed to serialise and the job stayed running for ever."""
    from worker import runner

    async def plugin_like(rt: Any, job: Any, attempts: Any) -> Any:
        structlog.get_logger("plugin").info("plugin.said", value=object(), seen={1, 2})
        return runner.Outcome(status=Status.SUCCEEDED, output="4", model="gpt-4o")

    monkeypatch.setattr(runner, "execute", plugin_like)
    rec = await _one(producer, settings)
    assert rec.status == Status.SUCCEEDED and rec.output == "4"
    said = next(e for e in rec.logs if e["event"] == "plugin.said")
    assert said["value"].startswith("<object object")
    assert any(e["event"] == "log.values_stringified" for e in rec.logs)


async def test_an_exception_in_the_job_path_fails_the_job(
    producer: Producer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: any non-Redis exception left the job running for ever."""
    from worker import runner

    async def broken(rt: Any, job: Any, attempts: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(runner, "execute", broken)
    rec = await _one(producer, settings)
    assert rec.status == Status.FAILED and rec.error is not None
    assert rec.error.type == "internal_error" and "KeyError" in rec.error.message
    assert rec.error.retryable


async def test_a_job_from_a_newer_producer_fails_as_invalid(
    producer: Producer, settings: Settings, redis: Redis
) -> None:
    """Before: the worker's strict model raised, and the job stayed running for ever."""
    batch = await producer.submit([AgentJob(custom_id="a", input="hi")])
    jid = job_id_for(batch.id, "a")
    await redis.hset(keys.job(jid), "spec", '{"custom_id":"a","input":"hi","new_field":1}')
    await run_batch(producer, settings, batch.id, timeout=30)
    rec = (await records(producer, batch.id))["a"]
    assert rec.status == Status.FAILED and rec.error is not None
    assert rec.error.type == "invalid_job" and "newer agentq" in rec.error.message


async def test_submit_survives_scripts_lost_in_a_redis_restart(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a restart between redis-py's script load and the pipeline's execution aborted
    submit with NoScriptError and left a half-enqueued batch. A submit now sends its chunks
    through one connection of its own: scripts lost before a chunk's send are loaded again
    on that connection, and the chunk runs."""
    from producer import client as client_module

    monkeypatch.setattr(client_module, "CHUNK", 2)
    store = producer.store
    send = store.send_chunk
    flushed: list[bool] = []

    async def lose_then_send(*args: Any, **kwargs: Any) -> int:
        if len(flushed) < 2:  # before the first chunk, and again before the second
            flushed.append(True)
            await producer.redis.script_flush()  # what a restart without persistence does
        return await send(*args, **kwargs)

    monkeypatch.setattr(store, "send_chunk", lose_then_send)
    batch = await producer.submit([AgentJob(custom_id=f"j{i}", input="hi") for i in range(5)])
    assert len(flushed) == 2 and batch.enqueued == 5
    st = await producer.status(batch.id)
    assert st.total == 5 and st.sealed
    assert [r.custom_id async for r in producer.results(batch.id)] == [f"j{i}" for i in range(5)]


async def test_a_pipelined_script_survives_scripts_lost_in_a_redis_restart(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store._pipelined (submit_chunk without a client of its own, and the worker's
    pipelines): a restart between redis-py's script load and the pipeline's execution
    loses the scripts; they are loaded again and the pipeline is sent again."""
    from redis.asyncio.client import Pipeline

    original = Pipeline.load_scripts
    flushed: list[bool] = []

    async def load_then_lose(self: Pipeline) -> None:
        await original(self)
        if not flushed:
            flushed.append(True)
            await producer.redis.script_flush()

    monkeypatch.setattr(Pipeline, "load_scripts", load_then_lose)
    jobs = [AgentJob(custom_id=f"j{i}", input="hi") for i in range(3)]
    assert await producer.store.submit_chunk("b-pipelined", jobs) == 3
    assert flushed


def test_metrics_endpoint_survives_a_worker_restart() -> None:
    """Before: a worker restarted after a Redis outage died on EADDRINUSE for ever."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    metrics.serve(port)  # the restarted worker loop in the same process


def test_label_and_cache_sets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.provider import MAX_CACHED_MODELS, RouterProvider

    monkeypatch.setattr(metrics, "_model_labels", set())  # other tests' labels stay intact
    labels = {metrics.model_label(f"invented-{i}") for i in range(500)}
    assert len(labels) <= metrics.MAX_MODEL_LABELS + 1 and "other" in labels
    provider = RouterProvider(
        {"default": ("http://127.0.0.1:9/v1", "k")}, concurrency=1, max_calls=1, call_timeout_s=1
    )
    for i in range(MAX_CACHED_MODELS + 50):
        provider.get_model(f"m{i}")
    assert len(provider._models) <= MAX_CACHED_MODELS
