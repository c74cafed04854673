"""The worker's CPU turns (worker/baton.py): FIFO, one holder, a watchdog that opens the baton,
cancelled waiters, and turns given away only by requests that wait."""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client import REGISTRY

from producer import AgentJob, Producer, Settings, Status
from producer.store import Store
from tests.helpers import records, run_batch
from worker import baton as baton_module
from worker import tools
from worker.baton import WINDOW_S, Baton, Hold, current_hold, given_while_waiting
from worker.provider import RouterModel


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _baton(**kwargs: Any) -> Baton:
    """A baton that never sees its CPU all used (tests keep the CPU busy)."""
    return Baton(cpu_clock=lambda: 0.0, **kwargs)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_turns_go_in_the_order_asked_and_one_at_a_time() -> None:
    baton = _baton()
    holds = [Hold(baton) for _ in range(4)]
    order: list[int] = []

    async def run(i: int) -> None:
        await holds[i].take()
        order.append(i)

    await holds[0].take()
    tasks = [asyncio.create_task(run(i)) for i in (1, 2, 3)]
    await _settle()
    assert order == [] and baton.waiting == 3
    for i in (0, 1, 2):
        assert [h.holding for h in holds].count(True) == 1 and holds[i].holding
        holds[i].give()
        await _settle()
        assert order == list(range(1, i + 2))
    await asyncio.gather(*tasks)
    holds[3].give()
    assert baton.current == 0 and baton.overruns == 0


async def test_a_superseded_hold_gives_nothing_away() -> None:
    baton = _baton()
    a, b, c = Hold(baton), Hold(baton), Hold(baton)
    await a.take()
    waiter = asyncio.create_task(b.take())
    await _settle()
    a.give()
    await waiter
    assert b.holding
    a.give()  # again, or late: b keeps its turn
    assert b.holding and not a.holding
    late = asyncio.create_task(c.take())
    await _settle()
    assert not late.done()
    b.give()
    await late
    assert c.holding
    c.give()
    assert baton.current == 0


async def test_a_holder_past_hold_s_lets_everyone_go_and_turns_rest() -> None:
    clock = Clock()
    baton = _baton(hold_s=0.02, rest_s=1.0, clock=clock)
    stuck, others = Hold(baton), [Hold(baton) for _ in range(3)]
    overruns = REGISTRY.get_sample_value("agentq_cpu_turn_overruns_total") or 0.0
    await stuck.take()
    waiting = [asyncio.create_task(h.take()) for h in others]
    await asyncio.wait_for(asyncio.gather(*waiting), 5)  # the watchdog lets them all go
    assert baton.overruns == 1 and baton.current == 0
    assert REGISTRY.get_sample_value("agentq_cpu_turn_overruns_total") == overruns + 1
    assert not any(h.holding for h in [stuck, *others])
    assert baton.is_open()
    # open: a take goes at once, without a turn
    extra = Hold(baton)
    await extra.take()
    assert not extra.holding
    stuck.give()  # the late give of the overrun holder changes nothing
    assert baton.current == 0
    clock.now += 1.5  # turns again
    await extra.take()
    assert extra.holding


async def test_no_turns_while_the_cpu_is_all_used() -> None:
    clock, cpu = Clock(), Clock()
    baton = Baton(clock=clock, cpu_clock=cpu)
    a, b = Hold(baton), Hold(baton)
    await a.take()
    assert a.holding
    clock.now += WINDOW_S
    cpu.now += WINDOW_S * 0.95  # busy: the next take goes at once, without a turn
    await asyncio.wait_for(b.take(), 5)
    assert not b.holding and a.holding and baton.busy
    assert REGISTRY.get_sample_value("agentq_cpu_turns_off") == 1.0
    a.give()
    clock.now += 5 * WINDOW_S  # no takes for a while: idle, which says nothing
    await b.take()
    assert not b.holding and baton.busy
    clock.now += WINDOW_S  # a window with CPU to spare: turns again
    await b.take()
    assert b.holding and not baton.busy
    assert REGISTRY.get_sample_value("agentq_cpu_turns_off") == 0.0
    waiter = asyncio.create_task(a.take())
    await _settle()
    assert not waiter.done()
    b.give()
    await waiter
    assert a.holding


