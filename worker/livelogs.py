"""Job log events published as they happen, for `agentq logs --follow`.

Each event a job keeps (worker/logs.py keep_for_job: already redacted) is also put in a small
per-worker buffer; one flush ~FLUSH_S later sends the buffer in one pipeline, one PUBLISH per
batch (keys.batch_logs) carrying a JSON list of {"job_id", "custom_id", "i", "event"}, where
"i" is the event's index in the job's log (the record keeps the same list, so a follower
dedupes by (job id, run, i)). A job never waits for it: when Redis is slow or down, or the
buffer is full, events are dropped and counted (they are still in the record). A batch nobody
follows gets nothing: the flush asks Redis who listens (PUBSUB NUMSUB) at most every
FOLLOWERS_TTL_S per batch, so a follower that starts meanwhile misses up to that much of the
running jobs' events live and prints them from their records (it handles such gaps anyway)."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections import deque
from typing import Any

import structlog
from redis.exceptions import RedisError

from producer import keys

from . import metrics

log = structlog.get_logger("agentq.livelogs")

FLUSH_S = 0.05
"""Events of this long are sent together."""
MAX_BUFFERED = 10_000
"""Events waiting for a flush; more are dropped (bounded memory while Redis is away)."""
SEND_TIMEOUT_S = 1.0
"""A flush slower than this is given up (its events dropped)."""
WARN_EVERY_S = 60.0
FOLLOWERS_TTL_S = 1.0
"""How long a batch's "followed or not" stays known before the flush asks again."""
FOLLOWERS_KEPT = 10_000
"""Batches whose followed-or-not is remembered (the oldest are forgotten first)."""


class LiveLogs:
    """The per-worker publisher. add() is cheap and never blocks: it may be called from any
    thread (a plugin tool logging from a worker thread); the flush runs on the worker's loop."""

    def __init__(self, redis: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.redis = redis
        self.loop = loop or asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.buffer: deque[tuple[str, str, str, int, dict[str, Any]]] = deque()
        self.dropped = 0
        self.sent = 0
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._warned = -WARN_EVERY_S
        self._counted = 0
        self._why = ""
        self._empty = contextvars.Context()  # the flush must not run in a job's context
        self._followed: dict[str, tuple[bool, float]] = {}
        """batch id -> (anyone subscribed, when Redis said so)."""
        self.unfollowed = 0
        """Events not sent because nobody followed their batch (not drops)."""

    def add(
        self, batch_id: str, job_id: str, custom_id: str, i: int, event: dict[str, Any]
    ) -> None:
        if len(self.buffer) >= MAX_BUFFERED:
            self.dropped += 1  # counted and told by the flush (not in this job's log)
            return
        self.buffer.append((batch_id, job_id, custom_id, i, event))
        if not self._scheduled:
            self._scheduled = True
            if threading.get_ident() == self._thread:
                self.loop.call_soon(self._start, context=self._empty)
            else:
                self.loop.call_soon_threadsafe(self._start, context=self._empty)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._flush_soon(), context=self._empty)

    async def _flush_soon(self) -> None:
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                await self.flush()
                if not self.buffer:
                    return
        finally:
            self._scheduled = False
            if self.buffer:  # added (from a thread) while this task was ending
                self._scheduled = True
                self.loop.call_soon(self._start, context=self._empty)

    async def flush(self) -> None:
        """Send what is buffered now to the batches someone follows; on any Redis trouble,
        drop it and count."""
        n = len(self.buffer)
        by_batch: dict[str, list[tuple[str, str, int, dict[str, Any]]]] = {}
        for _ in range(n):
            batch_id, job_id, custom_id, i, event = self.buffer.popleft()
            by_batch.setdefault(batch_id, []).append((job_id, custom_id, i, event))
        if by_batch:
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    followed = await self._followers(list(by_batch))
                    skipped = sum(len(by_batch.pop(b)) for b in list(by_batch) if not followed[b])
                    self.unfollowed += skipped
                    if by_batch:
                        async with self.redis.pipeline(transaction=False) as pipe:
                            for batch_id, entries in by_batch.items():
                                pipe.publish(keys.batch_logs(batch_id), _message(entries))
                            await pipe.execute()
                self.sent += n - skipped
            except (RedisError, OSError, TimeoutError) as exc:
                self.dropped += sum(map(len, by_batch.values()))
                self._why = repr(exc)
        self._tell_drops()

    async def _followers(self, batch_ids: list[str]) -> dict[str, bool]:
        """Whether anyone follows each batch: remembered for FOLLOWERS_TTL_S, then asked of
        Redis again (one PUBSUB NUMSUB for every batch due)."""
        now = time.monotonic()
        known = {b: self._followed.get(b) for b in batch_ids}
        due = [b for b, seen in known.items() if seen is None or now - seen[1] >= FOLLOWERS_TTL_S]
        if due:
            counts = await self.redis.pubsub_numsub(*(keys.batch_logs(b) for b in due))
            for b, (_, count) in zip(due, counts, strict=True):
                self._followed.pop(b, None)  # re-inserted last: the oldest go first
                known[b] = self._followed[b] = (int(count) > 0, now)
            while len(self._followed) > FOLLOWERS_KEPT:
                del self._followed[next(iter(self._followed))]
        return {b: bool(seen and seen[0]) for b, seen in known.items()}

    def _tell_drops(self) -> None:
        """Count drops in the metric, and warn at most once a WARN_EVERY_S (this runs in the
        flush task, outside any job: the warning is the worker's own)."""
        new = self.dropped - self._counted
        if not new:
            return
        self._counted = self.dropped
        metrics.LIVE_LOGS_DROPPED.inc(new)
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning(
                "logs.live_dropped",
                dropped_total=self.dropped,
                reason=self._why or f"more than {MAX_BUFFERED} events waiting",
                note="`agentq logs --follow` prints these events when their jobs end",
            )
        self._why = ""

    async def close(self) -> None:
        """Send what is left (shutting down), then stop."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()


def _message(entries: list[tuple[str, str, int, dict[str, Any]]]) -> str:
    """One batch's entries as the JSON list a follower reads."""
    return json.dumps(
        [{"job_id": j, "custom_id": c, "i": i, "event": e} for j, c, i, e in entries],
        default=repr,
    )
