"""No secret reaches a message, a log or a job record: URLs are redacted by parsing, bad
settings that may hold a key are not echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer import AgentJob, Producer, Settings
from producer.redact import safe_url
from producer.settings import ConfigError, load_settings
from tests.helpers import records, run_batch
from worker.errors import classify
from worker.settings import _secrets

SECRET = "pw-S3cr3t"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis://:{SECRET}@x@host:6379/0", "redis://***@host:6379/0"),
        (f"redis://user:{SECRET}@host/0", "redis://user:***@host/0"),
        (f"redis://host:6379/0?password={SECRET}&db=2", "redis://host:6379/0?password=***&db=2"),
        (
            f"rediss://host?ssl_cert_reqs=none&token={SECRET}",
            "rediss://host?ssl_cert_reqs=none&token=***",
        ),
        (f"http://{SECRET}@router:4000/v1", "http://***@router:4000/v1"),
        (f"redis://:{SECRET}/x@host/0", "***"),  # an unescaped / in the password
        (f"redis://:1234#{SECRET}@host/0", "redis://***"),  # an unescaped # in the password
        ("http://router:4000/v1", "http://router:4000/v1"),
    ],
)
def test_safe_url_hides_every_part_of_a_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown
    assert "S3cr3t" not in safe_url(url) and "x@" not in safe_url(url)


def test_an_inline_key_in_routers_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AGENTQ_ROUTERS", f'{{"backup": {{"url": "http://b/v1", "api_key": "{SECRET}"}}}}'
    )
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert SECRET not in message
    assert "AGENTQ_ROUTERS: backup.api_key" in message and '"key_env"' in message


def test_routers_that_are_not_json_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_ROUTERS", f'{{"backup": {{"url": "http://b", "key": "{SECRET}"')
    with pytest.raises(ConfigError, match="AGENTQ_ROUTERS is not valid JSON") as info:
        load_settings()
    assert SECRET not in str(info.value)


def test_a_bad_url_setting_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redis_url=[f"redis://:{SECRET}@h"])
    assert SECRET not in str(info.value)


def test_job_errors_show_the_router_url_without_its_password() -> None:
    import httpx2
    import openai

    exc = openai.APIConnectionError(request=httpx2.Request("POST", "http://r/v1"))
    failure = classify(exc, router_url=f"http://agent:{SECRET}@r/v1", model="m")
    assert "Cannot connect to Router at http://agent:***@r/v1" in failure.error.message
    assert SECRET not in failure.error.message


def test_url_passwords_are_redacted_from_logs(settings: Settings) -> None:
    s = settings.model_copy(
        update={
            "router_url": f"http://agent:{SECRET}@r/v1",
            "redis_url": f"redis://u:{SECRET}-redis@h/0",
        }
    )
    assert {SECRET, f"{SECRET}-redis"} <= set(_secrets(s))


@pytest.mark.parametrize("name", ["HANZO_ROUTER_URL", "AGENTQ_ROUTERS"])
def test_a_router_url_with_a_password_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    url = f"http://agent:{SECRET}@r/v1"
    monkeypatch.setenv(name, url if name == "HANZO_ROUTER_URL" else f'{{"b": {{"url": "{url}"}}}}')
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{name}" in str(info.value) and "HANZO_API_KEY" in str(info.value)
    assert SECRET not in str(info.value)


async def test_a_secret_in_the_router_url_reaches_no_log_and_no_record(
    producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    down = settings.model_copy(
        update={"router_url": f"http://127.0.0.1:9/v1?token={SECRET}", "max_attempts_per_model": 1}
    )
    batch = await producer.submit([AgentJob(custom_id="u", input="What is 2+2?")])
    log = tmp_path / "worker.jsonl"
    await run_batch(producer, down, batch.id, log_file=log)
    r = (await records(producer, batch.id))["u"]
    assert r.error is not None and r.error.type == "router_unreachable"
    assert "http://127.0.0.1:9/v1?token=***" in r.error.message
    assert SECRET not in r.model_dump_json()
    assert '"worker.started"' in log.read_text()
    assert SECRET not in log.read_text()


def test_the_embedded_servers_password_is_redacted_from_logs(
    settings: Settings, tmp_path: Path
) -> None:
    from producer.embedded import PASSWORD_FILE
    from producer.private import private_dir, write_private

    d = private_dir(tmp_path / "embedded")
    write_private(d / PASSWORD_FILE, f"{SECRET}-embedded\n")
    s = settings.model_copy(update={"redis_url": None, "data_dir": str(d)})
    assert f"{SECRET}-embedded" in _secrets(s)
