"""Where Redis is (REDIS_URL, or the embedded Valkey server every agentq command shares), and
how to talk to it: every command retries with backoff through restarts and dropped links."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from .embedded import ensure_embedded_redis
from .settings import Settings

RETRY_ON: list[type[Exception]] = [ConnectionError, TimeoutError, BusyLoadingError, OSError]
"""OSError covers a refused connect while Redis restarts, which redis-py does not retry."""


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
    return Redis.from_url(
        url,
        **tcp_options(url),
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=30,  # a half-open link fails and is retried instead of hanging
        retry=retry_policy(PRODUCER_RETRIES),
        retry_on_error=RETRY_ON,
    )
