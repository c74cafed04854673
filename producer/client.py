"""The Python API: submit batches, read their status, wait for them, stream results, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing
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
    JobMetadata,
    Priority,
    ResultRecord,
    Status,
    check_batch_id,
    job_id_for,
    new_batch_id,
)
from .settings import Settings, load_settings
from .store import Store

CHUNK = 1000
"""Jobs per pipelined round trip on submit."""


class JobNotFound(LookupError):
    def __init__(self, batch_id: str, ref: str) -> None:
        super().__init__(
            f"no job {ref!r} in batch {batch_id!r}: give its custom_id or its job id "
            f"(`agentq results {batch_id}` lists them)"
        )


@dataclass(frozen=True)
class BatchInfo:
    """A batch as `agentq batches` lists it."""

    status: BatchStatus
    active: bool
    """It has queued or running jobs."""


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


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


async def _put(queue: asyncio.Queue[Any], item: Any, sending: asyncio.Task[int]) -> None:
    """Queue the item for the sender, or raise the sender's error if it stopped."""
    if sending.done():
        await sending  # it stopped with an error: raise it
    put = asyncio.ensure_future(queue.put(item))
    try:
        await asyncio.wait([put, sending], return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not put.done():  # the sender stopped, or this submit is being cancelled
            put.cancel()
    if not put.done() or put.cancelled():
        await sending  # it stopped with an error: raise it
        raise RuntimeError("the sender stopped early")  # unreachable: it ends only on None


def _chunks(jobs: Iterable[AgentJob], n: int) -> Iterator[list[AgentJob]]:
    it = iter(jobs)
    while chunk := list(islice(it, n)):
        yield chunk


TRAILING_S = (keys.PROGRESS_THROTTLE_MS + 5) / 1000
"""After a progress message, `wait` reads the counters once more this much later unless another
message came: a change inside the publisher's throttle window sends none of its own."""

SAFETY_S = 2.0
"""With nothing heard, `wait` still re-reads the counters this often: pub/sub drops what
nobody heard (across a reconnect, say)."""


class Producer:
    """Client side of agentq. `async with Producer.from_env() as p: ...`"""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis: Any = redis  # redis-py 5's async reply types are unions with sync ones
        self.settings = settings
        self.store = Store(redis, queue=settings.queue, result_ttl_s=settings.result_ttl_s)
        self._stores: dict[str, Store] = {}
        """Stores of other queues, for batches submitted to them (see _store_of)."""

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
        tenant: str | None = None,
    ) -> Batch:
        """Enqueue jobs as one batch. Duplicate custom_ids are rejected before anything is
        enqueued; submitting the same batch id and custom_id again enqueues it once. Active
        batches share the workers in turns; `priority` ("high", "normal", "low") moves this
        batch ahead or behind (see PRIORITY_ROUNDS in producer/store.py); `tenant` is the
        metadata.tenant of every job that names none (tenants share above batches)."""
        priority = _priority(priority)
        tenant = _tenant(tenant)
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
        return await self._enqueue(jobs, len(jobs), batch_id or new_batch_id(), priority, tenant)

    async def submit_file(
        self,
        path: str | Path,
        *,
        batch_id: str | None = None,
        on_batch_id: Callable[[str], None] | None = None,
        priority: Priority | str = Priority.NORMAL,
        tenant: str | None = None,
    ) -> Batch:
        """Validate a JSONL job file (all of it, streamed), then enqueue it (streamed again).
        `on_batch_id` hears the batch id before the first job is enqueued: if submit fails
        halfway, submitting the same file with that batch id completes the batch (idempotent).
        `tenant` as in submit()."""
        priority = _priority(priority)
        tenant = _tenant(tenant)
        batch_id = check_batch_id(batch_id or new_batch_id())  # before reading a large file
        limit = self.settings.max_line_bytes
        count = validate_file(path, await self.checker(), max_line_bytes=limit)
        if on_batch_id is not None:
            on_batch_id(batch_id)
        return await self._enqueue(iter_jobs(path, limit), count, batch_id, priority, tenant)

    async def checker(self) -> Check:
        """Checks against the size limit and the tools and agent profiles of the live workers
        of this queue (only they run its jobs)."""
        workers = await self.workers(queue=self.settings.queue)
        return job_checker(self.settings.max_input_chars, workers)

    async def _enqueue(
        self,
        jobs: Iterable[AgentJob],
        count: int,
        batch_id: str,
        priority: Priority,
        tenant: str | None = None,
    ) -> Batch:
        check_batch_id(batch_id)
        if tenant is not None:
            jobs = (_with_tenant(job, tenant) for job in jobs)
        new = await self._send_in_order(batch_id, _chunks(jobs, CHUNK), priority)
        await self.store.seal(batch_id)
        if batch_id in self.store.revived:
            await self.store.keep_records(batch_id)
        return Batch(id=batch_id, jobs=count, enqueued=new)

    async def _send_in_order(
        self, batch_id: str, chunks: Iterable[list[AgentJob]], priority: Priority
    ) -> int:
        """Send each chunk's submit script, in input order, while the next chunks are read
        and packed: returns how many jobs were new.

        The order: each script appends its jobs to the batch's order, so the chunks must reach
        Redis one after the other. One sender sends them through one connection of its own,
        a chunk once the last one's reply is in, and stops at the first error. The overlap:
        this coroutine reads and packs the next chunk (the CPU-heavy part) meanwhile and
        waits only when one packed chunk is already queued, so a reply finds the next chunk
        ready and it goes out at once (the held connection skips the pool's check, which
        waits for the event loop's next turn). At most three packed chunks are held (one
        sent, one queued, one being queued): memory stays flat."""
        queue: asyncio.Queue[list[str | int] | None] = asyncio.Queue(maxsize=1)

        async def sender(link: Redis) -> int:
            sent = 0
            while (args := await queue.get()) is not None:
                sent += await self.store.send_chunk(batch_id, args, client=link)
            return sent

        async with self.redis.client() as link:
            sending = asyncio.create_task(sender(link))
            try:
                for chunk in chunks:
                    await _put(queue, self.store.pack_chunk(batch_id, chunk, priority), sending)
                await _put(queue, None, sending)
                return await sending
            finally:
                sending.cancel()  # a no-op once it has ended
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await sending  # an error already raised, or hidden by this one

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
        then re-reads them when told the batch may have finished (no job left queued or
        running, or it was just sealed), and, for `on_progress`, when its counters changed
        (at most one message per batch per 20 ms, whatever the number of jobs).
        Raises TimeoutError after `timeout` seconds."""
        pubsub = self.redis.pubsub()
        channels = [keys.batch_settled(batch_id)]
        if on_progress:
            channels.append(keys.batch_progress(batch_id))
        try:
            async with asyncio.timeout(timeout):
                await pubsub.subscribe(*channels)
                trailing = False
                while True:
                    try:
                        st = await self.status(batch_id)
                        if on_progress:
                            on_progress(st)
                        if st.finished:
                            return st
                        msg = await pubsub.get_message(
                            ignore_subscribe_messages=True,
                            timeout=TRAILING_S if trailing else SAFETY_S,
                        )
                        trailing = msg is not None
                    except RedisConnectionError:
                        # Redis restarting: the client's own retries ran out; keep waiting.
                        # pub/sub re-subscribes when it reconnects.
                        await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()

    async def results(
        self, batch_id: str, *, statuses: Iterable[Status] | None = None, follow: bool = False
    ) -> AsyncGenerator[ResultRecord, None]:
        """Result records in input order, streamed a chunk at a time; optionally only some
        statuses (e.g. {Status.FAILED}). With `follow`, final records as jobs finish instead
        (see `follow`), until the batch is done."""
        wanted = set(statuses) if statuses is not None else None
        if follow:
            async with aclosing(self.follow(batch_id)) as followed:
                async for record in followed:
                    if wanted is None or record.status in wanted:
                        yield record
            return
        await self.status(batch_id)
        async for ids in self.store.job_ids(batch_id):
            for record in await self.store.records(batch_id, ids):
                if wanted is None or record.status in wanted:
                    yield record

    def follow(self, batch_id: str) -> AsyncGenerator[ResultRecord, None]:
        """Final records as jobs finish, in the order they finished, until the batch is done
        (producer/follow.py says how)."""
        from .follow import follow

        return follow(self, batch_id)

    async def job(self, batch_id: str, ref: str) -> ResultRecord:
        """One job's record, by its custom_id or its job id."""
        await self.status(batch_id)
        for job_id in (job_id_for(batch_id, ref), ref):
            owner, _ = await self.store.job_owner(job_id)
            if owner == batch_id:
                (record,) = await self.store.records(batch_id, [job_id])
                return record
        raise JobNotFound(batch_id, ref)

    async def job_input(self, job_id: str) -> str | None:
        """The input a job was given, as text (chat messages as JSON), for a person to read."""
        spec = _text(await self.redis.hget(keys.job(job_id), "spec"))
        if spec is None:
            return None
        try:
            value = json.loads(spec).get("input")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    async def batches(self, *, active: bool | None = None, limit: int = 20) -> list[BatchInfo]:
        """Batches newest first (by submit time), with their counters; `active` True only
        those with queued or running jobs, False only those done. Expired batches are left
        out."""
        out: list[BatchInfo] = []
        start, page = 0, max(limit, 100)
        while len(out) < limit:
            ids = [
                _text(b) or ""
                for b in await self.redis.zrevrange(keys.BATCHES, start, start + page - 1)
            ]
            if not ids:
                break
            start += len(ids)
            async with self.redis.pipeline(transaction=False) as pipe:
                for b in ids:
                    pipe.zscore(keys.ACTIVE, b)
                flags = await pipe.execute()
            for b, score in zip(ids, flags, strict=True):
                is_active = score is not None
                if active is not None and is_active != active:
                    continue
                st = await self.store.batch_status(b)
                if st is not None:
                    out.append(BatchInfo(st, is_active))
                    if len(out) >= limit:
                        break
        return out

    async def cancel(self, batch_id: str) -> int:
        """Cancel every job of the batch not final yet; returns how many were cancelled.
        The batch is flagged first, so even if this is interrupted no job of it runs on."""
        await self.status(batch_id)
        store = await self._store_of(batch_id)
        await store.flag_cancelled(batch_id)
        n = 0
        async for ids in store.job_ids(batch_id):
            n += await store.cancel(batch_id, ids)
        while await store.sweep():  # re-arm the records' TTLs now, not at the next worker
            pass
        return n

    async def retry(self, batch_id: str, *, failed_only: bool = False) -> int:
        """Re-enqueue failed (and, unless failed_only, cancelled) jobs as new attempts of the
        same custom_id; returns how many."""
        await self.status(batch_id)
        statuses = [Status.FAILED] if failed_only else [Status.FAILED, Status.CANCELLED]
        store = await self._store_of(batch_id)
        n = 0
        async for ids in store.job_ids(batch_id):
            n += await store.retry(batch_id, ids, statuses)
        if n:  # the batch is active again: keep the records of the jobs not retried too
            await store.keep_records(batch_id)
        return n

    async def _store_of(self, batch_id: str) -> Store:
        """The store of the queue the batch was submitted to (retried and cancelled jobs stay
        in it, whatever queue this producer submits to)."""
        queue = _text(await self.redis.hget(keys.batch(batch_id), "queue"))
        if not queue or queue == self.store.queue:
            return self.store
        if queue not in self._stores:
            self._stores[queue] = Store(
                self.redis, queue=queue, result_ttl_s=self.settings.result_ttl_s
            )
        return self._stores[queue]

    async def workers(self, queue: str | None = None) -> dict[str, dict[str, Any]]:
        """Live workers (heartbeat in the last 15 s) with their load and registry; with
        `queue`, only that queue's (a worker too old to say which serves any)."""
        raw = await self.redis.hgetall(keys.WORKERS)
        now = time.time()
        out = {}
        for k, v in raw.items():
            beat = json.loads(v)
            if now - float(beat.get("seen_at", 0)) >= 15:
                continue
            if queue is None or beat.get("queue", queue) == queue:
                out[k.decode() if isinstance(k, bytes) else k] = beat
        return out


def _tenant(value: str | None) -> str | None:
    """A tenant name, checked as metadata.tenant is (before anything is enqueued)."""
    if value is None:
        return None
    try:
        return JobMetadata(tenant=value).tenant
    except ValueError as exc:
        raise ValueError(
            f"tenant {value!r} refused: a name of 1 to 200 characters; nothing was enqueued"
        ) from exc


def _with_tenant(job: AgentJob, tenant: str) -> AgentJob:
    if job.metadata.tenant is not None:
        return job
    return job.model_copy(update={"metadata": job.metadata.model_copy(update={"tenant": tenant})})


def _priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise ValueError(
            f"priority must be one of high, normal, low (got {value!r}); nothing was enqueued"
        ) from None
