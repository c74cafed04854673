"""structlog set-up: JSON lines, secrets redacted, a job's events kept for its record."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.logs import MAX_EVENTS_PER_JOB, configure, drop_content, job_context, redactor

SECRET = "sk-secret-1234"


def redact(secrets: list[str], **event: Any) -> dict[str, Any]:
    return dict(redactor(secrets)(None, "info", event))


# --- processors as pure functions -------------------------------------------------------------


def test_secret_is_replaced_inside_string_values() -> None:
    event = redact([SECRET], event=f"calling with {SECRET}", url=f"http://x/?k={SECRET}&a=1")
    assert event == {"event": "calling with [REDACTED]", "url": "http://x/?k=[REDACTED]&a=1"}


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "api-key",
        "apikey",
        "API_KEY",
        "openai_api_key",
        "authorization",
        "Authorization",
        "password",
        "db_password",
        "secret",
        "client_secret",
        "token",
        "access_token",
    ],
)
def test_secret_named_keys_are_redacted(key: str) -> None:
    assert redact([], **{key: "anything", "other": "kept"}) == {
        key: "[REDACTED]",
        "other": "kept",
    }


def test_secret_named_key_is_redacted_whatever_the_value_type() -> None:
    assert redact([], token=12345)["token"] == "[REDACTED]"


@pytest.mark.parametrize("key", ["input_tokens", "output_tokens", "total_tokens", "max_tokens"])
def test_token_counts_are_not_redacted(key: str) -> None:
    assert redact([], **{key: 42}) == {key: 42}


def test_bearer_tokens_are_scrubbed() -> None:
    event = redact([], event="header was Bearer abc.DEF-123_x and more")
    assert event["event"] == "header was Bearer [REDACTED] and more"


def test_short_and_empty_secrets_are_ignored() -> None:
    event = redact(["", "abc"], event="abc is short")
    assert event["event"] == "abc is short"


def test_non_string_values_pass_through() -> None:
    assert redact([SECRET], count=3, ratio=0.5, flag=None) == {
        "count": 3,
        "ratio": 0.5,
        "flag": None,
    }


def test_secret_inside_nested_values_is_redacted() -> None:
    event = redact([SECRET], headers={"Authorization": f"Bearer {SECRET}"}, args=[f"key={SECRET}"])
    assert SECRET not in json.dumps(event)


_SECRET_NAMES = re.compile(r"(api[_-]?key|authorization|password|secret|token)$", re.I)


def _reference_redact(secrets: list[str], event: dict[str, Any]) -> dict[str, Any]:
    """The redactor's rules written plainly (the processor itself is tuned for speed)."""
    values = [s for s in secrets if s and len(s) >= 4]

    def clean(key: str, value: Any) -> Any:
        if key and _SECRET_NAMES.search(key):
            return "[REDACTED]"
        if isinstance(value, str):
            for s in values:
                value = value.replace(s, "[REDACTED]")
            return re.sub(r"(Bearer\s+)[A-Za-z0-9._\-]+", r"\1[REDACTED]", value)
        if isinstance(value, dict):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean("", v) for v in value]
        return value

    return {k: clean(k, v) for k, v in event.items()}


_words = st.sampled_from(
    ["sk-secret-1234", "sk-other-99", "Bearer", "Bearer abc.D-1", "token", "api_key", "x", " "]
)
_texts = st.lists(_words | st.text(max_size=6), max_size=5).map("".join)
_keys = _words | st.sampled_from(["event", "input_tokens", "Authorization", "db_password", "n"])
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(st.sampled_from(["sk-secret-1234", "sk-other-99", "abc", ""]), max_size=3),
    event=st.dictionaries(_keys, _values, max_size=6),
)
def test_redactor_follows_its_rules_on_any_event(secrets: list[str], event: dict[str, Any]) -> None:
    expected = _reference_redact(secrets, copy.deepcopy(event))
    assert redact(secrets, **copy.deepcopy(event)) == expected


def test_drop_content_blanks_prompts_and_outputs() -> None:
    event = {
        "event": "model_call",
        "input": "What is 2+2?",
        "output": "4",
        "prompt": "p",
        "messages": [{"role": "user", "content": "hi"}],
        "model": "gpt-4o",
    }
    assert drop_content(None, "info", event) == {
        "event": "model_call",
        "input": "[omitted]",
        "output": "[omitted]",
        "prompt": "[omitted]",
        "messages": "[omitted]",
        "model": "gpt-4o",
    }


def test_drop_content_without_content_changes_nothing() -> None:
    assert drop_content(None, "info", {"event": "x", "n": 1}) == {"event": "x", "n": 1}


# --- configure + job_context ------------------------------------------------------------------


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


JOB = {"job_id": "j1", "batch_id": "b1", "custom_id": "q1"}


