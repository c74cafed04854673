"""A worker's runs take turns at the CPU between model calls (AGENTQ_CPU_TURNS).

Runs come back from the Router in bunches: runs that started together, with similar latencies.
asyncio then steps every run of a bunch in turn at each of its awaits, so none of them reaches
its next model call (or its end) before the whole bunch's CPU is spent, and every slot of the
bunch stands idle that long, round after round. A run that holds the baton from a model call's
answer to its next call (or from its start, or to its end) goes through in one piece while the
others of the bunch wait their turn: the first sends its next call after its own CPU, not after
everyone's, and the bunch spreads out. Measured at 200 ms a call against the same worker with
turns off (README, "CPU turns"; `python -m ops.bench --only turns`): 1.15 times the runs a
second (plain jobs, a fast machine), 1.09-1.17 on a slower one, for more CPU a run, spent where
the CPU stood idle.

Turns cost CPU (runs spread out are read and written one at a time, where a bunch shared each
wakeup of the event loop), so a worker short of CPU (its thread running or waiting for a core
nearly all the time) takes none: they can only help by filling CPU time a bunch leaves idle.

The baton only orders work, it never holds anything up for long:
- a run gives it up while it waits on a model call, an MCP server, or a tool that waits;
- a run's tasks (the SDK runs a turn, and each of parallel tool calls, in a task of its own)
  share its place: they wait in one place in the queue, and hold one turn together;
- a holder that keeps it past HOLD_S (it waits on something else: a guardrail's own request, a
  long stretch of CPU) loses it, and the baton then stays open (no turns, everyone goes) for
  REST_S, so what an unforeseen wait costs is bounded: at most HOLD_S in every REST_S.
(A wait for a turn counts against the job's timeout, like any of its CPU.)
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from agents import FunctionTool

from . import metrics

HOLD_S = 0.05
"""The longest a run holds the baton; a run's CPU between two model calls is a few ms."""

REST_S = 1.0
"""After a holder overran HOLD_S, the baton stays open this long."""

BUSY_SHARE = 0.9
"""A worker whose event loop's thread ran or waited for a core (the machine's other processes
had them) this share of the wall clock or more over the last WINDOW_S takes no turns over the
next (threads running sync tools do not count)."""

WINDOW_S = 0.5

T = TypeVar("T")

SCHEDSTAT = "/proc/thread-self/schedstat"


