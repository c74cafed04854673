"""arq's Worker with a few changes (arq 0.28's internals: pinned, and guarded by
tests/test_arq_internals.py). It starts jobs a poll's worth at a time. arq checks and marks
each job in its own WATCH/MULTI transaction, awaited one after another; a worker that frees
fifty slots at once (agent runs of equal latency finish together) then spends tens of
milliseconds starting them while the Router waits. Here one script checks and marks as many
jobs as there are free slots, with arq's own rules: not in progress, due, still queued. And its
close() runs on_shutdown even when Redis is gone, so a worker restarted after a long outage does
not leak MCP subprocesses and HTTP sessions. And a run waiting out a Router outage can park:
it gives its slot back while it waits (see park()). And it does not poll: an idle worker
sleeps until a wake message (every script that enqueues publishes one), a slot frees, or the
next deferred job is due (see main()). And the take returns each job's payload, so a run skips
arq's transaction before it (see run_job()). And a run whose record is all that is left to
store gives its slot to the next job (see free_slot())."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

from arq import Worker
from arq.connections import create_pool, log_redis_info
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import args_to_string, ms_to_datetime, timestamp_ms, truncate
from arq.worker import Function, Retry, RetryJob, logger

from producer.connect import Script, bound_pool, stop_if_cancelled, unlock_pool

_TAKE = """
-- KEYS[1]: the queue. ARGV: now (ms), in-progress mark (ms), free slots, in-progress key
-- prefix, payload key prefix, most entries to examine.
-- Reads the queue's due entries from the front and takes up to `free` of them (not in
-- progress: marks them). Returns {more, next due score or false, then (id, score, payload) for
-- each job taken}: more is 1 when due entries were left behind (for want of slots, or past the
-- examine limit). A payload is false when it is not a string (gone, or another type): arq's own
-- run_job then reads it and deals with it.
local limit, most = tonumber(ARGV[3]), tonumber(ARGV[6])
local taken, examined, offset, more = {}, 0, 0, 0
local chunk = math.max(math.min(math.max(limit, 16), most), 1)
while more == 0 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT',
                         offset, chunk)
  for i = 1, #ids, 2 do
    if #taken >= 3 * limit or examined >= most then more = 1; break end
    examined = examined + 1
    local id = ids[i]
    if redis.call('EXISTS', ARGV[4] .. id) == 0 then
      redis.call('PSETEX', ARGV[4] .. id, ARGV[2], '1')
      local payload = redis.pcall('GET', ARGV[5] .. id)
      table.insert(taken, id)
      table.insert(taken, ids[i + 1])
      table.insert(taken, type(payload) == 'string' and payload or false)
    end
  end
  if #ids < 2 * chunk then break end
  offset = offset + chunk
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
table.insert(taken, 1, later[2] or false)
table.insert(taken, 1, more)
return taken
"""


CLOSE_WAIT_S = 3.0
"""How long closing waits for cancelled runs to release their jobs, and for each Redis call."""

SHUTDOWN_MARGIN_S = 10.0
"""After SIGTERM, the grace period plus this much is all a worker gets: then it exits even if
its event loop is stuck (leases lapse, and its jobs run again elsewhere)."""


PARK_FACTOR = 4

UNCOUNTED_TRIES = 1_000_000
"""max_tries at or above this: arq's try count is not kept (agentq counts runs itself)."""

SPACING_SHARE = 0.02
"""A busy worker's reads of the queue are spaced by at most this share of a run's typical
duration (and at most poll_delay): freed slots are gathered into one start without making a
short run wait long for its next job."""

RUN_S_WEIGHT = 0.05
"""Weight of the newest run in the running average of run durations."""

IDLE_CHECK_S = 2.0
"""A worker with free slots reads the queue this often even when it hears nothing: a wake lost
in a reconnect, a job whose arq in-progress mark lapsed, or one deferred by another worker
still starts."""


