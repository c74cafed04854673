"""The arq side: worker options, start-up and shut-down of the shared provider, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

import structlog
from agents import set_trace_processors, set_tracing_disabled
from arq import Worker
from arq.connections import RedisSettings
from arq.worker import func

from producer import keys
from producer.connect import redis_url
from producer.serde import json_dumps, json_loads
from producer.settings import Settings, load_settings
from producer.store import RUN_FUNCTION, Store

from . import logs
from .provider import RouterProvider
from .runner import Runtime, run_agent_job
from .tools import default_registry, load_plugins

VERSION = "0.1.0"
HEARTBEAT_S = 5.0
log = structlog.get_logger("agentq.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _disable_tracing() -> None:
    """No trace export: the default exporter would send prompts, with the Router key, to
    api.openai.com."""
    set_tracing_disabled(True)
    set_trace_processors([])


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("agentq_settings") or load_settings()
    _disable_tracing()
    registry = default_registry()
    load_plugins(registry, settings.plugins)
    provider = RouterProvider(
        settings.router_url,
        settings.api_key.get_secret_value(),
        concurrency=settings.concurrency,
        max_calls=settings.model_call_limit,
        call_timeout_s=settings.call_timeout_s,
    )
    store = Store(ctx["redis"], queue=settings.queue, result_ttl_s=settings.result_ttl_s)
    rt = Runtime(settings, store, provider, registry, worker_id())
    ctx["agentq"] = rt
    ctx["agentq_heartbeat"] = asyncio.create_task(_heartbeat(rt))
    log.info(
        "worker.started",
        worker=rt.worker_id,
        router_url=settings.router_url,
        concurrency=settings.concurrency,
        queue=settings.queue,
        tools=sorted(registry.tools),
        agents=sorted(registry.agents),
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    rt: Runtime | None = ctx.get("agentq")
    task: asyncio.Task[None] | None = ctx.get("agentq_heartbeat")
    if task:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if rt is None:
        return
    with contextlib.suppress(Exception):
        await rt.store.redis.hdel(keys.WORKERS, rt.worker_id)
    await rt.provider.aclose()
    log.info("worker.stopped", worker=rt.worker_id)


async def _heartbeat(rt: Runtime) -> None:
    """Publish this worker's registry and load, so `agentq health`/`agents` can list them."""
    while True:
        beat = {
            "version": VERSION,
            "concurrency": rt.settings.concurrency,
            "in_flight": rt.in_flight,
            "tools": sorted(rt.registry.tools),
            "agents": {
                n: p.spec.model_dump(exclude_defaults=True) for n, p in rt.registry.agents.items()
            },
            "seen_at": time.time(),
        }
        try:
            await rt.store.redis.hset(keys.WORKERS, rt.worker_id, json.dumps(beat))
        except Exception as exc:  # Redis away: keep beating, arq reconnects
            log.warning("worker.heartbeat_failed", error=str(exc))
        await asyncio.sleep(HEARTBEAT_S)


def build_worker(
    settings: Settings | None = None,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    log_file: Path | None = None,
) -> Worker:
    """An arq Worker for agentq jobs, configured from settings."""
    settings = settings or load_settings()
    logs.configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=[settings.api_key.get_secret_value()],
        log_content=settings.log_content,
        static={"worker": worker_id()},
        log_file=log_file,
    )
    # arq's own job timeout stays above any job's timeout, so arq never cuts a run short and
    # never starts it a second time while it still runs.
    arq_timeout = settings.max_job_timeout_s + 60
    return Worker(
        functions=[func(run_agent_job, name=RUN_FUNCTION, timeout=arq_timeout)],
        queue_name=settings.queue,
        redis_settings=RedisSettings.from_dsn(redis_url(settings)),
        max_jobs=settings.concurrency,
        job_timeout=arq_timeout,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        burst=burst,
        handle_signals=handle_signals,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        ctx={"agentq_settings": settings},
        job_serializer=json_dumps,
        job_deserializer=json_loads,
        max_tries=5,
    )


class WorkerSettings:
    """For `arq worker.WorkerSettings`; `agentq worker` is the usual way."""

    functions: ClassVar = [func(run_agent_job, name=RUN_FUNCTION)]
    on_startup = on_startup
    on_shutdown = on_shutdown
    job_serializer = json_dumps
    job_deserializer = json_loads
    keep_result = 0
