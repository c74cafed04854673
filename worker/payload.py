"""Reading arq job payloads: JSON only, and never trusting them. Anything else in the queue, a
pickle included, becomes a job that fails as invalid_job instead of code that runs."""

from __future__ import annotations

import json
from typing import Any

from producer.limits import TooDeep, check_depth
from producer.store import RUN_FUNCTION


def _invalid(reason: str) -> dict[str, Any]:
    return {"f": RUN_FUNCTION, "a": [], "k": {"invalid_payload": reason}, "t": None, "et": 0}


def load_job(data: bytes) -> dict[str, Any]:
    """arq's job_deserializer. Never raises, never unpickles."""
    try:
        check_depth(data, "the queued payload")
    except TooDeep as exc:
        return _invalid(str(exc))
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _invalid("the queued payload is not JSON (a pickle, or written by something else)")
    if not isinstance(d, dict) or d.get("f") != RUN_FUNCTION:
        return _invalid("the queued payload is not an agentq job")
    args = d.get("a")
    if (
        not isinstance(args, list)
        or len(args) not in (2, 3)  # (job id, batch id[, enqueue generation])
        or not all(isinstance(a, str) for a in args)
        or d.get("k") not in ({}, None)
    ):
        return _invalid("the queued payload has malformed arguments")
    t = d.get("t")
    return {
        "f": RUN_FUNCTION,
        "a": args,
        "k": {},
        "t": t if isinstance(t, int) else None,
        "et": d.get("et") if isinstance(d.get("et"), int) else 0,
    }
