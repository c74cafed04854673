"""Following a batch's job log events as they happen (`agentq logs --follow`).

Workers publish each event a job keeps on keys.batch_logs, tagged with its index "i" in the
job's log, as soon as it is logged (worker/livelogs.py). The follower subscribes first, then
follows the batch's records (producer/follow.py): live events are printed as they come, and a
record's events only where the live channel did not bring them (a follower that started late,
an event the worker dropped, a reconnect). An event is known by (job id, run, index): the
record keeps the same list, and a retried job's new run starts again at index 0."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

LIVE_WAIT_S = 1.0


def run_of(event: dict[str, Any]) -> int:
    """The run number every job event is bound with (0 when absent)."""
    run = event.get("run")
    return run if isinstance(run, int) else 0


class Printed:
    """Per job: the latest run seen, and the indexes of its events printed; once that run's
    record was printed, just its length (about 100 bytes a finished job)."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[int, set[int] | int]] = {}

    def first_time(self, job_id: str, run: int, i: int) -> bool:
        """True (and noted) if this event was not printed yet."""
        got = self.jobs.get(job_id)
        if got is None or run > got[0]:
            self.jobs[job_id] = (run, {i})
            return True
        if run < got[0]:
            return False  # a late event of a run whose successor is already showing
        done = got[1]
        if isinstance(done, int):
            return False  # the record of this run was printed: it held every event
        if i in done:
            return False
        done.add(i)
        return True

    def in_record(self, job_id: str, run: int) -> Callable[[int], bool]:
        """For a record of this run: which of its events (by index) are still to print."""
        got = self.jobs.get(job_id)
        if got is None or run > got[0]:
            return lambda i: True
        done = got[1]
        if run < got[0] or isinstance(done, int):
            return lambda i: False
        return lambda i: i not in done

    def record_printed(self, job_id: str, run: int, n: int) -> None:
        got = self.jobs.get(job_id)
        if got is None or run >= got[0]:
            self.jobs[job_id] = (run, n)


async def read_live(pubsub: Any, on_entry: Callable[[dict[str, Any]], None]) -> None:
    """Hand each published entry ({"job_id", "custom_id", "i", "event"}) to on_entry, until
    cancelled. Through a reconnect it goes on (the records bring what was missed)."""
    while True:
        try:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LIVE_WAIT_S)
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
