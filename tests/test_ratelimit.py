"""Router budgets (worker/ratelimit.py): the turn scripts against the test Redis, the limiter in
the provider, the settings, the simulated Router's own rate limit. The fleet test with real
worker processes is tests/test_ratelimit_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest
import redis as redis_sync
from agents import ModelSettings, ModelTracing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from structlog.testing import capture_logs

from ops.simrouter import SimConfig, SimRouter
from producer import keys
from producer.budgets import describe_budgets, describe_waits, read_budgets
from producer.settings import ConfigError, RateLimit, Settings, load_settings
from producer.store import RUN_FUNCTION
from tests.conftest import ROUTER_KEY
from worker import ratelimit
from worker import settings as worker_settings
from worker.provider import MAX_FREE_429S, CallMeter, RouterProvider, current_meter
from worker.ratelimit import Budget, RateLimiter, Turn
from worker.retry import RetryPolicy
from worker.settings import ARQ_TIMEOUT_UNDER_BUDGETS_S, build_worker

# -- the scripts, on the test Redis ----------------------------------------------------------


@pytest.fixture(scope="module")
def sync_redis(redis_url: str) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(redis_url)
    client.delete(keys.BUDGETS)
    yield client
    client.delete(keys.BUDGETS)
    client.close()


class Scripts:
    """The limiter's scripts, called as the worker calls them."""

    def __init__(self, r: redis_sync.Redis) -> None:
        self.take_ = r.register_script(ratelimit._TAKE)
        self.slow_ = r.register_script(ratelimit._SLOW)
        self.settle_ = r.register_script(ratelimit._SETTLE)

    def take(self, budgets: list[Budget], tokens: int = 0) -> tuple[int, int, list[int]]:
        """(ms to wait, the turn in Redis ms, shifts)."""
        args: list[Any] = [tokens]
        for b in budgets:
            args += [b.name, b.rpm, b.tpm]
        reply = self.take_(keys=[keys.BUDGETS], args=args)
        return int(reply[0]), int(reply[1]), [int(x) for x in reply[2:]]

    def slow(self, budgets: list[Budget], ms: int, refused: bool) -> list[int]:
        names = [b.name for b in budgets]
        reply = self.slow_(keys=[keys.BUDGETS, keys.CONTROL], args=[ms, int(refused), *names])
        return [int(x) for x in reply]

    def settle(self, budgets: list[Budget], delta: int) -> None:
        self.settle_(keys=[keys.BUDGETS], args=[delta, *[b.name for b in budgets]])


def fresh(rpm: float = 0, tpm: float = 0) -> Budget:
    return Budget(f"test-{uuid.uuid4().hex[:8]}", rpm, tpm)


budget_st = st.builds(
    lambda rpm, tpm, which: Budget(
        f"h-{uuid.uuid4().hex[:8]}", rpm if which != "tpm" else 0, tpm if which != "rpm" else 0
    ),
    rpm=st.floats(60, 60_000),
    tpm=st.floats(6_000, 6_000_000),
    which=st.sampled_from(["rpm", "tpm", "both"]),
)
op_st = st.one_of(
    st.tuples(st.just("take"), st.floats(0, 1)),
    st.tuples(st.just("slow"), st.integers(1, 300), st.booleans()),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets=st.lists(budget_st, min_size=1, max_size=2), ops=st.lists(op_st, max_size=40))
def test_turns_never_exceed_a_budget_over_any_window(
    sync_redis: redis_sync.Redis, budgets: list[Budget], ops: list[tuple[Any, ...]]
) -> None:
    """Whatever the calls and the Router's slow-downs: in any window of the schedule, turns
    hold at most one request per 60000/rpm ms (no burst), and tokens at most the window's
    share of tpm plus one second's worth."""
    scripts = Scripts(sync_redis)
    small_cap = min((b.tpm / 60 for b in budgets if b.tpm), default=1000.0)
    turns: list[tuple[int, int]] = []  # (turn ms, tokens)
    for op in ops:
        if op[0] == "take":
            tokens = int(op[1] * small_cap)
            _, at, _ = scripts.take(budgets, tokens)
            turns.append((at, tokens))
        else:
            scripts.slow(budgets, op[1], op[2])
    turns.sort()
    for b in budgets:
        if b.rpm:
            spacing = 60_000 / b.rpm
            for (a, _), (c, _) in itertools.pairwise(turns):
                assert c - a >= spacing - 2, (turns, b)  # turns are whole ms
        if b.tpm:
            per_ms = b.tpm / 60_000
            for i, (a, _) in enumerate(turns):
                total = 0
                for c, tokens in turns[i:]:
                    total += tokens
                    assert total <= (c - a + 1000 + 5) * per_ms, (turns, b)


