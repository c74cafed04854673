"""agentq's arq side: the worker, its pooled provider, the job runner and the tool registry."""

from .provider import RouterProvider
from .runner import run_agent_job
from .settings import build_worker
from .tools import Registry, calculator, evaluate

__all__ = [
    "Registry",
    "RouterProvider",
    "build_worker",
    "calculator",
    "evaluate",
    "run_agent_job",
]
