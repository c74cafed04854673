"""Circuit breakers per Router and per model, shared by every worker through Redis.

A Router that refuses connections, or a model that answers 5xx or times out, is an outage,
not the job's fault. Consecutive failures (no success in between, anywhere in the fleet) open
the dependency's breaker. While it is open, calls that need it wait, without spending the
job's tries and without holding a worker slot (their job is parked), and jobs with a fallback
move on to it at once. One worker at a time probes the dependency (the Router's model list, or
a one-token completion for a model) and closes the breaker when it answers; waiting calls then
go on within a probe interval. Past AGENTQ_OUTAGE_MAX_S the waiting jobs fail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import openai
import structlog

from producer import keys
from producer.breakers import (
    BreakerState,
    format_duration,
    model_field,
    read_breakers,
    router_field,
)
from producer.connect import Script
from producer.redact import safe_url

from . import metrics

if TYPE_CHECKING:
    from .provider import CallMeter, Route

log = structlog.get_logger("agentq.breaker")


@dataclass(frozen=True)
class Thresholds:
    failures: int
    """Consecutive failures (no success in between) that open the breaker..."""
    seconds: float
    """...over at least this long: at a high call rate, random failures never last that long
    without a success in between; an outage does..."""
    jobs: int
    """...of at least this many jobs: one job's poisoned request never pauses the fleet (a
    refused connection is never one job's doing: 1 for Routers)."""


ROUTER = Thresholds(failures=3, seconds=0.5, jobs=1)
MODEL = Thresholds(failures=5, seconds=1.0, jobs=2)
PROBE_EVERY_S = 1.0
POLL_S = 0.25
"""A held call looks at the breakers this often (one read per worker, shared by its calls)."""
REFRESH_S = 1.0
"""A worker with calls in flight re-reads the fleet's breakers at most this often."""
MAX_HOLDS = 3
"""A call that failed again right after each of this many breaker waits spends its tries
as usual (a request that breaks the Router itself must not wait for ever)."""
OUTAGE_KINDS = {"router_unreachable": "router", "router_error": "model", "timeout": "model"}


@dataclass
class Streak:
    """This worker's failures of one dependency since its last success (exact and free: kept
    in memory; only an opened breaker is written to Redis)."""

    start: float
    fails: int = 0
    jobs: set[str] = field(default_factory=set)

    def shared(self, kind: Thresholds) -> bool:
        """Failing for other jobs too: a sign of an outage, not of one job's request."""
        return len(self.jobs) >= kind.jobs and (kind.jobs > 1 or self.fails > 1)


class BreakerOpen(Exception):
    """A call was not sent: its dependency's breaker is open (the job moves to a fallback)."""

    def __init__(self, state: BreakerState) -> None:
        super().__init__(
            f"{state.what} is down (circuit breaker open since "
            f"{format_duration((time.time() * 1000 - state.opened_ms) / 1000)} ago): "
            f"{state.error}"
        )
        self.kind = "router_unreachable" if state.model is None else "router_error"


class OutageTooLong(Exception):
    """A call waited for its dependency longer than AGENTQ_OUTAGE_MAX_S."""

    def __init__(self, state: BreakerState, down_s: float, limit_s: float, url: str) -> None:
        what = f"Router at {url}" if state.model is None else f"{state.what} ({url})"
        super().__init__(
            f"{what} has been down for {format_duration(down_s)} "
            f"(AGENTQ_OUTAGE_MAX_S={limit_s:g}): {state.error} — once it is back, "
            "`agentq retry BATCH` runs these jobs again"
        )
        self.kind = "router_unreachable" if state.model is None else "router_error"


_OPEN = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw and cjson.decode(raw).open == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = {open = 1, opened = now, fails = tonumber(ARGV[3]), since = now - tonumber(ARGV[4]),
           error = ARGV[2], probe = 0}
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(s))
return 1
"""

_OK = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return {0, 0} end
redis.call('HDEL', KEYS[1], ARGV[1])
local s = cjson.decode(raw)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if s.open == 1 then return {1, now - s.opened} end
return {0, 0}
"""

