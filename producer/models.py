"""The job contract shared by producers and workers: job lines, result records, batch status."""

from __future__ import annotations

import re
import uuid
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from . import limits


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Priority(StrEnum):
    """A batch's priority: see PRIORITY_ROUNDS in producer/store.py for the rule."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


TERMINAL: frozenset[Status] = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ACTIVE: frozenset[Status] = frozenset({Status.QUEUED, Status.RUNNING})

ErrorType = Literal[
    "router_unreachable",
    "auth_failed",
    "model_not_found",
    "rate_limited",
    "router_error",
    "timeout",
    "max_turns_exceeded",
    "invalid_job",
    "tool_error",
    "output_invalid",
    "cancelled",
    "internal_error",
]


class _Strict(BaseModel):
    """Unknown fields are errors: a typo in a job file must not be silently ignored. The job
    side's models are built on first use (defer_build): commands that only read never pay."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


class ChatMessage(BaseModel):
    """One chat message of a conversation input; extra keys (name, tool_call_id...) pass through."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


Name = Annotated[str, StringConstraints(max_length=limits.MAX_NAME_CHARS)]


class AgentSpec(_Strict):
    """An inline agent. Tools and MCP servers are names: code never travels through Redis.
    With `profile`, the named profile registered on the workers is the base and the fields
    given here override it."""

    profile: Name | None = None
    name: Name = Field(default="Assistant", min_length=1)
    instructions: str = Field(
        default="You are a helpful assistant. Be concise.",
        max_length=limits.MAX_INSTRUCTIONS_CHARS,
    )
    tools: list[Name] = Field(default_factory=list, max_length=limits.MAX_NAMES)
    output_schema: dict[str, Any] | None = None
    model_settings: dict[str, Any] = Field(default_factory=dict)
    mcp_servers: list[Name] = Field(default_factory=list, max_length=limits.MAX_NAMES)

    @field_validator("output_schema")
    @classmethod
    def _schema_is_valid(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            # jsonschema and re2 load on the first schema: commands that only read don't pay
            from .schema import check_output_schema

            limits.check_json_size(v, limits.MAX_SCHEMA_CHARS)
            check_output_schema(v)  # its SchemaRefused is a ValueError: pydantic reports it
        return v

    @field_validator("model_settings")
    @classmethod
    def _settings_size(cls, v: dict[str, Any]) -> dict[str, Any]:
        limits.check_json_size(v, limits.MAX_MODEL_SETTINGS_CHARS)
        return v


STORED = "stored"
"""Validation context key for a job read back from Redis (Store.claim): some checks of a
newer agentq give way to what an older one accepted and queued."""


class JobMetadata(BaseModel):
    """Free-form metadata; user_id and tags have a meaning for the Router."""

    model_config = ConfigDict(extra="allow", defer_build=True)

    user_id: str | None = None
    tags: list[str] = Field(default_factory=list, max_length=limits.MAX_NAMES)
    tenant: str | None = Field(default=None, min_length=1, max_length=limits.MAX_NAME_CHARS)
    """Who the job is for: tenants share the workers fairly, above batches (README: Fair
    share)."""

    @field_validator("tenant", mode="wrap")
    @classmethod
    def _tenant_a_name(
        cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> str | None:
        try:
            tenant: str | None = handler(v)
            if tenant is not None and not tenant.strip():
                raise ValueError("tenant is blank: name the tenant, or leave it out")
            return tenant
        except ValueError:
            if info.context and info.context.get(STORED):
                # queued by an agentq whose metadata was free-form: a job without a tenant
                return None
            raise


JOB_MODEL_SETTINGS_REFUSED = frozenset(
    {"metadata", "store", "extra_headers", "extra_body", "extra_query", "extra_args", "retry"}
)
"""model_settings a job may not set: they would pass the job's values through to the Router
(request metadata, stored completions, raw headers and body). Agent profiles, written by the
operator, may set metadata and store."""


class AgentJob(_Strict):
    """One line of a job file."""

    custom_id: str = Field(min_length=1, max_length=512)
    input: str | list[ChatMessage]
    agent: str | AgentSpec | None = None
    model: Name | None = None
    fallbacks: list[Name] = Field(default_factory=list, max_length=limits.MAX_FALLBACKS)
    max_turns: int | None = Field(default=None, ge=1, le=100)
    timeout_s: float | None = Field(default=None, gt=0, le=86_400)
    metadata: JobMetadata = Field(default_factory=JobMetadata)

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, v: str | list[ChatMessage]) -> str | list[ChatMessage]:
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty: give the question or task as a non-empty string")
        if isinstance(v, list) and not v:
            raise ValueError("empty list: give at least one chat message")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, v: JobMetadata) -> JobMetadata:
        # counted as before tenants existed: a tenant left out adds no "tenant": null
        unset = {"tenant"} if v.tenant is None else None
        limits.check_json_size(v.model_dump(mode="json", exclude=unset), limits.MAX_METADATA_CHARS)
        return v

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError('model is blank: name a model, "auto", or leave it out')
        return v

    @model_validator(mode="after")
    def _no_router_passthrough(self) -> AgentJob:
        if isinstance(self.agent, AgentSpec):
            kept = sorted(set(self.agent.model_settings) & JOB_MODEL_SETTINGS_REFUSED)
            if kept:
                raise ValueError(
                    f"agent.model_settings may not set {', '.join(kept)}: what reaches the "
                    "Router besides the model call is the operator's choice (a job's user_id "
                    "and tags go in its metadata)"
                )
        return self

    @model_validator(mode="after")
    def _fallbacks_not_blank(self) -> AgentJob:
        if any(not f.strip() for f in self.fallbacks):
            raise ValueError("fallbacks contains a blank model name")
        return self

    @property
    def tenant(self) -> str | None:
        return self.metadata.tenant

    def input_text(self) -> str:
        """The text used for routing by complexity: the input, or all message text."""
        if isinstance(self.input, str):
            return self.input
        parts: list[str] = []
        for m in self.input:
            if isinstance(m.content, str):
                parts.append(m.content)
            elif m.content:
                parts.extend(str(p.get("text", "")) for p in m.content)
        return "\n".join(parts)


_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_LEGACY_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
"""Before ':' was reserved: batches submitted then may still be read, retried, cancelled."""


class InvalidBatchId(ValueError):
    pass


def check_batch_id(batch_id: str, *, existing: bool = False) -> str:
    """Batch ids name Redis keys and travel in job payloads: letters, digits and _ . -
    A ':' would let one batch's keys name another's ("a:order" is the order list of "a"), so a
    new batch may not have one; `existing` accepts the ids of batches submitted before."""
    ok = (_LEGACY_BATCH_ID if existing else _BATCH_ID).fullmatch(batch_id)
    if not ok or (existing and batch_id.endswith(":order")):
        raise InvalidBatchId(
            f"batch id {batch_id!r} is not allowed: use up to 128 letters, digits and _ . - "
            "(starting with a letter or digit; ':' is reserved for agentq's key names)"
        )
    return batch_id


def job_id_for(batch_id: str, custom_id: str) -> str:
    """Deterministic job id: the same batch and custom_id always name the same job."""
    # The length prefix keeps ("x", "y:z") and ("x:y", "z") apart.
    return uuid.uuid5(uuid.NAMESPACE_URL, f"agentq:{len(batch_id)}:{batch_id}:{custom_id}").hex


def new_batch_id() -> str:
    return "b_" + uuid.uuid4().hex[:16]


class JobError(BaseModel):
    type: ErrorType
    message: str
    retryable: bool = False


class Attempt(BaseModel):
    model: str
    ok: bool
    ms: int
    router: str = "default"
    error: str | None = None


class Usage(BaseModel):
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class ResultRecord(BaseModel):
    """What a job became; `agentq results` writes one a line."""

    custom_id: str
    job_id: str
    batch_id: str
    status: Status
    output: str | None = None
    output_json: Any = None
    model: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    enqueued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    error: JobError | None = None
    logs: list[dict[str, Any]] = Field(default_factory=list)


class ModelUsage(BaseModel):
    """What the succeeded jobs of one model used."""

    jobs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class BatchStatus(BaseModel):
    """Counters of one batch; they change atomically with each job's record."""

    batch_id: str
    total: int = 0
    sealed: bool = False
    counts: dict[Status, int] = Field(default_factory=lambda: {s: 0 for s in Status})
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    created_at: str | None = None
    models: dict[str, ModelUsage] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    """The priority of its latest submit."""
    queue: str | None = None
    """The queue it was submitted to: its jobs run on that queue's workers (None: submitted
    by an agentq before batches named their queue)."""

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in TERMINAL)

    @property
    def finished(self) -> bool:
        return self.sealed and self.done >= self.total

    @property
    def all_succeeded(self) -> bool:
        return self.finished and self.counts.get(Status.SUCCEEDED, 0) == self.total
