"""`agentq worker --processes N`: a supervisor over N worker processes. Real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from tests.procs import ROOT, agentq, base_env, start_sim, status, stop, until
from worker import supervisor
from worker.supervisor import die_with_parent

pytestmark = pytest.mark.e2e


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", *args],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def _children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(x) for x in text.split()}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _beating(redis_url: str) -> set[int]:
    """Pids of the workers that published a heartbeat."""
    beats = redis_sync.Redis.from_url(redis_url).hkeys("agentq:workers")
    return {int(b.decode().rsplit(":", 1)[1]) for b in beats}


def _jobs(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"j{i}", "input": "What is 1 + 1?"}) + "\n")
    return path


def _leased(redis_url: str) -> int:
    return int(redis_sync.Redis.from_url(redis_url).zcard("agentq:leases"))


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


def test_workers_start_and_a_killed_one_is_restarted(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim()
    log = tmp_path / "sup.log"
    sup = _start(base_env(redis_url, url), log, "--processes", "2")
    try:
        until(lambda: len(_children(sup.pid)) == 2, what="2 workers started")
        first = _children(sup.pid)
        until(lambda: first <= _beating(redis_url), what="both workers registered")
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        until(
            lambda: len(_children(sup.pid) - first) == 1 and len(_children(sup.pid)) == 2,
            what="the killed worker replaced",
        )
        (new,) = _children(sup.pid) - first
        until(lambda: new in _beating(redis_url), what="the new worker registered")
        assert "restarting it in" in _log(log)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0, _log(log)
        assert not any(_alive(p) for p in (first | {new}) - {victim})
    finally:
        stop(sup, sim)


def test_sigterm_drains_every_worker_and_exits_0(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "2000")
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="3", AGENTQ_SHUTDOWN_GRACE_S="30")
    log = tmp_path / "sup.log"
    sup = _start(env, log, "--processes", "2")
    try:
        until(lambda: len(_beating(redis_url)) == 2, what="2 workers registered")
        res = agentq("submit", str(_jobs(tmp_path / "j.jsonl", 6)), env=env)
        assert res.returncode == 0, res.stderr
        batch = res.stdout.strip().splitlines()[-1]
        until(lambda: _leased(redis_url) == 6, what="6 jobs running on both workers")
        workers = _children(sup.pid)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(90) == 0, _log(log)
        assert not any(_alive(p) for p in workers)
        counts = status(batch, env)["counts"]
        assert counts["succeeded"] == 6, counts  # drained: finished, not put back
    finally:
        stop(sup, sim)


def test_a_second_signal_exits_at_once(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "30000")
    env = base_env(redis_url, url, AGENTQ_SHUTDOWN_GRACE_S="120", AGENTQ_CALL_TIMEOUT_S="60")
    log = tmp_path / "sup.log"
    sup = _start(env, log, "--processes", "2")
    try:
        until(lambda: len(_beating(redis_url)) == 2, what="2 workers registered")
        res = agentq("submit", str(_jobs(tmp_path / "j.jsonl", 2)), env=env)
        assert res.returncode == 0, res.stderr
        until(lambda: _leased(redis_url) == 2, what="jobs running")
        workers = _children(sup.pid)
        sup.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert sup.poll() is None  # draining: the grace period is 120 s
        sup.send_signal(signal.SIGINT)
        assert sup.wait(30) == 128 + signal.SIGINT, _log(log)
        until(lambda: not any(_alive(p) for p in workers), what="the workers gone too")
    finally:
        stop(sup, sim)


def test_workers_dying_at_start_make_it_give_up(redis_url: str, tmp_path: Path) -> None:
    sim, url = start_sim()
    env = base_env(redis_url, url, AGENTQ_PLUGINS="no_such_plugin_module")
    log = tmp_path / "sup.log"
    sup = _start(env, log, "--processes", "2")
    try:
        code = sup.wait(180)
        assert code == 1
        assert "giving up" in _log(log)
    finally:
        stop(sup, sim)


def test_processes_must_be_a_count_or_auto() -> None:
    res = agentq("worker", "--processes", "0", env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert "--processes" in res.stderr and "at least 1" in res.stderr
    res = agentq("worker", "--processes", "many", env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and "'auto'" in res.stderr


def test_auto_counts_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    cpu_max = tmp_path / "cpu.max"
    assert supervisor.cpu_count(cpu_max) == 3  # no cgroup file: the affinity mask
    cpu_max.write_text("max 100000\n")
    assert supervisor.cpu_count(cpu_max) == 3
    cpu_max.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert supervisor.cpu_count(cpu_max) == 2


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (the supervisor's loop runs in this thread)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_worker_that_dies_in_a_slow_start_up_died_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a death was early only within HEALTHY_S of the process's start. On a loaded
    machine a worker took 14–20 s to fail its start-up (HEALTHY_S is 10 s), so the supervisor
    restarted it for ever instead of giving up. Now a death before the worker said it was ready
    is early, however long the start-up took (here 0.3 s against a HEALTHY_S of 0.05 s)."""
    monkeypatch.setattr(supervisor, "HEALTHY_S", 0.05)
    monkeypatch.setattr(supervisor, "RESTART_MIN_S", 0.01)
    monkeypatch.setattr(supervisor, "RESTART_MAX_S", 0.01)
    slow_death = [sys.executable, "-c", "import time; time.sleep(0.3); raise SystemExit(3)"]
    with _deadline(60):
        assert supervisor.Supervisor(slow_death, 1).run() == 1


def test_a_worker_says_when_it_is_ready() -> None:
    ready_then_done = [
        sys.executable,
        "-c",
        "import os, time; os.write(int(os.environ['AGENTQ_READY_FD']), b'1'); time.sleep(0.5)",
    ]
    sup = supervisor.Supervisor(ready_then_done, 1)
    with _deadline(60):
        assert sup.run() == 0
    assert sup.slots[0].ready_at is not None and sup.slots[0].ready_fd is None
