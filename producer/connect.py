"""Where Redis is: REDIS_URL, or the embedded Valkey server every agentq command shares."""

from __future__ import annotations

from redis.asyncio import Redis

from .embedded import ensure_embedded_redis
from .settings import Settings


def redis_url(settings: Settings) -> str:
    return settings.redis_url or ensure_embedded_redis(settings.data_dir)


def connect(settings: Settings) -> Redis:
    """A client whose connections retry on connection errors (Redis restarts, dropped links)."""
    return Redis.from_url(
        redis_url(settings),
        health_check_interval=30,
        socket_keepalive=True,
        retry_on_timeout=True,
    )
