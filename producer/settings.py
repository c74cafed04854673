"""Configuration from the environment (12-factor); a .env file is read if present."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigError(Exception):
    """A setting has a bad value; the message names the environment variable."""


class RouterSpec(BaseModel):
    """Another OpenAI-compatible Router; its key is read from the named environment variable."""

    model_config = ConfigDict(extra="forbid")

    url: str
    key_env: str | None = None

    def api_key(self) -> str:
        return os.environ.get(self.key_env, "") if self.key_env else ""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENTQ_", env_file=".env", extra="ignore", frozen=True, validate_by_name=True
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

    queue: str = "agentq:queue"
    """Name of the arq queue (a Redis sorted set)."""

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
    """How often a worker looks at the queue for new jobs. A freed slot waits up to this long
    for its next job; an idle worker spends about 3% of a core at 0.02 (raise it for idle
    fleets)."""

    metrics_port: int = Field(0, ge=0, le=65535)
    """Port of the worker's Prometheus /metrics endpoint; 0 turns it off (9108 in the compose
    stack)."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    trace_events: bool = True
    """Agent and tool spans of the Agents SDK become events in the job's log."""

    otlp_endpoint: str | None = None
    """Also export agent, model and tool spans to OpenTelemetry at this OTLP/HTTP URL (e.g.
    http://collector:4318/v1/traces); needs `pip install 'agentq[otel]'`."""

    log_content: bool = True
    """Keep prompts and outputs in log events (set false to leave them out)."""

    @field_validator("plugins", mode="before")
    @classmethod
    def _split_plugins(cls, v: object) -> object:
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @property
    def model_call_limit(self) -> int:
        return self.max_model_calls or self.concurrency


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with a clear error naming the variable on a bad value."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            env = _env_name(field)
            lines.append(f"{env}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("bad configuration:\n  " + "\n  ".join(lines)) from None


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"AGENTQ_{field.upper()}"
