"""BatchStartWorker.run_job: a job taken with its payload runs without arq's transaction before
it; what that path does not cover (no payload) goes through arq's own; arq's Retry(defer) and
the job's record are as before."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq import Worker
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from producer import AgentJob, Producer, Settings, Status, keys
from producer.store import Store
from tests.helpers import records, run_batch
from worker import runner
from worker.settings import build_worker


@pytest.fixture
def arq_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """arq ids that went through arq's own run_job (its transaction before the run)."""
    seen: list[str] = []
    arqs = Worker.run_job

    async def spy(self: Worker, job_id: str, score: int) -> None:
        seen.append(job_id)
        await arqs(self, job_id, score)

    monkeypatch.setattr(Worker, "run_job", spy)
    return seen


async def test_runs_skip_arqs_read_of_the_payload(
    producer: Producer, settings: Settings, redis: Redis, arq_runs: list[str]
) -> None:
    """Before: every run began with arq's MULTI (GET payload, INCR and EXPIRE the try count),
    5 commands and a round trip a job, though the take had just looked at that entry."""
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    batch = await producer.submit(
        [
            AgentJob(custom_id="plain", input="What is 2+2?"),
            AgentJob.model_validate(
                {"custom_id": "tool", "input": "What is 6 * 7?", "agent": calc}
            ),
        ]
    )
    await run_batch(producer, settings, batch.id)
    out = await records(producer, batch.id)
    assert out["plain"].status == Status.SUCCEEDED and out["plain"].output == "4"
    assert out["tool"].output == "The result of 6 * 7 is 42."
    assert arq_runs == []
    assert await redis.keys(keys.ARQ_RETRY_PREFIX + "*") == []
    assert await redis.zcard(settings.queue) == 0


async def test_an_entry_without_its_payload_goes_through_arqs_own(
    producer: Producer, settings: Settings, redis: Redis, arq_runs: list[str]
) -> None:
    """arq fails a queue entry whose payload is gone ("job expired") and removes it."""
    batch = await producer.submit([AgentJob(custom_id="fine", input="What is 1 + 1?")])
    await redis.zadd(settings.queue, {"no-payload": 1})
    await run_batch(producer, settings, batch.id)
    assert arq_runs == ["no-payload"]
    assert (await records(producer, batch.id))["fine"].output == "2"
    assert await redis.zcard(settings.queue) == 0


async def test_the_take_survives_a_payload_of_another_type(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payload key holding a hash gives no payload (arq's own run_job deals with it, as it
    did before the take read payloads); the take still starts every job it took."""
    await redis.hset(keys.ARQ_JOB_PREFIX + "a-hash", "f", "x")
    await redis.set(keys.ARQ_JOB_PREFIX + "a-string", b"{}")
    await redis.zadd(settings.queue, {"a-hash": 1, "a-string": 2})
    worker = build_worker(settings, handle_signals=False)
    worker._pool = redis  # type: ignore[assignment]  # only the queue is read and taken here
    started: list[tuple[str, bytes | None]] = []

    async def run_job(job_id: str, score: int) -> None:
        started.append((job_id, worker._payloads.pop(job_id, None)))

    monkeypatch.setattr(worker, "run_job", run_job)
    await worker._read_queue()
    await asyncio.gather(*worker.tasks.values())
    assert sorted(started) == [("a-hash", None), ("a-string", b"{}")]


async def test_a_redis_error_at_claim_defers_the_job_and_it_runs_later(
    producer: Producer, settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runner raises arq's Retry(defer) when Redis fails the claim: the queue entry stays,
    deferred, and runs again (arq's own handling, kept by the shorter run_job)."""
    monkeypatch.setattr(runner, "REDIS_RETRY_S", 0.2)
    claims: list[str] = []
    claim = Store.claim

    async def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        claims.append(args[0])
        if len(claims) == 1:
            raise RedisConnectionError("Redis went away")
        return await claim(self, *args, **kwargs)

    monkeypatch.setattr(Store, "claim", flaky)
    batch = await producer.submit([AgentJob(custom_id="j", input="What is 1 + 1?")])
    await run_batch(producer, settings, batch.id)
    assert len(claims) == 2 and claims[0] == claims[1]
    r = (await records(producer, batch.id))["j"]
    assert r.status == Status.SUCCEEDED and r.output == "2"
    assert await redis.zcard(settings.queue) == 0
