"""Idle is free: a worker with nothing to do does not poll the queue; enqueues wake it, a job
deferred to later starts when due, and `wait` does not hear one message per job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from producer import AgentJob, Producer, Settings, keys
from producer.store import Store
from tests.helpers import cancel_worker
from worker import arqworker
from worker.arqworker import BatchStartWorker
from worker.settings import build_worker


async def _until(cond: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def running(settings: Settings, **attrs: Any) -> AsyncIterator[BatchStartWorker]:
    """An in-process worker (with `attrs` set on it before it starts), started (its
    on_startup done) and stopped at the end."""
    worker = build_worker(settings, handle_signals=False)
    for name, value in attrs.items():
        setattr(worker, name, value)
    task = asyncio.ensure_future(worker.async_run())
    try:

        async def started() -> bool:
            return "agentq" in worker.ctx or task.done()

        await _until(started, "the worker started")
        assert not task.done(), task
        yield worker
    finally:
        await cancel_worker(task)
        await asyncio.wait({asyncio.ensure_future(worker.close())}, timeout=30)


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def _finished(producer: Producer, batch_id: str) -> bool:
    return (await producer.status(batch_id)).finished


async def test_an_idle_worker_does_not_poll_the_queue(settings: Settings, redis: Redis) -> None:
    """Before: a read of the queue every poll_delay (0.01 s here: ~300 in the 3 s below)."""
    async with running(settings):
        await asyncio.sleep(0.5)
        before = await _calls(redis, "zrangebyscore")
        await asyncio.sleep(3)
        reads = await _calls(redis, "zrangebyscore") - before
    # a read every IDLE_CHECK_S, and the lease reaper's one inside its script every few s
    assert reads <= 3 / arqworker.IDLE_CHECK_S + 3, reads


async def test_an_enqueue_wakes_an_idle_worker(
    settings: Settings, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arqworker, "IDLE_CHECK_S", 3600.0)  # only the wake can start the job
    async with running(settings):
        await asyncio.sleep(0.3)  # its first read is done: it sleeps
        batch = await producer.submit([AgentJob(custom_id="a", input="What is 2+2?")])
        await _until(lambda: _finished(producer, batch.id), "the job done")


async def test_a_deferred_job_starts_when_due_without_a_wake(
    settings: Settings, producer: Producer, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arqworker, "IDLE_CHECK_S", 3600.0)
    batch = await producer.submit([AgentJob(custom_id="a", input="What is 2+2?")])
    ((entry, _),) = await redis.zrange(settings.queue, 0, -1, withscores=True)
    (now_s, now_us) = await redis.time()
    await redis.zadd(settings.queue, {entry: now_s * 1000 + now_us // 1000 + 1500}, xx=True)
    async with running(settings):
        await _until(lambda: _finished(producer, batch.id), "the job done")


async def test_wait_hears_one_channel_per_batch_not_one_message_per_job(
    settings: Settings, producer: Producer, redis: Redis
) -> None:
    """Before: wait subscribed to the batch's events channel, a message per job change."""
    batch = await producer.submit([AgentJob(custom_id=f"j{i}", input="2+2?") for i in range(20)])
    waiter = asyncio.ensure_future(producer.wait(batch.id, timeout=60))
    settled = keys.batch_settled(batch.id)
    try:

        async def subscribed() -> bool:
            return dict(await redis.pubsub_numsub(settled)).get(settled.encode(), 0) > 0

        await _until(subscribed, "wait subscribed")
        events = keys.batch_events(batch.id)
        assert dict(await redis.pubsub_numsub(events)).get(events.encode(), 0) == 0
        async with running(settings):
            st = await asyncio.wait_for(waiter, 60)
        assert st.finished and st.counts
    finally:
        waiter.cancel()


async def test_progress_messages_are_coalesced(store: Store, store_redis: Redis) -> None:
    """Counters changing n times in a burst send far fewer than n progress messages, and the
    batch's end is announced whatever the throttle."""
    n = 200
    jobs = [AgentJob(custom_id=f"j{i}", input="x") for i in range(n)]
    pubsub = store_redis.pubsub()
    await pubsub.subscribe(keys.batch_progress("b1"), keys.batch_settled("b1"))
    await store.submit_chunk("b1", jobs)
    await store.seal("b1")
    ids = [i async for chunk in store.job_ids("b1") for i in chunk]
    await store.cancel("b1", ids)  # n finish scripts in one pipeline
    heard: dict[str, int] = {}
    async with asyncio.timeout(10):
        while keys.batch_settled("b1") not in heard:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is not None:
                channel = msg["channel"].decode()
                heard[channel] = heard.get(channel, 0) + 1
    await pubsub.aclose()
    assert 1 <= heard.get(keys.batch_progress("b1"), 0) < n / 2, heard


