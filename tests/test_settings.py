"""Settings come from the environment (and a .env file); a bad value names its variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from producer.settings import ConfigError, Settings, load_settings

KEY = "sk-very-secret-key-0001"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No variable or .env file of the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith(("AGENTQ_", "HANZO_")) or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_design() -> None:
    s = load_settings()

    assert isinstance(s, Settings)
    assert s.router_url == "http://localhost:4000/v1"
    assert s.concurrency == 50
    assert s.redis_url is None
    assert s.api_key.get_secret_value() == ""
    assert s.data_dir == ".agentq"
    assert s.plugins == []
    assert s.log_content is True
    assert s.model_call_limit == 50


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANZO_ROUTER_URL", "http://router:4000/v1")
    monkeypatch.setenv("HANZO_API_KEY", KEY)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/2")
    monkeypatch.setenv("AGENTQ_CONCURRENCY", "200")

    s = load_settings()

    assert s.router_url == "http://router:4000/v1"
    assert s.api_key.get_secret_value() == KEY
    assert s.redis_url == "redis://redis:6379/2"
    assert s.concurrency == 200
    assert s.model_call_limit == 200


def test_agentq_prefixed_aliases_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_ROUTER_URL", "http://other:4000/v1")
    monkeypatch.setenv("AGENTQ_API_KEY", KEY)

    s = load_settings()

    assert s.router_url == "http://other:4000/v1"
    assert s.api_key.get_secret_value() == KEY


def test_max_model_calls_overrides_the_call_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_MAX_MODEL_CALLS", "8")
    assert load_settings().model_call_limit == 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [("a, b", ["a", "b"]), ("one", ["one"]), (" a ,, b ,", ["a", "b"]), ("", [])],
)
def test_plugins_are_comma_separated(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("AGENTQ_PLUGINS", value)
    assert load_settings().plugins == expected


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("AGENTQ_CONCURRENCY", "lots", "valid integer"),
        ("AGENTQ_CONCURRENCY", "0", "greater than or equal to 1"),
        ("AGENTQ_MAX_TURNS", "1000", "less than or equal to 100"),
        ("AGENTQ_LOG_LEVEL", "loud", "'debug', 'info', 'warning' or 'error'"),
        ("AGENTQ_LOG_CONTENT", "maybe", "valid boolean"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError) as info:
        load_settings()

    message = str(info.value)
    assert message.startswith("bad configuration:")
    assert f"{name}: " in message
    assert problem in message
    assert f"(got '{value}')" in message


def test_every_bad_value_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_CONCURRENCY", "lots")
    monkeypatch.setenv("AGENTQ_CALL_TIMEOUT_S", "-1")

    with pytest.raises(ConfigError) as info:
        load_settings()

    assert "AGENTQ_CONCURRENCY:" in str(info.value)
    assert "AGENTQ_CALL_TIMEOUT_S:" in str(info.value)


def test_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTQ_CONCURRENCY", "200")
    assert load_settings(concurrency=7).concurrency == 7


def test_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="AGENTQ_CONCURRENCY"):
        load_settings(concurrency=0)


def test_api_key_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HANZO_API_KEY", KEY)

    s = load_settings()

    assert isinstance(s.api_key, SecretStr)
    assert KEY not in repr(s.api_key)
    assert KEY not in str(s.api_key)
    assert KEY not in repr(s)
    assert KEY not in s.model_dump_json()


def test_dotenv_file_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        f"HANZO_ROUTER_URL=http://from-dotenv:4000/v1\nHANZO_API_KEY={KEY}\n"
        "AGENTQ_CONCURRENCY=12\nAGENTQ_PLUGINS=p1,p2\nUNRELATED=1\n",
        encoding="utf-8",
    )

    s = load_settings()

    assert s.router_url == "http://from-dotenv:4000/v1"
    assert s.api_key.get_secret_value() == KEY
    assert s.concurrency == 12
    assert s.plugins == ["p1", "p2"]


def test_environment_beats_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("AGENTQ_CONCURRENCY=12\n", encoding="utf-8")
    monkeypatch.setenv("AGENTQ_CONCURRENCY", "3")
    assert load_settings().concurrency == 3


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        s.concurrency = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "field", "default"),
    [
        ("AGENTQ_RATE_LIMITS", "rate_limits", {}),
        ("AGENTQ_ROUTERS", "routers", {}),
        ("AGENTQ_PRICES", "prices", {}),
        ("AGENTQ_MCP_SERVERS", "mcp_servers", ""),
        ("AGENTQ_PLUGINS", "plugins", []),
        ("REDIS_URL", "redis_url", None),
        ("AGENTQ_CONCURRENCY", "concurrency", 50),
        ("AGENTQ_LOG_LEVEL", "log_level", "info"),
    ],
)
def test_an_empty_variable_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch, name: str, field: str, default: object
) -> None:
    """Compose passes `X: ${X:-}` as an empty string when the shell has no X: that is the
    default, not a bad value (an empty JSON setting was refused as invalid JSON)."""
    monkeypatch.setenv(name, "")
    assert getattr(load_settings(), field) == default
    Path(".env").write_text(f"{name}=\n")  # likewise in a .env file
    monkeypatch.delenv(name)
    assert getattr(load_settings(), field) == default