def test_a_429_moves_the_turns_already_given_out(sync_redis: redis_sync.Redis) -> None:
    s = Scripts(sync_redis)
    b = fresh(rpm=600)  # a turn every 100 ms
    first = [s.take([b])[1] for _ in range(5)]
    assert all(c - a >= 99 for a, c in itertools.pairwise(first))
    [shift] = s.slow([b], 1000, refused=True)
    assert shift >= 900  # 1000 ms less the few the calls above took
    _, after, [seen] = s.take([b])
    assert seen == shift
    assert after >= first[-1] + 100 + shift - 1
    assert s.slow([b], 200, refused=True) == [shift]  # inside the first slow-down: no more


def test_a_429_that_moves_turns_tells_the_workers(sync_redis: redis_sync.Redis) -> None:
    """The shift that grew is published on the workers' control channel; a slow-down that
    moves nothing publishes nothing."""
    s = Scripts(sync_redis)
    b, idle, held = fresh(rpm=600), fresh(rpm=600), fresh(rpm=600)
    for budget in (b, b, held, held):
        s.take([budget])
    [(_, listeners)] = sync_redis.pubsub_numsub(keys.CONTROL)
    with sync_redis.pubsub(ignore_subscribe_messages=True) as sub:
        sub.subscribe(keys.CONTROL)
        for _ in range(3000):
            sub.get_message(timeout=0.01)  # the confirmation
            if sync_redis.pubsub_numsub(keys.CONTROL)[0][1] > listeners:
                break
        s.slow([idle], 1000, refused=True)
        s.slow([held], 1000, refused=False)  # an x-ratelimit reset moves no turn
        [shift, _] = s.slow([b, idle], 1000, refused=True)
        msg = sub.get_message(timeout=10)
        assert msg is not None
        verb, _, body = msg["data"].decode().partition(" ")
        assert (verb, json.loads(body)) == ("budgets", {b.name: shift})
        assert sub.get_message(timeout=0.2) is None


def test_a_spent_router_budget_holds_back_new_turns_only(sync_redis: redis_sync.Redis) -> None:
    s = Scripts(sync_redis)
    b = fresh(rpm=600)
    s.take([b])
    s.take([b])
    assert s.slow([b], 2000, refused=False) == [0]  # turns given out keep their time
    wait, _, _ = s.take([b])
    assert wait > 1000


def test_slow_down_of_an_unused_budget_changes_nothing(sync_redis: redis_sync.Redis) -> None:
    s = Scripts(sync_redis)
    b = fresh(rpm=600)
    assert s.slow([b], 2000, refused=True) == [0]
    assert s.take([b])[0] == 0


