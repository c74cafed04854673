"""JSON (never pickle) for everything that goes through Redis: a Redis writer must not be able
to run code on a worker."""

from __future__ import annotations

import json
from typing import Any


def json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_loads(data: bytes) -> Any:
    return json.loads(data)
