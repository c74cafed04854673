"""Submit-time checks: nothing is enqueued unless every job is valid, including against the
tools and agent profiles the live workers publish."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from producer import AgentJob, JobFileError, Producer, Settings, keys
from producer import client as client_module


async def publish_worker(redis: Redis, tools: list[str], agents: list[str]) -> None:
    beat = {
        "tools": tools,
        "agents": {a: {} for a in agents},
        "mcp_servers": [],
        "seen_at": time.time(),
        "concurrency": 1,
        "in_flight": 0,
        "version": "t",
    }
    await redis.hset(keys.WORKERS, "host:1", json.dumps(beat))


async def test_file_checked_against_live_workers(
    producer: Producer, redis: Redis, tmp_path: Path
) -> None:
    await publish_worker(redis, ["calculator"], ["calculator"])
    f = tmp_path / "jobs.jsonl"
    f.write_text(
        '{"custom_id": "a", "input": "1+1", "agent": {"tools": ["calculator"]}}\n'
        '{"custom_id": "b", "input": "1+1", "agent": {"tools": ["web_search"]}}\n'
        '{"custom_id": "c", "input": "1+1", "agent": "researcher"}\n'
        '{"custom_id": "d", "input": "1+1", "agent": {"mcp_servers": ["files"]}}\n'
        '{"custom_id": "e", "input": "1+1", "agent": {"output_schema": {"type": 3}}}\n'
    )
    with pytest.raises(JobFileError) as err:
        await producer.submit_file(f)
    text = str(err.value)
    assert "line 2: unknown tools ['web_search']; the workers offer: calculator" in text
    assert "line 3: unknown agent profile 'researcher'; the workers offer: calculator" in text
    assert "line 4: unknown MCP servers ['files']; the workers offer: none" in text
    assert "line 5: agent.output_schema: not a valid JSON Schema" in text
    assert await redis.zcard("agentq:queue") == 0


async def test_stale_workers_are_not_the_registry(producer: Producer, redis: Redis) -> None:
    beat = {"tools": [], "agents": {}, "seen_at": time.time() - 3600}
    await redis.hset(keys.WORKERS, "gone:1", json.dumps(beat))
    batch = await producer.submit(
        [
            AgentJob.model_validate(
                {"custom_id": "a", "input": "x", "agent": {"tools": ["anything"]}}
            )
        ]
    )
    assert batch.enqueued == 1  # no live worker: the worker checks when it runs the job


async def test_input_size_limit(settings: Settings, redis: Redis) -> None:
    small = settings.model_copy(update={"max_input_chars": 10})
    async with Producer.from_env(small) as p:
        with pytest.raises(
            JobFileError,
            match=r"job 2: input is 11 characters, over the limit "
            r"of 10 \(AGENTQ_MAX_INPUT_CHARS\)",
        ):
            await p.submit(
                [AgentJob(custom_id="a", input="short"), AgentJob(custom_id="b", input="x" * 11)]
            )
    assert await redis.dbsize() == 0


@pytest.mark.parametrize("bad", ['x"y', "a b", "-lead", "ü", "x" * 129, "a:order", "x:y"])
async def test_batch_id_is_checked(producer: Producer, redis: Redis, bad: str) -> None:
    from producer.models import InvalidBatchId

    with pytest.raises(InvalidBatchId, match="is not allowed"):
        await producer.submit([AgentJob(custom_id="a", input="x")], batch_id=bad)
    assert await redis.dbsize() == 0


async def test_payload_is_what_arq_writes(producer: Producer, redis: Redis) -> None:
    from arq.jobs import deserialize_job_raw

    from producer.models import job_id_for
    from producer.store import arq_job_id
    from worker.payload import load_job

    batch = await producer.submit(
        [AgentJob(custom_id="a", input="x")], batch_id="nightly-2026-11.v1"
    )
    jid = job_id_for(batch.id, "a")
    raw = await redis.get(keys.ARQ_JOB_PREFIX + arq_job_id(jid, 1))
    f, args, kwargs, tries, et = deserialize_job_raw(raw, deserializer=load_job)
    assert (f, args, kwargs, tries) == ("run_agent_job", [jid, "nightly-2026-11.v1", "1"], {}, None)
    assert et > 0 and json.loads(raw)["et"] == et


def _slow_first_send(producer: Producer, monkeypatch: pytest.MonkeyPatch, fail: bool) -> list[int]:
    """Chunks of 3 jobs; the first chunk's send takes 0.3 s, then fails if `fail`. Returns
    the list of sends made so far (one entry each)."""
    monkeypatch.setattr(client_module, "CHUNK", 3)
    store = producer.store
    send = store.send_chunk
    calls: list[int] = []

    async def slow_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(0.3)
            if fail:
                raise ConnectionError("Redis went away")
        return await send(*args, **kwargs)

    monkeypatch.setattr(store, "send_chunk", slow_first)
    return calls


async def test_chunks_reach_redis_in_input_order(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit packs the next chunk while the last one runs in Redis, but sends it only
    after that one's reply: a first chunk whose round trip was slow (a retry, a busy Redis)
    once let the second reach Redis first on another connection, and `results` listed the
    batch out of input order (seen in the 100,000-job bench)."""
    _slow_first_send(producer, monkeypatch, fail=False)
    jobs = [AgentJob(custom_id=f"j{i}", input="x") for i in range(10)]
    batch = await producer.submit(jobs)
    got = [r.custom_id async for r in producer.results(batch.id)]
    assert got == [j.custom_id for j in jobs]


async def test_no_chunk_is_sent_after_one_that_failed(
    producer: Producer, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submit raises the first chunk's error, and the chunk after it never reaches Redis
    (sent, it would sit ahead of the failed one's jobs when the submit is repeated)."""
    calls = _slow_first_send(producer, monkeypatch, fail=True)
    jobs = [AgentJob(custom_id=f"j{i}", input="x") for i in range(10)]
    with pytest.raises(ConnectionError):
        await producer.submit(jobs, batch_id="b-failed")
    await asyncio.sleep(0.5)  # a stray send would have landed by now
    assert len(calls) == 1
    assert await redis.llen(keys.batch_order("b-failed")) == 0


async def test_a_cancelled_submit_leaves_no_task_or_connection_behind(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while one chunk is in Redis, one queued and one waiting to be queued: the
    waiting hand-over and the sender end, and the submit's own connection goes back."""
    _slow_first_send(producer, monkeypatch, fail=False)
    before = asyncio.all_tasks()
    jobs = [AgentJob(custom_id=f"j{i}", input="x") for i in range(10)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(producer.submit(jobs, batch_id="b-cut"), 0.1)
    for _ in range(100):  # let cancelled tasks finish (a leftover never does)
        if not asyncio.all_tasks() - before:
            break
        await asyncio.sleep(0.01)
    assert asyncio.all_tasks() - before == set()
    assert not producer.redis.connection_pool._in_use_connections
