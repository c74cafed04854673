"""How long `agentq` commands take from start to exit, as real processes: the median of N runs
of each (after one warm-up run), against a small batch.

    python -m ops.cli_startup [--runs 5] [--redis-url URL] [--root DIR]

Without --redis-url, the commands use an embedded server in a temporary data dir (what a user
without REDIS_URL gets), stopped at the end. --root runs another checkout's code (e.g. the
commit before a change) with this interpreter."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def agentq(args: list[str], env: dict[str, str], root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(
    args: list[str], env: dict[str, str], root: Path, runs: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (user + system) seconds of each run. On a busy machine the wall
    clock includes waiting for a core; the CPU time is what the command itself costs."""
    agentq(args, env, root)  # warm-up: file caches, .pyc files
    wall, cpu = [], []
    for _ in range(runs):
        t, c = time.perf_counter(), _children_cpu()
        res = agentq(args, env, root)
        wall.append(time.perf_counter() - t)
        cpu.append(_children_cpu() - c)
        if res.returncode not in (0, 1, 2):
            raise SystemExit(f"agentq {' '.join(args)} failed: {res.stderr[-2000:]}")
    return wall, cpu


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:>6.0f}ms"


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.cli_startup", description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--redis-url", help="default: an embedded server in a temporary dir")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose code runs")
    args = ap.parse_args()
    root = args.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(root), "AGENTQ_DATA_DIR": f"{tmp}/data"}
        env.pop("REDIS_URL", None)
        if args.redis_url:
            env["REDIS_URL"] = args.redis_url
        jobs = Path(tmp) / "jobs.jsonl"
        jobs.write_text(
            "".join(
                json.dumps({"custom_id": f"q{i}", "input": f"What is {i} + 1?"}) + "\n"
                for i in range(10)
            )
        )
        try:
            res = agentq(["submit", str(jobs)], env, root)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            batch = res.stdout.strip().splitlines()[-1]
            cases = {
                "--help": ["--help"],
                "status": ["status", batch],
                "results": ["results", batch],
                "submit": ["submit", str(jobs), "--batch-id", batch],
                "wait": ["wait", batch, "--timeout", "0.01"],
                "cancel": ["cancel", batch],
            }
            print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.runs} runs")
            print(f"{'command':<10} {'wall':>8} {'min':>8} {'max':>8} {'CPU':>8}")
            for name, argv in cases.items():
                wall, cpu = timed(argv, env, root, args.runs)
                print(
                    f"{name:<10} {_ms(statistics.median(wall))} {_ms(min(wall))} "
                    f"{_ms(max(wall))} {_ms(statistics.median(cpu))}",
                    flush=True,
                )
            print(f"load average {os.getloadavg()[0]:.2f}")
        finally:
            if not args.redis_url:
                agentq(["embedded", "stop"], env, root)


if __name__ == "__main__":
    main()
