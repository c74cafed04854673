"""How the CLI shows things to a person: colour only on a terminal and never under NO_COLOR,
untrusted text made inert, log events as one line each, records as a readable page.

Kept free of heavy imports (no rich, no pydantic models at import time): read-only commands
start fast."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

from . import keys
from .breakers import format_duration

if TYPE_CHECKING:
    from .models import BatchStatus, ResultRecord

LEVELS = ("debug", "info", "warning", "error", "critical")

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}
_CONTROL_LINE = {**_CONTROL, ord("\n"): "\\n", ord("\t"): "\\t"}

_SGR = {"red": "31", "green": "32", "yellow": "33", "blue": "34", "dim": "2", "bold": "1"}
STATUS_COLOUR = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "blue",
    "queued": "dim",
    "active": "yellow",
    "done": "green",
}
LEVEL_COLOUR = {"debug": "dim", "warning": "yellow", "error": "red", "critical": "red"}

# Keys every event has, shown in their own columns rather than as key=value.
_EVENT_COLUMNS = ("timestamp", "level", "event")
MAX_VALUE_CHARS = 200
"""Readable log lines cut long values (prompts, outputs); --json keeps them whole."""


def colour_enabled(stream: IO[str] | None = None) -> bool:
    """Colour (and progress bars) only for a person at a terminal: not when NO_COLOR is set
    (https://no-color.org: present and not empty), not for TERM=dumb, not when stdout is
    redirected (a file or a pipe gets plain text, whatever stream is asked about)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    streams = [sys.stdout] if stream is None or stream is sys.stdout else [sys.stdout, stream]
    return all(_isatty(s) for s in streams)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False


def paint(text: str, colour: str | None, on: bool) -> str:
    """`text` in `colour` when `on`; `text` must already be inert."""
    if not on or colour is None or colour not in _SGR:
        return text
    return f"\x1b[{_SGR[colour]}m{text}\x1b[0m"


def inert(text: str) -> str:
    """`text` with control characters shown as \\xNN: an ESC from a model output must not
    reach the terminal (colours, hyperlinks, cursor moves, title changes)."""
    return text.translate(_CONTROL)


def one_line(text: str) -> str:
    """Inert, and on one line: newlines and tabs shown as \\n and \\t."""
    return text.translate(_CONTROL_LINE)


def clip(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_time(value: Any) -> dt.datetime | None:
    """An ISO timestamp of a record or event; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def age(value: Any, now: dt.datetime | None = None) -> str:
    """How long ago an ISO timestamp was, e.g. "3m05s"; "?" when unknown."""
    t = parse_time(value)
    if t is None:
        return "?"
    return format_duration(((now or dt.datetime.now(dt.UTC)) - t).total_seconds())


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    return clip(one_line(text))


def event_fields(event: Mapping[str, Any]) -> str:
    """The event's other keys as key=value, in the order they were logged."""
    return " ".join(
        f"{one_line(str(k))}={_value(v)}" for k, v in event.items() if k not in _EVENT_COLUMNS
    )


def level_at_least(event: Mapping[str, Any], level: str | None) -> bool:
    if level is None:
        return True
    got = str(event.get("level", "info")).lower()
    rank = LEVELS.index(got) if got in LEVELS else LEVELS.index("info")
    return rank >= LEVELS.index(level)


def event_line(event: Mapping[str, Any], custom_id: str, colour: bool) -> str:
    """One log event on one line: time, level, job, event, then its fields."""
    level = str(event.get("level", "")).lower()
    return "  ".join(
        part
        for part in (
            one_line(str(event.get("timestamp", "-"))),
            paint(f"{one_line(level):<7}", LEVEL_COLOUR.get(level), colour),
            one_line(custom_id),
            paint(one_line(str(event.get("event", "?"))), "bold", colour),
            event_fields(event),
        )
        if part
    )


def timeline(events: Iterable[Mapping[str, Any]], start: Any, colour: bool) -> list[str]:
    """A job's log as offsets from `start` (its start time, else its first event)."""
    events = list(events)
    t0 = parse_time(start)
    if t0 is None and events:
        t0 = parse_time(events[0].get("timestamp"))
    lines = []
    for e in events:
        t = parse_time(e.get("timestamp"))
        offset = f"+{(t - t0).total_seconds():.3f}s" if t is not None and t0 is not None else "?"
        level = str(e.get("level", "")).lower()
        line = (
            f"  {offset:>10}  {paint(f'{one_line(level):<7}', LEVEL_COLOUR.get(level), colour)}  "
            f"{paint(one_line(str(e.get('event', '?'))), 'bold', colour)}  {event_fields(e)}"
        )
        lines.append(line.rstrip())
    return lines


def _seconds_between(a: Any, b: Any) -> str | None:
    ta, tb = parse_time(a), parse_time(b)
    if ta is None or tb is None:
        return None
    return f"{(tb - ta).total_seconds():.3f} s"


def print_record(r: ResultRecord, out: IO[str], colour: bool, input_preview: str | None) -> None:
    """One job's record for a person (`agentq job`)."""
    rows: list[tuple[str, str]] = [
        ("job", f"{one_line(r.custom_id)}  (id {r.job_id})"),
        ("batch", one_line(r.batch_id)),
        ("status", paint(r.status.value, STATUS_COLOUR.get(r.status.value), colour)),
        ("model", one_line(r.model or "-")),
        ("worker", one_line(r.worker or "-")),
        ("enqueued", r.enqueued_at or "-"),
        ("started", r.started_at or "-"),
        ("finished", r.finished_at or "-"),
    ]
    ran = _seconds_between(r.started_at, r.finished_at)
    if ran:
        rows.append(("ran", ran))
    u = r.usage
    rows.append(
        (
            "usage",
            f"{u.requests} model requests, {u.total_tokens} tokens "
            f"(in {u.input_tokens}, out {u.output_tokens})",
        )
    )
    rows.append(("cost", f"${r.cost_usd:.6f}"))
    if input_preview is not None:
        rows.append(("input", clip(one_line(input_preview), 300)))
    if r.error is not None:
        rows.append(
            (
                "error",
                paint(one_line(r.error.type), "red", colour)
                + f": {one_line(r.error.message)}"
                + (" (retryable)" if r.error.retryable else ""),
            )
        )
    if r.output is not None:
        rows.append(("output", clip(one_line(r.output), 300)))
    if r.output_json is not None:
        rows.append(("output_json", clip(one_line(json.dumps(r.output_json)), 300)))
    for name, value in rows:
        print(f"{name:<12}{value}", file=out)
    if r.attempts:
        print("attempts", file=out)
        for i, a in enumerate(r.attempts, 1):
            result = paint("ok", "green", colour) if a.ok else paint("failed", "red", colour)
            why = f" ({one_line(a.error)})" if a.error else ""
            print(
                f"  {i}. {one_line(a.model)} on {one_line(a.router)}: {result}{why}, {a.ms} ms",
                file=out,
            )
    print(f"log ({len(r.logs)} events)", file=out)
    for line in timeline(r.logs, r.started_at, colour):
        print(line, file=out)


def status_dict(st: BatchStatus) -> dict[str, Any]:
    """A batch's counters as `--json` prints them."""
    return {
        "batch_id": st.batch_id,
        "total": st.total,
        "done": st.done,
        "finished": st.finished,
        "counts": {s.value: n for s, n in st.counts.items()},
        "usage": st.usage.model_dump(),
        "cost_usd": st.cost_usd,
        "created_at": st.created_at,
        "queue": st.queue,
        "models": {m: u.model_dump() for m, u in st.models.items()},
    }


def print_summary(st: BatchStatus, out: IO[str], colour: bool = False) -> None:
    """A batch's counts, tokens and cost, per model too."""
    from .models import Status

    counts = ", ".join(
        paint(f"{s.value} {st.counts.get(s, 0)}", STATUS_COLOUR.get(s.value), colour)
        if st.counts.get(s, 0)
        else f"{s.value} 0"
        for s in Status
    )
    pct = 100.0 * st.done / st.total if st.total else 0.0
    print(
        f"batch {inert(st.batch_id)}: {st.done}/{st.total} done ({pct:.0f}%) — {counts}", file=out
    )
    if st.queue is not None and st.queue != keys.DEFAULT_QUEUE:
        print(f"queue {inert(st.queue)}", file=out)
    print(
        f"tokens {st.usage.total_tokens} (in {st.usage.input_tokens}, out "
        f"{st.usage.output_tokens}), model requests {st.usage.requests}, "
        f"cost ${st.cost_usd:.6f}",
        file=out,
    )
    for model, u in st.models.items():  # jobs name models freely
        print(
            f"  {inert(model)}: {u.jobs} jobs, tokens in {u.input_tokens} out {u.output_tokens}, "
            f"cost ${u.cost_usd:.6f}",
            file=out,
        )
