"""Reading the fleet's Router budgets (workers keep them: worker/ratelimit.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import keys
from .breakers import format_duration

IDLE_S = 120
"""A budget no call has used for this long is shown as idle."""


@dataclass(frozen=True)
class BudgetState:
    """One budget of AGENTQ_RATE_LIMITS, as the workers last left it."""

    name: str
    rpm: float
    tpm: float
    requests: float
    """Requests given turns over the last minute (about: the last two minutes, weighted)."""
    tokens: float
    """Tokens reserved (corrected by usage) over the last minute, likewise."""
    backlog_s: float
    """How long a call asking now would wait for its turn."""
    slowed_s: float
    """How long the Router's last slow-down still holds new turns back."""
    idle_s: float
    """Since the last call took a turn."""

    @classmethod
    def parse(cls, name: str, raw: str | bytes, now_ms: int) -> BudgetState:
        s: dict[str, Any] = json.loads(raw)
        rpm, tpm = float(s.get("rpm") or 0), float(s.get("tpm") or 0)
        minute, into = divmod(now_ms, 60_000)
        weight = 1 - into / 60_000

        def used(cur: str, prev: str) -> float:
            m = s.get("m", 0)
            if m == minute:
                return float(s.get(cur, 0)) + float(s.get(prev, 0)) * weight
            if m == minute - 1:
                return float(s.get(cur, 0)) * weight
            return 0.0

        # when a new call's turn would come: the token schedule may run up to a second ahead
        free = max(
            float(s.get("tr", 0)) if rpm else 0.0,
            float(s.get("tt", 0)) - 1000 if tpm else 0.0,
            float(s.get("slow", 0)),
        )
        return cls(
            name=name,
            rpm=rpm,
            tpm=tpm,
            requests=used("r", "pr"),
            tokens=used("t", "pt"),
            backlog_s=max(0.0, free - now_ms) / 1000,
            slowed_s=max(0.0, float(s.get("slow", 0)) - now_ms) / 1000,
            idle_s=max(0.0, now_ms - float(s.get("seen", 0))) / 1000,
        )

    def limits(self) -> str:
        """Its limits, e.g. `1,140 rpm, 200,000 tpm`."""
        parts = [f"{self.rpm:,.0f} rpm"] if self.rpm else []
        return ", ".join(parts + ([f"{self.tpm:,.0f} tpm"] if self.tpm else []))

    def last_minute(self) -> str:
        """Its use, e.g. `1,083 calls (95%), 12,400 tokens (6%) in the last minute` (calls
        given their turn, which may still be ahead)."""
        parts = [
            f"{self.requests:,.0f} call{'' if round(self.requests) == 1 else 's'}"
            + (f" ({self.requests / self.rpm:.0%})" if self.rpm else "")
        ]
        if self.tpm:
            parts.append(f"{self.tokens:,.0f} tokens ({self.tokens / self.tpm:.0%})")
        return ", ".join(parts) + " in the last minute"


async def read_budgets(redis: Any) -> tuple[dict[str, BudgetState], int]:
    """Every budget's state, and Redis's clock (ms) it was read at."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.BUDGETS)
        pipe.time()
        raw, (sec, usec) = await pipe.execute()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    states = {}
    for f, v in raw.items():
        name = f.decode() if isinstance(f, bytes) else str(f)
        try:
            states[name] = BudgetState.parse(name, v, now_ms)
        except (ValueError, TypeError, AttributeError):
            continue
    return states, now_ms


WAIT_SHOWN_S = 0.5
"""`agentq status` mentions a budget once its calls wait at least this long."""


def describe_waits(states: dict[str, BudgetState]) -> list[str]:
    """One line per budget that makes calls wait now, for `agentq status`."""
    lines = []
    for s in sorted(states.values(), key=lambda s: s.name):
        if s.backlog_s < WAIT_SHOWN_S:
            continue
        why = " (the Router asked to slow down)" if s.slowed_s > 0 else ""
        lines.append(
            f"rate limited: budget {s.name} ({s.limits()}) in full use: calls wait "
            f"{_seconds(s.backlog_s)} for their turn{why}"
        )
    return lines


def describe_budgets(states: dict[str, BudgetState]) -> list[str]:
    """One line per budget and its use, for `agentq health`."""
    lines = []
    for s in sorted(states.values(), key=lambda s: s.name):
        head = f"Budget {s.name} ({s.limits()}): "
        if s.idle_s >= IDLE_S:
            lines.append(f"{head}unused for {format_duration(s.idle_s)}")
            continue
        busy = f"in full use, calls wait {_seconds(s.backlog_s)} for their turn; " * (
            s.backlog_s > 0
        )
        line = head + busy + s.last_minute()
        if s.slowed_s > 0:
            line += f"; the Router asked to slow down ({_seconds(s.slowed_s)} left)"
        lines.append(line)
    return lines


def _seconds(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else format_duration(s)