class BatchStartWorker(Worker):
    _take: Any = None
    parked = 0
    """Runs waiting for a circuit breaker, their slots given back."""
    _slot_debts = 0
    """Parked runs that ended without taking their slot back: their end releases none."""
    _freed: set[asyncio.Task[Any]]
    """Runs that gave their slot back before their end (free_slot): their end releases none."""
    claimed: set[str]
    """arq ids whose run claimed its job: the claim removed every arq key of that id, so
    arq's clean-up transaction after the run is skipped (see finish_job)."""
    stop_requested: threading.Event | None = None
    """Set by SIGTERM/SIGINT (when the worker handles signals): `agentq worker` exits instead
    of restarting the worker after a Redis outage."""

    def __init__(
        self,
        *args: Any,
        wake_channel: str | None = None,
        redis_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.redis_connections = redis_connections
        """At most this many Redis connections (None: one per command in flight)."""
        self.claimed = set()
        self._freed = set()
        self._payloads: dict[str, bytes] = {}
        """Payloads the take read, by arq id, for run_job (popped when it starts)."""
        if self.max_burst_jobs >= 0:
            raise ValueError("BatchStartWorker does not support max_burst_jobs")
        self.wake_channel = wake_channel
        """Pub/sub channel the enqueue scripts publish to; None: read every IDLE_CHECK_S."""
        self._nudge = asyncio.Event()
        """Set when something changed: a wake, a slot freed, a run ended."""
        self._more = True
        """The queue may hold jobs this worker could start now: read it when a slot is free."""
        self._next_due: float | None = None
        """Score (ms) of the first queued job not yet due at the last read."""
        self._ended = 0
        """Runs ended since the last iteration (their tasks are tidied up then)."""
        self._last_iteration = 0.0
        self.run_s: float | None = None
        """Running average of how long runs here take, start to end (None: none ended yet)."""

    def wake(self) -> None:
        """New jobs may be in the queue."""
        self._more = True
        self._nudge.set()

    async def main(self) -> None:
        """arq's main loop (same start-up and burst rules), but it waits for work instead of
        polling every poll_delay: a worker reads the queue when it was woken or a slot freed
        while jobs were left behind, at most every poll_delay; an idle one costs nothing."""
        if self._pool is None:
            self._pool = await create_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
            await bound_pool(self._pool, self.redis_connections)
        unlock_pool(self._pool)
        logger.info(
            "Starting worker for %d functions: %s", len(self.functions), ", ".join(self.functions)
        )
        await log_redis_info(self.pool, logger.info)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        listener = asyncio.create_task(self._listen_wake()) if self.wake_channel else None
        try:
            while True:
                await self._poll_iteration()
                if self.burst and await self.pool.zcard(self.queue_name) == 0:
                    await asyncio.gather(*self.tasks.values())
                    return
                await self._wait_for_work()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _poll_iteration(self) -> None:
        """arq's, but the queue is read only when there may be something to start."""
        self._last_iteration = self.loop.time()
        if self.allow_pick_jobs and self.job_counter < self.max_jobs and self._more:
            await self._read_queue()
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        self._ended = 0
        for job_id, t in list(self.tasks.items()):
            if t.done():
                del self.tasks[job_id]
                t.result()  # errors in run_job propagate, as in arq
        await self.heart_beat()

    async def _read_queue(self) -> None:
        """One script reads the queue's front, takes the due jobs that fit and says when the
        next one is due; then what it took starts. (arq reads queue_read_limit entries with
        their scores, then checks and marks each job in a transaction of its own.)"""
        self._more = False  # a wake heard while reading sets it again
        if self._take is None:
            self._take = Script(self.pool, _TAKE)
        reply = await self._take(
            keys=[self.queue_name],
            args=[
                timestamp_ms(),
                int(self.in_progress_timeout_s * 1000),
                self.max_jobs - self.job_counter,  # free slots (none: it takes none)
                in_progress_key_prefix,
                job_key_prefix,
                self.queue_read_limit,
            ],
        )
        more, later, taken = int(reply[0]), reply[1], reply[2:]
        self._next_due = float(later) if later is not None else None
        # Due jobs left for want of slots: read again when one frees. (Not "still full": runs
        # that end while these start leave it not full, and the rest waited IDLE_CHECK_S.)
        if more:
            self._more = True
        await self.start_taken(taken)

    async def _wait_for_work(self) -> None:
        """Until the next iteration has something to do: read the queue (a wake, a slot
        freed with jobs left behind, a deferred job due, or IDLE_CHECK_S with free slots),
        or tidy up ended runs. Iterations are spacing_s apart at least."""
        while True:
            free = self.allow_pick_jobs and self.job_counter < self.max_jobs
            if (free and self._more) or self._ended:
                break
            timeout = None
            if free:
                timeout = IDLE_CHECK_S
                if self._next_due is not None:
                    timeout = min(timeout, max(0.0, (self._next_due - timestamp_ms()) / 1000))
            self._nudge.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._nudge.wait()
            except TimeoutError:
                self._more = True
        wait = self._last_iteration + self.spacing_s - self.loop.time()
        if wait > 0:
            await asyncio.sleep(wait)

    @property
    def spacing_s(self) -> float:
        """The least time between two iterations: poll_delay, or SPACING_SHARE of a typical
        run when that is shorter (a 200 ms run waits ~4 ms for its slot's next job, not 20)."""
        if self.run_s is None:
            return self.poll_delay_s
        return min(self.poll_delay_s, SPACING_SHARE * self.run_s)

    def _run_ended(self, started: float, task: object = None) -> None:
        took = self.loop.time() - started
        self.run_s = took if self.run_s is None else self.run_s + RUN_S_WEIGHT * (took - self.run_s)
        if task in self._freed:  # its slot is already back
            self._freed.discard(task)
            self._ended += 1
            self._nudge.set()
        else:
            self._release_sem_dec_counter_on_complete()

    def free_slot(self, task: asyncio.Task[Any]) -> None:
        """The run of this task is done but for storing its record: its slot goes to the next
        job now, not a Redis round trip later (a slot's cycle at 200 ms of Router latency was
        2% store). The task stays in `tasks`, so a drain still waits for the store. At most
        max_jobs runs store without a slot: past that (Redis slow, or away and the stores
        waiting it out) they keep theirs, and the worker takes no more jobs than it can store."""
        if task in self._freed or task.done() or len(self._freed) >= self.max_jobs:
            return
        self._freed.add(task)
        self._give_slot_back()

    async def _listen_wake(self) -> None:
        """Hear the enqueue scripts' wake messages. A (re)subscription counts as one: pub/sub
        drops what is published while the connection is away."""
        assert self.wake_channel is not None
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(self.wake_channel)
                while True:
                    message = await pubsub.get_message(timeout=IDLE_CHECK_S)
                    stop_if_cancelled()
                    if message is not None:
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the client reconnects; reads go on meanwhile
                logger.debug("wake channel lost: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def take_signals(self, stop: threading.Event) -> None:
        """Handle SIGTERM and SIGINT with Python's signal module instead of the event loop's:
        the handler runs even while the loop is blocked, so the watchdog always starts."""
        self.stop_requested = stop
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, ValueError):
                self.loop.remove_signal_handler(sig)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        assert self.stop_requested is not None
        if self.stop_requested.is_set():
            # os.write, not sys.stderr: a handler must not re-enter a buffered write
            os.write(2, f"agentq: second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        self.stop_requested.set()
        limit = float(self._job_completion_wait or 0) + SHUTDOWN_MARGIN_S
        watchdog = threading.Timer(limit, _hard_exit, args=(limit,))
        watchdog.daemon = True
        watchdog.start()
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to drain
            self.loop.call_soon_threadsafe(
                self.handle_sig_wait_for_completion, signal.Signals(signum)
            )

    async def start_taken(self, taken: list[Any]) -> None:
        """Start the jobs the take script marked: (arq id, score, payload) triples."""
        for i in range(0, len(taken), 3):
            job_id = taken[i].decode() if isinstance(taken[i], bytes) else str(taken[i])
            if taken[i + 2] is not None:
                self._payloads[job_id] = taken[i + 2]
            await self.sem.acquire()  # free slots were counted: this does not wait
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, int(float(taken[i + 1]))))
            task.add_done_callback(functools.partial(self._run_ended, self.loop.time()))
            self.tasks[job_id] = task

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's run_job for a job taken with its payload, less arq's transaction before the run
        (a read of the payload, the take already had it; the try count, which agentq does not
        use: max_tries is off and AGENTQ_MAX_RUNS counts runs): 5 commands and a round trip a
        job. The run, its timeout, Retry(defer), "cancelled, will be run again" and the
        clean-up after it are arq's. No "job_try" in the job's ctx; "agentq_free_slot" in it
        (see free_slot). Anything this path does not cover (no payload, arq features agentq does
        not use) goes to arq's own."""
        payload = self._payloads.pop(job_id, None)
        if payload is None or self.allow_abort_jobs or self._job_hooks:
            return await super().run_job(job_id, score)
        try:
            name, args, kwargs, _, enqueued_ms = deserialize_job_raw(
                payload, deserializer=self.job_deserializer
            )
        except SerializationError:
            return await super().run_job(job_id, score)
        function = self.functions.get(name)
        if not isinstance(function, Function) or not self._plain(function):
            return await super().run_job(job_id, score)
        ref = f"{job_id}:{name}"
        ctx = {
            **self.ctx,
            "job_id": job_id,
            "enqueue_time": ms_to_datetime(enqueued_ms),
            "score": score,
        }
        current = asyncio.current_task()
        if current is not None and self.tasks.get(job_id) is current:
            ctx["agentq_free_slot"] = functools.partial(self.free_slot, current)
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        start_ms = timestamp_ms()
        chatty = logger.isEnabledFor(logging.INFO)  # arq's job lines: off unless asked for
        if chatty:
            late = start_ms - score
            extra = f" delayed={late / 1000:0.2f}s" if late > 1200 else ""
            s = args_to_string(args, kwargs)
            logger.info("%6.2fs → %s(%s)%s", (start_ms - enqueued_ms) / 1000, ref, s, extra)
        finish, incr_score = False, None
        try:
            coroutine = function.coroutine(ctx, *args, **kwargs)
            self.job_tasks[job_id] = task = self.loop.create_task(coroutine)
            try:
                result = await asyncio.wait_for(task, timeout_s)
            finally:
                del self.job_tasks[job_id]
        except (Exception, asyncio.CancelledError) as e:
            t = (timestamp_ms() - start_ms) / 1000
            if self.retry_jobs and isinstance(e, Retry):
                incr_score = e.defer_score
                logger.info(
                    "%6.2fs ↻ %s retrying job in %0.2fs", t, ref, (e.defer_score or 0) / 1000
                )
                if e.defer_score:
                    incr_score = e.defer_score + (timestamp_ms() - score)
                self.jobs_retried += 1
            elif self.retry_jobs and isinstance(e, (asyncio.CancelledError, RetryJob)):
                logger.info("%6.2fs ↻ %s cancelled, will be run again", t, ref)
                self.jobs_retried += 1
            else:
                exc_extra = getattr(e, "extra", None)
                if callable(exc_extra):
                    exc_extra = exc_extra()
                logger.exception(
                    "%6.2fs ! %s failed, %s: %s",
                    t,
                    ref,
                    e.__class__.__name__,
                    e,
                    extra={"extra": exc_extra},
                )
                finish = True
                self.jobs_failed += 1
        else:
            finish = True
            self.jobs_complete += 1
            if chatty:
                shown = "" if result is None or not self.log_results else truncate(repr(result))
                t = (timestamp_ms() - start_ms) / 1000
                logger.info("%6.2fs ← %s ● %s", t, ref, shown)
        if finish and job_id in self.claimed:  # finish_job would skip it: spare the shield
            self.claimed.discard(job_id)
            return
        await asyncio.shield(self.finish_job(job_id, finish, None, 0, False, incr_score, None))

    @property
    def _job_hooks(self) -> bool:
        return bool(self.on_job_start or self.on_job_end or self.after_job_end)

    def _plain(self, function: Function) -> bool:
        """A function whose runs the lean run_job covers: no result kept, tries not counted."""
        tries = self.max_tries if function.max_tries is None else function.max_tries
        forever = (
            self.keep_result_forever
            if function.keep_result_forever is None
            else function.keep_result_forever
        )
        keep = self.keep_result_s if function.keep_result_s is None else function.keep_result_s
        return tries >= UNCOUNTED_TRIES and not forever and not keep

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """arq's, skipped for a finished run whose claim already removed the id's keys (5
        commands a job). Anything else (a Retry, a shutdown, a run that never claimed) goes
        through arq's own."""
        if job_id in self.claimed:
            self.claimed.discard(job_id)
            if finish and result_data is None and keep_in_progress is None:
                return
        await super().finish_job(
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
        )

    @contextlib.asynccontextmanager
    async def park(self) -> AsyncIterator[None]:
        """While a run waits out an outage, its slot goes to other jobs (other models' jobs
        keep running); it takes a slot back before it goes on. At most PARK_FACTOR times
        max_jobs runs park; past that a waiting run keeps its slot."""
        if self.parked >= PARK_FACTOR * self.max_jobs:
            yield
            return
        self.parked += 1
        self.job_counter -= 1
        self.sem.release()
        self._nudge.set()
        try:
            yield
        finally:
            self.parked -= 1
            self.job_counter += 1
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # cancelled, or shutting down: it ends
                self._slot_debts += 1  # without its slot, so its end must release none
            else:
                try:
                    await self.sem.acquire()
                except asyncio.CancelledError:
                    self._slot_debts += 1
                    raise

    def _release_sem_dec_counter_on_complete(self) -> None:
        self._give_slot_back()
        self._ended += 1

    def _give_slot_back(self) -> None:
        self.job_counter -= 1
        self._nudge.set()
        if self._slot_debts:
            self._slot_debts -= 1
        else:
            self.sem.release()

    async def close(self) -> None:
        """arq's close, but Redis failing here (the reason we are closing, often) does not skip
        on_shutdown or the pool's close."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        # Runs were cancelled and give their jobs back; with Redis gone, that must not hold the
        # exit for the client's minute of retries (their leases lapse instead).
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=CLOSE_WAIT_S)
        try:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self.pool.delete(self.health_check_key)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
        finally:
            with contextlib.suppress(Exception):
                await self.pool.close(close_connection_pool=True)
            self._pool = None


def _hard_exit(limit: float) -> None:
    msg = (
        f"agentq: the worker did not stop within {limit:g} s of SIGTERM (a job blocked its "
        "event loop?); exiting now — its unfinished jobs run again elsewhere\n"
    )
    os.write(2, msg.encode())
    os._exit(70)
