"""The circuit breakers' shared state (scripts on a real Redis) and a parked run's slot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ops.simrouter import SimRouter
from producer import AgentJob, Producer, Settings, Status, keys
from producer.breakers import describe_open, read_breakers
from tests.helpers import records, run_batch
from worker import breaker
from worker.breaker import BreakerOpen, Breakers, OutageTooLong
from worker.provider import CallMeter, Route, router_client
from worker.settings import build_worker

MODEL = "model|default|gpt-4o"
ROUTER = "router|default"


async def test_a_model_opens_after_failures_of_two_jobs(redis: Redis) -> None:
    b = Breakers(redis, outage_max_s=60)
    for _ in range(breaker.MODEL.failures + 2):  # one job's poisoned request: never opens
        assert not await b.failed(MODEL, "job-a", "503 from Router")
    assert await b.failed(MODEL, "job-b", "503 from Router")
    states, now = await read_breakers(redis)
    assert states[MODEL].open and states[MODEL].model == "gpt-4o"
    (line,) = describe_open(states, now)
    assert line.startswith("paused: model gpt-4o on Router default failing since")
    assert line.endswith("503 from Router")


async def test_a_router_opens_after_refused_connections_of_one_job(redis: Redis) -> None:
    b = Breakers(redis, outage_max_s=60)
    opened = [await b.failed(ROUTER, "job-a", "refused") for _ in range(breaker.ROUTER.failures)]
    assert opened == [False] * (breaker.ROUTER.failures - 1) + [True]


async def test_a_success_anywhere_ends_the_streak(redis: Redis) -> None:
    one, other = Breakers(redis, outage_max_s=60), Breakers(redis, outage_max_s=60)
    for job in ("a", "b", "c", "d"):
        await one.failed(MODEL, job, "500")
    await other.refresh(0)  # the other worker learns of the streak, then its call succeeds
    await other.succeeded(ROUTER, MODEL)
    assert not await redis.hexists(keys.BREAKERS, MODEL)
    assert not await one.failed(MODEL, "e", "500")  # a new streak: 1 failure, not 5
    states, _ = await read_breakers(redis)
    assert states[MODEL].fails == 1


async def test_an_old_streak_starts_over(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breaker, "STREAK_STALE_MS", 50)
    b = Breakers(redis, outage_max_s=60)
    for job in ("a", "b", "c", "d"):
        await b.failed(MODEL, job, "500")
    await asyncio.sleep(0.2)
    assert not await b.failed(MODEL, "e", "500")
    states, _ = await read_breakers(redis)
    assert states[MODEL].fails == 1


async def test_one_worker_probes_at_a_time(redis: Redis) -> None:
    workers = [Breakers(redis, outage_max_s=60) for _ in range(5)]
    for _ in range(breaker.ROUTER.failures):
        await workers[0].failed(ROUTER, "a", "refused")
    taken = await asyncio.gather(*(w._take_probe(ROUTER) for w in workers))
    assert sorted(taken) == [False] * 4 + [True]


async def test_waiting_calls_fall_back_or_give_up_after_the_outage_limit(redis: Redis) -> None:
    b = Breakers(redis, outage_max_s=0.5)
    for _ in range(breaker.ROUTER.failures):
        await b.failed(ROUTER, "a", "Cannot connect to Router")
    route = Route(
        "default", "http://127.0.0.1:9/v1", router_client("http://127.0.0.1:9/v1", "k", 1, 1)
    )

    async def probe() -> None:
        raise AssertionError("a Router breaker probes the model list, not a model")

    try:
        with pytest.raises(BreakerOpen, match="Router default is down"):
            await b.wait(route, "gpt-4o", CallMeter(can_fall_back=True), probe)
        with pytest.raises(OutageTooLong, match=r"has been down for .*AGENTQ_OUTAGE_MAX_S=0.5"):
            await b.wait(route, "gpt-4o", CallMeter(), probe)
    finally:
        await route.client.close()


def _worker(tmp_path: Path, redis_url: str) -> Any:
    settings = Settings(
        redis_url=redis_url, data_dir=str(tmp_path), concurrency=2, log_format="json"
    )
    return build_worker(settings, handle_signals=False)


async def test_a_parked_run_gives_its_slot_back(tmp_path: Path, redis_url: str) -> None:
    w = _worker(tmp_path, redis_url)
    value = w.sem._value
    await w.sem.acquire()  # a run starts (as start_jobs does)
    w.job_counter += 1
    async with w.park():
        assert (w.job_counter, w.parked, w.sem._value) == (0, 1, value)
    assert (w.job_counter, w.parked, w.sem._value) == (1, 0, value - 1)
    w._release_sem_dec_counter_on_complete()
    assert (w.job_counter, w.sem._value) == (0, value)


async def test_a_run_cancelled_while_taking_its_slot_back_keeps_the_count(
    tmp_path: Path, redis_url: str
) -> None:
    """A parked run cancelled (agentq cancel, shutdown) while waiting for a free slot must not
    release one at its end: the worker would run one job too many from then on."""
    w = _worker(tmp_path, redis_url)
    value = w.sem._value
    await w.sem.acquire()
    w.job_counter += 1
    leave = asyncio.Event()

    async def run() -> None:
        async with w.park():
            await leave.wait()

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    while not w.sem.locked():  # other jobs take every slot, the parked one's too
        await w.sem.acquire()
    leave.set()
    await asyncio.sleep(0.05)  # it now waits for a slot
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    w._release_sem_dec_counter_on_complete()  # the run's end, as arq's callback does
    assert w._slot_debts == 0 and w.job_counter == 0
    assert w.sem._value == 0  # the other jobs hold every slot; none was invented
    for _ in range(value):
        w.sem.release()
    assert w.sem._value == value


async def test_a_run_cancelled_while_parked_ends_at_once(tmp_path: Path, redis_url: str) -> None:
    """`agentq cancel` (or shutdown) of a parked run: it must not wait for a free slot."""
    w = _worker(tmp_path, redis_url)
    value = w.sem._value
    await w.sem.acquire()
    w.job_counter += 1

    async def run() -> None:
        async with w.park():
            await asyncio.Event().wait()

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    while not w.sem.locked():
        await w.sem.acquire()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    w._release_sem_dec_counter_on_complete()
    assert (w._slot_debts, w.job_counter, w.sem._value) == (0, 0, 0)
    for _ in range(value):
        w.sem.release()


async def test_an_outage_does_not_count_against_the_job_timeout(
    producer: Producer, settings: Settings, sim: SimRouter
) -> None:
    """The Router is down for longer than the job's whole timeout_s: the job waits, and
    succeeds once the Router is back."""
    batch = await producer.submit(
        [AgentJob(custom_id="t", input="What is 2+2?", timeout_s=1.5)]
    )
    await sim.close()

    async def back() -> None:
        await asyncio.sleep(4)
        await sim.start()

    restart = asyncio.create_task(back())
    await run_batch(producer, settings, batch.id)
    await restart
    r = (await records(producer, batch.id))["t"]
    assert (r.status, r.output) == (Status.SUCCEEDED, "4"), r.error
    assert "breaker.resumed" in [e["event"] for e in r.logs]