def test_token_estimates_are_corrected(sync_redis: redis_sync.Redis) -> None:
    s = Scripts(sync_redis)
    over, back = fresh(tpm=60_000), fresh(tpm=60_000)  # a token a ms, 1000 at once
    for b in (over, back):
        assert s.take([b], 3000)[0] == 0  # more than a second's worth goes, into debt
    s.settle([back], -3000)  # the call used nothing (it failed): the tokens come back
    s.settle([over], 2000)  # it used 5000
    wait_over, _, _ = s.take([over], 500)
    wait_back, _, _ = s.take([back], 500)
    assert wait_back == 0
    assert wait_over > 3000


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "5",
        "null",
        '"text"',
        '{"tr": "soon", "tt": true, "slow": {}, "shift": [], "m": null, "r": "x"}',
        '{"tr": NaN, "tt": Infinity, "slow": -Infinity, "shift": NaN}',
    ],
)
def test_a_corrupt_budget_state_is_started_afresh(sync_redis: redis_sync.Redis, raw: str) -> None:
    """Anyone who can write to Redis can write the budgets hash: a field that is not the
    scripts' JSON must not fail every call under that budget in every worker (it did: the
    scripts raised, so each call failed its job). It counts as a budget nobody used yet."""
    s = Scripts(sync_redis)
    b = fresh(rpm=600, tpm=60_000)
    for script in ("take", "slow", "settle"):
        sync_redis.hset(keys.BUDGETS, b.name, raw)
        if script == "take":
            wait, _, [shift] = s.take([b], 100)
            assert (wait, shift) == (0, 0)
        elif script == "slow":
            assert s.slow([b], 500, refused=True) == [0]
        else:
            s.settle([b], 100)
        wait, _, _ = s.take([b], 100)  # and the budget works on
        assert wait <= 1000
        state = json.loads(sync_redis.hget(keys.BUDGETS, b.name) or "")
        assert all(isinstance(v, int | float) for v in state.values()), state


# -- the limiter in the worker ----------------------------------------------------------------


@pytest.fixture
async def limiter(redis: Redis) -> RateLimiter:
    return RateLimiter(redis, {"gpt-4": RateLimit(rpm=30), "*": RateLimit(tpm=600_000)})


def test_budgets_apply_by_model_name_and_router() -> None:
    lim = RateLimiter(
        redis_sync.Redis(),
        {
            "gpt-4o": RateLimit(rpm=10),
            "backup:gpt-4o": RateLimit(tpm=100),
            "*": RateLimit(rpm=50),
            "backup:*": RateLimit(rpm=5),
        },
    )
    assert [b.name for b in lim.budgets_for("gpt-4o", "default")] == ["gpt-4o", "*"]
    assert [b.name for b in lim.budgets_for("gpt-4", "default")] == ["*"]
    assert [b.name for b in lim.budgets_for("backup:gpt-4o", "backup")] == [
        "backup:gpt-4o",
        "backup:*",
    ]
    assert lim.budgets_for("backup:gpt-4o", "backup")[0] == Budget("backup:gpt-4o", 0, 100)


async def test_a_turn_waits_off_the_job_timeout_and_shows(limiter: RateLimiter) -> None:
    """Two calls under 30 rpm: the second waits about 2 s for its turn, inside a job whose
    timeout is 0.5 s. The wait is not the job's: no timeout; the log and metric show it."""
    budgets = limiter.budgets_for("gpt-4", "default")
    meter = CallMeter(job_id="j")
    count = REGISTRY.get_sample_value("agentq_ratelimit_wait_seconds_count", {"budget": "gpt-4"})
    with capture_logs() as logs:
        async with asyncio.timeout(0.5) as deadline:
            meter.deadline = deadline
            first = await limiter.take(budgets, 10, meter)
            second = await limiter.take(budgets, 10, meter)
    assert second.waited_s > first.waited_s
    waits = [e for e in logs if e["event"] == "ratelimit.wait"]
    assert waits and waits[-1]["budget"] == ["gpt-4", "*"]
    after = REGISTRY.get_sample_value("agentq_ratelimit_wait_seconds_count", {"budget": "gpt-4"})
    assert after == (count or 0) + 2


async def test_overlapping_waits_hold_the_job_timeout_off_once() -> None:
    """Two calls of one run wait at once (parallel tool calls, each waiting for its turn or an
    outage): the job's timeout is pushed back by the union of the two waits, once. It was
    pushed back by the first wait only: the second began while the timeout was already off,
    so none of its time was given back, and its wait past the first one's end counted."""
    meter = CallMeter(job_id="j")
    async with asyncio.timeout(3600) as deadline:
        meter.deadline = deadline
        when = deadline.when()
        assert when is not None
        first, second = meter.off_the_clock(), meter.off_the_clock()
        before = time.monotonic()
        first.__enter__()
        start = time.monotonic()
        await asyncio.sleep(0.01)
        second.__enter__()
        await asyncio.sleep(0.01)
        first.__exit__(None, None, None)
        assert deadline.when() is None, "the second call still waits"
        await asyncio.sleep(0.02)
        end = time.monotonic()
        second.__exit__(None, None, None)
        after = time.monotonic()
        pushed = (deadline.when() or 0) - when
        assert end - start <= pushed <= after - before
        # a later wait, on its own, pushes it back by its own span
        when = deadline.when() or 0
        before = time.monotonic()
        with meter.off_the_clock():
            start = time.monotonic()
            await asyncio.sleep(0.01)
            end = time.monotonic()
        after = time.monotonic()
        assert end - start <= (deadline.when() or 0) - when <= after - before