_PROBE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local s = cjson.decode(raw)
if s.open == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if s.probe and s.probe > now then return -1 end
s.probe = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(s))
return 1
"""


Parker = Callable[[], AbstractAsyncContextManager[None]]


class Breakers:
    """This worker's view of the fleet's breakers, and the calls that wait on them."""

    def __init__(self, redis: Any, outage_max_s: float, probe_timeout_s: float = 10.0) -> None:
        self.redis = redis
        self.outage_max_s = outage_max_s
        self.probe_timeout_s = probe_timeout_s
        self.park: Parker = _no_parking
        """Set by the worker: frees the job's slot while it waits (see BatchStartWorker)."""
        self.view: dict[str, BreakerState] = {}
        self._fetched = 0.0
        self._offset_ms = 0.0
        """Redis clock minus local clock, from the last read."""
        self.streaks: dict[str, Streak] = {}
        self.clock: Callable[[], float] = time.monotonic
        """The streaks' clock (tests drive it)."""
        self._probers: dict[str, asyncio.Task[None]] = {}
        self._open = Script(redis, _OPEN)
        self._ok = Script(redis, _OK)
        self._probe = Script(redis, _PROBE)
        self._refreshing: asyncio.Task[None] | None = None

    def fields(self, route: str, model: str) -> tuple[str, str]:
        return router_field(route), model_field(route, model)

    async def refresh(self, max_age_s: float = REFRESH_S) -> None:
        """Re-read the breakers when the view is older than that (one read at a time)."""
        if time.monotonic() - self._fetched < max_age_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read())
        await asyncio.shield(self._refreshing)

    async def _read(self) -> None:
        try:
            states, now_ms = await read_breakers(self.redis)
        except Exception as exc:  # Redis away: keep the last view; the store reports it
            log.debug("breaker.read_failed", error=str(exc))
            self._fetched = time.monotonic()
            return
        self._fetched = time.monotonic()
        self._offset_ms = now_ms - time.time() * 1000
        for gone in self.view.keys() - states.keys():
            old = self.view[gone]
            if old.open:
                _gauge(old, 0)
        for s in states.values():
            _gauge(s, 1 if s.open else 0)
        self.view = states

    def open_state(self, *fields: str) -> BreakerState | None:
        for f in fields:
            s = self.view.get(f)
            if s is not None and s.open:
                return s
        return None

    def streak(self, field: str) -> Streak | None:
        return self.streaks.get(field)

    @staticmethod
    def thresholds(field: str) -> Thresholds:
        return ROUTER if field.startswith("router|") else MODEL

    async def failed(self, field: str, job_id: str, error: str) -> bool:
        """Count an outage failure; True when the breaker is (now) open."""
        now = self.clock()
        streak = self.streaks.setdefault(field, Streak(start=now))
        streak.fails += 1
        if len(streak.jobs) < 16:
            streak.jobs.add(job_id)
        kind = self.thresholds(field)
        if (
            streak.fails >= kind.failures
            and now - streak.start >= kind.seconds
            and len(streak.jobs) >= kind.jobs
        ):
            try:
                opened = await self._open(
                    keys=[keys.BREAKERS],
                    args=[field, error[:300], streak.fails, int((now - streak.start) * 1000)],
                )
            except Exception as exc:
                log.warning("breaker.write_failed", error=str(exc))
                return False
            if opened:
                log.warning(
                    "breaker.opened",
                    breaker=field,
                    failures=streak.fails,
                    jobs=len(streak.jobs),
                    over_s=round(now - streak.start, 1),
                    error=error[:300],
                )
            await self.refresh(0)
            return True
        await self.refresh(POLL_S)
        return self.open_state(field) is not None

    async def succeeded(self, *fields: str, began: float | None = None) -> None:
        """A call answered: its dependencies' streaks end, and open breakers close. A call that
        began before a streak did (it was in flight when the Router went down) proves nothing
        about now: it ends no streak."""
        for f in fields:
            streak = self.streaks.get(f)
            if streak is not None and (began is None or began >= streak.start):
                del self.streaks[f]
            if f not in self.view:
                continue
            try:
                was_open, open_ms = await self._ok(keys=[keys.BREAKERS], args=[f])
            except Exception as exc:
                log.warning("breaker.write_failed", error=str(exc))
                continue
            gone = self.view.pop(f, None)
            if was_open:
                log.warning("breaker.closed", breaker=f, down_s=round(open_ms / 1000, 1))
            if gone is not None:
                _gauge(gone, 0)

    async def wait(
        self,
        route: Route,
        model: str,
        meter: CallMeter | None,
        probe: Callable[[], Any],
    ) -> bool:
        """Return when neither the Router's nor the model's breaker is open (True if it
        waited). Raises BreakerOpen at once when the job can fall back, OutageTooLong past
        AGENTQ_OUTAGE_MAX_S."""
        fields = self.fields(route.name, model)
        if self.view or time.monotonic() - self._fetched >= REFRESH_S:
            await self.refresh()
        state = self.open_state(*fields)
        if state is None:
            return False
        if meter is not None and meter.can_fall_back:
            raise BreakerOpen(state)
        started = time.monotonic()
        log.warning(
            "breaker.wait",
            breaker=state.field,
            down_s=round(self._down_s(state), 1),
            error=state.error,
        )
        # The outage does not count against the job's own timeout.
        off_clock = meter.off_the_clock() if meter is not None else contextlib.nullcontext()
        with off_clock:
            async with self.park():
                while state is not None:
                    down_s = self._down_s(state)
                    if down_s > self.outage_max_s:
                        raise OutageTooLong(state, down_s, self.outage_max_s, safe_url(route.url))
                    self._ensure_prober(state, route, model, probe)
                    await asyncio.sleep(POLL_S)
                    await self.refresh(POLL_S)
                    state = self.open_state(*fields)
        log.info("breaker.resumed", waited_s=round(time.monotonic() - started, 1))
        return True

    def _ensure_prober(
        self, state: BreakerState, route: Route, model: str, probe: Callable[[], Any]
    ) -> None:
        """One probing task per breaker per worker, whatever the number of held calls."""
        task = self._probers.get(state.field)
        if task is None or task.done():
            self._probers[state.field] = asyncio.create_task(
                self._probe_once(state, route, model, probe)
            )

    async def _probe_once(
        self, state: BreakerState, route: Route, model: str, probe: Callable[[], Any]
    ) -> None:
        if await self._take_probe(state.field):
            await self._run_probe(state, route, model, probe)

    def _down_s(self, state: BreakerState) -> float:
        return (time.time() * 1000 + self._offset_ms - state.opened_ms) / 1000

    async def _take_probe(self, field: str) -> bool:
        try:
            got = await self._probe(keys=[keys.BREAKERS], args=[field, int(PROBE_EVERY_S * 1000)])
        except Exception:
            return False
        return bool(got == 1)

    async def _run_probe(
        self, state: BreakerState, route: Route, model: str, probe: Callable[[], Any]
    ) -> None:
        """Ask the dependency once; an answer (other than a 5xx) closes the breaker."""
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                if state.model is None:
                    await route.client.models.list()
                else:
                    await probe()
        except openai.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code in (408, 409):
                log.info("breaker.probe_failed", breaker=state.field, status=exc.status_code)
                return
        except (openai.APIError, TimeoutError, OSError) as exc:
            log.info("breaker.probe_failed", breaker=state.field, error=type(exc).__name__)
            return
        await self.succeeded(state.field)


@contextlib.asynccontextmanager
async def _no_parking() -> AsyncIterator[None]:
    yield


def _gauge(state: BreakerState, value: int) -> None:
    model = metrics.model_label(state.model) if state.model else ""  # "": the whole Router
    metrics.BREAKER_OPEN.labels(state.router, model).set(value)
