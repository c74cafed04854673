"""Fixtures start real things: a Redis server (embedded Valkey, or REDIS_URL when given), the
simulated Router, arq workers."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from ops.simrouter import SimConfig, SimRouter
from producer import Producer, Settings
from producer.store import Store

ROUTER_KEY = "sk-test-router-key-0123456789"


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (`timeout`, a CI job cancelled) stops pytest as Ctrl-C does: the fixtures tear
    down, so the embedded Valkey and the processes the tests started stop too. Python's default
    for SIGTERM dies at once and leaves them running."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when given (CI points it at the machine's Redis, db 15), else an embedded
    Valkey server for the session. Tests flush that database."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from ops.procs import start_valkey

    server = start_valkey(tmp_path_factory.mktemp("valkey"))
    try:
        yield server.connection_url + "/0"
    finally:
        server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["fakeredis", "server"])
async def store_redis(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Any]:
    """Store tests run once per backend: fakeredis (fast) and the real server."""
    if request.param == "fakeredis":
        client: Any = fakeredis.FakeAsyncRedis()
    else:
        client = Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def store(store_redis: Any) -> Store:
    return Store(store_redis, queue="agentq:queue", result_ttl_s=3600)


@pytest.fixture
async def sim() -> AsyncIterator[SimRouter]:
    async with SimRouter(SimConfig(api_key=ROUTER_KEY, seed=7)) as router:
        yield router


@pytest.fixture
def settings(redis_url: str, sim: SimRouter, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        router_url=sim.url,
        api_key=ROUTER_KEY,  # type: ignore[arg-type]
        data_dir=str(tmp_path / ".agentq"),
        concurrency=20,
        poll_delay_s=0.01,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        call_timeout_s=5,
        log_format="json",
    )


@pytest.fixture
async def producer(settings: Settings, redis: Redis) -> AsyncIterator[Producer]:
    async with Producer.from_env(settings) as p:
        yield p
