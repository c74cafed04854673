"""Configuration from the environment (12-factor); a .env file is read if present."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from . import keys
from .redact import safe_url


class ConfigError(Exception):
    """A setting has a bad value; the message names the environment variable."""


def check_router_url(url: str) -> str:
    """A Router URL must not carry credentials: the client sends the key as a Bearer header
    and refuses a URL with user:password@ (and they would end up in messages)."""
    try:
        parts = urlsplit(url)
        has_userinfo = parts.username is not None or parts.password is not None
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if has_userinfo:
        raise ValueError(
            "a Router URL cannot carry user:password@ — remove it and put the key in "
            "HANZO_API_KEY (or a Router's key_env)"
        )
    return url


class RouterSpec(BaseModel):
    """Another OpenAI-compatible Router; its key is read from the named environment variable."""

    model_config = ConfigDict(extra="forbid")

    url: str
    key_env: str | None = None

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        return check_router_url(v)

    def api_key(self) -> str:
        return os.environ.get(self.key_env, "") if self.key_env else ""


class RateLimit(BaseModel):
    """A Router budget: requests and/or tokens per minute, for all workers together."""

    model_config = ConfigDict(extra="forbid")

    rpm: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Requests per minute."""
    tpm: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Tokens (input and output) per minute."""

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimit:
        if self.rpm is None and self.tpm is None:
            raise ValueError('a budget needs "rpm", "tpm" or both')
        return self


RATE_LIMITS_EXAMPLE = '{"gpt-4o": {"rpm": 500, "tpm": 200000}, "*": {"rpm": 1000}}'


class Settings(BaseSettings):
    # An empty variable counts as unset: compose's `X: ${X:-}` passes every setting through,
    # and AGENTQ_RATE_LIMITS="" (like any JSON setting) then means none instead of bad JSON.
    model_config = SettingsConfigDict(
        env_prefix="AGENTQ_",
        env_file=".env",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        validate_by_name=True,
    )

    router_url: str = Field(
        "http://localhost:4000/v1",
        validation_alias=AliasChoices("HANZO_ROUTER_URL", "AGENTQ_ROUTER_URL"),
    )
    """OpenAI-compatible base URL of the Router."""

    api_key: SecretStr = Field(
        SecretStr(""), validation_alias=AliasChoices("HANZO_API_KEY", "AGENTQ_API_KEY")
    )
    """Router key; never logged, never stored in Redis."""

    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL"))
    """redis:// or rediss:// URL; unset means the embedded Valkey server under data_dir."""

    data_dir: str = ".agentq"
    """Where the embedded Valkey server keeps its data (used only when REDIS_URL is unset)."""

    embedded_idle_s: float = Field(600.0, ge=0)
    """The embedded server shuts itself down (saving its data) after this long unused; 0 keeps
    it running. The next agentq command starts it again."""

    concurrency: int = Field(50, ge=1, le=10_000)
    """Agent runs in flight per worker process."""

    max_model_calls: int | None = Field(None, ge=1)
    """Model calls in flight per worker process (default: the concurrency)."""

    redis_connections: int = Field(64, ge=4, le=10_000)
    """Redis connections per worker process, at most: a command waits for a free one. Without
    a bound a worker opens one per command in flight, about one per run at high concurrency,
    and a fleet outgrows Redis's maxclients (10,000 by default)."""

    queue: str = Field(keys.DEFAULT_QUEUE, min_length=1, max_length=200)
    """Name of the arq queue (a Redis sorted set). Each queue's jobs run only on its workers:
    a batch stays in the queue it was submitted to, and its leases, repairs and fair share are
    the queue's own."""

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, v: str) -> str:
        if any(c in "|'\"\\" or c.isspace() or not c.isprintable() for c in v):
            raise ValueError(
                "a queue name may not hold '|', quotes, backslashes, spaces or control "
                "characters: pick a name such as agentq:queue:gpu"
            )
        return v

    default_model: str = "gpt-4o-mini"
    """Model for jobs that name none; "auto" routes by input complexity."""

    auto_threshold_chars: int = Field(50, ge=1)
    """model="auto": inputs shorter than this go to auto_small_model, others to auto_large_model."""

    auto_small_model: str = "gpt-3.5-turbo"
    auto_large_model: str = "gpt-4"

    max_turns: int = Field(10, ge=1, le=100)
    """Default max_turns of a job."""

    job_timeout_s: float = Field(600.0, gt=0, le=86_400)
    """Default whole-job timeout; a job's timeout_s overrides it."""

    max_job_timeout_s: float = Field(3600.0, gt=0, le=86_400)
    """Upper bound on any job's timeout_s; arq's own job timeout is set just above it."""

    call_timeout_s: float = Field(120.0, gt=0)
    """Timeout of one model call."""

    max_attempts_per_model: int = Field(3, ge=1, le=20)
    """Tries of one model for retryable errors before the next fallback."""

    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)

    outage_max_s: float = Field(6 * 3600.0, gt=0, le=7 * 86_400)
    """How long jobs wait out a Router or model outage (its circuit breaker open) before they
    fail as router_unreachable. Waiting spends none of a job's tries nor its timeout_s."""

    lease_s: float = Field(30.0, ge=1)
    """A running job's lease: if its worker dies, the job runs again elsewhere within about
    this long. Workers renew leases every lease_s / 3."""

    max_runs: int = Field(3, ge=1, le=100)
    """Starts of one job whose worker died each time, before it fails instead."""

    shutdown_grace_s: int = Field(30, ge=0)
    """On SIGTERM a worker takes no new jobs and lets running ones finish for this long; the
    rest go back to the queue."""

    max_input_chars: int = Field(200_000, ge=1)
    """Largest job input accepted at submit."""

    max_line_bytes: int = Field(1 << 20, ge=1024)
    """Longest job line accepted at submit (a job given through the Python API: as JSON).
    Every field has its own bound too (README: "Limits")."""

    routers: dict[str, RouterSpec] = Field(default_factory=dict)
    """More Routers by name, as JSON: {"backup": {"url": "https://...", "key_env": "BACKUP_KEY"}};
    a job's model or fallback "backup:gpt-4o" goes to that Router."""

    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    """Router budgets shared by every worker on this Redis, as JSON {"gpt-4o": {"rpm": 500,
    "tpm": 200000}}: by model name as jobs write it ("backup:gpt-4o" for a named Router), "*"
    for all calls to the default Router together ("backup:*" for a named one). A call waits
    for its turn under every budget that applies to it."""

    mcp_servers: str = ""
    """MCP servers the workers connect to, as JSON: {"files": {"command": "python", "args":
    [...]}, "search": {"url": "http://host/mcp", "headers": {...}}}; jobs name them."""

    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)
    """USD per million input and output tokens by model, as JSON {"gpt-4o": [2.5, 10]}: the
    cost of calls whose Router sends no x-llm-response-cost header."""

    result_ttl_s: int = Field(7 * 86_400, ge=60)
    """How long job records and batch counters are kept."""

    plugins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Python modules that register tools and agent profiles (comma-separated)."""

    poll_delay_s: float = Field(0.02, gt=0)
    """The least time between two reads of the queue by a busy worker: a freed slot waits up
    to this long for its next job. An idle worker does not poll: enqueues wake it."""

    metrics_port: int = Field(0, ge=0, le=65535)
    """Port of the worker's Prometheus /metrics endpoint; 0 turns it off (9108 in the compose
    stack)."""

    metrics_host: str = "127.0.0.1"
    """Address /metrics listens on: this machine only by default (it has no auth); the image
    sets 0.0.0.0 so Prometheus can reach it over the container network."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    cpu_turns: bool = True
    """A worker's runs take turns at the CPU between model calls (worker/baton.py): runs that
    come back from the Router together then go through one after the other."""

    trace_events: bool = True
    """Agent and tool spans of the Agents SDK become events in the job's log."""

    otlp_endpoint: str | None = None
    """Also export agent, model and tool spans to OpenTelemetry at this OTLP/HTTP URL (e.g.
    http://collector:4318/v1/traces); needs `pip install 'agentq[otel]'`."""

    log_content: bool = True
    """Keep prompts and outputs in log events (set false to leave them out)."""

    @field_validator("router_url")
    @classmethod
    def _router_url(cls, v: str) -> str:
        return check_router_url(v)

    @field_validator("rate_limits")
    @classmethod
    def _budget_names(cls, v: dict[str, RateLimit], info: ValidationInfo) -> dict[str, RateLimit]:
        routers = info.data.get("routers") or {}
        for name in v:
            prefix, sep, rest = name.partition(":")
            if not name.strip():
                raise ValueError('a budget needs a model name (or "*")')
            if sep and rest == "*" and prefix not in routers:
                raise ValueError(
                    f'"{name}" names no Router of AGENTQ_ROUTERS: use "*" for the default '
                    'Router, "NAME:*" for a Router named in AGENTQ_ROUTERS'
                )
        return v

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @property
    def model_call_limit(self) -> int:
        return self.max_model_calls or self.concurrency


