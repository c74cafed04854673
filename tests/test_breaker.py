"""The circuit breakers' shared state (scripts on a real Redis) and a parked run's slot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ops.simrouter import SimRouter
from producer import AgentJob, Producer, Status, keys
from producer import Settings as AgentqSettings
from producer.breakers import describe_open, read_breakers
from tests.helpers import records, run_batch
from worker import breaker
from worker.breaker import BreakerOpen, Breakers, OutageTooLong
from worker.provider import CallMeter, Route, router_client
from worker.settings import build_worker

MODEL = "model|default|gpt-4o"
ROUTER = "router|default"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked(redis: Redis) -> tuple[Breakers, Clock]:
    b = Breakers(redis, outage_max_s=60)
    b.clock = clock = Clock()
    return b, clock


async def test_a_model_opens_after_failures_of_two_jobs_over_a_second(redis: Redis) -> None:
    b, clock = clocked(redis)
    for _ in range(breaker.MODEL.failures + 5):  # one job's poisoned request: never opens
        clock.now += 1
        assert not await b.failed(MODEL, "job-a", "503 from Router")
    assert await b.failed(MODEL, "job-b", "503 from Router")
    states, now = await read_breakers(redis)
    assert states[MODEL].open and states[MODEL].model == "gpt-4o"
    (line,) = describe_open(states, now)
    assert line.startswith("paused: model gpt-4o on Router default failing since")
    assert line.endswith("503 from Router")


async def test_a_router_opens_after_refused_connections_of_one_job(redis: Redis) -> None:
    b, clock = clocked(redis)
    opened = []
    for _ in range(breaker.ROUTER.failures):
        opened.append(await b.failed(ROUTER, "job-a", "refused"))
        clock.now += breaker.ROUTER.seconds
    assert opened == [False] * (breaker.ROUTER.failures - 1) + [True]


Event = tuple[str, int, float]  # ("fail", job, dt) or ("ok", 0, dt)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fail", "fail", "fail", "ok"]),
            st.integers(0, 2),
            st.floats(0, 0.6),
        ),
        max_size=40,
    )
)
async def test_a_breaker_opens_exactly_when_a_streak_meets_every_threshold(
    redis_url: str, events: list[Event]
) -> None:
    """Model of the rule: open iff some run of failures with no success in between has
    reached the failure count, lasted the time and come from enough jobs."""
    client = Redis.from_url(redis_url)
    try:
        await client.delete(keys.BREAKERS)
        b, clock = clocked(client)
        kind = breaker.MODEL
        run: list[tuple[int, float]] = []
        expect_open = False
        for what, job, dt in events:
            clock.now += dt
            if what == "ok":
                await b.succeeded(MODEL)
                run, expect_open = [], False
                continue
            run.append((job, clock.now))
            if (
                len(run) >= kind.failures
                and clock.now - run[0][1] >= kind.seconds
                and len({j for j, _ in run}) >= kind.jobs
            ):
                expect_open = True
            is_open = await b.failed(MODEL, f"job-{job}", "500")
            assert is_open == expect_open
            states, _ = await read_breakers(client)
            assert (MODEL in states and states[MODEL].open) == expect_open
    finally:
        await client.aclose()


async def test_a_success_anywhere_closes_an_open_breaker(redis: Redis) -> None:
    one, clock = clocked(redis)
    for i in range(breaker.MODEL.failures):
        clock.now += 1
        await one.failed(MODEL, f"job-{i}", "500")
    other = Breakers(redis, outage_max_s=60)
    await other.refresh(0)  # the other worker reads the fleet's breakers, then its call succeeds
    await other.succeeded(ROUTER, MODEL)
    assert not await redis.hexists(keys.BREAKERS, MODEL)
    await one.refresh(0)
    assert one.open_state(MODEL) is None


async def test_one_worker_probes_at_a_time(redis: Redis) -> None:
    workers = [Breakers(redis, outage_max_s=60) for _ in range(5)]
    workers[0].clock = clock = Clock()
    for _ in range(breaker.ROUTER.failures):
        clock.now += 1
        await workers[0].failed(ROUTER, "a", "refused")
    taken = await asyncio.gather(*(w._take_probe(ROUTER) for w in workers))
    assert sorted(taken) == [False] * 4 + [True]


async def test_waiting_calls_fall_back_or_give_up_after_the_outage_limit(redis: Redis) -> None:
    b, clock = clocked(redis)
    b.outage_max_s = 0.5
    for _ in range(breaker.ROUTER.failures):
        clock.now += 1
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
    config = AgentqSettings(
        redis_url=redis_url, data_dir=str(tmp_path), concurrency=2, log_format="json"
    )
    return build_worker(config, handle_signals=False)


async def test_a_parked_run_gives_its_slot_back(tmp_path: Path, redis_url: str) -> None:
    w = _worker(tmp_path, redis_url)
    value = w.sem._value
    await w.sem.acquire()  # a run starts (as start_taken does)
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
    producer: Producer, settings: AgentqSettings, sim: SimRouter
) -> None:
    """The Router is down for longer than the job's whole timeout_s: the job waits, and
    succeeds once the Router is back."""
    batch = await producer.submit([AgentJob(custom_id="t", input="What is 2+2?", timeout_s=1.5)])
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


async def test_a_success_ends_this_workers_streak(redis: Redis) -> None:
    """Random failures at a high rate never add up to an outage: each success ends the
    streak (a defect once kept streaks growing while no breaker was known)."""
    from agents import Agent, RunConfig, Runner

    from ops.simrouter import SimConfig
    from tests.conftest import ROUTER_KEY
    from worker.provider import RouterProvider
    from worker.retry import RetryPolicy

    config = SimConfig(api_key=ROUTER_KEY, fault_rates={"500": 0.5}, seed=3)
    async with SimRouter(config) as flaky:
        provider = RouterProvider(
            {"default": (flaky.url, ROUTER_KEY)},
            concurrency=2,
            max_calls=2,
            call_timeout_s=5,
            policy=RetryPolicy(5, 0.001, 0.002),
        )
        provider.breakers = Breakers(redis, outage_max_s=60)
        run_config = RunConfig(model="gpt-4o", model_provider=provider, tracing_disabled=True)
        agent = Agent(name="a", instructions="Answer.")
        try:
            for _ in range(20):
                await Runner.run(agent, "What is 1+1?", run_config=run_config)
                assert provider.breakers.streaks == {}
            assert flaky.stats.by_outcome["500"] > 0
        finally:
            await provider.aclose()


async def test_a_call_in_flight_before_the_failures_ends_no_streak(redis: Redis) -> None:
    """Calls answered after the Router went down, but sent before, are no sign it is back: a
    job's last try was once given up because such a success had ended the streak."""
    b, clock = clocked(redis)
    began_before = clock.now
    clock.now += 0.1
    await b.failed(ROUTER, "a", "refused")
    await b.failed(ROUTER, "b", "refused")
    await b.succeeded(ROUTER, began=began_before)
    assert b.streak(ROUTER) is not None and b.streak(ROUTER).fails == 2  # type: ignore[union-attr]
    clock.now += 0.1
    await b.succeeded(ROUTER, began=clock.now)
    assert b.streak(ROUTER) is None
