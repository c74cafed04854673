"""A worker plugin for the fault suite: a tool that logs values JSON cannot hold (as careless
plugins do). Load it with AGENTQ_PLUGINS=ops.fault_plugin; the simulated Router calls a tool
whose name the input mentions."""

from __future__ import annotations

import structlog

from worker.tools import Registry

log = structlog.get_logger("agentq.fault_plugin")


def weird_log(text: str) -> str:
    """Echo the text, after logging an object, a set and bytes."""
    log.info("plugin.weird", obj=object(), tags={"a", "b"}, raw=b"\x00\x01")
    return text.upper()


def register(registry: Registry) -> None:
    registry.add_tool(weird_log)