SECRET_FIELDS = frozenset({"api_key", "redis_url", "router_url", "routers", "mcp_servers"})
"""Fields that may hold a key or a password: a bad value is never echoed (URLs are shown with
their secrets hidden)."""


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with a clear error naming the variable on a bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            field = _field_name(str(loc[0])) if loc else "?"
            where = ".".join(str(p) for p in loc[1:])
            lines.append(
                f"{_env_name(field)}{': ' + where if where else ''}: {err['msg']}"
                f"{_shown(field, err.get('input'))}{_hint(field, err['type'])}"
            )
        raise ConfigError("bad configuration:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # a JSON setting that isn't JSON
        m = re.search(r'field "(\w+)"', str(exc))
        env = _env_name(m.group(1)) if m else "a setting"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        example = (
            f" — write it as {RATE_LIMITS_EXAMPLE}" if m and m.group(1) == "rate_limits" else ""
        )
        raise ConfigError(f"bad configuration: {env} is not valid JSON{cause}{example}") from None


def _shown(field: str, value: object) -> str:
    """The bad value for the message, unless it may hold a secret."""
    if field not in SECRET_FIELDS:
        text = repr(value)
        return f" (got {text[:80]}{'…' if len(text) > 80 else ''})"
    if field.endswith("_url") and isinstance(value, str):
        return f" (got {safe_url(value)!r})"
    return ""


def _hint(field: str, err_type: str) -> str:
    if field == "rate_limits":
        return f" — write it as {RATE_LIMITS_EXAMPLE}: rpm and/or tpm, each above 0"
    if field == "routers" and err_type == "extra_forbidden":
        return (
            ' — a Router takes "url" and "key_env" only: put its key in an environment '
            'variable and name that variable in "key_env"'
        )
    return ""


def _field_name(loc: str) -> str:
    """The field a validation error's location names (it is the alias for aliased fields)."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc in alias.choices:
            return name
    return loc


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"AGENTQ_{field.upper()}"
