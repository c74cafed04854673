"""agentq's arq side: the worker, its pooled provider, the job runner and the tool registry.

The names below load on first use (PEP 562), as producer's do: `agentq worker --processes N`
imports worker.supervisor, which needs none of them, and the supervisor process should not
carry the Agents SDK and the openai client it never uses."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .provider import RouterProvider
    from .runner import run_agent_job
    from .settings import build_worker
    from .tools import Registry, calculator, evaluate

_WHERE = {
    "Registry": "tools",
    "RouterProvider": "provider",
    "build_worker": "settings",
    "calculator": "tools",
    "evaluate": "tools",
    "run_agent_job": "runner",
}

__all__ = [
    "Registry",
    "RouterProvider",
    "build_worker",
    "calculator",
    "evaluate",
    "run_agent_job",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    value = getattr(import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value