def cpu_demand() -> float:
    """Seconds the calling thread ran or waited to run (Linux's schedstat: a worker that
    shares its cores with other busy processes is short of CPU without using all of one);
    elsewhere, its CPU time."""
    try:
        with open(SCHEDSTAT, "rb") as f:
            ran, waited = f.read().split()[:2]
        return (int(ran) + int(waited)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class Hold:
    """One run's place with the baton, shared by the run's tasks (the SDK runs a turn in a task
    of its own): `take` before its CPU, `give` before it waits."""

    __slots__ = ("baton", "grant", "tasks", "waiter")

    def __init__(self, baton: Baton) -> None:
        self.baton = baton
        self.grant = 0
        """The grant this run holds (0: none)."""
        self.waiter: asyncio.Future[None] | None = None
        """The run's place in the queue, while it has one."""
        self.tasks = 0
        """The run's tasks waiting there."""

    @property
    def holding(self) -> bool:
        return self.grant != 0 and self.grant == self.baton.current

    async def take(self) -> None:
        await self.baton.take(self)

    def give(self) -> None:
        self.baton.give(self)


current_hold: ContextVar[Hold | None] = ContextVar("agentq_hold", default=None)
"""The running job's Hold (None: no turns, or not in a job)."""


class Baton:
    """FIFO turns, one holder at a time, with a watchdog (see the module's docstring)."""

    def __init__(
        self,
        hold_s: float | None = None,
        rest_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = cpu_demand,
    ) -> None:
        self.hold_s, self.rest_s = hold_s, rest_s
        """(None: HOLD_S and REST_S, read when used.)"""
        self._clock, self._cpu_clock = clock, cpu_clock
        self._window, self._window_cpu = clock(), cpu_clock()
        self.busy = False
        """The CPU was all used over the last window: no turns."""
        self.current = 0
        """The grant holding the baton (0: free)."""
        self._last = 0
        self._waiters: deque[tuple[asyncio.Future[None], Hold]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._open_until = 0.0
        self.overruns = 0
        """Holders that kept the baton past hold_s (each opened it for rest_s)."""
        metrics.CPU_TURNS_OFF.set_function(self.turns_off)

    def turns_off(self) -> float:
        """1 while takes go without a turn (as of the last check of the CPU), for /metrics."""
        return float(self.busy or self._clock() < self._open_until)

    @property
    def waiting(self) -> int:
        """Runs waiting for their turn."""
        return sum(not f.done() for f, _ in self._waiters)

    def is_open(self) -> bool:
        """Takes go at once without a turn: after an overrun, or while the CPU is all used."""
        now = self._clock()
        if now - self._window >= WINDOW_S:
            cpu = self._cpu_clock()
            if now - self._window < 2 * WINDOW_S:  # (a longer one was idle: no verdict)
                self.busy = cpu - self._window_cpu >= BUSY_SHARE * (now - self._window)
            self._window, self._window_cpu = now, cpu
        return self.busy or (self._open_until > 0.0 and now < self._open_until)

    async def take(self, hold: Hold) -> None:
        """Wait for the hold's turn (at once when it holds the baton already, when the baton is
        free and no one waits, or while it is open). Tasks of one run share its place."""
        if hold.holding:
            return
        if hold.waiter is None:
            hold.grant = 0
            if self.is_open():
                return
            if self.current == 0:  # (then no one waits: a give or an overrun emptied the queue)
                self._grant(hold)
                return
            hold.waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((hold.waiter, hold))
        waiter = hold.waiter
        hold.tasks += 1
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            hold.tasks -= 1
            if hold.tasks == 0:  # the run's last task waiting there
                if waiter.done():
                    self.give(hold)  # granted as it was cancelled: the next run's turn
                else:
                    waiter.cancel()  # its place is skipped
                    hold.waiter = None
            raise
        hold.tasks -= 1

    def give(self, hold: Hold) -> None:
        """End the hold's turn, if it has one: the next waiter's starts."""
        if not hold.holding:
            hold.grant = 0
            return
        hold.grant = self.current = 0
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiters:
            waiter, nxt = self._waiters.popleft()
            if not waiter.done():  # (a cancelled waiter is skipped)
                self._grant(nxt)
                nxt.waiter = None
                waiter.set_result(None)
                return

    def _grant(self, hold: Hold) -> None:
        self._last += 1
        self.current = hold.grant = self._last
        loop = asyncio.get_running_loop()
        hold_s = HOLD_S if self.hold_s is None else self.hold_s
        self._watchdog = loop.call_at(loop.time() + hold_s, self._overrun, self._last)

    def _overrun(self, grant: int) -> None:
        """The holder kept the baton past hold_s: everyone goes, and turns rest for rest_s."""
        if grant != self.current:
            return
        self.overruns += 1
        metrics.CPU_TURN_OVERRUNS.inc()
        self.current = 0
        self._watchdog = None
        self._open_until = self._clock() + (REST_S if self.rest_s is None else self.rest_s)
        while self._waiters:
            waiter, nxt = self._waiters.popleft()
            if not waiter.done():
                nxt.grant, nxt.waiter = 0, None
                waiter.set_result(None)


async def given_while_waiting(request: Awaitable[T]) -> T:
    """Await the request, the running job's turn given away if it waits (I/O, a thread): one
    that answers at once keeps the turn, one that waits lets the next run go meanwhile."""
    hold = current_hold.get()
    if hold is None:
        return await request
    handle = asyncio.get_running_loop().call_soon(hold.give)  # runs only if the request waits
    try:
        result = await request
    except Exception:
        handle.cancel()
        await hold.take()
        raise
    except BaseException:  # cancelled: no turn to wait for
        handle.cancel()
        raise
    handle.cancel()
    await hold.take()
    return result


class _TurnGivingInvoker:
    """A FunctionTool's invoker, its calls awaited by given_while_waiting. Other attributes
    (argument preparation, the SDK's markers) are the wrapped invoker's; the SDK's checks for
    its own invoker class (`tool.__wrapped__`, approval of changed arguments) do not see it."""

    def __init__(self, invoke: Any) -> None:
        self._invoke = invoke

    async def __call__(self, ctx: Any, arguments: str) -> Any:
        return await given_while_waiting(self._invoke(ctx, arguments))

    def __agents_bind_function_tool__(self, tool: FunctionTool) -> _TurnGivingInvoker:
        """A copy of the tool (FunctionTool.__copy__) binds the wrapped invoker to itself."""
        bind = getattr(self._invoke, "__agents_bind_function_tool__", None)
        return _TurnGivingInvoker(bind(tool) if callable(bind) else self._invoke)

    def __getattr__(self, name: str) -> Any:
        invoke = self.__dict__.get("_invoke")  # (absent while copy or pickle rebuilds it)
        if invoke is None:
            raise AttributeError(name)
        return getattr(invoke, name)


def gives_turn_while_waiting(tool: FunctionTool) -> FunctionTool:
    """A copy of the tool whose calls give the running job's turn away if they wait (a tool
    already so is kept as is). The SDK's `tool.__wrapped__` is not available on it."""
    if isinstance(tool.on_invoke_tool, _TurnGivingInvoker):
        return tool
    wrapped = copy.copy(tool)
    wrapped.on_invoke_tool = _TurnGivingInvoker(wrapped.on_invoke_tool)
    return wrapped
