"""A worker's slots: a run holds one from its start until only its record's store is left (then
the next job may start), a parked run gives its own back while it waits, and the counts stay
true whatever order runs start, park, free and end in."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from producer import AgentJob, Producer, Settings, Status
from producer.store import Store
from tests.helpers import cancel_worker, records
from worker.arqworker import PARK_FACTOR
from worker.settings import Settings as AgentqSettings
from worker.settings import build_worker


async def _wait_for(check: Any, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def test_the_next_job_starts_while_a_finished_run_stores_its_record(
    producer: Producer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot: the second job starts while the first's store is held up; a run that finds
    max_jobs stores already waiting keeps its slot (no third job), and every record lands."""
    claimed: list[str] = []
    storing: list[str] = []
    go_on = asyncio.Event()
    claim, finish = Store.claim, Store.finish

    async def counted_claim(self: Store, job_id: str, *args: Any) -> Any:
        claimed.append(job_id)
        return await claim(self, job_id, *args)

    async def held_finish(self: Store, record: Any, token: str) -> int:
        storing.append(record.custom_id)
        await go_on.wait()
        return await finish(self, record, token)

    monkeypatch.setattr(Store, "claim", counted_claim)
    monkeypatch.setattr(Store, "finish", held_finish)
    jobs = [AgentJob(custom_id=f"q{i}", input="What is 2+2?") for i in range(3)]
    batch = await producer.submit(jobs)
    worker = build_worker(
        settings.model_copy(update={"concurrency": 1}), handle_signals=False, burst=True
    )
    task = asyncio.ensure_future(worker.async_run())
    try:
        await _wait_for(lambda: len(storing) == 2)  # the second ran while the first stored
        assert len(claimed) == 2 and worker.job_counter == 1 and len(worker._freed) == 1
        await asyncio.sleep(0.3)  # the second keeps its slot: max_jobs stores wait already
        assert len(claimed) == 2, "a third job started with max_jobs records unstored"
        go_on.set()
        await asyncio.wait_for(task, 30)
    finally:
        go_on.set()  # an assertion failed: let held stores finish, so the worker can stop
        if not task.done():
            await cancel_worker(task)
        await worker.close()
    out = await records(producer, batch.id)
    assert {r.status for r in out.values()} == {Status.SUCCEEDED} and len(out) == 3
    assert worker.job_counter == 0 and not worker._freed


# --- the slot counts as a state machine -----------------------------------------------------

MAX_JOBS = 2


class Slots(RuleBasedStateMachine):
    """Runs on a real BatchStartWorker's slot methods, stepped on an event loop: start (as
    start_taken does), park, unpark (takes a slot back: may wait for one), `agentq cancel`
    while parked or waiting, free (only the store left), end. Each run's flags record what it
    holds; after each step the worker's semaphore, job counter and debts must agree with them,
    and start_taken's acquire must never have to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        config = AgentqSettings(
            redis_url="redis://127.0.0.1:1/0",  # never connected to
            data_dir=str(Path("/tmp") / "agentq-slots-test"),
            concurrency=MAX_JOBS,
            log_format="json",
        )
        self.w = build_worker(config, handle_signals=False)
        self.units = self.w.sem._value  # arq's semaphore has max_jobs + 1
        self.runs: list[dict[str, Any]] = []

    def teardown(self) -> None:
        async def drain() -> None:
            for run in self.runs:
                run["cmd"].put_nowait("end")
                run["task"].cancel()
            await asyncio.gather(*(r["task"] for r in self.runs), return_exceptions=True)

        self.loop.run_until_complete(drain())
        self.loop.close()

    def settle(self) -> None:
        for _ in range(4):
            self.loop.run_until_complete(asyncio.sleep(0))

    def alive(self, *states: str) -> list[dict[str, Any]]:
        return [r for r in self.runs if not r["task"].done() and r["state"] in states]

    async def _body(self, run: dict[str, Any]) -> None:
        w = self.w
        while True:
            cmd = await run["cmd"].get()
            if cmd == "park":
                keeps = w.parked >= PARK_FACTOR * w.max_jobs  # past this a run keeps its slot
                run["state"] = "parked"
                if not keeps:
                    run.update(slot=False, counted=False)
                try:
                    async with w.park():
                        await run["cmd"].get()  # "unpark"
                        run["state"] = "unparking"
                        run["counted"] = True
                except asyncio.CancelledError:  # the runner goes on to store a cancelled record
                    run["state"] = "cancelled"
                    if not keeps:  # park's end counted it and left a debt for its slot
                        run.update(counted=True, owes=True)
                    continue
                run.update(state="holding", slot=True)
            elif cmd == "free":
                before = len(w._freed)
                w.free_slot(asyncio.current_task())  # type: ignore[arg-type]
                if len(w._freed) > before:
                    run.update(freed=True, slot=False, owes=False, counted=False)
            elif cmd == "end":
                return

    @precondition(lambda self: self.w.job_counter < MAX_JOBS)
    @rule()
    def start(self) -> None:
        w = self.w
        run: dict[str, Any] = {
            "state": "holding",
            "cmd": asyncio.Queue(),
            "slot": True,
            "counted": True,
            "owes": False,
            "freed": False,
        }

        async def take() -> asyncio.Task[None]:  # as start_taken does
            await w.sem.acquire()
            w.job_counter += 1
            task = self.loop.create_task(self._body(run))
            task.add_done_callback(functools.partial(w._run_ended, self.loop.time()))
            return task

        run["task"] = self.loop.run_until_complete(take())
        self.runs.append(run)
        self.settle()

    def _send(self, data: st.DataObject, states: tuple[str, ...], cmd: str) -> None:
        runs = self.alive(*states)
        if runs:
            data.draw(st.sampled_from(runs))["cmd"].put_nowait(cmd)
            self.settle()

    @rule(data=st.data())
    def park(self, data: st.DataObject) -> None:
        runs = [r for r in self.alive("holding") if not r["freed"]]
        if runs:
            data.draw(st.sampled_from(runs))["cmd"].put_nowait("park")
            self.settle()

    @rule(data=st.data())
    def unpark(self, data: st.DataObject) -> None:
        self._send(data, ("parked",), "unpark")

    @rule(data=st.data())
    def cancel_waiting(self, data: st.DataObject) -> None:
        runs = self.alive("parked", "unparking")
        if runs:
            data.draw(st.sampled_from(runs))["task"].cancel()
            self.settle()

    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        self._send(data, ("holding", "cancelled"), "free")

    @rule(data=st.data())
    def end(self, data: st.DataObject) -> None:
        self._send(data, ("holding", "cancelled"), "end")

    @invariant()
    def counts_agree(self) -> None:
        w, live = self.w, [r for r in self.runs if not r["task"].done()]
        taken = sum(r["slot"] or r["owes"] for r in live)
        assert w.sem._value - w._slot_debts == self.units - taken
        assert w.job_counter == sum(r["counted"] for r in live)
        assert w._slot_debts >= 0 and 0 <= w.sem._value <= self.units
        assert len(w._freed) == sum(r["freed"] for r in live) <= MAX_JOBS
        assert w.sem._value >= MAX_JOBS - w.job_counter, "start_taken's acquire would wait"
        if not live:
            assert (w.sem._value, w.job_counter, w._slot_debts) == (self.units, 0, 0)


TestSlots = Slots.TestCase
TestSlots.settings = hsettings(max_examples=200, stateful_step_count=40, deadline=None)
