"""The arq side: worker options, start-up and shut-down of the shared provider, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import structlog
from agents import TracingProcessor, set_trace_processors, set_tracing_disabled
from arq.connections import RedisSettings
from arq.worker import func
from redis.asyncio.connection import UnixDomainSocketConnection

from producer import keys
from producer.connect import (
    RETRY_ON,
    being_cancelled,
    redis_url,
    retry_policy,
    stop_if_cancelled,
)
from producer.embedded import read_password
from producer.redact import safe_url, url_secrets
from producer.serde import json_dumps
from producer.settings import Settings, load_settings
from producer.store import RUN_FUNCTION, Store

from . import agentids, fastbody, heap, logs, metrics
from .arqworker import UNCOUNTED_TRIES, BatchStartWorker
from .baton import Baton
from .breaker import Breakers
from .livelogs import LiveLogs
from .mcp import McpPool, parse_mcp_config
from .payload import load_job
from .provider import RouterProvider
from .ratelimit import RateLimiter
from .retry import RetryPolicy
from .runner import Runtime, run_agent_job
from .tools import default_registry, load_plugins
from .tracing import JobLogProcessor

VERSION = "0.1.0"
HEARTBEAT_S = 5.0
log = structlog.get_logger("agentq.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _set_up_tracing(settings: Settings) -> list[TracingProcessor]:
    """Spans go to the job's log (and to OTLP when configured), never to the SDK's default
    exporter, which would send prompts, with the Router key, to api.openai.com."""
    processors: list[TracingProcessor] = [JobLogProcessor()] if settings.trace_events else []
    if settings.otlp_endpoint:
        try:
            from .otel import OtelExporter, otlp_provider
        except ImportError as exc:
            raise RuntimeError(
                "AGENTQ_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                "pip install 'agentq[otel]'"
            ) from exc
        processors.append(
            OtelExporter(otlp_provider(settings.otlp_endpoint), content=settings.log_content)
        )
    set_trace_processors(processors)
    set_tracing_disabled(not processors)
    return processors


async def on_startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("agentq_settings") or load_settings()
    ctx["agentq_tracing"] = _set_up_tracing(settings)
    registry = default_registry()
    load_plugins(registry, settings.plugins)
    routers = {"default": (settings.router_url, settings.api_key.get_secret_value())}
    routers |= {name: (spec.url, spec.api_key()) for name, spec in settings.routers.items()}
    provider = RouterProvider(
        routers,
        concurrency=settings.concurrency,
        max_calls=settings.model_call_limit,
        call_timeout_s=settings.call_timeout_s,
        policy=RetryPolicy(
            settings.max_attempts_per_model, settings.backoff_base_s, settings.backoff_max_s
        ),
        prices=settings.prices,
        # The job log keeps agent and tool spans; a generation span per call is read by the
        # OTLP export only.
        generation_spans=bool(settings.otlp_endpoint),
    )
    await _set_timeouts(ctx["redis"])
    store = Store(
        ctx["redis"],
        queue=settings.queue,
        result_ttl_s=settings.result_ttl_s,
        lease_s=settings.lease_s,
        max_runs=settings.max_runs,
    )
    breakers = Breakers(ctx["redis"], settings.outage_max_s, min(10.0, settings.call_timeout_s))
    if isinstance(ctx.get("agentq_worker"), BatchStartWorker):
        breakers.park = ctx["agentq_worker"].park
    provider.breakers = breakers
    if settings.rate_limits:
        provider.limiter = RateLimiter(ctx["redis"], settings.rate_limits, settings.backoff_max_s)
    metrics.serve(settings.metrics_port, settings.metrics_host)
    mcp = McpPool()
    await mcp.start(parse_mcp_config(settings.mcp_servers))
    rt = Runtime(settings, store, provider, registry, worker_id(), mcp=mcp)
    rt.live = LiveLogs(ctx["redis"])
    rt.baton = Baton() if settings.cpu_turns else None
    ctx["agentq"] = rt
    ctx["agentq_tasks"] = [
        asyncio.create_task(_maintain(rt)),
        asyncio.create_task(_listen(rt)),
    ]
    fast_bodies = fastbody.install()
    fast_agent_ids = agentids.install()
    frozen = heap.freeze()
    _tell_ready()
    log.info(
        "worker.started",
        worker=rt.worker_id,
        router_url=safe_url(settings.router_url),
        routers=sorted(settings.routers),
        rate_limits={n: b.model_dump(exclude_none=True) for n, b in settings.rate_limits.items()},
        concurrency=settings.concurrency,
        queue=settings.queue,
        lease_s=settings.lease_s,
        tools=sorted(registry.tools),
        agents=sorted(registry.agents),
        mcp_servers=mcp.status(),
        heap_frozen=frozen,
        fast_bodies=fast_bodies,
        fast_agent_ids=fast_agent_ids,
    )


REDIS_SOCKET_TIMEOUT_S = 15.0
"""No agentq command blocks in Redis: a reply later than this means a dead link."""


async def _set_timeouts(pool: Any) -> None:
    """arq's pool has a connect timeout only: add a read timeout and health checks, so a
    half-open connection fails (and is retried) instead of hanging renewals and finishes."""
    kwargs = pool.connection_pool.connection_kwargs
    kwargs.update(socket_timeout=REDIS_SOCKET_TIMEOUT_S, health_check_interval=30)
    if not issubclass(pool.connection_pool.connection_class, UnixDomainSocketConnection):
        kwargs.update(socket_keepalive=True)  # TCP only: refused for a unix socket
    await pool.connection_pool.disconnect()


async def on_shutdown(ctx: dict[str, Any]) -> None:
    tasks = ctx.get("agentq_tasks", [])
    for task in tasks:
        task.cancel()
    if tasks:  # bounded: shutting down never waits on a background loop for ever
        await asyncio.wait(tasks, timeout=3.0)
    rt: Runtime | None = ctx.get("agentq")
    if rt is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(2):  # Redis may be the reason we are stopping
            await rt.store.redis.hdel(keys.WORKERS, rt.worker_id)
    if rt.live is not None:
        await rt.live.close()  # bounded by its send timeout
    await rt.mcp.close()
    for processor in ctx.get("agentq_tracing", []):
        with contextlib.suppress(Exception):
            processor.shutdown()  # flushes spans still queued for OTLP
    await rt.provider.aclose()
    heap.thaw()
    log.info("worker.stopped", worker=rt.worker_id)


async def _maintain(rt: Runtime) -> None:
    """Every few seconds: renew the leases of this worker's runs (always before reaping anyone
    else's), put jobs of dead workers back in the queue, take a turn at the fleet's repair
    sweep, and publish this worker's registry and load (`agentq health`, `agentq agents`,
    and submit-time checks read it)."""
    every = min(HEARTBEAT_S, rt.settings.lease_s / 3)
    rounds = 0
    while True:
        try:
            await renew_leases(rt)
            reaped, gap_ms = await rt.store.reap()
            if gap_ms:
                log.warning("leases.extended", after_outage_s=round(gap_ms / 1000, 1))
            if reaped:
                log.warning("leases.expired", requeued=reaped)
            checked, fixed = await rt.store.reconcile(interval_s=every)
            if fixed:
                log.warning("reconcile.repaired", jobs=fixed, checked=checked)
            await rt.store.sweep()
            queued, leased = await rt.store.depth()
            metrics.QUEUE_DEPTH.set(queued)
            metrics.LEASED.set(leased)
            await rt.store.redis.hset(keys.WORKERS, rt.worker_id, json.dumps(_beat(rt)))
            if rounds % 60 == 0:
                await _prune(rt)
            rounds += 1
        except Exception as exc:  # Redis away: keep going, the client reconnects
            if being_cancelled():
                raise asyncio.CancelledError from exc
            log.warning("worker.maintenance_failed", error=str(exc))
        await asyncio.sleep(every)


async def renew_leases(rt: Runtime) -> None:
    """Extend this worker's leases; stop runs whose lease is gone (another run took the job,
    or it is final) and runs of cancelled batches."""
    runs = rt.runs()
    if not runs:  # nothing to renew (the reap that follows keeps the fleet's clock)
        return
    tokens = dict(runs)
    lost, cancelled = await rt.store.renew(runs)
    for jid in lost:
        if rt.stop(jid, "lost", tokens.get(jid)):
            log.warning("job.lease_lost", job_id=jid, action="stopped here; no record written")
    for jid in cancelled:
        if rt.stop(jid, "cancelled", tokens.get(jid)):
            log.info("job.cancel_seen", job_id=jid)


DEAD_WORKER_S = 600
"""A worker heartbeat older than this is removed from agentq:workers."""


async def _prune(rt: Runtime) -> None:
    """Drop dead workers' heartbeats and expired batches from the index."""
    now = time.time()
    beats = await rt.store.redis.hgetall(keys.WORKERS)
    dead = []
    for wid, raw in beats.items():
        try:
            seen = float(json.loads(raw).get("seen_at", 0))
        except (ValueError, AttributeError):
            seen = 0
        if now - seen > DEAD_WORKER_S:
            dead.append(wid)
    if dead:
        await rt.store.redis.hdel(keys.WORKERS, *dead)
    await rt.store.trim_index()


