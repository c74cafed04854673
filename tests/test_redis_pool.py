"""Pooled Redis connections are taken without redis-py 5.3's pool lock (producer/connect.py
unlock_pool): the worker's commands no longer queue one event-loop turn apart."""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis as redis_sync
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import ConnectionError

from ops.procs import tcp_connections
from producer import Settings
from producer.connect import BoundedPool, _get_connection, bound_pool, connect, unlock_pool
from tests.procs import agentq, base_env, start_sim, start_worker, status, stop
from tests.test_idle import running

NOT_TOGETHER_S = 1.0
"""How long the other callers get to reach the connection check while the first holds it,
where they must not: under redis-py's lock they never do (the first is parked until the test
lets it go), so this short wait cannot make the test pass or fail by speed."""

TOGETHER_S = 30.0
"""How long they get where they must: only a hang takes this long."""


async def _checked_together(pool: Any, callers: int = 3, within_s: float = TOGETHER_S) -> bool:
    """Whether `callers` concurrent get_connection calls are all inside the connection check
    at once: the check is held open until every caller is in, or `within_s` has passed."""
    inside = 0
    all_in, let_go = asyncio.Event(), asyncio.Event()

    async def check(connection: Any) -> None:
        nonlocal inside
        inside += 1
        if inside == callers:
            all_in.set()
        await let_go.wait()

    pool.ensure_connection = check
    takers = [asyncio.create_task(pool.get_connection()) for _ in range(callers)]
    try:
        async with asyncio.timeout(within_s):
            await all_in.wait()
        return True
    except TimeoutError:
        return False
    finally:
        let_go.set()
        try:
            for connection in await asyncio.gather(*takers):
                await pool.release(connection)
        finally:
            del pool.ensure_connection


async def test_redis_py_still_takes_connections_one_at_a_time() -> None:
    """The internal unlock_pool leans on: if this fails, redis-py changed get_connection (its
    lock is gone, or moved): check whether unlock_pool is still needed, and that its copy of
    get_connection still matches redis-py's."""
    source = inspect.getsource(ConnectionPool.get_connection)
    assert "async with self._lock" in source and "ensure_connection" in source, source
    assert not await _checked_together(ConnectionPool(), within_s=NOT_TOGETHER_S)


async def test_an_unlocked_pool_checks_connections_side_by_side() -> None:
    client = unlock_pool(Redis())
    assert await _checked_together(client.connection_pool)


async def test_connect_unlocks_the_producers_pool(settings: Settings) -> None:
    client = connect(settings)
    try:
        assert await _checked_together(client.connection_pool)
    finally:
        await client.aclose()


def test_other_pools_keep_their_lock() -> None:
    """A blocking or Sentinel pool, and a login that refreshes its token (redis-py
    re-authenticates free connections under the lock), keep redis-py's own get_connection."""
    refreshing = Redis(credential_provider=UsernamePasswordCredentialProvider("u", "p"))
    sentinel = SentinelConnectionPool("mymaster", Sentinel([("127.0.0.1", 26379)]))
    for client in (
        Redis(connection_pool=BlockingConnectionPool()),
        Redis(connection_pool=sentinel),
        refreshing,
    ):
        unlock_pool(client)
        assert "get_connection" not in vars(client.connection_pool)


async def test_a_failed_or_cancelled_check_gives_the_connection_back() -> None:
    pool = unlock_pool(Redis()).connection_pool
    entered = asyncio.Event()

    async def refused(connection: Any) -> None:
        raise ConnectionError("refused")

    async def stuck(connection: Any) -> None:
        entered.set()
        await asyncio.Event().wait()

    pool.ensure_connection = refused
    with pytest.raises(ConnectionError):
        await pool.get_connection()
    assert not pool._in_use_connections and len(pool._available_connections) == 1
    pool.ensure_connection = stuck
    taker = asyncio.create_task(pool.get_connection())
    await entered.wait()
    taker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taker
    assert not pool._in_use_connections and len(pool._available_connections) == 1