async def test_a_runs_tasks_share_its_place_and_its_turn() -> None:
    """Two tool calls of one run, in tasks of their own, come back while another run holds the
    turn: before, each took a place of its own, the first one's turn went to a run waiting for
    the second, and every run stood still until the watchdog (50 ms, then no turns for 1 s)."""
    baton = _baton()
    run, other, third = Hold(baton), Hold(baton), Hold(baton)
    await other.take()
    calls = [asyncio.create_task(run.take()) for _ in range(2)]
    last = asyncio.create_task(third.take())
    await _settle()
    assert baton.waiting == 2  # run's two tasks wait in one place, then third's
    other.give()
    await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert run.holding and not last.done()
    run.give()
    await asyncio.wait_for(last, 5)
    assert third.holding and baton.overruns == 0
    # one of a run's two waiting tasks is cancelled: the other keeps the place
    calls = [asyncio.create_task(run.take()) for _ in range(2)]
    await _settle()
    calls[0].cancel()
    await _settle()
    third.give()
    await asyncio.wait_for(calls[1], 5)
    assert run.holding
    run.give()


async def test_a_cancelled_waiter_is_skipped_and_a_cancelled_grant_passes_on() -> None:
    baton = _baton()
    a, b, c = Hold(baton), Hold(baton), Hold(baton)
    await a.take()
    tb = asyncio.create_task(b.take())
    tc = asyncio.create_task(c.take())
    await _settle()
    tb.cancel()
    await _settle()
    a.give()
    await tc
    assert c.holding and not b.holding
    # granted and cancelled in the same step: the turn goes to the next waiter
    d, e = Hold(baton), Hold(baton)
    td = asyncio.create_task(d.take())
    te = asyncio.create_task(e.take())
    await _settle()
    c.give()  # grants d ...
    td.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await td
    await asyncio.wait_for(te, 5)
    assert e.holding and not d.holding
    e.give()
    assert baton.current == 0


async def test_a_request_that_answers_at_once_keeps_the_turn_one_that_waits_gives_it() -> None:
    baton = _baton()
    mine, other = Hold(baton), Hold(baton)
    ran: list[str] = []

    async def other_run() -> None:
        await other.take()
        ran.append("other")
        other.give()

    async def at_once() -> str:
        return "now"

    async def waits() -> str:
        await asyncio.sleep(0.01)
        return "later"

    token = current_hold.set(mine)
    try:
        await mine.take()
        task = asyncio.create_task(other_run())
        await _settle()
        assert await given_while_waiting(at_once()) == "now"
        assert mine.holding and ran == []
        assert await given_while_waiting(waits()) == "later"
        assert ran == ["other"]  # it went while this one waited
        assert mine.holding  # and this one has its turn back
        mine.give()
        await task
    finally:
        current_hold.reset(token)