def _beat(rt: Runtime) -> dict[str, Any]:
    return {
        "version": VERSION,
        "queue": rt.settings.queue,
        "concurrency": rt.settings.concurrency,
        "in_flight": rt.in_flight,
        "tools": sorted(rt.registry.tools),
        "agents": {
            n: p.spec.model_dump(exclude_defaults=True) for n, p in rt.registry.agents.items()
        },
        "mcp_servers": rt.mcp.names(),
        "seen_at": time.time(),
    }


async def _listen(rt: Runtime) -> None:
    """Hear `agentq cancel` and stop that batch's running jobs here at once. (A message lost
    in a reconnect is caught at the next lease renewal: the cancel flag is durable.) Hear
    another worker's 429 too, which moved the turns of calls asleep here (worker/ratelimit.py;
    a lost one is heard in the next reply)."""
    while True:
        pubsub = rt.store.redis.pubsub()
        try:
            await pubsub.subscribe(keys.CONTROL)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                stop_if_cancelled()
                if msg is None or msg.get("type") != "message":
                    continue
                verb, _, rest = msg["data"].decode().partition(" ")
                if verb == "budgets" and rt.provider.limiter is not None:
                    rt.provider.limiter.hear(rest)
                elif verb == "cancel":
                    batch_id = rest
                    n = rt.cancel_batch(batch_id)
                    if n:
                        log.info("batch.cancel_heard", batch_id=batch_id, stopped=n)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if being_cancelled():
                raise asyncio.CancelledError from exc
            log.warning("worker.control_channel_lost", error=str(exc))
            await asyncio.sleep(1)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


