"""Submit-time checks that need more than the job line: size limits, and the tools, agent
profiles and MCP servers that the live workers offer (they publish them in Redis)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .limits import TooDeep, check_depth
from .models import AgentJob

Check = Callable[[AgentJob], str | None]


def stored_size_problem(job: AgentJob, max_line_bytes: int) -> str | None:
    """For a job built in Python (never a line whose size and depth were checked): what is
    wrong with it as it will be stored, or None."""
    spec = job.model_dump_json(exclude_unset=True)
    if (size := len(spec.encode())) > max_line_bytes:
        return (
            f"the job is {size} bytes as JSON, over the limit of {max_line_bytes} "
            "(AGENTQ_MAX_LINE_BYTES): make its fields smaller"
        )
    try:
        check_depth(spec, "the job")
    except TooDeep as exc:
        return str(exc)
    return None


def job_checker(max_input_chars: int, workers: Mapping[str, Mapping[str, Any]]) -> Check:
    """A check for one job; returns the reason it is bad, or None. With no live workers the
    registry is unknown: names are then checked by the worker when the job runs."""
    tools: set[str] = set()
    agents: set[str] = set()
    mcp: set[str] = set()
    for beat in workers.values():
        tools.update(beat.get("tools", []))
        agents.update(beat.get("agents", {}))
        mcp.update(beat.get("mcp_servers", []))
    known = bool(workers)

    def offered(names: Iterable[str]) -> str:
        return ", ".join(sorted(names)) or "none"

    def check(job: AgentJob) -> str | None:
        size = len(job.input_text())
        if size > max_input_chars:
            return (
                f"input is {size} characters, over the limit of {max_input_chars} "
                "(AGENTQ_MAX_INPUT_CHARS)"
            )
        if not known or job.agent is None:
            return None
        if isinstance(job.agent, str):
            if job.agent not in agents:
                return f"unknown agent profile {job.agent!r}; the workers offer: {offered(agents)}"
            return None
        if job.agent.profile is not None and job.agent.profile not in agents:
            return (
                f"unknown agent profile {job.agent.profile!r}; the workers offer: {offered(agents)}"
            )
        missing = [t for t in job.agent.tools if t not in tools]
        if missing:
            return f"unknown tools {missing}; the workers offer: {offered(tools)}"
        missing = [m for m in job.agent.mcp_servers if m not in mcp]
        if missing:
            return f"unknown MCP servers {missing}; the workers offer: {offered(mcp)}"
        return None

    return check
