"""The worker's heap, kept out of the garbage collector's way.

A worker imports the Agents SDK, openai, pydantic and aiohttp: hundreds of thousands of
long-lived objects. CPython's full collections walk every one of them, and a busy worker runs
one every few seconds (each job's objects outlive a young collection now and then). Frozen,
they are never walked again: measured on a 0 ms Router, about a tenth of a plain job's CPU.

And the runs in flight: an agent run allocates thousands of container objects, so with
CPython's default thresholds (a young collection every 700 allocations) the collector walks
the live objects of hundreds of runs many times per job; nearly all of a run's objects are
freed by reference counting anyway. With GC_THRESHOLDS, one worker at C = 500 and a 2 s
Router spent 2.4-2.9 ms of CPU per plain job instead of 3.9-4.6 (A/B runs of the same batch).
The price is garbage cycles kept longer: a failed call leaves some (an exception, its
traceback and frames, holding the request: ~93 KB for a 50 KB input), and a full collection
now comes every ~2M allocations instead of ~70k: a few hundred failed runs' worth, tens of MB
with large inputs, before it is freed."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (20_000, 10, 10)
"""A young collection every 20,000 net allocations (CPython: 700); the older generations as by
default, every 10 collections of the one below. (20,000, 20, 20) measured no faster."""

_before: tuple[int, int, int] | None = None


def freeze() -> int:
    """Move everything alive now into the permanent generation (call once start-up is done)
    and collect less often from then on; returns how many objects were frozen. Objects still
    leak nothing: frozen ones that die are freed by reference counting as usual, only cycles
    among them are not collected."""
    global _before
    gc.collect()
    gc.freeze()
    if _before is None:
        _before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return gc.get_freeze_count()


def thaw() -> None:
    """Give the frozen objects and the thresholds back to the collector (a process that runs a
    worker and then goes on, such as a test, collects as before)."""
    global _before
    gc.unfreeze()
    if _before is not None:
        gc.set_threshold(*_before)
        _before = None
