"""structlog set-up: JSON on stdout, secrets redacted, and every event of a job also kept in that
job's result record."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.types import EventDict, Processor

from producer.private import open_private, private_dir

_job_events: ContextVar[list[dict[str, Any]] | None] = ContextVar("agentq_job_events", default=None)
_job_live: ContextVar[Callable[[int, dict[str, Any]], None] | None] = ContextVar(
    "agentq_job_live", default=None
)

MAX_EVENTS_PER_JOB = 200
"""A runaway job must not grow its record without bound."""

_SECRET_KEYS = re.compile(r"(api[_-]?key|authorization|password|secret|token)$", re.I)
_CONTENT_KEYS = frozenset({"input", "output", "prompt", "messages"})
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._\-]+")


def redactor(secrets: list[str]) -> Processor:
    """A processor that hides secret values wherever they appear, and secret-named keys.

    Every event of every job passes here, so the common case (a flat event of numbers and
    strings holding no secret) costs a dict look-up and a few substring checks per value, not
    a recursive call per value."""
    values = [s for s in secrets if s and len(s) >= 4]

    def suspect(text: str) -> bool:
        """Whether the text needs scrubbing (substring checks: a regex alternation of the
        same is slower, and ten times slower on a 2,000-character input)."""
        if "Bearer" in text:
            return True
        for s in values:  # not any(): a generator costs more per call
            if s in text:
                return True
        return False

    secret_keys: dict[str, bool] = {}

    def secret_key(key: str) -> bool:
        hit = secret_keys.get(key)
        if hit is None:
            if len(secret_keys) >= _KEY_CACHE:  # event keys may come from jobs: bounded
                secret_keys.clear()
            hit = secret_keys[key] = bool(_SECRET_KEYS.search(key))
        return hit

    def scrub(text: str) -> str:
        for s in values:
            if s in text:
                text = text.replace(s, "[REDACTED]")
        return _BEARER.sub(r"\1[REDACTED]", text) if "Bearer" in text else text

    def clean(key: str, value: Any) -> Any:
        if key and secret_key(key):
            return "[REDACTED]"
        if value is None or type(value) in _NUMBERS:
            return value
        if isinstance(value, str):
            return scrub(value) if suspect(value) else value
        if isinstance(value, dict):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean("", v) for v in value]
        return value

    def redact(_: Any, __: str, event: EventDict) -> EventDict:
        for key, value in event.items():
            if secret_key(key):
                event[key] = "[REDACTED]"
            elif type(value) is str:
                if suspect(value):
                    event[key] = scrub(value)
            elif value is not None and type(value) not in _NUMBERS:
                event[key] = clean("", value)
        return event

    return redact


_KEY_CACHE = 4096
_NUMBERS = frozenset({int, float, bool})


def drop_content(_: Any, __: str, event: EventDict) -> EventDict:
    """Leave prompts and outputs out of logs (AGENTQ_LOG_CONTENT=false)."""
    for key in _CONTENT_KEYS & event.keys():
        event[key] = "[omitted]"
    return event


def keep_for_job(_: Any, __: str, event: EventDict) -> EventDict:
    """Append a copy of the event to the running job's log, if a job is running, and hand it
    (with its index in that log) to the live publisher, if any."""
    events = _job_events.get()
    if events is not None and len(events) < MAX_EVENTS_PER_JOB:
        kept = {k: v for k, v in event.items() if k not in _JOB_CONTEXT}
        events.append(kept)
        live = _job_live.get()
        if live is not None:
            live(len(events) - 1, kept)
    return event


_JOB_CONTEXT = frozenset({"job_id", "batch_id", "custom_id", "worker"})
"""Fields bound on every event of a job: the record holds them once, not per event."""


def add_static(fields: dict[str, Any]) -> Processor:
    def add(_: Any, __: str, event: EventDict) -> EventDict:
        for k, v in fields.items():
            event.setdefault(k, v)
        return event

    return add


def configure(
    *,
    level: str = "info",
    fmt: str = "auto",
    secrets: list[str] | None = None,
    log_content: bool = True,
    static: dict[str, Any] | None = None,
    log_file: Path | None = None,
) -> None:
    """Configure structlog once per process: stdout, or a JSON-lines file (for `agentq run`,
    whose stdout shows results)."""
    out: TextIO = sys.stdout
    if log_file is not None:  # prompts and outputs: readable by their owner only
        private_dir(log_file.parent)
        out = open_private(log_file, "a")
    console = fmt == "console" or (fmt == "auto" and log_file is None and sys.stdout.isatty())
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_static(static or {}),
        # Tracebacks become data first, so the redactor sees exception messages too.
        structlog.processors.dict_tracebacks,
        redactor(secrets or []),
    ]
    if not log_content:
        processors.append(drop_content)
    processors += [
        keep_for_job,
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One writer for every event (a factory building one per event costs a lock look-up).
        logger_factory=_shared(structlog.WriteLogger(out)),
        # Not cached: a module's logger cached on first use keeps the configuration of that
        # moment (its output, its redactor's secrets) when a process builds a second worker
        # (tests, an embedding application). Costs a few microseconds per event.
        cache_logger_on_first_use=False,
    )
    # arq logs every job start and end through stdlib logging: too chatty at batch volume.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")


def _shared(writer: structlog.WriteLogger) -> Callable[..., structlog.WriteLogger]:
    def factory(*args: Any) -> structlog.WriteLogger:
        return writer

    return factory


def end_live() -> None:
    """The job's record has been built: events from here on (job.stored, ...) are not in it,
    so live followers must not get them either."""
    _job_live.set(None)


@contextmanager
def job_context(
    live: Callable[[int, dict[str, Any]], None] | None = None, **bound: Any
) -> Iterator[list[dict[str, Any]]]:
    """Bind job fields to every event and collect the job's events (yielded list); `live`
    also gets each event as it is kept, with its index."""
    events: list[dict[str, Any]] = []
    token = _job_events.set(events)
    live_token = _job_live.set(live)
    with structlog.contextvars.bound_contextvars(**bound):
        try:
            yield events
        finally:
            _job_live.reset(live_token)
            _job_events.reset(token)


def json_safe(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's log as it can be stored: values JSON cannot hold (a plugin logged an object)
    become their repr, and a last event says which events were changed."""
    try:
        json.dumps(events)
        return events
    except (TypeError, ValueError):
        pass
    changed: list[int] = []
    out = []
    for i, event in enumerate(events):
        try:
            json.dumps(event)
            out.append(event)
        except (TypeError, ValueError):
            changed.append(i)
            out.append(json.loads(json.dumps(event, default=repr, skipkeys=True)))
    out.append(
        {
            "event": "log.values_stringified",
            "level": "warning",
            "events": changed,
            "reason": "these events held values JSON cannot store; they are kept as repr()",
        }
    )
    return out
