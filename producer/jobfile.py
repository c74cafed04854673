"""Reading JSONL job files: stream them, validate every line, report every bad line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .checks import Check
from .limits import MAX_LINE_BYTES, check_depth
from .models import AgentJob

MAX_REPORTED = 50


@dataclass(frozen=True)
class LineError:
    line: int
    reason: str
    kind: str = "line"
    """"line" in a file; "job" (1-based position) for jobs given through the Python API."""

    def __str__(self) -> str:
        return f"{self.kind} {self.line}: {self.reason}"


class JobFileError(Exception):
    """A job file has bad lines; nothing of it was enqueued."""

    def __init__(self, path: str, errors: list[LineError], total: int) -> None:
        self.path, self.errors, self.total = path, errors, total
        shown = "\n".join(f"  {e}" for e in errors)
        more = f"\n  ... and {total - len(errors)} more" if total > len(errors) else ""
        super().__init__(
            f"{path}: {total} bad line{'s' if total != 1 else ''}; nothing was enqueued. "
            f"Fix them and submit again:\n{shown}{more}"
        )


_UNION_TAGS = {
    "str": "a string",
    "list[ChatMessage]": "a list of chat messages",
    "AgentSpec": "an agent spec object",
}


def describe(exc: ValidationError) -> str:
    """One readable reason from a pydantic error: which field, what is wrong. For a field that
    takes one of several types, a wrong-type complaint about the branch the value was clearly
    not meant for is left out."""
    errors = []
    for err in exc.errors():
        tags = [str(p) for p in err["loc"] if str(p) in _UNION_TAGS]
        loc = ".".join(str(p) for p in err["loc"] if str(p) not in _UNION_TAGS)
        errors.append((loc, tags, err))
    deep = {loc.split(".")[0] for loc, tags, e in errors if tags and not _wrong_type(e)}
    parts: list[str] = []
    mismatched: dict[str, list[str]] = {}
    for loc, tags, err in errors:
        if tags and _wrong_type(err):
            if loc.split(".")[0] not in deep:
                mismatched.setdefault(loc, []).extend(_UNION_TAGS[t] for t in tags)
            continue
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing required field '{loc}'")
        elif err["type"] == "string_too_long":
            size, limit = len(err["input"]), err["ctx"]["max_length"]
            parts.append(f"{loc}: {size} characters, over the limit of {limit}: make it shorter")
        elif err["type"] == "too_long":
            items, most = err["ctx"].get("actual_length"), err["ctx"]["max_length"]
            parts.append(f"{loc}: {items} items, over the limit of {most}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    for loc, kinds in mismatched.items():
        parts.append(f"{loc}: wrong type, expected {' or '.join(kinds)}")
    return "; ".join(parts)


def _wrong_type(err: Any) -> bool:
    return str(err["type"]).endswith("_type")


def parse_line(text: str) -> AgentJob:
    """One job from one JSON line; raises ValueError with a readable reason."""
    check_depth(text)  # before any parser recurses
    try:
        return AgentJob.model_validate_json(text)  # the fast path: pydantic parses the JSON
    except ValidationError:
        pass  # find out what is wrong, below
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return AgentJob.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


_BOM = b"\xef\xbb\xbf"  # from some editors: fine


class LineTooLong(ValueError):
    pass


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, str | ValueError]]:
    """The non-blank lines of a file with their numbers; a line over `max_bytes` (or not
    UTF-8) comes as the error to report, and is never held whole in memory."""
    with path.open("rb") as f:
        n = 0
        while raw := f.readline(max_bytes + 2):  # the line, its \r\n, and one byte more
            n += 1
            if n == 1:
                raw = raw.removeprefix(_BOM)
            size = len(raw.rstrip(b"\r\n"))
            if size > max_bytes:
                while not raw.endswith(b"\n") and (raw := f.readline(1 << 16)):
                    size += len(raw.rstrip(b"\r\n"))
                yield (
                    n,
                    LineTooLong(
                        f"the line is {size} bytes, over the limit of {max_bytes} "
                        "(AGENTQ_MAX_LINE_BYTES): make its fields smaller"
                    ),
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, ValueError(f"not UTF-8 text: {exc}")
                continue
            if text.strip():
                yield n, text


def validate_file(
    path: str | Path, check: Check | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> int:
    """Check every line; return the number of jobs, or raise JobFileError listing bad lines.

    Streams the file; remembers only an 8-byte digest per custom_id, so memory stays small."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"job file not found: {p}")
    seen: dict[bytes, int] = {}
    errors: list[LineError] = []
    total_bad = count = 0

    def bad(n: int, reason: str) -> None:
        nonlocal total_bad
        total_bad += 1
        if len(errors) < MAX_REPORTED:
            errors.append(LineError(n, reason))

    for n, text in _lines(p, max_line_bytes):
        if isinstance(text, ValueError):
            bad(n, str(text))
            continue
        try:
            job = parse_line(text)
        except ValueError as exc:
            bad(n, str(exc))
            continue
        reason = check(job) if check else None
        if reason:
            bad(n, reason)
            continue
        digest = hashlib.blake2b(job.custom_id.encode(), digest_size=8).digest()
        if digest in seen:
            bad(n, f"duplicate custom_id {job.custom_id!r} (first on line {seen[digest]})")
            continue
        seen[digest] = n
        count += 1
    if total_bad:
        raise JobFileError(str(p), errors, total_bad)
    if count == 0:
        raise JobFileError(str(p), [LineError(0, "the file has no jobs")], 1)
    return count


def iter_jobs(path: str | Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[AgentJob]:
    """Stream the jobs of a file already checked by validate_file."""
    for _, text in _lines(Path(path), max_line_bytes):
        if isinstance(text, ValueError):
            raise text
        yield parse_line(text)
