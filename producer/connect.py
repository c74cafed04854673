"""Where Redis is (REDIS_URL, or the embedded Valkey server every agentq command shares), and
how to talk to it: every command retries with backoff through restarts and dropped links."""

from __future__ import annotations

import asyncio
import builtins
import types
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    TimeoutError,
)

from .embedded import ensure_embedded_redis
from .settings import Settings

RETRY_ON: list[type[Exception]] = [
    ConnectionError,
    TimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    OSError,
]
"""OSError covers a refused connect while Redis restarts, which redis-py does not retry.

ReadOnlyError (READONLY) is a failover seen from a connection that still reaches the old
primary, now a replica. redis-py closes the connection before it retries, so the retry
connects again, to wherever the endpoint points by then. A READONLY reply means that command
wrote nothing: a replica refuses every write, and in a script the first one ends it (agentq's
scripts catch no Redis errors). A retried pipeline re-sends commands that may have run before the
server turned replica; agentq's scripts are idempotent or refused when repeated (a claim's
nonce, a finish's fence), as they already are for a reply lost with its connection."""


def being_cancelled() -> bool:
    """Whether this task was told to stop. A Redis call cancelled mid-flight can come out as
    an ordinary error or as no reply (redis-py), which a loop that survives errors or reads
    until cancelled must not take for anything else."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was told to stop. For loops that read pub/sub until
    cancelled: a cancel that lands as get_message's own read timeout expires comes out as that
    timeout (get_message returns None), and such a loop would run on for ever (a worker's
    listener kept a test's event loop from closing)."""
    if being_cancelled():
        raise asyncio.CancelledError


def retry_policy(retries: int = 40) -> Retry:
    """Retries with backoff from 50 ms doubling to 2 s: 40 ride out about a minute of Redis
    restart or failover. Retried commands are safe: agentq's state changes are idempotent."""
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries)


PRODUCER_RETRIES = 12
"""About 15 s: a command line should not hang a minute on a wrong REDIS_URL. `wait` keeps
going through longer outages on its own."""


def redis_url(settings: Settings) -> str:
    return settings.redis_url or ensure_embedded_redis(
        settings.data_dir, idle_s=settings.embedded_idle_s
    )


def tcp_options(url: str) -> dict[str, Any]:
    """Keepalive for a TCP link; redis-py refuses the option for a unix socket (TypeError)."""
    return {} if url.startswith("unix:") else {"socket_keepalive": True}


def connect(settings: Settings) -> Redis:
    url = redis_url(settings)
    return unlock_pool(
        Redis.from_url(
            url,
            **tcp_options(url),
            health_check_interval=30,
            socket_connect_timeout=5,
            socket_timeout=30,  # a half-open link fails and is retried instead of hanging
            retry=retry_policy(PRODUCER_RETRIES),
            retry_on_error=RETRY_ON,
        )
    )


POOL_WAIT_S = 90
"""The longest a command waits for a free connection of a bounded pool before it fails (a
ConnectionError, which callers handle as any Redis error). It only runs out while Redis is
unreachable: a command holds its connection through its retries, about 70 s of them."""


class BoundedPool(BlockingConnectionPool):
    """redis-py's BlockingConnectionPool, whose waiters do not lose a wake-up when cancelled.

    Its release() wakes one waiter (asyncio.Condition.notify). On Python < 3.12.1 and
    3.11.8, a waiter cancelled after that wake-up swallows it (CPython gh-112202): a
    connection stays free while the others sleep on, until another release. A worker cancels
    often (a job's timeout, `agentq cancel`, a flush's time limit), so the wake-up is passed on.
    The connection check stays outside the lock, as in redis-py (see unlock_pool)."""

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        try:
            async with self._condition:
                async with asyncio.timeout(self.timeout):
                    try:
                        await self._condition.wait_for(self.can_get_connection)
                    except asyncio.CancelledError:
                        self._condition.notify()  # the wake-up this waiter may have taken
                        raise
                    connection = self.get_available_connection()
        except builtins.TimeoutError as exc:  # redis's TimeoutError is another class
            raise ConnectionError("No connection available.") from exc
        return await _checked(self, connection)


async def bound_pool(redis: Any, max_connections: int | None) -> Any:
    """Give the client a pool of at most max_connections (None: leave it unbounded), where a
    command waits for a free one.

    redis-py's pool (and arq's) opens a connection for every command in flight and keeps them
    all: a worker with 500 runs in flight held about 500 connections, and 20 such workers
    reach Redis's default maxclients (10,000). A pool of another kind (Sentinel) is left as
    it is."""
    old = redis.connection_pool
    if max_connections is None or type(old) is not ConnectionPool:
        return redis
    redis.connection_pool = BoundedPool(
        connection_class=old.connection_class,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        **old.connection_kwargs,
    )
    await old.disconnect()
    return redis


def unlock_pool(redis: Any) -> Any:
    """Let the client's commands take pooled connections at once, as redis-py < 5.3 did.

    redis-py 5.3 (arq 0.28 needs redis-py < 6) takes a connection under one asyncio.Lock
    per pool, held while it checks the connection, and with the hiredis parser that check
    waits for the event loop's next turn (a read with a zero timeout). So a process took one
    connection per loop turn, whatever its pool size: a worker with 500 runs in flight queued
    its commands and its reads of the queue for hundreds of milliseconds, and a third of its
    slots stood empty (redis-py issue #3692). A taken connection is one task's alone until it
    is released, so the lock is not needed for that. It does matter for logins that refresh a
    token (a credential_provider: redis-py re-authenticates free connections under it), so
    such a pool keeps it, as does any pool but a plain ConnectionPool (a Sentinel or blocking
    pool). Checked by tests/test_redis_pool.py."""
    pool = redis.connection_pool
    if type(pool) is ConnectionPool and not pool.connection_kwargs.get("credential_provider"):
        pool.get_connection = types.MethodType(_get_connection, pool)
    return redis


async def _get_connection(
    self: ConnectionPool, command_name: Any = None, *keys: Any, **options: Any
) -> Any:
    """redis-py's ConnectionPool.get_connection without its lock."""
    return await _checked(self, self.get_available_connection())


async def _checked(pool: Any, connection: Any) -> Any:
    """The taken connection once the pool has checked it; given back if the check fails."""
    try:
        await pool.ensure_connection(connection)
    except BaseException:
        await pool.release(connection)
        raise
    return connection


class Script:
    """A Lua script, run by its SHA as redis-py's Script runs it, that also survives a
    failover. redis-py answers NoScriptError by loading the script and running it again, but
    each of those through any pooled connection: while some still reach the old primary (a
    replica now, which takes SCRIPT LOAD) and some the new one, the load can land on one
    server and the run on the other. Then this loads and runs it on a single connection."""

    def __init__(self, redis: Any, source: str) -> None:
        self.redis = redis
        self.script: Any = redis.register_script(source)

    async def __call__(
        self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None
    ) -> Any:
        on = {} if client is None else {"client": client}
        try:
            return await self.script(keys=list(keys), args=list(args), **on)
        except NoScriptError:  # nothing ran: it is safe to send again
            if isinstance(client, Pipeline):  # its caller sends it again (Store._pipelined)
                raise
            if client is not None:  # a client of one connection (a submit's): again on it
                return await self.script(keys=list(keys), args=list(args), client=client)
            async with self.redis.client() as one:
                return await self.script(keys=list(keys), args=list(args), client=one)
