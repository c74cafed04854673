"""The Python API: submit batches, read their status, wait for them, stream results, cancel."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from . import keys
from .checks import Check, job_checker, stored_size_problem
from .connect import connect
from .jobfile import JobFileError, LineError, iter_jobs, validate_file
from .models import (
    AgentJob,
    BatchStatus,
    Priority,
    ResultRecord,
    Status,
    check_batch_id,
    new_batch_id,
)
from .settings import Settings, load_settings
from .store import Store

CHUNK = 1000
"""Jobs per pipelined round trip on submit."""


class BatchNotFound(LookupError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(
            f"batch {batch_id!r} not found (expired, or never submitted to this Redis)"
        )


@dataclass(frozen=True)
class Batch:
    id: str
    jobs: int
    """Jobs in what was submitted."""
    enqueued: int
    """Of those, how many were new (the rest were already in the batch: idempotent)."""


def _chunks(jobs: Iterable[AgentJob], n: int) -> Iterator[list[AgentJob]]:
    it = iter(jobs)
    while chunk := list(islice(it, n)):
        yield chunk


READ_GAP_S = 0.01
"""`wait` reads the counters at most this often: a busy batch's notifications (two a job) are
read in bursts, not one counter read each."""


async def _next_burst(pubsub: Any, last_read: float) -> None:
    """Wait for a change notification (or a second: pub/sub drops what nobody heard, e.g.
    across a reconnect), then drain the burst of notifications that came with it. A read that
    would follow the last one within READ_GAP_S waits for the rest of the gap first."""
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
    gap = READ_GAP_S - (time.monotonic() - last_read)
    if msg is not None and gap > 0:
        await asyncio.sleep(gap)
    deadline = time.monotonic() + 0.05
    while msg is not None and time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)


class Producer:
    """Client side of agentq. `async with Producer.from_env() as p: ...`"""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis: Any = redis  # redis-py 5's async reply types are unions with sync ones
        self.settings = settings
        self.store = Store(redis, queue=settings.queue, result_ttl_s=settings.result_ttl_s)

    @classmethod
    def from_env(cls, settings: Settings | None = None) -> Producer:
        settings = settings or load_settings()
        return cls(connect(settings), settings)

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.redis.aclose()

    # -- submit ---------------------------------------------------------------------------

    async def submit(
        self,
        jobs: Iterable[AgentJob],
        *,
        batch_id: str | None = None,
        priority: Priority | str = Priority.NORMAL,
    ) -> Batch:
        """Enqueue jobs as one batch. Duplicate custom_ids are rejected before anything is
        enqueued; submitting the same batch id and custom_id again enqueues it once. Active
        batches share the workers in turns; `priority` ("high", "normal", "low") moves this
        batch ahead or behind (see PRIORITY_ROUNDS in producer/store.py)."""
        priority = _priority(priority)
        jobs = jobs if isinstance(jobs, Sequence) else list(jobs)
        check = await self.checker()
        seen: dict[str, int] = {}
        errors = []
        for n, job in enumerate(jobs, 1):
            reason = stored_size_problem(job, self.settings.max_line_bytes) or check(job)
            if reason is None and job.custom_id in seen:
                reason = (
                    f"duplicate custom_id {job.custom_id!r} (first at job {seen[job.custom_id]})"
                )
            if reason:
                errors.append(LineError(n, reason, kind="job"))
            seen.setdefault(job.custom_id, n)
        if errors:
            raise JobFileError("jobs", errors[:50], len(errors))
        return await self._enqueue(jobs, len(jobs), batch_id or new_batch_id(), priority)

    async def submit_file(
        self,
        path: str | Path,
        *,
        batch_id: str | None = None,
        on_batch_id: Callable[[str], None] | None = None,
        priority: Priority | str = Priority.NORMAL,
    ) -> Batch:
        """Validate a JSONL job file (all of it, streamed), then enqueue it (streamed again).
        `on_batch_id` hears the batch id before the first job is enqueued: if submit fails
        halfway, submitting the same file with that batch id completes the batch (idempotent)."""
        priority = _priority(priority)
        batch_id = check_batch_id(batch_id or new_batch_id())  # before reading a large file
        limit = self.settings.max_line_bytes
        count = validate_file(path, await self.checker(), max_line_bytes=limit)
        if on_batch_id is not None:
            on_batch_id(batch_id)
        return await self._enqueue(iter_jobs(path, limit), count, batch_id, priority)

    async def checker(self) -> Check:
        """Checks against the size limit and the live workers' tools and agent profiles."""
        return job_checker(self.settings.max_input_chars, await self.workers())

    async def _enqueue(
        self, jobs: Iterable[AgentJob], count: int, batch_id: str, priority: Priority
    ) -> Batch:
        check_batch_id(batch_id)
        new = 0
        # One chunk in flight while the next is read and packed: Redis and the producer work
        # at the same time (at most two chunks held, so memory stays flat).
        sending: asyncio.Task[int] | None = None
        try:
            for chunk in _chunks(jobs, CHUNK):
                task = asyncio.create_task(self.store.submit_chunk(batch_id, chunk, priority))
                if sending is not None:
                    new += await sending
                sending = task
            if sending is not None:
                new += await sending
                sending = None
        finally:
            if sending is not None:
                sending.cancel()
        await self.store.seal(batch_id)
        if batch_id in self.store.revived:
            await self.store.keep_records(batch_id)
        return Batch(id=batch_id, jobs=count, enqueued=new)

    # -- read -----------------------------------------------------------------------------

    async def status(self, batch_id: str) -> BatchStatus:
        check_batch_id(batch_id, existing=True)
        st = await self.store.batch_status(batch_id)
        if st is None:
            raise BatchNotFound(batch_id)
        return st

    async def wait(
        self,
        batch_id: str,
        *,
        timeout: float | None = None,
        on_progress: Callable[[BatchStatus], None] | None = None,
    ) -> BatchStatus:
        """Until every job of the batch is final. Subscribes first, then reads the counters,
        then re-reads them after each burst of change notifications (never a poll per job).
        Raises TimeoutError after `timeout` seconds."""
        pubsub = self.redis.pubsub()
        try:
            async with asyncio.timeout(timeout):
                await pubsub.subscribe(keys.batch_events(batch_id))
                while True:
                    try:
                        st = await self.status(batch_id)
                        last_read = time.monotonic()
                        if on_progress:
                            on_progress(st)
                        if st.finished:
                            return st
                        await _next_burst(pubsub, last_read)
                    except RedisConnectionError:
                        # Redis restarting: the client's own retries ran out; keep waiting.
                        # pub/sub re-subscribes when it reconnects.
                        await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()

    async def results(
        self, batch_id: str, *, statuses: Iterable[Status] | None = None
    ) -> AsyncIterator[ResultRecord]:
        """Result records in input order, streamed a chunk at a time; optionally only some
        statuses (e.g. {Status.FAILED})."""
        await self.status(batch_id)
        wanted = set(statuses) if statuses is not None else None
        async for ids in self.store.job_ids(batch_id):
            for record in await self.store.records(batch_id, ids):
                if wanted is None or record.status in wanted:
                    yield record

    async def cancel(self, batch_id: str) -> int:
        """Cancel every job of the batch not final yet; returns how many were cancelled.
        The batch is flagged first, so even if this is interrupted no job of it runs on."""
        await self.status(batch_id)
        await self.store.flag_cancelled(batch_id)
        n = 0
        async for ids in self.store.job_ids(batch_id):
            n += await self.store.cancel(batch_id, ids)
        while await self.store.sweep():  # re-arm the records' TTLs now, not at the next worker
            pass
        return n

    async def retry(self, batch_id: str, *, failed_only: bool = False) -> int:
        """Re-enqueue failed (and, unless failed_only, cancelled) jobs as new attempts of the
        same custom_id; returns how many."""
        await self.status(batch_id)
        statuses = [Status.FAILED] if failed_only else [Status.FAILED, Status.CANCELLED]
        n = 0
        async for ids in self.store.job_ids(batch_id):
            n += await self.store.retry(batch_id, ids, statuses)
        if n:  # the batch is active again: keep the records of the jobs not retried too
            await self.store.keep_records(batch_id)
        return n

    async def workers(self) -> dict[str, dict[str, Any]]:
        """Live workers (heartbeat in the last 15 s) with their load and registry."""
        raw = await self.redis.hgetall(keys.WORKERS)
        now = time.time()
        out = {}
        for k, v in raw.items():
            beat = json.loads(v)
            if now - float(beat.get("seen_at", 0)) < 15:
                out[k.decode() if isinstance(k, bytes) else k] = beat
        return out


def _priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise ValueError(
            f"priority must be one of high, normal, low (got {value!r}); nothing was enqueued"
        ) from None
