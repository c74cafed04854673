"""Bounds on what a job's submitter (or a model's reply) controls, checked before parsing."""

from __future__ import annotations

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
