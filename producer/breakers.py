"""Reading the fleet's circuit breakers (workers write them: worker/breaker.py)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from . import keys


@dataclass(frozen=True)
class BreakerState:
    """One dependency that is failing: a Router (model is None) or one model on a Router."""

    field: str
    router: str
    model: str | None
    fails: int
    open: bool
    since_ms: int
    """Redis time of the first failure of the streak."""
    opened_ms: int
    """Redis time the breaker opened (0 while it is only counting failures)."""
    error: str

    @classmethod
    def parse(cls, field: str, raw: str | bytes) -> BreakerState:
        s: dict[str, Any] = json.loads(raw)
        kind, _, rest = field.partition("|")
        router, _, model = rest.partition("|")
        return cls(
            field=field,
            router=router,
            model=model if kind == "model" else None,
            fails=int(s.get("fails", 0)),
            open=bool(s.get("open")),
            since_ms=int(s.get("since", 0)),
            opened_ms=int(s.get("opened", 0)),
            error=str(s.get("error", "")),
        )

    @property
    def what(self) -> str:
        return (
            f"model {self.model} on Router {self.router}"
            if self.model
            else (f"Router {self.router}")
        )


def router_field(router: str) -> str:
    return f"router|{router}"


def model_field(router: str, model: str) -> str:
    return f"model|{router}|{model}"


async def read_breakers(redis: Any) -> tuple[dict[str, BreakerState], int]:
    """Every breaker's state, and Redis's clock (ms) to measure them against."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.BREAKERS)
        pipe.time()
        raw, (sec, usec) = await pipe.execute()
    states = {}
    for f, v in raw.items():
        name = f.decode() if isinstance(f, bytes) else str(f)
        try:
            states[name] = BreakerState.parse(name, v)
        except (ValueError, TypeError):
            continue
    return states, int(sec) * 1000 + int(usec) // 1000


def describe_open(states: dict[str, BreakerState], now_ms: int) -> list[str]:
    """One line per open breaker, for `agentq status` and `agentq health`."""
    lines = []
    for s in sorted(states.values(), key=lambda s: s.field):
        if not s.open:
            continue
        down = "unreachable" if s.model is None else "failing"
        lines.append(
            f"paused: {s.what} {down} since {_clock(s.opened_ms)} "
            f"({format_duration((now_ms - s.opened_ms) / 1000)}): {s.error}"
        )
    return lines


def _clock(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