def _secrets(settings: Settings) -> list[str]:
    """Every key the worker holds, for the log redactor: the Routers' keys, passwords in the
    Router and Redis URLs, the MCP servers' headers, args and env values."""
    found = [settings.api_key.get_secret_value()]
    found += [spec.api_key() for spec in settings.routers.values()]
    found += url_secrets(settings.router_url) + url_secrets(settings.redis_url)
    if settings.redis_url is None:  # the embedded server's password
        found.append(read_password(Path(settings.data_dir).resolve()) or "")
    found += [s for router in settings.routers.values() for s in url_secrets(router.url)]
    with contextlib.suppress(ValueError):
        for spec in parse_mcp_config(settings.mcp_servers).values():
            found += spec.secrets()
    return [s for s in found if s]


ARQ_TIMEOUT_UNDER_BUDGETS_S = 365 * 86_400.0
"""arq's job timeout when AGENTQ_RATE_LIMITS has budgets: none in effect. A call waits for its
turn off the job's timeout, as long as a busy budget makes it; arq cutting the run short would
give the job back and start it again, forever (leases cover dead workers, not this timeout)."""


def build_worker(
    settings: Settings | None = None,
    *,
    burst: bool = False,
    handle_signals: bool = True,
    log_file: Path | None = None,
) -> BatchStartWorker:
    """An arq Worker for agentq jobs, configured from settings."""
    settings = settings or load_settings()
    logs.configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=_secrets(settings),
        log_content=settings.log_content,
        static={"worker": worker_id()},
        log_file=log_file,
    )
    # arq's own job timeout stays above any job's timeout, so arq never cuts a run short and
    # never starts it a second time while it still runs. Under budgets a run's waits for its
    # turns have no bound: see ARQ_TIMEOUT_UNDER_BUDGETS_S.
    arq_timeout = settings.max_job_timeout_s + settings.outage_max_s + 60
    if settings.rate_limits:
        arq_timeout = ARQ_TIMEOUT_UNDER_BUDGETS_S
    worker = BatchStartWorker(
        functions=[func(run_agent_job, name=RUN_FUNCTION, timeout=arq_timeout)],
        queue_name=settings.queue,
        redis_settings=redis_settings(settings),
        max_jobs=settings.concurrency,
        job_timeout=arq_timeout,
        keep_result=0,
        poll_delay=settings.poll_delay_s,
        wake_channel=keys.wake(settings.queue),
        redis_connections=settings.redis_connections,
        burst=burst,
        handle_signals=handle_signals,
        job_completion_wait=settings.shutdown_grace_s,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        ctx={"agentq_settings": settings},
        job_serializer=json_dumps,
        job_deserializer=load_job,
        # agentq counts runs itself (AGENTQ_MAX_RUNS); arq's count would end a job silently.
        max_tries=UNCOUNTED_TRIES,
    )
    # arq marks a job "in progress" until its function starts; a worker dying in that moment
    # must not hold the job for arq's full job timeout. Running jobs are covered by leases.
    worker.in_progress_timeout_s = settings.lease_s
    worker.ctx["agentq_worker"] = worker
    return worker


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection, retrying commands with backoff through Redis restarts and drops."""
    url = redis_url(settings)
    rs = RedisSettings.from_dsn(url)
    # TLS options in the URL's query, as redis-py's from_url reads them for the producer.
    query = {k: v[-1] for k, v in parse_qs(urlparse(url).query).items()}
    rs.ssl_ca_certs = query.get("ssl_ca_certs", rs.ssl_ca_certs)
    rs.ssl_certfile = query.get("ssl_certfile", rs.ssl_certfile)
    rs.ssl_keyfile = query.get("ssl_keyfile", rs.ssl_keyfile)
    rs.ssl_cert_reqs = query.get("ssl_cert_reqs", rs.ssl_cert_reqs)
    rs.conn_retries = 30
    rs.retry_on_error = RETRY_ON
    rs.retry = retry_policy()
    return rs


def _tell_ready() -> None:
    """Tell `agentq worker --processes`'s supervisor (if it started us) that start-up is done:
    a death after this is not a failing start-up (worker/supervisor.py)."""
    fd = os.environ.pop("AGENTQ_READY_FD", None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        os.write(int(fd), b"1")
        os.close(int(fd))