async def test_many_commands_at_once_through_an_unlocked_pool(redis_url: str) -> None:
    """Every command gets a connection no other command uses meanwhile, its own reply, and
    gives the connection back."""
    client = unlock_pool(Redis.from_url(redis_url))
    try:
        await client.delete("agentq:test:pool")
        replies = await asyncio.gather(
            *(client.incr("agentq:test:pool") for _ in range(50)),
            *(client.echo(f"m{i}") for i in range(50)),
        )
        assert sorted(replies[:50]) == list(range(1, 51))
        assert replies[50:] == [f"m{i}".encode() for i in range(50)]
        assert not client.connection_pool._in_use_connections
    finally:
        await client.delete("agentq:test:pool")
        await client.aclose()


def test_redis_py_blocking_pool_still_has_what_bounded_pool_uses() -> None:
    """The internals BoundedPool leans on (it replaces BlockingConnectionPool.get_connection):
    if this fails, redis-py changed them: check BoundedPool against its new get_connection."""
    source = inspect.getsource(BlockingConnectionPool.release)
    assert "self._condition" in source and "notify()" in source, source
    pool = BlockingConnectionPool(max_connections=2, timeout=3)
    assert isinstance(pool._condition, asyncio.Condition) and pool.timeout == 3
    for name in ("can_get_connection", "get_available_connection", "ensure_connection"):
        assert callable(getattr(pool, name)), name


async def test_a_bounded_pool_checks_connections_side_by_side() -> None:
    assert await _checked_together(BoundedPool(max_connections=5))


async def _waiting(pool: Any, n: int) -> None:
    while len(pool._condition._waiters) < n:  # noqa: ASYNC110 (no event tells of a waiter)
        await asyncio.sleep(0)


async def test_a_waiter_cancelled_after_its_wake_up_passes_it_on() -> None:
    """One connection, two waiters: the first is woken by the release and cancelled before it
    runs. The second still gets the connection. (With redis-py's BlockingConnectionPool on
    Python < 3.11.8 it sleeps on beside a free connection: CPython gh-112202.)"""
    pool = BoundedPool(max_connections=1)

    async def connected(connection: Any) -> None:
        pass

    pool.ensure_connection = connected
    held = await pool.get_connection()
    first = asyncio.create_task(pool.get_connection())
    second = asyncio.create_task(pool.get_connection())
    await _waiting(pool, 2)
    await pool.release(held)  # wakes `first`, which has not run yet
    first.cancel()
    async with asyncio.timeout(TOGETHER_S):
        got = await second
    assert got is held and first.cancelled()


async def test_a_bounded_pool_wait_ends_with_a_connection_error() -> None:
    pool = BoundedPool(max_connections=1, timeout=0)

    async def connected(connection: Any) -> None:
        pass

    pool.ensure_connection = connected
    await pool.get_connection()
    with pytest.raises(ConnectionError, match="No connection available"):
        await pool.get_connection()


async def _opened(client: Redis, commands: int) -> int:
    """Connections the client's pool holds after `commands` commands sent at once."""
    await client.delete("agentq:test:pool")
    replies = await asyncio.gather(*(client.incr("agentq:test:pool") for _ in range(commands)))
    assert sorted(replies) == list(range(1, commands + 1))
    pool = client.connection_pool
    assert not pool._in_use_connections
    return len(pool._available_connections)


async def test_a_bounded_client_opens_at_most_its_bound(redis_url: str) -> None:
    """200 commands at once: an unbounded pool opens a connection for most of them, a bounded
    one at most its bound, and every command gets its reply."""
    free = unlock_pool(Redis.from_url(redis_url))
    bounded = unlock_pool(await bound_pool(Redis.from_url(redis_url), 4))
    try:
        assert isinstance(bounded.connection_pool, BlockingConnectionPool)
        assert await _opened(free, 200) > 4  # the test can tell the two apart
        assert await _opened(bounded, 200) <= 4
    finally:
        await free.delete("agentq:test:pool")
        await free.aclose()
        await bounded.aclose()