def _taking_worker(
    settings: Settings, concurrency: int, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> tuple[BatchStartWorker, list[str]]:
    """A worker that only reads and takes the queue; its runs just note their arq ids."""
    worker = build_worker(
        settings.model_copy(update={"concurrency": concurrency}), handle_signals=False
    )
    worker._pool = redis  # type: ignore[assignment]  # only the queue is read and taken here
    started: list[str] = []

    async def run_job(job_id: str, score: int) -> None:
        started.append(job_id)

    monkeypatch.setattr(worker, "run_job", run_job)
    return worker, started


async def test_jobs_left_behind_are_read_again_when_runs_end_during_their_start(
    settings: Settings, producer: Producer, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a read left jobs for a later one only if the worker was still full after
    starting what fitted. A run that ended while those started (at 0 ms Router latency, most
    reads) made it look not full: the rest of the queue waited IDLE_CHECK_S (2 s) a time, and
    one worker ran 80 jobs/s instead of 130 (measured with the bench's sdk-loop jobs)."""
    await producer.submit([AgentJob(custom_id=f"j{i}", input="x") for i in range(5)])
    worker, started = _taking_worker(settings, 2, redis, monkeypatch)
    start_taken = worker.start_taken

    async def start_while_a_run_ends(taken: list[Any]) -> None:
        await start_taken(taken)
        worker._release_sem_dec_counter_on_complete()  # a run ended meanwhile

    monkeypatch.setattr(worker, "start_taken", start_while_a_run_ends)
    await worker._read_queue()
    await asyncio.gather(*worker.tasks.values())
    assert len(started) == 2
    assert worker.job_counter < worker.max_jobs
    assert worker._more, "three jobs are left behind: the next freed slot must read again"


async def test_reads_are_spaced_by_a_share_of_a_run_not_a_fixed_poll_delay(
    settings: Settings,
) -> None:
    """Before: a busy worker read the queue at most every AGENTQ_POLL_DELAY_S, so a slot freed
    by a 200 ms run waited up to that long for its next job (measured: one worker at 200 ms
    Router latency, 191 runs/s with the bench's 0.05 s, 226 with the share)."""
    worker = build_worker(settings.model_copy(update={"poll_delay_s": 0.05}), handle_signals=False)
    assert worker.spacing_s == 0.05  # no run has ended yet
    await worker.sem.acquire()
    worker.job_counter = 1
    worker._run_ended(worker.loop.time() - 0.2)  # a 200 ms run ends
    assert worker.job_counter == 0 and worker._ended == 1  # its slot is given back
    assert worker.run_s == pytest.approx(0.2, abs=0.05)
    assert worker.spacing_s == pytest.approx(arqworker.SPACING_SHARE * worker.run_s)
    for _ in range(200):  # long runs: the spacing is capped by poll_delay
        await worker.sem.acquire()
        worker.job_counter += 1
        worker._run_ended(worker.loop.time() - 10.0)
    assert worker.spacing_s == 0.05


async def test_one_take_reads_the_queue_and_says_what_is_left_and_when_the_next_is_due(
    settings: Settings, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The take script reads the queue's due front itself (it skips entries in progress and
    stops at the free slots), and returns the score of the first entry not yet due."""
    now = arqworker.timestamp_ms()
    entries = {f"due{i}": now - 1000 + i for i in range(40)} | {"later": now + 60_000}
    await redis.zadd(settings.queue, entries)
    await redis.psetex(arqworker.in_progress_key_prefix + "due0", 60_000, "1")  # in progress
    worker, started = _taking_worker(settings, 30, redis, monkeypatch)
    await worker._read_queue()
    await asyncio.gather(*worker.tasks.values())
    assert started == [f"due{i}" for i in range(1, 31)]  # in queue order, due0 skipped
    assert worker._more, "nine due jobs are left behind"
    assert worker._next_due == now + 60_000
    worker.tasks.clear()  # their runs ended: their slots are free again
    assert worker.job_counter == 0
    await redis.zrem(settings.queue, *started)
    await worker._read_queue()
    await asyncio.gather(*worker.tasks.values())
    assert started[30:] == [f"due{i}" for i in range(31, 40)]
    assert not worker._more, "nothing due is left"
