"""Turning a job's agent spec or profile name into an Agents SDK Agent and its model settings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any

from agents import Agent, AgentOutputSchemaBase, ModelSettings
from agents.exceptions import ModelBehaviorError
from cachetools import LRUCache

from producer.limits import TooDeep, check_depth
from producer.models import AgentJob, AgentSpec
from producer.schema import (
    VALIDATION_BUDGET_S,
    BudgetSpent,
    SchemaRefused,
    check_output_schema,
    output_errors,
    output_validator,
)
from producer.settings import Settings

from .errors import InvalidJob
from .tools import Registry

_NOT_FROM_JOBS = {
    "store": "it would have the provider keep the prompts and outputs",
    "metadata": "the Router reads it for routing, tags and spend tracking; use the job's "
    "metadata (user_id, tags)",
}
"""Model settings a job may not pass to the Router, and why."""

_MODEL_SETTINGS = frozenset(f.name for f in fields(ModelSettings)) - {
    "extra_headers",
    "extra_body",
    "extra_query",
    "extra_args",
    "retry",
    *_NOT_FROM_JOBS,
}


MAX_ERROR_CHARS = 500
"""Longest validation message kept in a job's error (it quotes the model's output)."""


class JsonSchemaOutput(AgentOutputSchemaBase):
    """Structured output from a plain JSON Schema (a job cannot send Python types)."""

    def __init__(self, schema: dict[str, Any]) -> None:
        try:
            check_output_schema(schema)
        except SchemaRefused as exc:
            raise InvalidJob(f"output_schema: {exc}") from None
        self._schema = schema
        self._validator = output_validator(schema)

    def is_plain_text(self) -> bool:
        return False

    def name(self) -> str:
        return "final_output"

    def json_schema(self) -> dict[str, Any]:
        return self._schema

    def is_strict_json_schema(self) -> bool:
        return False

    def validate_json(self, json_str: str) -> Any:
        try:
            check_depth(json_str, "the output")
            value = json.loads(json_str)
        except TooDeep as exc:
            raise ModelBehaviorError(str(exc)) from None
        except json.JSONDecodeError as exc:
            raise ModelBehaviorError(f"output is not JSON: {exc.msg}") from None
        try:
            errors = output_errors(self._validator, value)
        except RecursionError:  # a schema whose $refs loop without consuming the output
            raise InvalidJob("output_schema refers to itself without end ($ref loop)") from None
        except BudgetSpent:
            raise ModelBehaviorError(
                f"checking the output against output_schema took over {VALIDATION_BUDGET_S:g} s "
                "(the budget of one output): make the schema or the output smaller"
            ) from None
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "(root)"
            message = errors[0].message  # jsonschema quotes the whole value: keep it short
            if len(message) > MAX_ERROR_CHARS:
                message = message[:MAX_ERROR_CHARS] + "…"
            raise ModelBehaviorError(f"output does not match output_schema at {where}: {message}")
        return value


@dataclass(frozen=True)
class Plan:
    """What to run for a job: the agent, the models to try in order, and the call settings."""

    agent: Agent[Any]
    models: list[str]
    model_settings: ModelSettings
    max_turns: int
    timeout_s: float
    mcp_servers: list[str] = field(default_factory=list)


def resolve_model(name: str, job: AgentJob, settings: Settings) -> str:
    """Route "auto" by input complexity, as the guide's route_by_complexity does."""
    if name != "auto":
        return name
    if len(job.input_text()) < settings.auto_threshold_chars:
        return settings.auto_small_model
    return settings.auto_large_model


AGENT_CACHE_BYTES = 32 << 20
_ENTRY_BYTES = 16 << 10
"""What one cached agent costs besides its spec (objects, the SDK's own state): with it the
budget also bounds how many agents are kept."""