async def test_bound_pool_keeps_the_connection_options_and_leaves_sentinel_alone() -> None:
    client = await bound_pool(Redis(socket_timeout=7, db=3), 9)
    pool = client.connection_pool
    assert type(pool) is BoundedPool and pool.max_connections == 9
    assert pool.connection_kwargs["socket_timeout"] == 7 and pool.connection_kwargs["db"] == 3
    unbounded = Redis()
    assert (await bound_pool(unbounded, None)).connection_pool is unbounded.connection_pool
    sentinel = SentinelConnectionPool("mymaster", Sentinel([("127.0.0.1", 26379)]))
    assert (await bound_pool(Redis(connection_pool=sentinel), 9)).connection_pool is sentinel


async def test_the_workers_pool_is_bounded(settings: Settings) -> None:
    """A bounded pool, which checks connections outside its lock (tested above). (By type:
    holding a running worker's own connections open stalls the worker.)"""
    settings = settings.model_copy(update={"redis_connections": 7})
    async with running(settings) as worker:
        pool = worker.ctx["redis"].connection_pool
        assert type(pool) is BoundedPool and pool.max_connections == 7
        assert "get_connection" not in vars(pool)


async def test_an_unbounded_workers_pool_is_unlocked(settings: Settings) -> None:
    async with running(settings, redis_connections=None) as worker:
        get_connection = worker.ctx["redis"].connection_pool.get_connection
        assert get_connection.__func__ is _get_connection


@pytest.mark.e2e
def test_a_worker_process_keeps_to_its_redis_connections(redis_url: str, tmp_path: Path) -> None:
    """A real worker with 100 runs in flight and AGENTQ_REDIS_CONNECTIONS=6: every job
    succeeds, and the process never holds more than 6 connections to Redis (sampled from
    /proc while the batch runs; unbounded, it held about one per run)."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    port = urlsplit(redis_url).port or 6379
    sim, url = start_sim("--latency-ms", "100")
    env = base_env(
        redis_url,
        url,
        AGENTQ_CONCURRENCY="100",
        AGENTQ_REDIS_CONNECTIONS="6",
        AGENTQ_DATA_DIR=str(tmp_path / "d"),
    )
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(f'{{"custom_id": "j{i}", "input": "hi {i}"}}\n' for i in range(400)))
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        sub = agentq("submit", str(jobs), env=env)
        assert sub.returncode == 0, sub.stderr
        batch_id = sub.stdout.strip().splitlines()[-1]
        peak, deadline = 0, time.monotonic() + 240
        while not status(batch_id, env)["finished"]:
            peak = max(peak, tcp_connections(worker.pid, port))
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the batch did not finish in 240 s"
        st = status(batch_id, env)
    finally:
        stop(worker, sim)
    assert st["counts"]["succeeded"] == 400, st  # type: ignore[index]
    assert 1 <= peak <= 6, peak


async def test_a_script_lost_twice_on_a_client_of_its_own_runs_again_on_it() -> None:
    """A failover between redis-py's reload and its second try (NoScriptError twice): the
    submit's own client sends it once more, as nothing ran."""
    from redis.exceptions import NoScriptError

    from producer.connect import Script

    class OneConnection:
        def __init__(self) -> None:
            self.evals = 0

        async def evalsha(self, *args: Any) -> int:
            self.evals += 1
            if self.evals <= 2:
                raise NoScriptError("NOSCRIPT")
            return 7

        async def script_load(self, source: str) -> str:
            return "sha"

    client = OneConnection()
    assert await Script(Redis(), "return 7")(args=[1], client=client) == 7
    assert client.evals == 3