class Turns(RuleBasedStateMachine):
    """Runs take, give and are cancelled in any order; the watchdog fires and the clock moves.
    After each step: at most one holder, and it is the baton's; no run waits while the baton is
    free; turns go in the order they were asked for; a run whose tasks were all cancelled
    while waiting never holds; a run that holds has no place in the queue."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.cpu = Clock()
        self.baton = Baton(hold_s=3600, rest_s=1.0, clock=self.clock, cpu_clock=self.cpu)
        self.runs: list[dict[str, Any]] = []
        self.asked: list[int] = []  # runs waiting, in the order they asked
        self.granted: list[int] = []

    def teardown(self) -> None:
        async def drain() -> None:
            for r in self.runs:
                if r["task"] is not None:
                    r["task"].cancel()
            await asyncio.gather(
                *(r["task"] for r in self.runs if r["task"] is not None), return_exceptions=True
            )

        self.loop.run_until_complete(drain())
        self.loop.close()

    def settle(self) -> None:
        self.loop.run_until_complete(_settle())

    def _waiting(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r["task"] is not None and not r["task"].done()]

    def _start(self, hold: Hold, first: bool) -> dict[str, Any]:
        """A task of a run (a new one when first) that takes the turn."""
        run: dict[str, Any] = {"hold": hold, "i": len(self.runs), "cancelled": False}

        async def taking() -> None:
            await hold.take()
            if first and hold.holding:
                self.granted.append(run["i"])

        async def start() -> None:
            run["task"] = asyncio.create_task(taking())

        self.runs.append(run)
        self.loop.run_until_complete(start())
        return run

    @rule()
    def take(self) -> None:
        run = self._start(Hold(self.baton), first=True)
        if not run["task"].done():
            self.asked.append(run["i"])
        self.settle()

    @rule(data=st.data())
    def take_again(self, data: st.DataObject) -> None:
        """Another task of an existing run asks (the SDK's turn task, a parallel tool call)."""
        if not self.runs:
            return
        self._start(data.draw(st.sampled_from(self.runs))["hold"], first=False)
        self.settle()

    @rule()
    def cpu_use_moves(self) -> None:
        """The window's CPU share flips between busy and idle (the clock moves a window)."""
        self.cpu.now += WINDOW_S if not self.baton.busy else 0.0
        self.clock.now += WINDOW_S

    @rule(data=st.data())
    def give(self, data: st.DataObject) -> None:
        runs = [r for r in self.runs if r["task"] is not None and r["task"].done()]
        if runs:
            hold = data.draw(st.sampled_from(runs))["hold"]

            async def give() -> None:  # (a grant starts its watchdog on the running loop)
                hold.give()

            self.loop.run_until_complete(give())
            self.settle()

    @rule(data=st.data())
    def cancel_waiting(self, data: st.DataObject) -> None:
        runs = self._waiting()
        if runs:
            run = data.draw(st.sampled_from(runs))
            run["task"].cancel()
            run["cancelled"] = True
            self.settle()

    @precondition(lambda self: self.baton.current != 0)
    @rule()
    def watchdog(self) -> None:
        self.baton._overrun(self.baton.current)  # what the holder's timer calls at hold_s
        self.settle()

    @rule(s=st.sampled_from([0.3, 1.5]))
    def time_passes(self, s: float) -> None:
        self.clock.now += s

    @invariant()
    def one_holder_and_fifo(self) -> None:
        holders = list({id(r["hold"]): r["hold"] for r in self.runs if r["hold"].holding}.values())
        assert len(holders) <= 1
        if holders:
            assert self.baton.current == holders[0].grant != 0
        else:
            assert self.baton.current == 0
        waiting = self._waiting()
        if self.baton.current == 0:
            assert not waiting, "a run waits while the baton is free"
        by_hold: dict[int, list[dict[str, Any]]] = {}
        for r in self.runs:
            by_hold.setdefault(id(r["hold"]), []).append(r)
        for tasks in by_hold.values():  # a run whose every task was cancelled waiting
            if all(t["cancelled"] for t in tasks):
                assert not tasks[0]["hold"].holding, "a cancelled run holds the turn"
        for r in self.runs:
            hold = r["hold"]
            assert not (hold.holding and hold.waiter is not None), "a holder still queued"
            assert hold.tasks >= 0
        # grants from waiting go in the order asked (cancelled ones skipped)
        waited = [i for i in self.granted if i in self.asked]
        assert waited == sorted(waited)


TestTurns = Turns.TestCase
TestTurns.settings = hsettings(max_examples=200, stateful_step_count=40, deadline=None)


# -- a worker's runs ----------------------------------------------------------------------------


@pytest.fixture
def turns_seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Hold | None]]:
    """The running job's Hold at each model call (as it is sent), tool body and record store,
    with whether it held the turn then."""
    seen: dict[str, list[Any]] = {"call": [], "tool": [], "store": []}

    def note(where: str) -> None:
        hold = current_hold.get()
        seen[where].append((hold, hold is not None and hold.holding))

    call = RouterModel._get_response

    async def spy_call(self: RouterModel, *args: Any, **kwargs: Any) -> Any:
        note("call")
        return await call(self, *args, **kwargs)

    evaluate = tools.evaluate

    def spy_evaluate(expression: str) -> int | float:
        note("tool")
        return evaluate(expression)

    finish = Store.finish

    async def spy_finish(self: Store, record: Any, token: str) -> int:
        note("store")
        return await finish(self, record, token)

    monkeypatch.setattr(RouterModel, "_get_response", spy_call)
    monkeypatch.setattr(tools, "evaluate", spy_evaluate)
    monkeypatch.setattr(Store, "finish", spy_finish)
    return seen


