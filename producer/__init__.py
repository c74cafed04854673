"""agentq's client side: the job contract and the producer API."""

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
