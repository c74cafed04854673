"""agentq's client side: the job contract and the producer API.

The names below load on first use (PEP 562): `agentq --help` and the commands that only read
Redis don't pay for modules they never touch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Batch, BatchNotFound, Producer
    from .jobfile import JobFileError
    from .models import (
        ACTIVE,
        TERMINAL,
        AgentJob,
        AgentSpec,
        BatchStatus,
        JobError,
        Priority,
        ResultRecord,
        Status,
    )
    from .settings import ConfigError, Settings, load_settings

_WHERE = {
    "Batch": "client",
    "BatchNotFound": "client",
    "Producer": "client",
    "JobFileError": "jobfile",
    "ACTIVE": "models",
    "TERMINAL": "models",
    "AgentJob": "models",
    "AgentSpec": "models",
    "BatchStatus": "models",
    "JobError": "models",
    "Priority": "models",
    "ResultRecord": "models",
    "Status": "models",
    "ConfigError": "settings",
    "Settings": "settings",
    "load_settings": "settings",
}

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "AgentJob",
    "AgentSpec",
    "Batch",
    "BatchNotFound",
    "BatchStatus",
    "ConfigError",
    "JobError",
    "JobFileError",
    "Priority",
    "Producer",
    "ResultRecord",
    "Settings",
    "Status",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    value = getattr(import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value
