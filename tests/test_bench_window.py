"""long-run's steady middle counts what a steady worker does, not its start or its drain: a
simulated worker with no overhead scores C / L by it, and one that loses 50 ms a run its true
share, within half a point, whether its first wave starts at once or spread over a second (C
runs take the worker about that much CPU to start). The window from 1.5 L used before scored
0.97-0.99 for no overhead, and a plain cut at 3 L about a point high."""

from __future__ import annotations

import heapq
import random
import statistics

import pytest

from ops.bench.cases import FULL, LONG_JITTER, MIN_LONG_WAVES, steady_rate, steady_weight

C, WAVES = FULL.long_concurrency, FULL.long_waves
LATENCY_S = FULL.long_latencies_ms[0] / 1000
SEEDS = range(8)


def simulated_batch(
    seed: int, spread_s: float, overhead_s: float
) -> tuple[list[float], list[float]]:
    """C slots run C x WAVES jobs from one queue: each job's call takes LATENCY_S +-25%, and
    the slot loses overhead_s around it; slot i starts its first job at a uniform draw in
    [0, spread_s]. Returns the jobs' start and finish times."""
    rng = random.Random(seed)
    free = [rng.uniform(0, spread_s) for _ in range(C)]
    heapq.heapify(free)
    started, finished = [], []
    for _ in range(C * WAVES):
        t = heapq.heappop(free)
        call = LATENCY_S * rng.uniform(1 - LONG_JITTER, 1 + LONG_JITTER)
        end = t + call + overhead_s
        started.append(t)
        finished.append(end)
        heapq.heappush(free, end)
    return started, finished


def share(spread_s: float, overhead_s: float) -> float:
    """steady_rate / (C / L), the mean over SEEDS."""
    shares = []
    for seed in SEEDS:
        started, finished = simulated_batch(seed, spread_s, overhead_s)
        shares.append(steady_rate(started, finished, LATENCY_S, WAVES) / (C / LATENCY_S))
    return statistics.mean(shares)


@pytest.mark.parametrize("spread_s", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("overhead_s", [0.0, 0.05])
def test_scores_the_true_share(spread_s: float, overhead_s: float) -> None:
    true = LATENCY_S / (LATENCY_S + overhead_s)
    assert share(spread_s, overhead_s) == pytest.approx(true, abs=0.005)


def test_window_closes_while_the_queue_still_has_jobs() -> None:
    """Finishes count only while every slot can still take a next job: the last weighed
    finish comes before the last job leaves the queue, even for a worker losing 5% a run."""
    started, _ = simulated_batch(0, 1.0, 0.1)
    last_counted = max(
        t for t in (x / 100 for x in range(0, 100 * WAVES)) if steady_weight(t, WAVES) > 0
    )
    assert last_counted * LATENCY_S < max(started)


def test_too_few_waves_is_refused() -> None:
    with pytest.raises(ValueError, match="waves"):
        steady_rate([0.0], [1.0], 1.0, MIN_LONG_WAVES - 1)
