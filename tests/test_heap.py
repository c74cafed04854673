"""worker/heap.py: the worker's start-up heap is frozen and the collector runs less often; a
process that goes on after its worker (a test) gets the collector back as it was."""

from __future__ import annotations

import gc

from worker import heap


def test_freeze_collects_less_often_and_thaw_gives_the_thresholds_back() -> None:
    before = gc.get_threshold()
    try:
        assert heap.freeze() > 0
        assert gc.get_threshold() == heap.GC_THRESHOLDS
        assert heap.freeze() > 0  # a second worker in the same process
        assert gc.get_threshold() == heap.GC_THRESHOLDS
    finally:
        heap.thaw()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