async def eventually(cond: Callable[[], bool], timeout_s: float = 30) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting for a condition")


def test_arq_never_cuts_short_a_run_waiting_for_its_turns(tmp_path: Path, redis_url: str) -> None:
    """Turns are waited for off the job's timeout, however long a busy budget makes them. arq's
    own job timeout (the job's longest timeout and outage, plus a minute) cut such runs short:
    arq cancelled the run, the worker gave the job back to the front of the queue as at a
    shutdown (no run counted), and it started again, spending the budget each time, forever."""
    config = Settings(
        redis_url=redis_url,
        data_dir=str(tmp_path),
        log_format="json",
        rate_limits={"*": RateLimit(rpm=1)},
    )
    worker = build_worker(config, handle_signals=False)
    assert worker.functions[RUN_FUNCTION].timeout_s == ARQ_TIMEOUT_UNDER_BUDGETS_S
    unlimited = build_worker(config.model_copy(update={"rate_limits": {}}), handle_signals=False)
    assert unlimited.functions[RUN_FUNCTION].timeout_s == config.max_job_timeout_s + (
        config.outage_max_s + 60
    )  # without budgets arq's backstop stays


async def test_a_429_moves_every_worker_s_sleeping_calls(redis: Redis) -> None:
    """Two workers (two limiters) under one budget: a 429 heard by one moves the turn a call
    of the other sleeps until, once the other hears of it (any reply of its own)."""
    limits = {"*": RateLimit(rpm=20)}  # a turn every 3 s
    a, b = RateLimiter(redis, limits), RateLimiter(redis, limits)
    budgets = a.budgets_for("gpt-4o", "default")
    await a.take(budgets, 0, None)
    sleeper = asyncio.create_task(b.take(budgets, 0, None))  # its turn: 3 s from now
    await eventually(lambda: "*" in b.shifts)
    await a.slow_down(Turn(budgets, 0, [0]), 1.0, refused=True)
    later = asyncio.create_task(b.take(budgets, 0, None))  # b hears of the shift in its reply
    try:
        await eventually(lambda: b.shifts["*"] > 0)
        turn = await sleeper
    finally:
        later.cancel()
    assert b.shifts["*"] >= 900
    # it slept the shift too: its turn's record of the shifts it has slept caught up with it
    # (a condition, not a clock reading: with the shift ignored this stays at 0)
    assert turn.shifts == [b.shifts["*"]], (turn.shifts, b.shifts)


async def test_a_sleeping_call_hears_of_another_worker_s_429(redis: Redis) -> None:
    """Every call of worker b sleeps until its turn when worker a hears a 429: b hears of it on
    the control channel (no command of its own) and its call sleeps the shift too before it is
    sent. It heard only in a reply of its own, and a worker whose calls all slept sent them on
    the turns the 429 had moved."""
    limits = {"*": RateLimit(rpm=20)}  # a turn every 3 s
    a, b = RateLimiter(redis, limits), RateLimiter(redis, limits)
    budgets = a.budgets_for("gpt-4o", "default")
    rt: Any = SimpleNamespace(
        store=SimpleNamespace(redis=redis), provider=SimpleNamespace(limiter=b)
    )
    [(_, listeners)] = await redis.pubsub_numsub(keys.CONTROL)
    listener = asyncio.create_task(worker_settings._listen(rt))
    try:
        await eventually_async(
            lambda: redis.pubsub_numsub(keys.CONTROL), lambda n: n[0][1] > listeners
        )
        await a.take(budgets, 0, None)
        sleeper = asyncio.create_task(b.take(budgets, 0, None))  # its turn: 3 s from now
        await eventually(lambda: "*" in b.shifts)
        await a.slow_down(Turn(budgets, 0, [0]), 1.0, refused=True)
        shift = a.shifts["*"]
        assert shift >= 900
        turn = await sleeper
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    assert b.shifts["*"] == shift
    # it slept the shift: its record of the shifts it has slept caught up (a condition, not a
    # clock reading: unheard, it stays at 0)
    assert turn.shifts == [shift], (turn.shifts, shift)


