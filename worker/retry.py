"""agentq's one retry policy. It is applied to each model call (in RouterModel), so a failed
call is retried without re-running the turns and tools before it; when a model's tries are
spent, the runner moves on to the job's next fallback."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, retry: int, hint: float | None) -> float:
        """Wait before retry number `retry` (0-based): exponential with jitter; the Router's
        retry-after hint wins when it gives one (capped at max_s)."""
        if hint is not None:
            return min(hint, self.max_s)
        ceiling = min(self.max_s, self.base_s * 2**retry)
        return random.uniform(ceiling / 2, ceiling)