_AGENTS: LRUCache[tuple[int, bytes], tuple[Agent[Any], int]] = LRUCache(
    maxsize=AGENT_CACHE_BYTES, getsizeof=lambda entry: entry[1]
)
"""Agents by registry and spec digest: batches repeat a few specs, and building one is not
free. Bounded by the size of the specs it holds (a job's instructions and schema can be large),
least recently used first out."""


def _agent(spec: AgentSpec, registry: Registry) -> Agent[Any]:
    spec_json = spec.model_dump_json().encode()
    key = (id(registry), hashlib.blake2b(spec_json, digest_size=16).digest())
    entry = _AGENTS.get(key)
    if entry is None:
        agent = Agent(
            name=spec.name,
            instructions=spec.instructions,
            tools=[registry.tools[t] for t in spec.tools],
            output_type=JsonSchemaOutput(spec.output_schema) if spec.output_schema else None,
        )
        entry = _AGENTS[key] = (agent, len(spec_json) + _ENTRY_BYTES)
    return entry[0]


def plan(
    job: AgentJob, registry: Registry, settings: Settings, mcp_names: Collection[str] = ()
) -> Plan:
    profile_model: str | None = None
    if job.agent is None:
        spec = AgentSpec()
    elif isinstance(job.agent, str):
        profile = registry.agents.get(job.agent)
        if profile is None:
            offered = ", ".join(sorted(registry.agents)) or "none"
            raise InvalidJob(
                f"unknown agent profile {job.agent!r}; the workers offer: {offered} "
                "(see `agentq agents`)"
            )
        spec, profile_model = profile.spec, profile.model
    elif job.agent.profile is not None:
        base = registry.agents.get(job.agent.profile)
        if base is None:
            offered = ", ".join(sorted(registry.agents)) or "none"
            raise InvalidJob(
                f"unknown agent profile {job.agent.profile!r}; the workers offer: {offered}"
            )
        overrides = {f: getattr(job.agent, f) for f in job.agent.model_fields_set - {"profile"}}
        spec, profile_model = base.spec.model_copy(update=overrides), base.model
    else:
        spec = job.agent

    unknown = [t for t in spec.tools if t not in registry.tools]
    if unknown:
        offered = ", ".join(sorted(registry.tools)) or "none"
        raise InvalidJob(f"unknown tools {unknown}; the workers offer: {offered}")
    unknown_mcp = [m for m in spec.mcp_servers if m not in mcp_names]
    if unknown_mcp:
        offered = ", ".join(sorted(mcp_names)) or "none"
        raise InvalidJob(f"unknown MCP servers {unknown_mcp}; the workers offer: {offered}")

    refused = sorted(set(spec.model_settings) & _NOT_FROM_JOBS.keys())
    if refused:
        why = "; ".join(f"{k}: {_NOT_FROM_JOBS[k]}" for k in refused)
        raise InvalidJob(f"model_settings {refused} are not passed to the Router ({why})")
    bad = sorted(set(spec.model_settings) - _MODEL_SETTINGS)
    if bad:
        raise InvalidJob(f"unknown model_settings {bad}; allowed: {sorted(_MODEL_SETTINGS)}")
    headers: dict[str, str] = {}
    extra_args: dict[str, Any] = {}
    if job.metadata.user_id:
        headers["X-User-ID"] = job.metadata.user_id
        extra_args["user"] = job.metadata.user_id
    if job.metadata.tags:
        headers["x-llm-tags"] = ",".join(job.metadata.tags)
    try:
        model_settings = ModelSettings(
            **spec.model_settings, extra_headers=headers or None, extra_args=extra_args or None
        )
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"bad model_settings: {exc}") from None

    agent = _agent(spec, registry)
    first = job.model or profile_model or settings.default_model
    models = [resolve_model(m, job, settings) for m in [first, *job.fallbacks]]
    return Plan(
        agent=agent,
        models=models,
        model_settings=model_settings,
        max_turns=job.max_turns or settings.max_turns,
        timeout_s=min(job.timeout_s or settings.job_timeout_s, settings.max_job_timeout_s),
        mcp_servers=list(spec.mcp_servers),
    )
