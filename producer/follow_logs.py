"""Following a batch's job log events as they happen (`agentq logs --follow`).

Workers publish each event a job keeps on keys.batch_logs, tagged with its index "i" in the
job's log, as soon as it is logged (worker/livelogs.py). The follower subscribes first, then
follows the batch's records (producer/follow.py). A job's events print in index order, each
once: a live event prints when every earlier one of its run has printed; one that comes after
a gap (a follower that started while the job ran, an event the worker dropped, a reconnect) is
held until the job's record fills the gap when the job ends. An event is known by (job id,
run, index): the record keeps the same list, and a retried job's new run starts again at
index 0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from .connect import stop_if_cancelled

LIVE_WAIT_S = 1.0

Event = dict[str, Any]


def run_of(event: Event) -> int:
    """The run number every job event is bound with (0 when absent)."""
    run = event.get("run")
    return run if isinstance(run, int) else 0


@dataclass(slots=True)
class _Run:
    """One job's latest run seen: events [0, printed) went out; `held` came after a gap;
    `done` once its record was printed (it held every event: nothing more of this run)."""

    run: int
    printed: int = 0
    held: dict[int, Event] | None = None
    done: bool = False


class Printed:
    """What the follower printed of each job (about 100 bytes a finished job), and the live
    events it holds back until the events before them are printed."""

    def __init__(self) -> None:
        self.jobs: dict[str, _Run] = {}

    def _current(self, job_id: str, run: int) -> _Run | None:
        """The job's state for this run (a newer run starts afresh); None for a run that is
        over for the follower (an older one, or one whose record was printed)."""
        got = self.jobs.get(job_id)
        if got is None or run > got.run:
            got = self.jobs[job_id] = _Run(run)
        if run < got.run or got.done:
            return None
        return got

    def live(self, job_id: str, run: int, i: int, event: Event) -> list[Event]:
        """A live event: the events to print now, in order (none while a gap is before it)."""
        got = self._current(job_id, run)
        if got is None or i < got.printed:
            return []
        if i > got.printed:
            got.held = got.held or {}
            got.held[i] = event
            return []
        out = [event]
        got.printed += 1
        while got.held and got.printed in got.held:
            out.append(got.held.pop(got.printed))
            got.printed += 1
        return out

    def record(self, job_id: str, run: int, events: list[Event]) -> list[Event]:
        """A job's record (every event of its run): the events not printed yet, in order."""
        got = self._current(job_id, run)
        if got is None:
            return []
        self.jobs[job_id] = _Run(run, printed=len(events), done=True)
        return events[got.printed :]


async def read_live(pubsub: Any, on_entry: Callable[[Event], None]) -> None:
    """Hand each published entry ({"job_id", "custom_id", "i", "event"}) to on_entry, until
    cancelled. Through a reconnect it goes on (the records bring what was missed)."""
    while True:
        try:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LIVE_WAIT_S)
            stop_if_cancelled()
        except RedisConnectionError:
            await asyncio.sleep(LIVE_WAIT_S)
            continue
        if msg is None:
            continue
        try:
            entries = json.loads(msg["data"])
        except (TypeError, ValueError):
            continue  # not ours
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and isinstance(entry.get("event"), dict):
                on_entry(entry)
