"""Every SDK and openai error maps to one of the contract's error types, here and nowhere else,
with a message that says what to do."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
from agents.exceptions import MaxTurnsExceeded, ModelBehaviorError, UserError

from producer.models import JobError
from producer.redact import safe_url

from .breaker import BreakerOpen, OutageTooLong


class InvalidJob(Exception):
    """The job names something the workers cannot run (unknown tool, agent profile...)."""


class OutputInvalid(Exception):
    """The final output does not match the job's output_schema."""


@dataclass(frozen=True)
class Failure:
    error: JobError
    retry_after_s: float | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """OpenAI-style durations in x-ratelimit-reset-*: "20ms", "1s", "6m0s", "1h2m3.5s"."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _ratelimit_reset(get: Any) -> float | None:
    """When a budget is spent (x-ratelimit-remaining-* is 0), its reset time."""
    waits = []
    for kind in ("requests", "tokens"):
        if str(get(f"x-ratelimit-remaining-{kind}", "")).strip() == "0":
            reset = parse_duration(str(get(f"x-ratelimit-reset-{kind}", "")))
            if reset is not None:
                waits.append(reset)
    return max(waits) if waits else None


def retry_after(headers: object) -> float | None:
    """Seconds the Router asks us to wait: retry-after-ms, retry-after (seconds or HTTP date),
    LiteLLM's llm_provider-retry-after, or the reset time of a spent x-ratelimit-* budget."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    ms = get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    for name in ("retry-after", "llm_provider-retry-after"):
        value = get(name)
        if not value:
            continue
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            continue
        return max(0.0, parsed.timestamp() - time.time())
    return _ratelimit_reset(get)


def _router_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return exc.message


def _is_connection_failure(exc: BaseException) -> bool:
    """The aiohttp transport reports a refused or dropped connection as a ConnectTimeout; its
    cause chain tells a real timeout from a connection failure."""
    seen: BaseException | None = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return False
        if isinstance(seen, aiohttp.ClientConnectionError | ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def classify(exc: BaseException, *, router_url: str, model: str) -> Failure:
    """The contract's error for an exception raised while running one attempt of a job."""
    router_url = safe_url(router_url)  # job errors are stored, exported and shown

    def fail(kind: str, message: str, retryable: bool, after: float | None = None) -> Failure:
        return Failure(JobError(type=kind, message=message, retryable=retryable), after)  # type: ignore[arg-type]

    if isinstance(exc, BreakerOpen | OutageTooLong):
        return fail(exc.kind, str(exc), True)
    if isinstance(exc, openai.APITimeoutError) and not _is_connection_failure(exc):
        return fail("timeout", f"model call to {model} timed out at the Router {router_url}", True)
    if isinstance(exc, openai.APIConnectionError):
        return fail(
            "router_unreachable",
            f"Cannot connect to Router at {router_url} — is it running? `docker compose up "
            "router`, or set HANZO_ROUTER_URL",
            True,
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return fail(
            "auth_failed",
            f"{exc.status_code} from Router: invalid HANZO_API_KEY — generate a key in the Router "
            "dashboard and `export HANZO_API_KEY=...`",
            False,
        )
    if isinstance(exc, openai.RateLimitError):
        after = retry_after(exc.response.headers)
        return fail(
            "rate_limited", f"429 from Router for {model}: {_router_message(exc)}", True, after
        )
    if isinstance(exc, openai.APIStatusError):
        message = _router_message(exc)
        if (
            exc.status_code == 404
            or "Invalid model name" in message
            or "model_not_found" in str(exc.code)
        ):
            return fail(
                "model_not_found", f"model '{model}' not found — see `agentq models`", False
            )
        if exc.status_code >= 500 or exc.status_code in (408, 409):
            return fail(
                "router_error",
                f"{exc.status_code} from Router for {model}: {message}",
                True,
                retry_after(exc.response.headers),
            )
        return fail("invalid_job", f"{exc.status_code} from Router for {model}: {message}", False)
    if isinstance(exc, MaxTurnsExceeded):
        return fail(
            "max_turns_exceeded",
            f"{exc} — raise max_turns in the job, or simplify the task",
            False,
        )
    if isinstance(exc, OutputInvalid | ModelBehaviorError):
        return fail("output_invalid", f"model output is not valid: {exc}", False)
    if isinstance(exc, InvalidJob | UserError):
        return fail("invalid_job", str(exc), False)
    from .mcp import McpUnavailable  # here: worker.mcp imports this module

    if isinstance(exc, McpUnavailable):
        return fail("tool_error", str(exc), True)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return fail("timeout", "job timed out", False)
    return fail("tool_error", f"{type(exc).__name__}: {exc}", False)
