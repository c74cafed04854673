"""The worker's start-up heap, kept out of the garbage collector's way.

A worker imports the Agents SDK, openai, pydantic and aiohttp: hundreds of thousands of
long-lived objects. CPython's full collections walk every one of them, and a busy worker runs
one every few seconds (each job's objects outlive a young collection now and then). Frozen,
they are never walked again: measured on a 0 ms Router, about a tenth of a plain job's CPU."""

from __future__ import annotations

import gc


def freeze() -> int:
    """Move everything alive now into the permanent generation (call once start-up is done);
    returns how many objects were frozen. Objects still leak nothing: frozen ones that die
    are freed by reference counting as usual, only cycles among them are not collected."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give the frozen objects back to the collector (a process that runs a worker and then
    goes on, such as a test, collects their cycles again)."""
    gc.unfreeze()
