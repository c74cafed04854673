"""long-run's steady middle counts what a steady worker does, not its start: a simulated worker
with no overhead scores C / L by it, one that loses 50 ms a run scores about its true share,
whether its first wave starts at once or spread over a second (C runs take the worker about
that much CPU to start). The window from 1.5 L used before scored 0.97 for no overhead."""

from __future__ import annotations

import heapq
import random
import statistics

import pytest

from ops.bench.cases import LONG_JITTER, steady_rate

C, WAVES, LATENCY_S = 500, 11, 2.0
SEEDS = range(8)


def simulated_batch(
    seed: int, spread_s: float, overhead_s: float
) -> tuple[list[float], list[float]]:
    """C slots run C x WAVES jobs from one queue: each job's call takes LATENCY_S +-25%, and
    the slot loses overhead_s around it; slot i starts its first job at a uniform draw in
    [0, spread_s]. Returns the jobs' start and finish times."""
    rng = random.Random(seed)
    free = sorted(rng.uniform(0, spread_s) for _ in range(C))
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
def test_no_overhead_scores_the_ideal(spread_s: float) -> None:
    assert 0.995 <= share(spread_s, 0.0) <= 1.015


@pytest.mark.parametrize("spread_s", [0.0, 0.5, 1.0])
def test_overhead_scores_about_its_true_share(spread_s: float) -> None:
    true = LATENCY_S / (LATENCY_S + 0.05)  # 0.976
    assert true - 0.01 <= share(spread_s, 0.05) <= true + 0.015