def test_a_budgets_message_only_ever_raises_a_known_shift() -> None:
    """Anyone who can publish on the control channel can send one: what is not a shift of a
    budget this worker has changes nothing (an inf shift would have failed every call)."""
    lim = RateLimiter(redis_sync.Redis(), {"*": RateLimit(rpm=60)})
    for message in ("not json", "5", "[1]", '{"*": "1"}', '{"*": NaN}', '{"*": Infinity}'):
        lim.hear(message)
    lim.hear('{"*": true, "other": 5}')
    assert lim.shifts == {}
    lim.hear('{"*": 1500}')
    lim.hear('{"*": 900}')  # published before the other, heard after it
    assert lim.shifts == {"*": 1500}


async def eventually_async(
    read: Callable[[], Awaitable[Any]], cond: Callable[[Any], bool], timeout_s: float = 30
) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond(await read()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out waiting for a condition")


async def test_a_model_without_a_budget_costs_no_redis_command(sim: SimRouter) -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def register_script(self, src: str) -> Any:
            async def run(keys: list[str], args: list[Any]) -> list[int]:
                self.calls.append(src)
                return [0, 0, 0]

            return run

    redis = Recorder()
    provider = RouterProvider(
        {"default": (sim.url, ROUTER_KEY)}, concurrency=2, max_calls=2, call_timeout_s=5
    )
    provider.limiter = RateLimiter(redis, {"gpt-4": RateLimit(rpm=60)})
    try:
        for model, calls in (("gpt-4o", 0), ("gpt-4", 1)):
            await provider.get_model(model).get_response(
                None, "What is 1 + 1?", ModelSettings(), [], None, [], ModelTracing.DISABLED
            )
            assert len(redis.calls) == calls, model
    finally:
        await provider.aclose()


async def _call(provider: RouterProvider, model: str) -> None:
    await provider.get_model(model).get_response(
        None, "What is 1 + 1?", ModelSettings(), [], None, [], ModelTracing.DISABLED
    )


async def test_tokens_are_reserved_then_settled_by_usage(redis: Redis, sim: SimRouter) -> None:
    """A call under a token budget reserves its estimate (its text, and max_tokens) before it
    is sent; the response's usage replaces the estimate."""
    provider = RouterProvider(
        {"default": (sim.url, ROUTER_KEY)}, concurrency=2, max_calls=2, call_timeout_s=5
    )
    provider.limiter = RateLimiter(redis, {"*": RateLimit(tpm=1_000_000)})
    model = provider.get_model("gpt-4o")
    settings_ = ModelSettings(max_tokens=500)
    try:
        with capture_logs() as logs:
            await model.get_response(
                "Be brief.", "What is 1 + 1?", settings_, [], None, [], ModelTracing.DISABLED
            )
    finally:
        await provider.aclose()
    [call] = [e for e in logs if e["event"] == "model_call"]
    raw = await redis.hget(keys.BUDGETS, "*")
    assert raw is not None
    assert json.loads(raw)["t"] == call["total_tokens"]
    assert ratelimit.estimate_tokens("Be brief.", "What is 1 + 1?", [], 500) == 500 + 23 // 4 + 1


PHOTO = "data:image/jpeg;base64," + "/9j/4AAQSkZJRgABAQ" * 20_000  # 360,000 characters


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_image", "image_url": PHOTO, "detail": "high"},
        {"type": "image_url", "image_url": {"url": PHOTO}},
        {"type": "input_image", "image_url": "https://example.com/cat.jpg"},
        {"type": "input_file", "file_data": PHOTO.replace("image/jpeg", "application/pdf")},
    ],
)
def test_an_image_is_estimated_at_a_fixed_figure(part: dict[str, Any]) -> None:
    """An image counts IMAGE_TOKENS whatever its size: its base64 text counted as text
    reserved about 90,000 tokens for this photo (and one more second of a 5M tpm budget for
    each 83,000 tokens of it)."""
    question = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"}]}]
    with_image = [{"role": "user", "content": [question[0]["content"][0], part]}]  # type: ignore[index]
    text = ratelimit.estimate_tokens("Describe images.", question, [], 300)
    estimate = ratelimit.estimate_tokens("Describe images.", with_image, [], 300)
    assert text + ratelimit.IMAGE_TOKENS <= estimate <= text + ratelimit.IMAGE_TOKENS + 30