@pytest.mark.usefixtures("reset_structlog")
def test_job_events_go_to_stdout_as_json_and_to_the_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(fmt="json", secrets=[SECRET])
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        log.info("job_started", model="gpt-4o")
        log.warning("retrying", attempt=2, note=f"key {SECRET} refused")
        log.info("model_call", api_key=SECRET, input_tokens=12, latency_ms=800)
    log.info("after_job")

    out = capsys.readouterr().out
    lines = json_lines(out)
    assert SECRET not in out
    assert [line["event"] for line in lines] == [
        "job_started",
        "retrying",
        "model_call",
        "after_job",
    ]
    for line in lines[:3]:
        assert {k: line[k] for k in JOB} == JOB
        assert line["timestamp"].endswith("Z")
    assert [line["level"] for line in lines] == ["info", "warning", "info", "info"]
    assert "job_id" not in lines[3]
    assert lines[1]["note"] == "key [REDACTED] refused"
    assert lines[2]["api_key"] == "[REDACTED]"
    assert lines[2]["input_tokens"] == 12

    assert [e["event"] for e in events] == ["job_started", "retrying", "model_call"]
    for event, line in zip(events, lines, strict=False):
        assert not {"job_id", "batch_id", "custom_id"} & event.keys()
        assert event == {k: v for k, v in line.items() if k not in JOB}
    assert SECRET not in json.dumps(events)


@pytest.mark.usefixtures("reset_structlog")
def test_events_outside_a_job_are_not_collected(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json")
    log = structlog.get_logger()

    log.info("before")
    with job_context(**JOB) as events:
        log.info("during")
    log.info("after")

    assert [e["event"] for e in events] == ["during"]
    assert [line["event"] for line in json_lines(capsys.readouterr().out)] == [
        "before",
        "during",
        "after",
    ]


@pytest.mark.usefixtures("reset_structlog")
def test_nested_jobs_keep_their_own_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json")
    log = structlog.get_logger()

    with job_context(job_id="outer") as outer:
        log.info("a")
        with job_context(job_id="inner") as inner:
            log.info("b")
        log.info("c")

    assert [e["event"] for e in outer] == ["a", "c"]
    assert [e["event"] for e in inner] == ["b"]
    assert [line["job_id"] for line in json_lines(capsys.readouterr().out)] == [
        "outer",
        "inner",
        "outer",
    ]


@pytest.mark.usefixtures("reset_structlog")
def test_job_events_are_capped(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json")
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        for i in range(MAX_EVENTS_PER_JOB + 25):
            log.info("step", i=i)

    assert len(events) == MAX_EVENTS_PER_JOB
    assert events[-1]["i"] == MAX_EVENTS_PER_JOB - 1
    assert len(json_lines(capsys.readouterr().out)) == MAX_EVENTS_PER_JOB + 25


@pytest.mark.usefixtures("reset_structlog")
def test_level_filters_events(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json", level="warning")
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")

    assert [line["event"] for line in json_lines(capsys.readouterr().out)] == ["w", "e"]
    assert [e["event"] for e in events] == ["w", "e"]


@pytest.mark.usefixtures("reset_structlog")
def test_log_content_false_omits_input(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json", log_content=False)
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        log.info("model_call", input="What is 2+2?", output="4", model="gpt-4o")

    (line,) = json_lines(capsys.readouterr().out)
    assert line["input"] == "[omitted]"
    assert line["output"] == "[omitted]"
    assert line["model"] == "gpt-4o"
    assert events[0]["input"] == "[omitted]"


@pytest.mark.usefixtures("reset_structlog")
def test_log_content_true_keeps_input(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json")
    structlog.get_logger().info("model_call", input="What is 2+2?")
    (line,) = json_lines(capsys.readouterr().out)
    assert line["input"] == "What is 2+2?"


@pytest.mark.usefixtures("reset_structlog")
def test_static_fields_are_added(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json", static={"worker": "host:1"})
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        log.info("x")
        log.info("y", worker="override")

    lines = json_lines(capsys.readouterr().out)
    assert [line["worker"] for line in lines] == ["host:1", "override"]
    assert all("worker" not in e for e in events)


@pytest.mark.usefixtures("reset_structlog")
def test_log_file_gets_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "logs" / "batch.jsonl"
    configure(fmt="auto", secrets=[SECRET], log_file=log_file)
    log = structlog.get_logger()

    with job_context(**JOB):
        log.info("one", token=SECRET)
        log.info("two", detail=SECRET)

    assert capsys.readouterr().out == ""
    text = log_file.read_text(encoding="utf-8")
    assert SECRET not in text
    lines = json_lines(text)
    assert [line["event"] for line in lines] == ["one", "two"]
    assert all(line["job_id"] == "j1" for line in lines)
    assert lines[1]["detail"] == "[REDACTED]"


@pytest.mark.usefixtures("reset_structlog")
def test_secret_in_exception_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure(fmt="json", secrets=[SECRET])
    log = structlog.get_logger()

    with job_context(**JOB) as events:
        try:
            raise RuntimeError(f"key {SECRET} rejected")
        except RuntimeError:
            log.exception("call_failed")

    assert SECRET not in capsys.readouterr().out
    assert SECRET not in json.dumps(events, default=str)


def test_worker_redacts_every_key_it_holds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from producer.settings import Settings
    from worker.settings import _secrets

    monkeypatch.setenv("BACKUP_ROUTER_KEY", "sk-backup-1234")
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = Settings(
        data_dir=str(tmp_path / ".agentq"),  # not ./.agentq, whose server may have a password
        api_key="sk-main-9999",  # type: ignore[arg-type]
        routers={"b": {"url": "http://b/v1", "key_env": "BACKUP_ROUTER_KEY"}},  # type: ignore[dict-item]
        mcp_servers=json.dumps(
            {"s": {"url": "http://m/mcp", "headers": {"Authorization": "Bearer tok-5555"}}}
        ),
    )
    assert _secrets(settings) == ["sk-main-9999", "sk-backup-1234", "tok-5555"]
