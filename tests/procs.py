"""Real processes for end-to-end and fault tests: the simulated Router, `agentq worker`s and
`agentq` commands, each its own OS process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker.supervisor import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-e2e-router-key-987654321"


def start_sim(*args: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    """The simulated Router (on a free port unless given); returns the process and its /v1
    URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.simrouter", "--port", str(port), *args],
        env={**os.environ, "SIMROUTER_API_KEY": KEY},
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "simulated Router listening on" in line, line
    return proc, line.rsplit(" ", 1)[1].strip()


def base_env(redis_url: str, router_url: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "HANZO_ROUTER_URL": router_url,
        "HANZO_API_KEY": KEY,
        "AGENTQ_POLL_DELAY_S": "0.02",
        "AGENTQ_CONCURRENCY": "50",
        "AGENTQ_BACKOFF_BASE_S": "0.05",
        "AGENTQ_BACKOFF_MAX_S": "0.5",
        "PYTHONPATH": str(ROOT),
        **extra,
    }


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def agentq(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_parent,
    )


def run_suite(module: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m <module> --quick` (the fault and hostile-job suites) from the repository."""
    return subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=die_with_parent,
    )


def until(cond: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def status(batch_id: str, env: dict[str, str]) -> dict[str, object]:
    res = agentq("status", batch_id, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def stop(*procs: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def keys_containing(redis_url: str, needle: str) -> list[str]:
    """Every key of the database whose name or value contains `needle` (a secrets scan)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    found = []
    raw = needle.encode()
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            values = [v for kv in r.hgetall(key).items() for v in kv]
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind in (b"zset", b"set"):
            values = list(r.zrange(key, 0, -1) if kind == b"zset" else r.smembers(key))
        else:
            values = []
        if raw in key or any(raw in v for v in values):
            found.append(key.decode())
    return found