def _jobs() -> list[AgentJob]:
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    plain = [AgentJob(custom_id=f"plain-{i}", input=f"What is {i} + 1?") for i in range(6)]
    tool = [
        AgentJob.model_validate({"custom_id": f"t{i}", "input": f"What is {i}*7?", "agent": calc})
        for i in range(6)
    ]
    return plain + tool


async def test_a_run_holds_its_turn_between_model_calls_and_not_while_it_waits(
    producer: Producer,
    settings: Settings,
    turns_seen: dict[str, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # turns even on a busy test machine, and no overrun from a slow step
    monkeypatch.setattr(baton_module, "BUSY_SHARE", 1e9)
    monkeypatch.setattr(baton_module, "HOLD_S", 60.0)
    batch = await producer.submit(_jobs())
    await run_batch(producer, settings, batch.id)
    out = await records(producer, batch.id)
    assert all(r.status == Status.SUCCEEDED for r in out.values()), out
    calls, tool_bodies, stores = turns_seen["call"], turns_seen["tool"], turns_seen["store"]
    assert len(calls) == 18 and len(tool_bodies) == 6 and len(stores) == 12
    assert all(h is not None for h, _ in calls + tool_bodies + stores)
    assert not any(held for _, held in calls), "a model call was sent holding the turn"
    assert all(held for _, held in tool_bodies), "the SDK's work after an answer ran out of turn"
    assert not any(held for _, held in stores), "a record's store waited holding the turn"
    baton = calls[0][0].baton
    assert baton.current == 0 and baton.waiting == 0 and baton.overruns == 0


async def test_cpu_turns_off(
    producer: Producer, settings: Settings, turns_seen: dict[str, list[Any]]
) -> None:
    off = settings.model_copy(update={"cpu_turns": False})
    batch = await producer.submit(_jobs()[:2])
    await run_batch(producer, off, batch.id)
    assert all(r.status == Status.SUCCEEDED for r in (await records(producer, batch.id)).values())
    assert turns_seen["call"] and all(h is None for h, _ in turns_seen["call"])


def test_cpu_demand_counts_the_threads_cpu() -> None:
    """(On Linux also its waits for a core: schedstat's first two fields.)"""
    start = baton_module.cpu_demand()
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    assert baton_module.cpu_demand() - start >= 0.05


def test_a_wrapped_tool_copies_and_deep_copies() -> None:
    """copy and pickle rebuild the invoker without __init__: its attribute lookups must not
    recurse."""
    tool = tools.default_registry().tools["calculator"]
    for copied in (copy.copy(tool), copy.deepcopy(tool)):
        assert copied.name == tool.name
        assert callable(copied.on_invoke_tool)
    assert copy.copy(tool.on_invoke_tool)._invoke is not None
