"""The benchmark harness runs: `python -m ops.bench --quick` exits 0 and prints a table line
for every target. Benchmarks, not timed tests: no speed is checked here, only that what the
bench measures adds up (CPU of every agentq process, true memory peaks)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ops.bench import cases
from ops.bench.cases import CASES
from ops.bench.measure import BENCH, TOTAL, CpuSplit, PeakMem
from worker.supervisor import die_with_parent

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """`python -m ops.bench --quick ARGS`: its stdout and its JSON rows."""
    # Always its own embedded Valkey: the harness flushes the database it is given, and the
    # test session's REDIS_URL database must not be flushed under other tests.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    out_json = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "ops.bench", "--quick", "--json", str(out_json), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,  # the quick bench took 6 min on a slow, busy 2-core machine
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout, json.loads(out_json.read_text())["rows"]


def test_quick_bench_runs_every_target(tmp_path: Path) -> None:
    stdout, rows = run_bench(tmp_path)
    table = stdout.split("== results", 1)[1]
    for name in CASES:
        assert re.search(rf"^{re.escape(name)}\s+\|.*\|\s*(PASS|SHORT)\s*$", table, re.M), (
            f"no table line for {name}:\n{table}"
        )
    assert {r["name"] for r in rows} == set(CASES)
    assert all(r["status"] in ("PASS", "SHORT", "INFO") for r in rows)
    long_cases = [r["case"] for r in rows if r["name"] == "long-run"]
    assert long_cases == [
        "C=100, 0.5 s +-25% a call",
        "C=100, 0.5 s fixed (every call the same)",
        "C=100, 0.3 s +-25% a call",
        "memory per run in flight",
    ], long_cases


def assert_split(split: dict[str, float], parts: set[str]) -> None:
    """CPU per process: exactly these parts, each spent something, and they add up."""
    assert set(split) == parts | {TOTAL}, split
    assert all(split[k] > 0 for k in parts), split
    assert sum(split[k] for k in parts) == pytest.approx(split[TOTAL]), split


def test_quick_bench_counts_every_agentq_process(tmp_path: Path) -> None:
    """The smallest cases that report CPU per job and memory growth: CPU counts the worker(s),
    Redis and the submitting/waiting bench process, and sums to the total printed; memory is
    each process's true peak from its RSS after warm-up."""
    stdout, rows = run_bench(tmp_path, "--only", "latency-500", "e2e-100k")
    by_case = {(r["name"], r["case"]): r for r in rows}

    for c in (50, 200):
        row = by_case[("latency-500", f"C={c}")]
        assert_split(row["data"]["cpu_ms_per_job"], {"worker", "Redis", BENCH})
        assert "worker" in row["detail"] and "Redis" in row["detail"] and BENCH in row["detail"]

    row = by_case[("e2e-100k", "2,000 jobs, 2 workers")]
    assert_split(row["data"]["cpu_ms_per_job"], {"2 workers", "Redis", BENCH})
    assert_split(row["data"]["cores_busy"], {"2 workers", "Redis", BENCH})
    memory = row["data"]["memory_mb"]
    assert set(memory) == {"worker-0", "worker-1", "Redis", BENCH}
    for label, m in memory.items():
        assert m["since"] == "after warm-up", (label, m)
        assert m["peak_mb"] >= m["rss_mb"] > 0, (label, m)
        assert m["peak_mb"] >= m["baseline_mb"] > 0, (label, m)
        assert m["growth_mb"] == pytest.approx(m["peak_mb"] - m["baseline_mb"], abs=0.11)
        assert f"{label} {m['baseline_mb']:.0f} -> peak {m['peak_mb']:.0f} MB" in row["detail"]
    growth = max(memory[w]["growth_mb"] for w in ("worker-0", "worker-1"))
    assert f"worker memory +{growth:.0f} MB" in row["measured"]
    header = stdout.split("== results", 1)[0].splitlines()[1]
    assert "its CPU and memory counted as agentq's" in header, header


def _child(code: str) -> subprocess.Popen[str]:
    """A Python child that says "ready" once started, then runs code when told (a line on
    stdin), says "done" and waits for another line before it exits."""
    script = (
        "import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        f"{code}\nprint('done', flush=True)\nsys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def _run(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"


def test_cpu_split_counts_each_process_and_this_one() -> None:
    """A child that burns 0.3 s of CPU is counted under its label, this process's own work
    under BENCH, an idle 'apart' process in neither; the parts add up to the total."""
    busy = _child("t = time.process_time()\nwhile time.process_time() - t < 0.3: pass")
    idle = _child("pass")
    try:
        with CpuSplit({"busy": [busy.pid]}, apart={"idle": [idle.pid]}) as m:
            _run(busy)
            t = time.process_time()
            while time.process_time() - t < 0.2:
                pass
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    ms = m.ms_per(1)
    assert set(ms) == {"busy", BENCH, TOTAL}
    assert ms["busy"] >= 280  # /proc counts in clock ticks (10 ms)
    assert ms[BENCH] >= 200
    assert ms[TOTAL] == pytest.approx(ms["busy"] + ms[BENCH])
    assert m.apart_ms_per(1) == {"idle": pytest.approx(0, abs=20)}


def test_peak_mem_sees_a_peak_between_readings() -> None:
    """64 MB touched and freed again after the baseline: the peak (VmHWM) still shows it, and
    the baseline is the RSS when the peak was reset, not the process's start-up peak."""
    child = _child("x = b'x' * (64 << 20)\ndel x")
    try:
        mem = PeakMem({"child": child.pid}).start("the reset")
        _run(child)
        m = mem.read()["child"]
    finally:
        child.kill()
        child.wait()
    assert m["since"] == "the reset"
    assert float(m["growth_mb"]) >= 60
    assert float(m["peak_mb"]) >= float(m["rss_mb"]) + 50  # freed: now well below the peak
    assert m["baseline_mb"] == pytest.approx(m["peak_mb"] - m["growth_mb"], abs=0.11)


class _Started(Exception):
    """Stops the turns case once both workers are set up."""


async def test_turns_case_sets_turns_on_and_off_whatever_the_shell_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shell (or .env) with AGENTQ_CPU_TURNS=false must not turn the case into off against
    off: each side's worker gets the setting it stands for."""
    monkeypatch.setenv("AGENTQ_CPU_TURNS", "false")
    given: dict[str, dict[str, str] | None] = {}

    class FakeSim:
        pid, url = os.getpid(), "http://127.0.0.1:1/v1"

        def __init__(self, latency: int) -> None: ...
        def __enter__(self) -> FakeSim:
            return self

        def __exit__(self, *exc: object) -> None: ...

    @contextlib.contextmanager
    def workers(self: Any, n: int, sim: Any, c: int, queue: str, extra_env: Any = None) -> Any:
        given[queue] = extra_env
        yield []

    def producer(self: Any, queue: str) -> Any:
        raise _Started

    async def flush(self: Any) -> None: ...

    monkeypatch.setattr(cases, "SimRouterProc", FakeSim)
    monkeypatch.setattr(cases.Bench, "workers", workers)
    monkeypatch.setattr(cases.Bench, "producer", producer)
    monkeypatch.setattr(cases.Bench, "flush", flush)
    with pytest.raises(_Started):
        await cases.turns(cases.Bench("redis://unused", cases.QUICK, tmp_path))
    env = {**os.environ}
    on, off = (env | (given[q] or {}) for q in ("bench:turns-on", "bench:turns-off"))
    assert on["AGENTQ_CPU_TURNS"] == "true" and off["AGENTQ_CPU_TURNS"] == "false", given