@pytest.mark.parametrize(
    "items",
    [
        [{"role": "user", "content": "Describe the image on the left. " * 50}],
        [{"role": "user", "content": [{"type": "input_text", "text": "a data: URL " * 40}]}],
        [{"role": "assistant", "content": None, "tool_calls": [{"name": "image_search"}]}],
    ],
)
def test_text_that_mentions_images_is_counted_as_text(items: list[dict[str, Any]]) -> None:
    """Items that only talk about images are counted as before: as their JSON text."""
    chars = len(json.dumps(items))
    estimate = ratelimit.estimate_tokens(None, items, [], None)
    assert abs(estimate - chars // ratelimit.CHARS_PER_TOKEN) <= chars * 0.02 + 2


async def test_429s_under_a_budget_spend_no_tries(redis: Redis) -> None:
    """A model that always answers 429: under a budget, each 429 slows the fleet down and the
    call takes a new turn, MAX_FREE_429S times, before its tries are spent as usual."""
    async with SimRouter(SimConfig(api_key=ROUTER_KEY, retry_after_s=0.01)) as router:
        for budget, sent in ((False, 2), (True, MAX_FREE_429S + 2)):
            provider = RouterProvider(
                {"default": (router.url, ROUTER_KEY)},
                concurrency=2,
                max_calls=2,
                call_timeout_s=5,
                policy=RetryPolicy(max_attempts=2, base_s=0.01, max_s=0.02),
            )
            if budget:
                provider.limiter = RateLimiter(redis, {"sim-429": RateLimit(rpm=60_000)})
            router.stats.reset()
            try:
                with pytest.raises(openai.RateLimitError):
                    await _call(provider, "sim-429")
            finally:
                await provider.aclose()
            assert router.stats.by_model["sim-429"] == sent
    states, _ = await read_budgets(redis)
    assert states["sim-429"].slowed_s >= 0


async def test_a_spent_router_budget_is_heard(redis: Redis) -> None:
    """The Router's x-ratelimit-remaining-requests is 0 after a call: new turns wait for its
    reset, and `agentq health` and `status` say so."""
    config = SimConfig(api_key=ROUTER_KEY, rate_limit_rps=1 / 60, rate_window_s=60)
    async with SimRouter(config) as router:
        provider = RouterProvider(
            {"default": (router.url, ROUTER_KEY)}, concurrency=2, max_calls=2, call_timeout_s=5
        )
        provider.limiter = RateLimiter(redis, {"*": RateLimit(rpm=600)}, max_pause_s=30)
        token = current_meter.set(CallMeter(job_id="j"))
        try:
            await _call(provider, "gpt-4o")
        finally:
            current_meter.reset(token)
            await provider.aclose()
    states, _ = await read_budgets(redis)
    state = states["*"]
    assert state.slowed_s > 20 and state.backlog_s > 20
    assert round(state.requests) == 1
    [health] = describe_budgets(states)
    assert health.startswith("Budget * (600 rpm): in full use, calls wait ")
    assert "for their turn; 1 call (0%) in the last minute; the Router asked to slow" in health
    [status] = describe_waits(states)
    assert status.startswith("rate limited: budget * (600 rpm) in full use: calls wait ")
    assert status.endswith("for their turn (the Router asked to slow down)")


# -- settings ---------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("AGENTQ_", "HANZO_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_env")
def test_rate_limits_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().rate_limits == {}
    monkeypatch.setenv("AGENTQ_ROUTERS", '{"backup": {"url": "http://b/v1"}}')
    monkeypatch.setenv(
        "AGENTQ_RATE_LIMITS",
        '{"gpt-4o": {"rpm": 500, "tpm": 200000}, "*": {"rpm": 1000}, "backup:*": {"tpm": 5}}',
    )
    limits = load_settings().rate_limits
    assert limits["gpt-4o"] == RateLimit(rpm=500, tpm=200_000)
    assert limits["*"] == RateLimit(rpm=1000)
    assert limits["backup:*"].tpm == 5


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('{"gpt-4o": {"rpm": 500', "AGENTQ_RATE_LIMITS is not valid JSON"),
        ('{"gpt-4o": {"rps": 5}}', "AGENTQ_RATE_LIMITS: gpt-4o.rps: Extra inputs"),
        ('{"gpt-4o": {"rpm": 0}}', "AGENTQ_RATE_LIMITS: gpt-4o.rpm: Input should be greater"),
        ('{"gpt-4o": {"tpm": -5}}', "AGENTQ_RATE_LIMITS: gpt-4o.tpm: Input should be greater"),
        ('{"gpt-4o": {}}', 'a budget needs "rpm", "tpm" or both'),
        ('{"gpt-4o": 500}', "AGENTQ_RATE_LIMITS: gpt-4o: Input should be a valid dictionary"),
        ('{"nope:*": {"rpm": 5}}', '"nope:*" names no Router of AGENTQ_ROUTERS'),
        # accepted before, and every call under the budget then failed (no JSON for inf)
        ('{"gpt-4o": {"rpm": Infinity}}', "gpt-4o.rpm: Input should be a finite number"),
        ('{"gpt-4o": {"tpm": 1e999}}', "gpt-4o.tpm: Input should be a finite number"),
    ],
)
def test_a_bad_budget_says_what_to_write(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    monkeypatch.setenv("AGENTQ_RATE_LIMITS", value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert says in str(err.value)
    assert '{"gpt-4o": {"rpm": 500, "tpm": 200000}, "*": {"rpm": 1000}}' in str(err.value)


# -- the simulated Router's rate limit --------------------------------------------------------


async def test_the_simulated_router_limits_all_callers_together() -> None:
    """6 requests a minute: of 9 requests, 6 are answered, each saying what remains; the rest
    get 429 with retry-after. Without the option nothing is limited, and no header is sent."""
    config = SimConfig(api_key=ROUTER_KEY, rate_limit_rps=0.1, rate_window_s=60)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {ROUTER_KEY}"}
    async with SimRouter(config) as router, aiohttp.ClientSession(headers=auth) as http:
        seen = []
        for _ in range(9):
            async with http.post(router.url + "/chat/completions", json=body) as resp:
                seen.append((resp.status, resp.headers.copy()))
        assert [s for s, _ in seen] == [200] * 6 + [429] * 3
        remaining = [h["x-ratelimit-remaining-requests"] for _, h in seen]
        assert remaining == ["5", "4", "3", "2", "1", "0", "0", "0", "0"]
        assert all(h["x-ratelimit-limit-requests"] == "6" for _, h in seen)
        refused = seen[-1][1]
        assert 50_000 < int(refused["retry-after-ms"]) <= 60_000
        assert 50 <= int(refused["retry-after"]) <= 60
        assert refused["x-ratelimit-reset-requests"].endswith("ms")
        assert router.stats.by_outcome["429"] == 3
    async with SimRouter(SimConfig(api_key=ROUTER_KEY)) as router:
        async with aiohttp.ClientSession(headers=auth) as http:
            for _ in range(9):
                async with http.post(router.url + "/chat/completions", json=body) as resp:
                    assert resp.status == 200
                    assert "x-ratelimit-remaining-requests" not in resp.headers


def test_the_simulated_router_refuses_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="above 0"):
        SimConfig(rate_limit_rps=0)
