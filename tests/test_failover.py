"""A Redis failover seen from agentq's client: the primary it talks to is demoted to a replica
(its writes get READONLY) and the endpoint moves to the promoted replica. Real Valkey servers:
two, replicating over TCP, and a unix socket path as the endpoint, a symlink moved from one
server's socket to the other's, as a managed service moves its primary endpoint's DNS name."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from ops.procs import start_valkey
from producer import keys
from producer.connect import connect
from producer.models import AgentJob, job_id_for
from producer.settings import Settings
from producer.store import Store
from tests.procs import until


def _info(r: redis_sync.Redis, section: str) -> dict[str, Any]:
    return r.info(section)  # type: ignore[no-any-return]


def _readonly_replies(r: redis_sync.Redis) -> int:
    """READONLY errors the server has sent so far (INFO errorstats)."""
    return int(_info(r, "errorstats").get("errorstat_READONLY", {}).get("count", 0))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Any, Any, Path]]:
    """Servers A (primary) and B (its replica, in sync), each on a port and a unix socket, and
    the endpoint: a symlink to A's socket. Socket paths live in a short /tmp directory (the
    limit is 107 bytes)."""
    socks = Path(tempfile.mkdtemp(prefix="aqfo", dir="/tmp"))
    servers: list[Any] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(start_valkey(tmp_path / name, unix_socket_path=socks / f"{name}.sock"))
        a, b = servers
        redis_sync.Redis(port=b.port).replicaof("127.0.0.1", a.port)
        replica = redis_sync.Redis(port=b.port)
        until(lambda: _info(replica, "replication").get("master_link_status") == "up", 30, "sync")
        (socks / "primary.sock").symlink_to(socks / "a.sock")
        yield a, b, socks
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(socks, ignore_errors=True)


async def test_writes_that_meet_a_demoted_primary_are_retried_on_the_new_one(
    pair: tuple[Any, Any, Path],
) -> None:
    """A claim (a script), a submit (scripts in a pipeline) and a plain write sent to the old
    primary after it became a replica: each gets READONLY, reconnects, and lands on the new
    primary once the endpoint points there. Before ReadOnlyError was in RETRY_ON they raised."""
    a, b, socks = pair
    admin_a, admin_b = redis_sync.Redis(port=a.port), redis_sync.Redis(port=b.port)
    client = connect(Settings(redis_url=f"unix://{socks / 'primary.sock'}?db=0"))
    store = Store(client, queue="agentq:queue", result_ttl_s=3600)
    try:
        assert await store.submit_chunk("b1", [AgentJob(custom_id="q1", input="x")]) == 1
        assert admin_a.wait(1, 10_000) == 1  # B has it all
        # The failover: B promoted, A demoted to B's replica. A keeps serving reads.
        admin_b.replicaof("NO", "ONE")
        admin_a.replicaof("127.0.0.1", b.port)
        seen = _readonly_replies(admin_a)
        calls = [
            asyncio.create_task(store.claim(job_id_for("b1", "q1"), "b1", "w1", "1")),
            asyncio.create_task(store.submit_chunk("b1", [AgentJob(custom_id="q2", input="y")])),
            asyncio.create_task(client.set("agentq:test:plain", "1")),
        ]
        # Every call met the demoted primary at least once (or, before the fix, gave up).
        await _until(lambda: _readonly_replies(admin_a) >= seen + 3 or any(c.done() for c in calls))
        tmp_link = socks / "next.sock"
        tmp_link.symlink_to(socks / "b.sock")
        os.replace(tmp_link, socks / "primary.sock")  # the endpoint moves to B
        claim, new, plain = await asyncio.wait_for(asyncio.gather(*calls), 60)
    finally:
        await client.aclose()
    assert _readonly_replies(admin_a) >= seen + 3  # the calls did meet the demoted primary
    assert claim.state == "running" and new == 1 and plain
    st = await _batch_on(b.port, "b1")
    assert (st["running"], st["queued"], st["total"]) == ("1", "1", "2")
    assert admin_b.get("agentq:test:plain") == b"1"


async def _until(cond: Any, timeout: float = 30) -> None:
    """Until cond() holds, letting the calls in flight run meanwhile."""
    async with asyncio.timeout(timeout):
        while True:
            if cond():
                return
            await asyncio.sleep(0.02)


async def _batch_on(port: int, batch_id: str) -> dict[str, str]:
    r = redis_sync.Redis(port=port, decode_responses=True)
    return r.hgetall(keys.batch(batch_id))  # type: ignore[return-value]
