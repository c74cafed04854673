"""Bounds on what a job's submitter (or a model's reply) controls, checked before parsing."""

from __future__ import annotations

import json
import re
from itertools import accumulate

MAX_DEPTH = 64
"""Deepest JSON nesting (arrays and objects) in a job line, a stored job or a model's
structured output. Parsers recurse: pydantic's stops near 200 levels, Python's json near 1000
(with a RecursionError), and validating a schema recurses several frames a level."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
"""A JSON string; unterminated ones run to the end, so every try matches (linear time)."""
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = str.maketrans({"[": "+", "{": "+", "]": "-", "}": "-"})


def json_depth(text: str | bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, without parsing it (no recursion;
    linear time). Malformed text gets a number too: the parser reports what is wrong."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8", "replace")
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_STEP)
    return max(accumulate(1 if c == "+" else -1 for c in brackets), default=0)


class TooDeep(ValueError):
    """JSON nested deeper than MAX_DEPTH."""


def check_depth(text: str | bytes, what: str = "the line") -> None:
    """Raise TooDeep when `text` nests deeper than MAX_DEPTH."""
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise TooDeep(
            f"{what} nests JSON arrays and objects {depth} levels deep, over the limit of "
            f"{MAX_DEPTH}: flatten it"
        )


# -- sizes of a job's fields (characters; the dict fields as JSON) -----------------------------
# Each bounds what one job can make a worker hold: agents and run configs are cached per spec,
# and names become metric labels and cache keys.

MAX_LINE_BYTES = 1 << 20
"""Default of AGENTQ_MAX_LINE_BYTES: the longest job line (or job, as JSON) accepted."""
MAX_NAME_CHARS = 200
"""A model, fallback, agent name, tool name, MCP server name or profile name."""
MAX_FALLBACKS = 10
MAX_NAMES = 64
"""Tools, MCP servers of an agent spec; tags of the metadata."""
MAX_INSTRUCTIONS_CHARS = 100_000
MAX_SCHEMA_CHARS = 64_000
"""output_schema, as JSON."""
MAX_MODEL_SETTINGS_CHARS = 16_000
"""model_settings, as JSON."""
MAX_METADATA_CHARS = 16_000
"""metadata, as JSON."""


def check_json_size(value: object, limit: int) -> None:
    """Raise ValueError when `value` (a job field: JSON already) is over `limit` characters as
    compact JSON."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))
    if size > limit:
        raise ValueError(f"{size} characters as JSON, over the limit of {limit}: make it smaller")
