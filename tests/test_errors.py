"""Every openai/SDK exception maps to one contract error type, with a message saying what to do."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import aiohttp
import httpx2
import openai
import pytest
from agents.exceptions import MaxTurnsExceeded, ModelBehaviorError, UserError

from worker.errors import Failure, InvalidJob, OutputInvalid, classify, retry_after

ROUTER = "http://r/v1"
MODEL = "gpt-5"
REQUEST = httpx2.Request("POST", "http://r/v1/chat/completions")


def response(status: int, headers: dict[str, str] | None = None) -> httpx2.Response:
    return httpx2.Response(status, headers=headers or {}, request=REQUEST)


def body(message: str) -> dict[str, Any]:
    return {"error": {"message": message}}


def status_error(
    cls: type[openai.APIStatusError],
    status: int,
    message: str = "boom",
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    return cls(message, response=response(status, headers), body=body(message))


def run(exc: BaseException) -> Failure:
    return classify(exc, router_url=ROUTER, model=MODEL)


def caused_by(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


# --- the table --------------------------------------------------------------------------------

CASES = [
    pytest.param(
        openai.APIConnectionError(request=REQUEST),
        "router_unreachable",
        True,
        ["Cannot connect to Router at http://r/v1 — is it running?", "HANZO_ROUTER_URL"],
        id="connection-error",
    ),
    pytest.param(
        openai.APITimeoutError(request=REQUEST),
        "timeout",
        True,
        ["timed out", MODEL, ROUTER],
        id="api-timeout",
    ),
    pytest.param(
        status_error(openai.AuthenticationError, 401, "bad key"),
        "auth_failed",
        False,
        ["401 from Router: invalid HANZO_API_KEY", "export HANZO_API_KEY"],
        id="401",
    ),
    pytest.param(
        status_error(openai.PermissionDeniedError, 403, "forbidden"),
        "auth_failed",
        False,
        ["403 from Router: invalid HANZO_API_KEY"],
        id="403",
    ),
    pytest.param(
        status_error(openai.RateLimitError, 429, "slow down", {"retry-after": "3"}),
        "rate_limited",
        True,
        ["429 from Router for gpt-5: slow down"],
        id="429",
    ),
    pytest.param(
        status_error(
            openai.BadRequestError,
            400,
            "Invalid model name passed in model=gpt-5. Call `/v1/models` to view available models",
        ),
        "model_not_found",
        False,
        ["model 'gpt-5' not found — see `agentq models`"],
        id="400-invalid-model-name",
    ),
    pytest.param(
        status_error(openai.NotFoundError, 404, "no such thing"),
        "model_not_found",
        False,
        ["model 'gpt-5' not found — see `agentq models`"],
        id="404",
    ),
    pytest.param(
        status_error(openai.BadRequestError, 400, "temperature must be <= 2"),
        "invalid_job",
        False,
        ["400 from Router for gpt-5: temperature must be <= 2"],
        id="400-other",
    ),
    pytest.param(
        status_error(openai.UnprocessableEntityError, 422, "bad field"),
        "invalid_job",
        False,
        ["422 from Router for gpt-5: bad field"],
        id="422",
    ),
    pytest.param(
        status_error(openai.InternalServerError, 500, "upstream exploded"),
        "router_error",
        True,
        ["500 from Router for gpt-5: upstream exploded"],
        id="500",
    ),
    pytest.param(
        status_error(openai.InternalServerError, 503, "overloaded"),
        "router_error",
        True,
        ["503 from Router for gpt-5: overloaded"],
        id="503",
    ),
    pytest.param(
        status_error(openai.APIStatusError, 408, "request timeout"),
        "router_error",
        True,
        ["408 from Router"],
        id="408",
    ),
    pytest.param(
        MaxTurnsExceeded("Max turns (3) exceeded"),
        "max_turns_exceeded",
        False,
        ["Max turns (3) exceeded", "raise max_turns"],
        id="max-turns",
    ),
    pytest.param(
        ModelBehaviorError("bad"),
        "output_invalid",
        False,
        ["model output is not valid: bad"],
        id="model-behavior",
    ),
    pytest.param(
        OutputInvalid("not matching schema"),
        "output_invalid",
        False,
        ["not matching schema"],
        id="output-invalid",
    ),
    pytest.param(InvalidJob("x"), "invalid_job", False, ["x"], id="invalid-job"),
    pytest.param(
        UserError("unknown tool"), "invalid_job", False, ["unknown tool"], id="sdk-user-error"
    ),
    pytest.param(TimeoutError(), "timeout", False, ["job timed out"], id="timeout-error"),
    pytest.param(
        ValueError("tool broke"),
        "tool_error",
        False,
        ["ValueError: tool broke"],
        id="other-exception",
    ),
]


@pytest.mark.parametrize(("exc", "kind", "retryable", "message_parts"), CASES)
def test_classify(exc: BaseException, kind: str, retryable: bool, message_parts: list[str]) -> None:
    failure = run(exc)

    assert failure.error.type == kind
    assert failure.error.retryable is retryable
    for part in message_parts:
        assert part in failure.error.message


def test_rate_limit_carries_retry_after() -> None:
    exc = status_error(openai.RateLimitError, 429, "slow down", {"retry-after": "3"})
    assert run(exc).retry_after_s == 3.0


def test_rate_limit_without_header_has_no_retry_after() -> None:
    assert run(status_error(openai.RateLimitError, 429)).retry_after_s is None


def test_server_error_carries_retry_after_ms() -> None:
    exc = status_error(openai.InternalServerError, 503, "busy", {"retry-after-ms": "1500"})
    assert run(exc).retry_after_s == 1.5


def test_model_not_found_by_error_code() -> None:
    exc = openai.BadRequestError(
        "no",
        response=response(400),
        body={"code": "model_not_found", "message": "The model does not exist"},
    )
    assert exc.code == "model_not_found"
    assert run(exc).error.type == "model_not_found"


def test_router_message_falls_back_to_exception_message() -> None:
    exc = openai.InternalServerError("plain failure", response=response(502), body="<html>")
    assert run(exc).error.message == "502 from Router for gpt-5: plain failure"


def test_non_retryable_errors_have_no_retry_after() -> None:
    assert run(status_error(openai.AuthenticationError, 401)).retry_after_s is None


# --- timeouts that are really connection failures ---------------------------------------------


@pytest.mark.parametrize(
    "cause",
    [
        pytest.param(aiohttp.ServerDisconnectedError(), id="server-disconnected"),
        pytest.param(ConnectionRefusedError(111, "Connection refused"), id="connection-refused"),
    ],
)
def test_timeout_caused_by_connection_failure_is_router_unreachable(cause: Exception) -> None:
    exc = caused_by(openai.APITimeoutError(request=REQUEST), cause)

    failure = run(exc)

    assert failure.error.type == "router_unreachable"
    assert failure.error.retryable is True
    assert "Cannot connect to Router at http://r/v1" in failure.error.message


def test_connection_failure_deep_in_the_cause_chain() -> None:
    inner = caused_by(RuntimeError("wrapped"), aiohttp.ServerDisconnectedError())
    exc = caused_by(openai.APITimeoutError(request=REQUEST), inner)
    assert run(exc).error.type == "router_unreachable"


def test_timeout_caused_by_timeout_is_a_timeout() -> None:
    exc = caused_by(openai.APITimeoutError(request=REQUEST), TimeoutError())

    failure = run(exc)

    assert failure.error.type == "timeout"
    assert failure.error.retryable is True


def test_timeout_found_before_connection_failure_wins() -> None:
    inner = caused_by(TimeoutError(), aiohttp.ServerDisconnectedError())
    exc = caused_by(openai.APITimeoutError(request=REQUEST), inner)
    assert run(exc).error.type == "timeout"


# --- retry_after ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after": "3"}, 3.0, id="seconds"),
        pytest.param({"retry-after": "0.25"}, 0.25, id="fractional-seconds"),
        pytest.param({"retry-after": "-5"}, 0.0, id="negative-clamped"),
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="milliseconds"),
        pytest.param({"retry-after-ms": "250", "retry-after": "9"}, 0.25, id="ms-wins"),
        pytest.param({"retry-after-ms": "abc", "retry-after": "2"}, 2.0, id="bad-ms-falls-back"),
        pytest.param({"llm_provider-retry-after": "7"}, 7.0, id="litellm-header"),
        pytest.param({"retry-after": ""}, None, id="empty"),
        pytest.param({}, None, id="no-headers"),
        pytest.param({"x-other": "1"}, None, id="unrelated-header"),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers) == expected


def test_retry_after_reads_httpx_headers_case_insensitively() -> None:
    assert retry_after(response(429, {"Retry-After": "4"}).headers) == 4.0


def test_retry_after_http_date_in_the_future() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    value = retry_after({"retry-after": when})
    assert value is not None
    assert 27 <= value <= 31


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0


def test_retry_after_without_a_mapping_is_none() -> None:
    assert retry_after(None) is None
    assert retry_after("retry-after: 3") is None


def test_retry_after_garbage_is_none() -> None:
    assert retry_after({"retry-after": "soon"}) is None


def test_classify_rate_limit_with_garbage_retry_after() -> None:
    exc = status_error(openai.RateLimitError, 429, "slow down", {"retry-after": "soon"})
    failure = run(exc)
    assert failure.error.type == "rate_limited"
    assert failure.retry_after_s is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    from worker.errors import parse_duration

    assert parse_duration(text) == seconds


def test_retry_after_from_spent_ratelimit_budget() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert retry_after(headers) == 360.0
    assert retry_after({**headers, "x-ratelimit-remaining-tokens": "1000"}) == 2.0
    assert (
        retry_after({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s"})
        is None
    )
