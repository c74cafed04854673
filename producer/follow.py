"""Following a batch's results: each final record as its job finishes, in finish order, until
the batch is done (`agentq results --follow`, `Producer.results(batch, follow=True)`).

It builds on the batch's change notices (keys.batch_events: "<job id> <status>", published by
every state change's script): subscribe first, then read the batch, then fetch the record of
each job a notice says is final. Pub/sub drops what nobody heard (a reconnect), so when the
batch's counters disagree with what was heard after a quiet second, and always once the batch
is done, it reads the batch again. It keeps each job id of the batch in memory (about 100
bytes a job), never the records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError

from . import keys
from .models import TERMINAL, BatchStatus, ResultRecord

if TYPE_CHECKING:
    from .client import Producer

FINAL = frozenset(s.value for s in TERMINAL)
QUIET_S = 1.0
"""How long without a notice before the counters are compared with what was heard."""
BURST_S = 0.05
"""Notices read together: their records are fetched in one round trip."""


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class Seen:
    """What was seen of each job: the finished_at of the record yielded, or "" while the job
    is not final; and how many jobs are known to be final, to compare with the counters."""

    def __init__(self) -> None:
        self.jobs: dict[str, str] = {}
        self.final = 0

    def yielded(self, job_id: str, finished_at: str | None) -> bool:
        got = self.jobs.get(job_id)
        return bool(got) and got == (finished_at or "-")

    def pending(self, job_id: str) -> None:
        if self.jobs.get(job_id):
            self.final -= 1
        self.jobs[job_id] = ""

    def new_final(self, record: ResultRecord) -> bool:
        """Note a record just read; True if it is one to yield (final, and not yielded yet)."""
        if record.status.value not in FINAL:
            self.pending(record.job_id)
            return False
        if self.yielded(record.job_id, record.finished_at):
            return False
        if not self.jobs.get(record.job_id):
            self.final += 1
        self.jobs[record.job_id] = record.finished_at or "-"
        return True

    def agrees(self, st: BatchStatus) -> bool:
        return st.done == self.final and st.total == len(self.jobs)


async def read_burst(pubsub: Any) -> list[tuple[str, str]]:
    """The notices of one burst, in the order they were published: (job id, status). Waits up
    to QUIET_S for the first; [] when none came. "- sealed" and the like are left out."""
    heard: list[tuple[str, str]] = []
    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=QUIET_S)
    deadline = time.monotonic() + BURST_S
    while msg is not None:
        job_id, _, status = (_text(msg.get("data")) or "").partition(" ")
        if job_id and job_id != "-":
            heard.append((job_id, status))
        if time.monotonic() >= deadline:
            break
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
    return heard


async def follow(p: Producer, batch_id: str) -> AsyncGenerator[ResultRecord, None]:
    """Records of jobs already final first (input order), then each as its job finishes. A
    job retried and finished again comes again, with its new record."""
    seen = Seen()
    pubsub = p.redis.pubsub()
    try:
        await pubsub.subscribe(keys.batch_events(batch_id))
        await p.status(batch_id)  # BatchNotFound
        async for record in rescan(p, batch_id, seen):
            yield record
        stale = False
        while True:
            try:
                st = await p.status(batch_id)
                if st.finished or stale:
                    stale = False
                    async for record in rescan(p, batch_id, seen):
                        yield record
                    if st.finished:
                        return
                heard = await read_burst(pubsub)
                if heard:
                    async for record in _heard(p, batch_id, heard, seen):
                        yield record
                else:
                    stale = not seen.agrees(await p.status(batch_id))
            except RedisConnectionError:  # as `wait` does: keep going, then read it all again
                await asyncio.sleep(1.0)
                stale = True
    finally:
        await pubsub.aclose()


async def _heard(
    p: Producer, batch_id: str, heard: list[tuple[str, str]], seen: Seen
) -> AsyncIterator[ResultRecord]:
    """The records of the jobs the notices said became final, in notice order."""
    finals = []
    for job_id, status in heard:
        if status in FINAL:
            finals.append(job_id)
        else:
            seen.pending(job_id)
    if finals:
        for record in await p.store.records(batch_id, finals):
            if seen.new_final(record):
                yield record


async def rescan(p: Producer, batch_id: str, seen: Seen) -> AsyncIterator[ResultRecord]:
    """Every job of the batch, in input order: the final records not yielded yet."""
    async for ids in p.store.job_ids(batch_id):
        async with p.redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hmget(keys.job(jid), "status", "finished_at")
            rows = await pipe.execute()
        todo = []
        for jid, (status, finished_at) in zip(ids, rows, strict=True):
            status, finished_at = _text(status), _text(finished_at)
            if status in FINAL and not seen.yielded(jid, finished_at):
                todo.append(jid)
            elif status is not None and status not in FINAL:
                seen.pending(jid)
        if todo:
            for record in await p.store.records(batch_id, todo):
                if seen.new_final(record):
                    yield record
