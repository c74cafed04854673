"""A worker plugin for the fault suite and tests: a tool that logs values JSON cannot hold,
and one that blocks the event loop (as careless plugins do). Load it with
AGENTQ_PLUGINS=ops.fault_plugin; the simulated Router calls a tool whose name the input
mentions."""

from __future__ import annotations

import time

import structlog

from worker.tools import Registry

log = structlog.get_logger("agentq.fault_plugin")


def weird_log(text: str) -> str:
    """Echo the text, after logging an object, a set and bytes."""
    log.info("plugin.weird", obj=object(), tags={"a", "b"}, raw=b"\x00\x01")
    return text.upper()


BLOCK_S = 120


async def block_loop(note: str) -> str:
    """Block the worker's event loop for two minutes (a careless async plugin: time.sleep in a
    coroutine)."""
    time.sleep(BLOCK_S)  # noqa: ASYNC251 -- blocking is the point
    return "done"


def register(registry: Registry) -> None:
    registry.add_tool(weird_log)
    registry.add_tool(block_loop)
