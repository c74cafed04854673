"""One function per benchmark target. Each starts what it needs (simulated Router and worker
processes), measures, stops them again, and returns table rows.

Comparisons run side by side in one run: the same Router process serves both sides, the two
sides alternate (A B, B A, ...), and the medians of the rounds are compared, so a noisy
machine slows both alike. The harness process only orchestrates; what is measured runs in
processes of its own (workers, the plain SDK loop, the submitting client)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from redis.asyncio import Redis

from ops import procs
from ops.procs import SimRouterProc, WorkerProc, workers_running
from producer import Producer, keys
from producer.models import AgentJob, AgentSpec, BatchStatus, JobMetadata, Status, new_batch_id
from producer.settings import load_settings

from .measure import BENCH, TOTAL, CpuSplit, PeakMem, fmt_mem, fmt_split, median_round
from .sdkloop import TOOL_AGENT, question

# -- sizes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    rounds: int
    """A/B rounds per comparison (medians are compared)."""
    sdk_rounds: int
    sdk_concurrency: int
    sdk_n: dict[tuple[int, str], int]
    """(router latency ms, plain|tool) -> runs per side per round."""
    scale_n: int
    lat500_waves: int
    """latency-500 runs C x waves jobs, so the ramp-up and tail are a small part."""
    lat500_rounds: int
    submit_small: int
    submit_big: int
    visible_n: int
    rss_concurrency: int
    rss_latency_ms: int
    rss_n: int
    e2e_n: int
    cmds_n: int
    """redis-cmds: jobs per batch whose Redis commands are counted."""
    cmds_cases: tuple[tuple[int, str], ...]
    """redis-cmds: (Router latency ms, plain|tool) of each batch counted."""
    long_concurrency: int
    long_latencies_ms: tuple[int, ...]
    """long-run's Router latencies: the first is also run with a fixed latency."""
    long_waves: int
    """long-run runs C x waves jobs a round (its steady middle needs MIN_LONG_WAVES)."""
    long_rounds: int
    fair_big: int
    """fair-share: the big batch the small and the priority batches are submitted behind."""
    fair_pair: int
    ratelimit_n: int
    idle_window_s: float = 20.0
    """How long an idle worker's Redis commands and CPU are counted."""
    idle_starts: int = 40
    """Single jobs submitted to an idle worker, one at a time (submit-to-start latency)."""
    wait_n: int = 2_000
    """Jobs of the batch whose `wait` CPU is measured."""
    turns_rounds: int = 6
    """turns: rounds of each case, a worker with CPU turns against one without."""


FULL = Sizes(
    rounds=3,
    sdk_rounds=3,
    sdk_concurrency=50,
    sdk_n={(0, "plain"): 1200, (0, "tool"): 600, (200, "plain"): 1250, (200, "tool"): 600},
    scale_n=900,
    lat500_waves=12,
    lat500_rounds=3,
    submit_small=1_000,
    submit_big=100_000,
    visible_n=1_500,
    rss_concurrency=1_000,
    rss_latency_ms=5_000,
    rss_n=2_000,
    e2e_n=100_000,
    cmds_n=600,
    cmds_cases=((0, "plain"), (200, "plain"), (200, "tool")),
    long_concurrency=500,
    long_latencies_ms=(2_000, 5_000),
    long_waves=11,
    long_rounds=2,
    fair_big=3_000,
    fair_pair=300,
    ratelimit_n=1_200,
)

QUICK = Sizes(
    rounds=2,
    sdk_rounds=1,
    sdk_concurrency=50,
    sdk_n={(0, "plain"): 150, (0, "tool"): 80, (200, "plain"): 150, (200, "tool"): 80},
    scale_n=120,
    lat500_waves=3,
    lat500_rounds=1,
    submit_small=1_000,
    submit_big=5_000,
    visible_n=150,
    rss_concurrency=300,
    rss_latency_ms=2_000,
    rss_n=300,
    e2e_n=2_000,
    cmds_n=100,
    cmds_cases=((0, "plain"),),
    long_concurrency=100,
    long_latencies_ms=(500, 300),
    long_waves=7,
    long_rounds=1,
    fair_big=400,
    fair_pair=60,
    ratelimit_n=150,
    idle_window_s=4.0,
    idle_starts=5,
    wait_n=150,
    turns_rounds=2,
)


# -- rows -----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    case: str
    measured: str
    target: str
    ok: bool | None
    """True PASS, False SHORT, None: information only (no target)."""
    value: float | None = None
    detail: str = ""
    error: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    """The numbers behind measured/detail (CPU per process, memory peaks), for --json."""

    @property
    def status(self) -> str:
        if self.error:
            return "ERROR"
        if self.ok is None:
            return "INFO"
        return "PASS" if self.ok else "SHORT"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "case": self.case,
            "measured": self.measured,
            "value": self.value,
            "target": self.target,
            "status": self.status,
            "detail": self.detail,
            "data": self.data,
        }


# -- context --------------------------------------------------------------------------------


@dataclass
class Bench:
    redis_url: str
    sizes: Sizes
    tmp: Path
    redis_pid: int | None = None
    """The Redis server's pid when it runs here (its CPU and memory are agentq's cost)."""
    say: Callable[[str], None] = field(default=lambda msg: print(f"  · {msg}", flush=True))

    def agentq_pids(self, workers: Sequence[WorkerProc]) -> dict[str, list[int]]:
        """The processes agentq adds besides the bench process: its workers and Redis."""
        label = "worker" if len(workers) == 1 else f"{len(workers)} workers"
        out = {label: [w.pid for w in workers]}
        if self.redis_pid is not None:
            out["Redis"] = [self.redis_pid]
        return out

    @property
    def redis_note(self) -> str:
        if self.redis_pid is not None:
            return ""
        return " (Redis not counted: not a local process this bench can read)"

    def producer(self, queue: str) -> Producer:
        return Producer.from_env(load_settings(redis_url=self.redis_url, queue=queue))

    async def flush(self) -> None:
        r = Redis.from_url(self.redis_url)
        try:
            await r.flushdb()
        finally:
            await r.aclose()

    @contextmanager
    def workers(
        self,
        n: int,
        router: SimRouterProc,
        concurrency: int,
        queue: str,
        extra_env: dict[str, str] | None = None,
    ) -> Iterator[list[WorkerProc]]:
        with workers_running(
            n,
            redis_url=self.redis_url,
            router_url=router.url,
            concurrency=concurrency,
            queue=queue,
            log_dir=self.tmp / "logs",
            extra_env=extra_env,
        ) as ws:
            yield ws


# -- helpers --------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def make_jobs(kind: str, n: int, prefix: str) -> list[AgentJob]:
    agent = AgentSpec(**TOOL_AGENT) if kind == "tool" else None  # type: ignore[arg-type]
    return [AgentJob(custom_id=f"{prefix}{i}", input=question(i), agent=agent) for i in range(n)]


def write_jobfile(path: Path, n: int, *, mix_tools: bool) -> Path:
    """n jobs a line: plain ones, or every other one a calculator-tool job."""
    with path.open("w") as f:
        for i in range(n):
            line: dict[str, Any] = {"custom_id": f"j{i}", "input": question(i)}
            if mix_tools and i % 2:
                line["agent"] = TOOL_AGENT
            f.write(json.dumps(line) + "\n")
    return path


async def check_done(p: Producer, st: BatchStatus, n: int) -> None:
    """Raise with the first failure's error unless all n jobs succeeded."""
    if st.all_succeeded and st.total == n:
        return
    first = None
    async for record in p.results(st.batch_id, statuses={Status.FAILED}):
        first = record.error
        break
    counts = {s.value: c for s, c in st.counts.items() if c}
    raise RuntimeError(f"batch {st.batch_id}: {counts} of {st.total} (first error: {first})")


async def run_batch(p: Producer, jobs: list[AgentJob], timeout_s: float) -> float:
    """Submit jobs as a batch and wait for it; seconds from submit start to wait's return."""
    t0 = time.perf_counter()
    batch = await p.submit(jobs)
    st = await p.wait(batch.id, timeout=timeout_s)
    seconds = time.perf_counter() - t0
    await check_done(p, st, len(jobs))
    return seconds


async def warm_up(p: Producer, workers: int, kinds: Sequence[str] = ("plain", "tool")) -> None:
    """A small batch through warm workers before any clock starts."""
    jobs: list[AgentJob] = []
    for kind in kinds:
        jobs += make_jobs(kind, 10 * workers, prefix=f"warm-{kind}-")
    await run_batch(p, jobs, timeout_s=120)


def timeout_for(n: int, min_rate: float = 2.0) -> float:
    """A guard against a hang, not a target: generous enough for a loaded machine (the quick
    bench in the test suite timed out once at 10 jobs/s, with load 7 on 2 cores)."""
    return n / min_rate + 60.0


def fmt_rounds(xs: Sequence[float], spec: str = ".2f") -> str:
    return " ".join(format(x, spec) for x in xs)


# -- sdk-loop -------------------------------------------------------------------------------


async def sdk_loop(b: Bench) -> list[Row]:
    """agentq (1 worker process) vs a plain asyncio.gather + Semaphore loop over Runner.run with
    the worker's own pooled client (the ratio), and with the SDK's default client (for
    reference)."""
    rows: list[Row] = []
    c = b.sizes.sdk_concurrency
    queue = "bench:sdk"
    for latency in (0, 200):
        await b.flush()
        with SimRouterProc(latency) as sim, b.workers(1, sim, c, queue) as [w]:
            async with b.producer(queue) as p:
                await warm_up(p, 1)
                for kind in ("plain", "tool"):
                    n = b.sizes.sdk_n[(latency, kind)]
                    rows.append(await _sdk_pair(b, p, sim, w, latency, kind, n, c))
    return rows


async def _sdk_pair(
    b: Bench,
    p: Producer,
    sim: SimRouterProc,
    w: WorkerProc,
    latency: int,
    kind: str,
    n: int,
    c: int,
) -> Row:
    a_rate: list[float] = []
    a_cpu: list[dict[str, float]] = []
    a_sim: list[float] = []
    l_rate: list[float] = []
    l_cpu: list[dict[str, float]] = []
    l_sim: list[float] = []
    d_rate: list[float] = []
    loop_args = ["-m", "ops.bench.sdkloop", "--url", sim.url, "--n", str(n)]
    loop_args += ["--concurrency", str(c), "--warmup", str(min(20, n))]
    if kind == "tool":
        loop_args.append("--tool")
    for r in range(b.sizes.sdk_rounds):
        # agentq against the best plain loop (the worker's own pooled client), and the loop a
        # newcomer writes (the SDK's default client) for reference; the order alternates.
        sides = ("agentq", "loop", "default") if r % 2 == 0 else ("default", "loop", "agentq")
        for side in sides:
            if side == "default":
                args = [*loop_args, "--client", "default"]
                out = await asyncio.to_thread(procs.run_json, args, timeout_for(n))
                d_rate.append(out["runs_per_s"])
                continue
            if side == "agentq":
                jobs = make_jobs(kind, n, prefix=f"{kind}-{r}-")
                with CpuSplit(b.agentq_pids([w]), apart={"sim Router": [sim.pid]}) as m:
                    seconds = await run_batch(p, jobs, timeout_for(n))
                a_rate.append(n / seconds)
                a_cpu.append(m.ms_per(n))
                a_sim.append(m.apart_ms_per(n)["sim Router"])
            else:
                with CpuSplit({}, apart={"sim Router": [sim.pid]}, count_self=False) as ms:
                    out = await asyncio.to_thread(procs.run_json, loop_args, timeout_for(n))
                if out["failures"]:
                    raise RuntimeError(f"plain SDK loop: {out['failures']} of {n} runs failed")
                l_rate.append(out["runs_per_s"])
                # the plain loop is one process: no Redis, no producer, no waiter
                l_cpu.append({"loop process": out["cpu_ms_per_run"], TOTAL: out["cpu_ms_per_run"]})
                l_sim.append(ms.apart_ms_per(n + min(20, n))["sim Router"])
        b.say(
            f"{latency}ms {kind} round {r + 1}: agentq {a_rate[-1]:.0f} runs/s, pooled loop "
            f"{l_rate[-1]:.0f} runs/s, default loop {d_rate[-1]:.0f} runs/s; CPU ms/run: agentq "
            f"{a_cpu[-1][TOTAL]:.2f} (worker, Redis, submit+wait), pooled loop "
            f"{l_cpu[-1][TOTAL]:.2f}"
        )
    ratio = median(a_rate) / median(l_rate)
    per_round = [a / lo for a, lo in zip(a_rate, l_rate, strict=True)]
    a_mid, l_mid = median_round(a_cpu), median_round(l_cpu)
    return Row(
        "sdk-loop",
        f"{latency}ms {kind} C={c}",
        f"{ratio:.2f}x (agentq {median(a_rate):.0f} vs loop {median(l_rate):.0f} runs/s; "
        f"{median(a_rate) / median(d_rate):.2f}x the default-client loop's "
        f"{median(d_rate):.0f} runs/s)",
        ">= 1.0x",
        ratio >= 1.0,
        value=round(ratio, 3),
        detail=(
            f"n={n}/side/round; per-round ratios {fmt_rounds(per_round)}; CPU per run "
            f"(the median round by total): agentq {fmt_split(a_mid, 'ms/run')}{b.redis_note} "
            f"vs the pooled plain loop: {fmt_split(l_mid, 'ms/run')} (no Redis, producer or "
            f"waiter); "
            f"sim Router, on neither side: {median(a_sim):.2f} vs {median(l_sim):.2f} ms/run; "
            f"both run the same openai client, pool and event loop; the worker adds what the "
            f"loop's author would not bother with (an Agent copy per run, request bodies "
            f"without openai's no-op transform, a less eager garbage collector, the SDK's "
            f"agent identity map without its signature sort)"
        ),
        data={
            "cpu_ms_per_run": {"agentq": a_mid, "loop": l_mid},
            "sim_router_cpu_ms_per_run": {"agentq": median(a_sim), "loop": median(l_sim)},
        },
    )


# -- 2 worker processes vs 1 (scale-2v1, processes) -------------------------------------------


SCALE_C = 50
"""Concurrency of every worker process (and of the plain loop) in scale-2v1 and processes."""


@dataclass
class TwoVsOne:
    """Runs/s of each side per round; where measured, the cores busy per round."""

    rate: dict[int, list[float]] = field(default_factory=lambda: {1: [], 2: []})
    cores: dict[int, list[dict[str, float]]] = field(default_factory=lambda: {1: [], 2: []})
    sim_cores: dict[int, list[float]] = field(default_factory=lambda: {1: [], 2: []})
    loop: list[float] = field(default_factory=list)
    """Runs/s of the plain SDK loop per round, where it ran as a third side."""

    @property
    def ratio(self) -> float:
        return median(self.rate[2]) / median(self.rate[1])


async def _two_vs_one(
    b: Bench,
    name: str,
    sim: SimRouterProc,
    labels: tuple[str, str],
    cpu_of: dict[int, dict[str, list[int]]] | None = None,
    with_loop: bool = False,
) -> TwoVsOne:
    """Side 2 against side 1, whose workers serve queues bench:NAME-2 and -1: tool jobs, after
    a warm-up of each, b.sizes.rounds rounds of scale_n jobs a side, the sides alternating
    (1 2, 2 1, ...). With cpu_of (side -> process groups), each round's CPU split too. With
    with_loop, the pooled plain SDK loop (C=SCALE_C, the same jobs) runs each round too: last,
    then first."""
    n = b.sizes.scale_n
    out = TwoVsOne()
    loop_args = ["-m", "ops.bench.sdkloop", "--url", sim.url, "--n", str(n), "--tool"]
    loop_args += ["--concurrency", str(SCALE_C), "--warmup", str(min(20, n))]

    async def plain_loop() -> None:
        got = await asyncio.to_thread(procs.run_json, loop_args, timeout_for(n))
        if got["failures"]:
            raise RuntimeError(f"plain SDK loop: {got['failures']} of {n} runs failed")
        out.loop.append(got["runs_per_s"])

    async with b.producer(f"bench:{name}-1") as p1, b.producer(f"bench:{name}-2") as p2:
        producers = {1: p1, 2: p2}
        await warm_up(p1, 1)
        await warm_up(p2, 2)
        for r in range(b.sizes.rounds):
            if with_loop and r % 2:
                await plain_loop()
            for k in (1, 2) if r % 2 == 0 else (2, 1):
                jobs = make_jobs("tool", n, prefix=f"{name[0]}{k}-{r}-")
                split = CpuSplit(cpu_of[k], apart={"sim Router": [sim.pid]}) if cpu_of else None
                with split or contextlib.nullcontext():
                    seconds = await run_batch(producers[k], jobs, timeout_for(n))
                out.rate[k].append(n / seconds)
                if split is not None:
                    out.cores[k].append(split.cores())
                    out.sim_cores[k].append(split.apart_cores()["sim Router"])
            if with_loop and r % 2 == 0:
                await plain_loop()
            loop = f", plain loop {out.loop[-1]:.0f} runs/s" if with_loop else ""
            b.say(
                f"round {r + 1}: {labels[0]} {out.rate[1][-1]:.0f} runs/s, "
                f"{labels[1]} {out.rate[2][-1]:.0f} runs/s{loop}"
            )
    return out


async def scale_2v1(b: Bench) -> list[Row]:
    """2 worker processes vs 1 on this machine: tool jobs, Router latency 0 (CPU-bound)."""
    await b.flush()
    with ExitStack() as stack:
        sim = stack.enter_context(SimRouterProc(0))
        groups = {
            k: stack.enter_context(b.workers(k, sim, SCALE_C, f"bench:scale-{k}")) for k in (1, 2)
        }
        cpu_of = {k: b.agentq_pids(groups[k]) for k in (1, 2)}
        t = await _two_vs_one(b, "scale", sim, ("1 worker", "2 workers"), cpu_of)
    n, rate, ratio, sim_cores = b.sizes.scale_n, t.rate, t.ratio, t.sim_cores
    mid = {k: median_round(t.cores[k]) for k in (1, 2)}
    return [
        Row(
            "scale-2v1",
            "tool jobs, 0ms",
            f"{ratio:.2f}x (2 workers {median(rate[2]):.0f} vs 1 worker "
            f"{median(rate[1]):.0f} runs/s)",
            ">= 1.7x",
            ratio >= 1.7,
            value=round(ratio, 3),
            detail=(
                f"n={n}/round; per-round 2-worker rates {fmt_rounds(rate[2], '.0f')}, "
                f"1-worker {fmt_rounds(rate[1], '.0f')}; cores busy (CPU s per wall s, "
                f"median round, of {os.cpu_count()}): 1-worker run: "
                f"{fmt_split(mid[1], 'cores')}, sim Router {median(sim_cores[1]):.2f}; 2-worker "
                f"run: {fmt_split(mid[2], 'cores')}, sim Router {median(sim_cores[2]):.2f}"
                f"{b.redis_note}"
            ),
            data={"cores_busy": {"1 worker": mid[1], "2 workers": mid[2]}},
        )
    ]


# -- latency-500 ----------------------------------------------------------------------------


async def latency_500(b: Bench) -> list[Row]:
    """Router latency 500 ms: runs/s against the ideal C / 0.5 s, and CPU per job."""
    rows = []
    with SimRouterProc(500) as sim:
        for c in (50, 200):
            await b.flush()
            queue = f"bench:lat500-{c}"
            n = c * b.sizes.lat500_waves
            rates: list[float] = []
            cpu_ms: list[dict[str, float]] = []
            cores: list[float] = []
            with b.workers(1, sim, c, queue) as [w]:
                async with b.producer(queue) as p:
                    await warm_up(p, 1, kinds=("plain",))
                    for r in range(b.sizes.lat500_rounds):
                        jobs = make_jobs("plain", n, prefix=f"l{c}-{r}-")
                        with CpuSplit(b.agentq_pids([w])) as m:
                            seconds = await run_batch(p, jobs, timeout_for(n))
                        rates.append(n / seconds)
                        cpu_ms.append(m.ms_per(n))
                        cores.append(m.cores()["worker"])
                        b.say(
                            f"C={c} round {r + 1}: {rates[-1]:.0f} runs/s, "
                            f"{cpu_ms[-1][TOTAL]:.2f} CPU ms/job (worker, Redis, submit+wait)"
                        )
            ideal = c / 0.5
            frac = median(rates) / ideal
            mid = median_round(cpu_ms)
            rows.append(
                Row(
                    "latency-500",
                    f"C={c}",
                    f"{frac:.0%} ({median(rates):.0f} of {ideal:.0f} runs/s)",
                    ">= 90% of C/0.5s",
                    frac >= 0.9,
                    value=round(frac, 4),
                    detail=(
                        f"n={n}/round, rounds {fmt_rounds(rates, '.0f')} runs/s; CPU (median "
                        f"round by total): {fmt_split(mid, 'ms/job')}{b.redis_note}; the "
                        f"worker process kept {median(cores):.0%} of a core busy"
                    ),
                    data={"cpu_ms_per_job": mid, "worker_cores_busy": median(cores)},
                )
            )
    return rows


# -- submit ---------------------------------------------------------------------------------


async def submit(b: Bench) -> list[Row]:
    """Producer.submit_file of a generated JSONL in a subprocess: jobs/s and peak-RSS growth."""
    small_n, big_n = b.sizes.submit_small, b.sizes.submit_big
    out: dict[int, dict[str, Any]] = {}
    for n in (small_n, big_n):
        await b.flush()
        path = write_jobfile(b.tmp / f"submit-{n}.jsonl", n, mix_tools=True)
        args = ["-m", "ops.bench.client", "submit", "--redis-url", b.redis_url]
        args += ["--queue", "bench:submit-only", "--file", str(path)]
        out[n] = await asyncio.to_thread(procs.run_json, args, timeout_for(n, 500))
        if out[n]["enqueued"] != n:
            raise RuntimeError(f"submit of {n} jobs enqueued {out[n]['enqueued']}")
        b.say(
            f"{n} jobs: {out[n]['jobs_per_s']:,.0f} jobs/s; the submitting process's peak RSS "
            f"+{out[n]['delta_mb']} MB from after set-up"
        )
        path.unlink()
    await b.flush()
    rate = out[big_n]["jobs_per_s"]
    growth = out[big_n]["delta_mb"] - out[small_n]["delta_mb"]
    return [
        Row(
            "submit",
            f"{big_n:,} jobs",
            f"{rate:,.0f} jobs/s",
            ">= 20,000 jobs/s",
            rate >= 20_000,
            value=rate,
            detail=(
                f"Producer.submit_file (validates the whole file, then enqueues it streamed) "
                f"took {out[big_n]['seconds']:.2f} s; {small_n:,} jobs: "
                f"{out[small_n]['jobs_per_s']:,.0f} jobs/s"
            ),
        ),
        Row(
            "submit",
            "producer memory",
            f"peak RSS +{out[big_n]['delta_mb']:.1f} MB at {big_n:,} jobs vs "
            f"+{out[small_n]['delta_mb']:.1f} MB at {small_n:,}",
            "flat (growth <= 20 MB)",
            growth <= 20,
            value=round(growth, 1),
            detail=(
                "peak RSS (ru_maxrss) of the submitting process (a process of its own) after "
                "submit, minus its RSS after imports and client set-up (peak reset there)"
            ),
        ),
    ]


# -- visible --------------------------------------------------------------------------------


def _iso_ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))]


async def visible(b: Bench) -> list[Row]:
    """Finish-to-visible latency of `Producer.wait`.

    A raw subscriber on the batch's channel records when each job's final message arrives; its
    k-th message means k jobs are stored (the finish script stores and publishes atomically,
    and pub/sub keeps order). `wait`'s on_progress records each counter read it makes. A job
    is visible when the first read with done >= k happened; its latency is that time minus the
    record's finished_at (stamped by the worker just before it stores: an upper bound). The
    worker is paused while the batch is enqueued, so wait is subscribed before any job ends."""
    await b.flush()
    n = b.sizes.visible_n
    queue = "bench:visible"
    terminal = {s.value for s in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)}
    arrivals: list[tuple[float, str]] = []
    reads: list[tuple[float, int]] = []
    with SimRouterProc(100) as sim, b.workers(1, sim, 10, queue) as [w]:
        async with b.producer(queue) as p:
            await warm_up(p, 1, kinds=("plain",))
            batch_id = new_batch_id()
            sub = p.redis.pubsub()
            await sub.subscribe(keys.batch_events(batch_id))

            async def listen() -> None:
                while len(arrivals) < n:
                    msg = await sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None:
                        continue
                    jid, _, state = msg["data"].decode().rpartition(" ")
                    if state in terminal:
                        arrivals.append((time.time(), jid))

            listener = asyncio.create_task(listen())
            os.kill(w.pid, signal.SIGSTOP)
            try:
                await p.submit(make_jobs("plain", n, "v"), batch_id=batch_id)
                waiter = asyncio.create_task(
                    p.wait(
                        batch_id,
                        timeout=timeout_for(n),
                        on_progress=lambda st: reads.append((time.time(), st.done)),
                    )
                )
                await asyncio.sleep(0.2)
            finally:
                os.kill(w.pid, signal.SIGCONT)
            st = await waiter
            await asyncio.wait_for(listener, 10)
            await sub.aclose()
            await check_done(p, st, n)
            finished = {r.job_id: _iso_ts(r.finished_at or "") async for r in p.results(batch_id)}

    lat_finish: list[float] = []
    lat_store: list[float] = []
    i = 0
    for k, (arrived, jid) in enumerate(arrivals, 1):
        while i < len(reads) and reads[i][1] < k:
            i += 1
        if i == len(reads):
            raise RuntimeError(f"wait never saw job {k} of {n} done")
        seen = reads[i][0]
        lat_finish.append(max(0.0, seen - finished[jid]) * 1000)
        lat_store.append(max(0.0, seen - arrived) * 1000)
    p50, p99 = pct(lat_finish, 50), pct(lat_finish, 99)
    return [
        Row(
            "visible",
            "wait, finish→seen",
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            "p50 <= 20, p99 <= 100 ms",
            p50 <= 20 and p99 <= 100,
            value=round(p99, 2),
            detail=(
                f"n={n} jobs, 1 worker C=10, Router 100 ms; from the worker's finished_at "
                f"stamp to the first `wait` counter read showing the job done (rank-matched "
                f"via a raw subscriber). From the store's own pub/sub message instead: "
                f"p50 {pct(lat_store, 50):.1f} ms, p99 {pct(lat_store, 99):.1f} ms; wait made "
                f"{len(reads)} counter reads for {n} jobs. `results` reads the record itself, "
                f"so a stored job is visible to it at once"
            ),
        )
    ]


# -- rss ------------------------------------------------------------------------------------


async def _sample(every_s: float, fn: Callable[[], Awaitable[None]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await fn()
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


async def _used_memory(r: Any) -> int:
    return int((await r.info("memory"))["used_memory"])


async def _memory_usage_per_job(p: Producer, batch_id: str, sample: int = 200) -> float:
    """Mean MEMORY USAGE of a sample of job hashes, plus the batch's order-list share."""
    total, count = 0, 0
    async for ids in p.store.job_ids(batch_id, chunk=sample):
        for jid in ids:
            total += int(await p.redis.memory_usage(keys.job(jid)) or 0)
            count += 1
        break
    n = int(await p.redis.llen(keys.batch_order(batch_id)) or 1)
    order = int(await p.redis.memory_usage(keys.batch_order(batch_id)) or 0)
    return total / max(count, 1) + order / n


async def rss(b: Bench) -> list[Row]:
    """Worker RSS with C runs in flight (slow Router) and Redis memory per stored result."""
    await b.flush()
    c, n, lat = b.sizes.rss_concurrency, b.sizes.rss_n, b.sizes.rss_latency_ms
    queue = "bench:rss"
    peak_running = 0.0
    with SimRouterProc(lat) as sim, b.workers(1, sim, c, queue) as [w]:
        async with b.producer(queue) as p:
            await warm_up(p, 1, kinds=("plain",))
            mem = PeakMem({"worker": w.pid}).start("idle after warm-up")
            used0 = await _used_memory(p.redis)
            jobs = make_jobs("plain", n, "m")
            batch = await p.submit(jobs)

            async def sample() -> None:
                nonlocal peak_running
                st = await p.status(batch.id)
                peak_running = max(peak_running, st.counts[Status.RUNNING])

            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample(0.1, sample, stop))
            try:
                st = await p.wait(batch.id, timeout=timeout_for(n, 20))
            finally:
                stop.set()
                await sampler
            await check_done(p, st, n)
            wm = mem.read()["worker"]
            used1 = await _used_memory(p.redis)
            per_key = await _memory_usage_per_job(p, batch.id)
    per_result = (used1 - used0) / n
    peak_rss = float(wm["peak_mb"])
    b.say(f"worker peak RSS {peak_rss:.0f} MB (VmHWM) with {peak_running:.0f} runs in flight")
    return [
        Row(
            "rss",
            f"{peak_running:.0f} runs in flight",
            f"{peak_rss:.0f} MB worker peak RSS",
            "<= 300 MB",
            peak_rss <= 300 and peak_running >= 0.95 * c,
            value=round(peak_rss, 1),
            detail=(
                f"1 worker, AGENTQ_CONCURRENCY={c}, Router {lat} ms, {n} jobs; the worker "
                f"process's true peak RSS (VmHWM, reset when idle after warm-up): "
                f"{fmt_mem({'worker': wm})}; RSS at the end {wm['rss_mb']:.0f} MB; peak "
                f"'running' counter {peak_running:.0f} (sampled every 100 ms)"
            ),
            data={"memory_mb": {"worker": wm}, "peak_running": peak_running},
        ),
        Row(
            "rss",
            "Redis / stored result",
            f"{per_result / 1024:.2f} KB Redis used_memory",
            "(information)",
            None,
            value=round(per_result),
            detail=(
                f"INFO used_memory delta / {n} jobs (job hash with spec, record and logs, "
                f"order list, counters); MEMORY USAGE of sampled job hashes: "
                f"{per_key / 1024:.2f} KB"
            ),
        ),
    ]


# -- e2e-100k -------------------------------------------------------------------------------


async def e2e(b: Bench) -> list[Row]:
    """A big batch end to end: 2 workers, Router latency 0, plain jobs; throughput and memory."""
    await b.flush()
    n = b.sizes.e2e_n
    queue = "bench:e2e"
    path = write_jobfile(b.tmp / f"e2e-{n}.jsonl", n, mix_tools=False)
    with SimRouterProc(0) as sim, b.workers(2, sim, 50, queue) as ws:
        async with b.producer(queue) as p:
            await warm_up(p, 2, kinds=("plain",))
            # Growth is measured from here: each process's RSS after warm-up, its peak reset.
            watched = {f"worker-{i}": w.pid for i, w in enumerate(ws)}
            if b.redis_pid is not None:
                watched["Redis"] = b.redis_pid
            watched[BENCH] = os.getpid()
            mem = PeakMem(watched).start("after warm-up")
            used0 = await _used_memory(p.redis)

            async def progress() -> None:
                st = await p.status(batch.id)
                b.say(f"{st.done:,}/{n:,} jobs done after {time.perf_counter() - t0:.0f} s")

            stop = asyncio.Event()
            with CpuSplit(b.agentq_pids(ws), apart={"sim Router": [sim.pid]}) as m:
                t0 = time.perf_counter()
                batch = await p.submit_file(path)
                submitted = time.perf_counter() - t0
                reporter = asyncio.create_task(_sample(30.0, progress, stop))
                try:
                    st = await p.wait(batch.id, timeout=timeout_for(n, 20))
                finally:
                    stop.set()
                    await reporter
                elapsed = time.perf_counter() - t0
            memory = mem.read()
            await check_done(p, st, n)
            used1 = await _used_memory(p.redis)
    path.unlink()
    args = ["-m", "ops.bench.client", "results", "--redis-url", b.redis_url]
    args += ["--queue", queue, "--batch", batch.id]
    res = await asyncio.to_thread(procs.run_json, args, timeout_for(n, 200))
    await b.flush()
    complete = res["records"] == n and res["succeeded"] == n and res["in_order"]
    # Memory flat: each worker's true peak (VmHWM) during the batch vs its RSS after warm-up.
    growth = max(float(memory[f"worker-{i}"]["growth_mb"]) for i in range(len(ws)))
    flat = growth <= 25 and res["delta_mb"] <= 25
    rate = n / elapsed
    cpu, cores = m.ms_per(n), m.cores()
    return [
        Row(
            "e2e-100k",
            f"{n:,} jobs, 2 workers",
            f"{rate:.0f} jobs/s, worker memory +{growth:.0f} MB",
            "completes, memory flat",
            complete and flat,
            value=round(rate, 1),
            detail=(
                f"{elapsed:.1f} s from submit start to wait's return (submit {submitted:.1f} s); "
                f"{res['succeeded']:,}/{n:,} succeeded, results in input order: "
                f"{res['in_order']}; RSS after warm-up -> true peak (VmHWM) during "
                f"submit and wait: {fmt_mem(memory)}; results "
                f"streamed at {res['records_per_s']:,.0f} records/s by a client process whose "
                f"peak RSS grew {res['delta_mb']} MB; CPU over submit+wait: "
                f"{fmt_split(cpu, 'ms/job')} ({fmt_split(cores, 'cores busy')}){b.redis_note}; "
                f"sim Router, not agentq's: {m.apart_cores()['sim Router']:.2f} cores; Redis "
                f"used_memory {(used1 - used0) / n / 1024:.2f} KB/result"
            ),
            data={"cpu_ms_per_job": cpu, "cores_busy": cores, "memory_mb": memory},
        )
    ]


# -- redis-cmds -----------------------------------------------------------------------------


async def count_commands(
    b: Bench, p: Producer, body: Callable[[], Awaitable[Any]]
) -> tuple[Counter[str], Counter[str]]:
    """Commands Redis executes while body() runs, read through MONITOR: (sent by clients,
    each script call once; called inside scripts). INFO commandstats cannot tell them apart."""
    sent: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    marker = f"agentq-bench-end-{time.time_ns()}"
    mon = Redis.from_url(b.redis_url)
    try:
        async with mon.monitor() as m:

            async def read() -> None:
                while True:
                    cmd = await m.next_command()
                    name = cmd["command"].split(" ", 1)[0].lower()
                    if cmd["client_type"] == "lua":
                        inside[name] += 1
                    elif marker in cmd["command"]:
                        return
                    else:
                        sent[name] += 1

            reader = asyncio.create_task(read())
            try:
                await body()
                await p.redis.echo(marker)
                await asyncio.wait_for(reader, 120)
            finally:
                reader.cancel()
    finally:
        await mon.aclose()
    return sent, inside


async def redis_cmds(b: Bench) -> list[Row]:
    """Redis commands per job: producer (submit), worker (poll, claim, run, finish) and waiter
    (wait), counted over a batch and divided by its jobs. A command a client sends counts once,
    a script call (EVALSHA) too; what scripts call inside Redis is printed apart."""
    rows: list[Row] = []
    queue = "bench:cmds"
    n = b.sizes.cmds_n
    for latency, kind in b.sizes.cmds_cases:
        await b.flush()
        with SimRouterProc(latency) as sim, b.workers(1, sim, 50, queue):
            async with b.producer(queue) as p:
                await warm_up(p, 1, kinds=(kind,))
                jobs = make_jobs(kind, n, prefix=f"cmd-{kind}-")
                sent, inside = await count_commands(
                    b, p, functools.partial(run_batch, p, jobs, timeout_for(n))
                )
        per_job = sum(sent.values()) / n
        top = ", ".join(f"{k} {v / n:.2f}" for k, v in sent.most_common(10))
        rows.append(
            Row(
                "redis-cmds",
                f"{latency}ms {kind}",
                f"{per_job:.1f} commands/job",
                "<= 8",
                per_job <= 8,
                value=round(per_job, 2),
                detail=(
                    f"n={n}, 1 worker C=50, producer + worker + waiter, read with MONITOR; per "
                    f"job: {top}; inside scripts another {sum(inside.values()) / n:.1f} calls/job"
                ),
                data={
                    "sent_per_job": {k: round(v / n, 3) for k, v in sent.items()},
                    "inside_scripts_per_job": {k: round(v / n, 3) for k, v in inside.items()},
                },
            )
        )
    return rows


# -- long-run -------------------------------------------------------------------------------


LONG_JITTER = 0.25
"""long-run's target case: each call's latency varies by up to +-25% of L (real Routers vary).
With a fixed latency, runs that start together end together, for ever: printed beside it."""


@dataclass
class LongRounds:
    rates: list[float] = field(default_factory=list)
    """Runs/s from submit to the last result, per round."""
    steady: list[float] = field(default_factory=list)
    """Runs/s in the steady middle (_steady_rate), per round."""
    cpu_ms: list[dict[str, float]] = field(default_factory=list)
    cores: list[float] = field(default_factory=list)
    peak_running: float = 0.0
    peak_links: dict[str, int] = field(default_factory=dict)
    """The most TCP connections the worker held to each, sampled with peak_running."""
    memory: dict[str, Any] = field(default_factory=dict)


async def _long_rounds(b: Bench, lat: int, jitter: float) -> LongRounds:
    c, waves = b.sizes.long_concurrency, b.sizes.long_waves
    n = c * waves
    queue = "bench:long"
    out = LongRounds()
    await b.flush()
    args = ("--latency-jitter", str(jitter)) if jitter else ()
    with SimRouterProc(lat, args) as sim, b.workers(1, sim, c, queue) as [w]:
        async with b.producer(queue) as p:
            await warm_up(p, 1, kinds=("plain",))
            mem = PeakMem({"worker": w.pid}).start("idle after warm-up")
            ports = {"Router": sim.port}  # a unix-socket Redis has no port to count by
            if not b.redis_url.startswith("unix:"):
                ports["Redis"] = urlsplit(b.redis_url).port or 6379
            for r in range(b.sizes.long_rounds):
                batch_id = new_batch_id()

                async def sample(batch_id: str = batch_id) -> None:
                    for name, port in ports.items():
                        links = procs.tcp_connections(w.pid, port)
                        out.peak_links[name] = max(out.peak_links.get(name, 0), links)
                    with contextlib.suppress(Exception):  # not submitted yet
                        st = await p.status(batch_id)
                        out.peak_running = max(out.peak_running, st.counts[Status.RUNNING])

                stop = asyncio.Event()
                sampler = asyncio.create_task(_sample(0.25, sample, stop))
                try:
                    jobs = make_jobs("plain", n, prefix=f"long{r}-")
                    with CpuSplit(b.agentq_pids([w])) as m:
                        t0 = time.perf_counter()
                        await p.submit(jobs, batch_id=batch_id)
                        st = await p.wait(batch_id, timeout=timeout_for(n, 20))
                        seconds = time.perf_counter() - t0
                finally:
                    stop.set()
                    await sampler
                await check_done(p, st, n)
                out.rates.append(n / seconds)
                out.steady.append(await _steady_rate(p, batch_id, lat / 1000, waves))
                out.cpu_ms.append(m.ms_per(n))
                out.cores.append(m.cores()["worker"])
                b.say(
                    f"C={c}, {lat} ms +-{jitter:.0%}, round {r + 1}: {out.rates[-1]:.0f} runs/s "
                    f"from submit to the last result, {out.steady[-1]:.0f} runs/s in the steady "
                    f"middle, worker {out.cores[-1]:.0%} of a core, "
                    f"{out.cpu_ms[-1][TOTAL]:.2f} CPU ms/job"
                )
            out.memory = mem.read()["worker"]
    return out


async def long_run(b: Bench) -> list[Row]:
    """Long Router calls at high concurrency: 1 worker, C runs in flight at L seconds each, for
    each L of the sizes (+-25% per call; and the first L fixed, for information). Runs/s against
    the ideal C / L (reachable only while the worker's core keeps up: each row says how far one
    core goes at the worker's CPU per job), and the worker's memory per run in flight at the
    first L: (true peak RSS - idle RSS) / C."""
    c, waves = b.sizes.long_concurrency, b.sizes.long_waves
    lats = b.sizes.long_latencies_ms
    rows: list[Row] = []
    runs = []
    for lat in lats:  # the fixed-latency line right after the first, as it is printed
        runs.append((lat, LONG_JITTER, await _long_rounds(b, lat, LONG_JITTER)))
        if lat == lats[0]:
            runs.append((lat, 0.0, await _long_rounds(b, lat, 0.0)))
    for lat, jitter, got in runs:
        rows.append(_long_row(got, c, lat, waves, jitter, b.redis_note))
    varied = runs[0][2]
    wm = varied.memory
    per_run_kb = float(wm["growth_mb"]) * 1024 / c
    rows.append(
        Row(
            "long-run",
            "memory per run in flight",
            f"{per_run_kb:.0f} KB",
            "<= 150 KB",
            per_run_kb <= 150 and varied.peak_running >= 0.95 * c,
            value=round(per_run_kb, 1),
            detail=(
                f"(worker true peak RSS - its RSS idle after warm-up) / C={c}, latency "
                f"{lats[0] / 1000:g} s +-{LONG_JITTER:.0%}: {fmt_mem({'worker': wm})}, with "
                f"{varied.peak_running:.0f} runs in flight at the peak of the 'running' "
                f"counter; the connection pool to the Router grows with C too"
            ),
            data={"memory_mb": {"worker": wm}, "peak_running": varied.peak_running},
        )
    )
    return rows


def _long_row(got: LongRounds, c: int, lat: int, waves: int, jitter: float, redis_note: str) -> Row:
    ideal = c / (lat / 1000)
    frac = median(got.steady) / ideal
    mid = median_round(got.cpu_ms)
    one_core = 1000 / mid["worker"]
    full = steady_full(waves)
    case = f"C={c}, {lat / 1000:g} s" + (
        f" +-{jitter:.0%} a call" if jitter else " fixed (every call the same)"
    )
    return Row(
        "long-run",
        case,
        f"{frac:.0%} ({median(got.steady):.0f} of {ideal:.0f} runs/s in the steady "
        f"middle; {median(got.rates) / ideal:.0%} from submit to the last result)",
        f">= 95% of C/{lat / 1000:g}s" if jitter else "(information)",
        frac >= 0.95 if jitter else None,
        value=round(frac, 4),
        detail=(
            f"1 worker, n={c * waves}/round ({waves} waves of C); steady middle: the jobs "
            f"that finished (by the records' finished_at) from {full[0]:g} L to "
            f"{full[1]:g} L after the first run started, weighed up from 0 over the latency "
            f"before and down to 0 over the one after, over the weights' span (a simulated "
            f"worker scores its true share of C/L by it); "
            f"rounds {fmt_rounds(got.steady, '.0f')} runs/s steady, "
            f"{fmt_rounds(got.rates, '.0f')} runs/s submit to last result; the worker "
            f"process kept {median(got.cores):.0%} of a core busy over the round; at its "
            f"{mid['worker']:.2f} CPU ms/job one core runs at most {one_core:.0f} runs/s "
            f"({one_core / ideal:.0%} of C/L"
            f"{': the CPU does not allow the target' if one_core < 0.95 * ideal else ''}); "
            f"CPU (median round by total): {fmt_split(mid, 'ms/job')}{redis_note}; peak "
            f"'running' counter {got.peak_running:.0f}, and the worker held at most "
            f"{got.peak_links.get('Redis', 'n/a')} connections to Redis and "
            f"{got.peak_links['Router']} to the Router (both sampled every 250 ms)"
        ),
        data={
            "cpu_ms_per_job": mid,
            "worker_cores_busy": median(got.cores),
            "one_core_runs_per_s": round(one_core, 1),
            "peak_connections": got.peak_links,
        },
    )


STEADY_RAMP_L = (2.5, 3.5)
"""long-run's steady middle weighs finishes from 0 to 1 over these latencies after the first
run started, and back to 0 over as long a span before the drain (see steady_weight).
Earlier windows catch the start: C runs starting at once take the worker a second of CPU or
so, which spreads the first wave's starts, and the window from 1.5 L to 4.5 L used before
under-counted (a worker with no overhead scores 0.97 of C/L there when its first wave's
starts spread over 0.5 s). A plain cut at 3 L still read about a point high: runs of +-25%
latency even out their waves slowly, so where a sharp edge falls in a wave counts; ramps
average that out."""

DRAIN_L = 1.5
"""The last waves' drain: finishes this many latencies before the batch's nominal end and
later count for nothing (slots then run out of queued jobs)."""

MIN_LONG_WAVES = 7
"""The least long_waves for a steady middle at full weight over at least one latency."""


def steady_full(waves: int) -> tuple[float, float]:
    """(from, to), in latencies after the first start, where finishes count in full: 3.5 L to
    (waves - 2.5) L. A ramp of one latency leads in and out of it."""
    lo, hi = STEADY_RAMP_L
    return hi, waves - DRAIN_L - (hi - lo)


def steady_weight(t_l: float, waves: int) -> float:
    """How much a finish t_l latencies after the first start counts: 0 until 2.5 L, rising to
    1 at 3.5 L, 1 until (waves - 2.5) L, falling to 0 at (waves - 1.5) L."""
    lo, hi = STEADY_RAMP_L
    rise = (t_l - lo) / (hi - lo)
    fall = (waves - DRAIN_L - t_l) / (hi - lo)
    return max(0.0, min(1.0, rise, fall))


def steady_rate(
    started: Sequence[float], finished: Sequence[float], latency_s: float, waves: int
) -> float:
    """Jobs finished per second in the steady middle of a batch of `waves` waves of C jobs:
    finishes weighed by steady_weight, over the weights' span. A simulated worker scores
    within half a point of its true share of C / L by it (1.000 with no overhead, 0.976 losing
    50 ms a run), whether its first wave starts at once or spread over a second, with a latency
    varying +-25% (tests/test_bench_window.py)."""
    if waves < MIN_LONG_WAVES:
        raise ValueError(f"long-run needs {MIN_LONG_WAVES} waves or more, not {waves}")
    if not started:
        return float("nan")
    t0 = min(started)
    weight = sum(steady_weight((f - t0) / latency_s, waves) for f in finished)
    a, b = steady_full(waves)
    ramp = STEADY_RAMP_L[1] - STEADY_RAMP_L[0]
    return weight / ((b - a + ramp) * latency_s)  # the weights' integral: two half ramps


async def _steady_rate(p: Producer, batch_id: str, latency_s: float, waves: int) -> float:
    got = [r async for r in p.results(batch_id)]
    started = [_iso_ts(r.started_at or "") for r in got]
    return steady_rate(started, [_iso_ts(r.finished_at or "") for r in got], latency_s, waves)


# -- ratelimit ------------------------------------------------------------------------------

ROUTER_RPS = 20
BUDGET_SHARE = 0.95
"""The budget is set this far under the simulated Router's limit."""


async def _sim(sim: SimRouterProc, method: str, path: str) -> Any:
    """A /sim endpoint of the simulated Router (its stats, or a reset of them)."""
    auth = {"Authorization": f"Bearer {procs.ROUTER_KEY}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.request(method, sim.url.removesuffix("/v1") + path) as resp:
            resp.raise_for_status()
            return await resp.json()


async def ratelimit(b: Bench) -> list[Row]:
    """2 workers x C=50 against a Router that allows 20 requests/s across all callers: with a
    budget of 95% of that (AGENTQ_RATE_LIMITS), with one set too high (150%: the Router's 429s
    must slow the fleet down), and without one. The share of the budget used (calls answered
    200 / (budget x seconds, submit to done)), calls answered 429, and jobs failed."""
    n = b.sizes.ratelimit_n
    rows = []
    with SimRouterProc(50, ("--rate-limit-rps", str(ROUTER_RPS))) as sim:
        for share in (BUDGET_SHARE, 1.5, None):
            await b.flush()
            side = "none" if share is None else f"{share:.0%}"
            queue = f"bench:ratelimit-{side.rstrip('%')}"
            rpm = ROUTER_RPS * 60 * (share or 1)
            env = {"AGENTQ_RATE_LIMITS": json.dumps({"*": {"rpm": rpm}})} if share else {}
            with b.workers(2, sim, 50, queue, extra_env=env):
                async with b.producer(queue) as p:
                    await _sim(sim, "POST", "/sim/reset")
                    t0 = time.perf_counter()
                    batch = await p.submit(make_jobs("plain", n, prefix=f"rl-{side}-"))
                    st = await p.wait(batch.id, timeout=timeout_for(n, 5))
                    seconds = time.perf_counter() - t0
                    stats = await _sim(sim, "GET", "/sim/stats")
            ok, refused = stats["by_outcome"]["ok"], stats["by_outcome"]["429"]
            share_429 = refused / max(1, stats["total_requests"])
            failed = st.counts[Status.FAILED]
            use = ok / (seconds * rpm / 60)
            b.say(
                f"budget {side}: {n} jobs in {seconds:.1f} s, {ok / seconds:.1f} calls/s "
                f"answered, {refused} of {stats['total_requests']} calls answered 429, "
                f"{failed} jobs failed"
            )
            measured = f"{share_429:.1%} of calls 429, {failed} jobs failed"
            detail = (
                f"n={n} plain jobs (one call each), Router latency 50 ms, its limit "
                f"{ROUTER_RPS} requests/s over any 1 s; {ok / seconds:.1f} calls/s answered "
                f"({ok / seconds / ROUTER_RPS:.0%} of the Router's limit), {refused} of "
                f"{stats['total_requests']} calls answered 429, {seconds:.1f} s from submit "
                f"to done"
            )
            data = {"use": use, "share_429": share_429, "failed": failed}
            if share == BUDGET_SHARE:
                row = Row(
                    "ratelimit",
                    f"budget {share:.0%} of {ROUTER_RPS} rps, 2 workers C=50",
                    f"{use:.0%} of the budget used, {measured}",
                    ">= 80% used, <= 5% 429, 0 failed",
                    use >= 0.8 and share_429 <= 0.05 and failed == 0,
                    value=round(use, 3),
                )
            elif share is not None:
                row = Row(
                    "ratelimit",
                    f"budget {share:.0%} of the Router's limit (too high)",
                    f"{ok / seconds / ROUTER_RPS:.0%} of the Router's limit used, {measured}",
                    "(information)",
                    None,
                    value=round(share_429, 3),
                )
            else:
                row = Row(
                    "ratelimit",
                    "no budget, 2 workers C=50",
                    f"{ok / seconds / ROUTER_RPS:.0%} of the Router's limit used, {measured}",
                    "(information)",
                    None,
                    value=round(share_429, 3),
                )
            row.detail, row.data = detail, data
            rows.append(row)
    return rows


# -- idle -----------------------------------------------------------------------------------


def _stats(r: Any) -> tuple[int, dict[str, int]]:
    total = int(r.info("stats")["total_commands_processed"])
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}
    return total, calls


async def idle(b: Bench) -> list[Row]:
    """An idle worker, alone on a private Redis (so every command counted is its own): Redis
    commands per second and CPU; then single jobs submitted to it one at a time (submit to
    start); then the CPU `wait` spends per job it watches."""
    server = procs.EmbeddedRedis(b.tmp / "idle-valkey")
    url = server.start()
    try:
        with (
            SimRouterProc(0) as sim,
            procs.workers_running(
                1,
                redis_url=url,
                router_url=sim.url,
                concurrency=50,
                queue="bench:idle",
                log_dir=b.tmp / "logs",
                extra_env={"AGENTQ_POLL_DELAY_S": "0.02"},  # the default, whatever the env says
            ) as [w],
        ):
            settings = load_settings(redis_url=url, queue="bench:idle")
            async with Producer.from_env(settings) as p:
                await warm_up(p, 1, kinds=("plain",))
                rows = [await _idle_cost(b, url, w)]
                rows.append(await _submit_to_start(b, p))
                rows += await _wait_cpu(b, p, w)
    finally:
        server.stop()
    return rows


async def _idle_cost(b: Bench, url: str, w: WorkerProc) -> Row:
    import redis as redis_sync

    r = redis_sync.Redis.from_url(url)
    try:
        # past the warm-up's tail: its records' TTLs re-armed (a sweep step every 5 s)
        for _ in range(120):
            if not r.zcard(keys.SWEEPS) and not r.zcard(keys.ACTIVE):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        total0, calls0 = _stats(r)
        cpu0, t0 = w.cpu_s(), time.perf_counter()
        await asyncio.sleep(b.sizes.idle_window_s)
        total1, calls1 = _stats(r)
        cpu1, t1 = w.cpu_s(), time.perf_counter()
    finally:
        r.close()
    seconds = t1 - t0
    # the two INFO calls that opened the window ran on this connection, not the worker's
    per_s = (total1 - total0 - 2) / seconds
    cpu_pct = (cpu1 - cpu0) / seconds * 100
    delta = {c: n - calls0.get(c, 0) for c, n in calls1.items() if c != "info"}
    top = ", ".join(
        f"{c} {n / seconds:.2f}/s" for c, n in sorted(delta.items(), key=lambda x: -x[1]) if n
    )
    return Row(
        "idle",
        "idle worker: Redis commands, CPU",
        f"{per_s:.2f} commands/s, {cpu_pct:.2f}% of a core",
        "<= 5/s, <= 1%",
        per_s <= 5 and cpu_pct <= 1,
        value=round(per_s, 3),
        detail=(
            f"{seconds:.0f} s of an idle `agentq worker` (AGENTQ_CONCURRENCY=50, "
            f"AGENTQ_POLL_DELAY_S=0.02), the only client of a private Valkey: "
            f"total_commands_processed delta (commands run inside scripts count too): {top}"
        ),
        data={"commands_per_s": per_s, "cpu_pct": cpu_pct},
    )


async def _submit_to_start(b: Bench, p: Producer) -> Row:
    n = b.sizes.idle_starts
    ids = []
    for i in range(n):
        await asyncio.sleep(0.25 + 0.05 * (i % 5))  # the worker is idle again
        batch = await p.submit([AgentJob(custom_id="s", input=question(i))])
        ids.append(batch.id)
    lat = []
    for batch_id in ids:
        st = await p.wait(batch_id, timeout=60)
        await check_done(p, st, 1)
        async for rec in p.results(batch_id):
            lat.append((_iso_ts(rec.started_at or "") - _iso_ts(rec.enqueued_at or "")) * 1000)
    p50, p90 = pct(lat, 50), pct(lat, 90)
    return Row(
        "idle",
        "submit → start, idle worker",
        f"p50 {p50:.1f} ms, p90 {p90:.1f} ms",
        "p50 <= 20 ms",
        p50 <= 20,
        value=round(p50, 2),
        detail=(
            f"{n} single-job batches, one every ~0.3 s, to the idle worker; from the job's "
            f"enqueued_at (stamped by the producer just before its submit script) to its "
            f"started_at (the worker's claim); ms resolution"
        ),
    )


async def _per_message_wait(p: Producer, batch_id: str) -> BatchStatus:
    """`wait` as it was before: a message per job change, counters re-read per burst."""
    pubsub = p.redis.pubsub()
    try:
        await pubsub.subscribe(keys.batch_events(batch_id))
        while True:
            st = await p.status(batch_id)
            if st.finished:
                return st
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            deadline = time.monotonic() + 0.05
            while msg is not None and time.monotonic() < deadline:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
    finally:
        await pubsub.aclose()


async def _wait_cpu(b: Bench, p: Producer, w: WorkerProc) -> list[Row]:
    """CPU of this process while it only waits (the worker paused while the batch is
    enqueued, so the wait sees every job), per job watched: `wait` with a progress callback
    (as `agentq wait` runs it), without, and the per-message waiter it replaced."""
    n = b.sizes.wait_n
    out: dict[str, float] = {}
    seen: list[BatchStatus] = []
    for side in ("wait (progress)", "wait", "per-message waiter (before)"):
        os.kill(w.pid, signal.SIGSTOP)
        try:
            batch = await p.submit(make_jobs("plain", n, f"w{len(out)}-"))
        finally:
            os.kill(w.pid, signal.SIGCONT)
        c0 = time.process_time()
        if side == "wait (progress)":
            st = await p.wait(batch.id, timeout=timeout_for(n), on_progress=seen.append)
        elif side == "wait":
            st = await p.wait(batch.id, timeout=timeout_for(n))
        else:
            st = await _per_message_wait(p, batch.id)
        out[side] = (time.process_time() - c0) * 1000 / n
        await check_done(p, st, n)
    main = out["wait (progress)"]
    return [
        Row(
            "idle",
            "wait CPU per watched job",
            f"{main:.3f} ms (no progress callback {out['wait']:.3f}; before "
            f"{out['per-message waiter (before)']:.3f})",
            "<= 0.25 ms",
            main <= 0.25,
            value=round(main, 4),
            detail=(
                f"n={n} plain jobs, Router 0 ms, 1 worker C=50; this process's CPU while it "
                f"only waits, per job; the progress callback does nothing here (the CLI's "
                f"progress bar adds its own drawing) and was called {len(seen)} "
                f"times"
            ),
            data={"cpu_ms_per_job": out},
        )
    ]


# -- processes ------------------------------------------------------------------------------


async def processes(b: Bench) -> list[Row]:
    """`agentq worker --processes 2` vs `agentq worker`, and vs the pooled plain SDK loop (one
    process, C=SCALE_C): tool jobs, Router latency 0."""
    await b.flush()
    with ExitStack() as stack:
        sim = stack.enter_context(SimRouterProc(0))
        groups: dict[int, WorkerProc] = {}
        for k in (1, 2):
            w = WorkerProc(
                b.redis_url,
                sim.url,
                SCALE_C,
                f"bench:procs-{k}",
                b.tmp / "logs" / f"procs-{k}.log",
                args=("--processes", str(k)),
            ).start()
            stack.callback(w.stop)
            groups[k] = w
        await _until_registered(b.redis_url, groups[1], 1)
        await _until_registered(b.redis_url, groups[2], 2)
        redis = {"Redis": [b.redis_pid]} if b.redis_pid is not None else {}
        cpu_of = {  # (a supervisor only waits: its children are the workers)
            1: {"worker": [groups[1].pid], **redis},
            2: {"2 workers": groups[2].children(), **redis},
        }
        t = await _two_vs_one(
            b, "procs", sim, ("--processes 1", "--processes 2"), cpu_of, with_loop=True
        )
    n, rate, ratio = b.sizes.scale_n, t.rate, t.ratio
    vs_loop = median(rate[2]) / median(t.loop)
    mid = {k: median_round(t.cores[k]) for k in (1, 2)}
    rounds = (
        f"n={n}/round; per-round rates --processes 2: {fmt_rounds(rate[2], '.0f')}, "
        f"1: {fmt_rounds(rate[1], '.0f')}, the plain loop: {fmt_rounds(t.loop, '.0f')}; one "
        f"`agentq worker` command each, {os.cpu_count()} cores shared with Redis and the "
        f"simulated Router; cores busy (CPU s per wall s, median round): --processes 1: "
        f"{fmt_split(mid[1], 'cores')}, sim Router {median(t.sim_cores[1]):.2f}; "
        f"--processes 2: {fmt_split(mid[2], 'cores')}, sim Router "
        f"{median(t.sim_cores[2]):.2f}{b.redis_note}"
    )
    return [
        Row(
            "processes",
            "--processes 2 vs 1, tool jobs, 0ms",
            f"{ratio:.2f}x ({median(rate[2]):.0f} vs {median(rate[1]):.0f} runs/s)",
            ">= 1.8x",
            ratio >= 1.8,
            value=round(ratio, 3),
            detail=rounds,
            data={"cores_busy": {"--processes 1": mid[1], "--processes 2": mid[2]}},
        ),
        Row(
            "processes",
            "--processes 2 vs the plain loop, tool jobs, 0ms",
            f"{vs_loop:.2f}x ({median(rate[2]):.0f} vs {median(t.loop):.0f} runs/s)",
            ">= 1.6x",
            vs_loop >= 1.6,
            value=round(vs_loop, 3),
            detail=(
                f"{rounds}; the loop is one process, an asyncio.gather over Runner.run at "
                f"C={SCALE_C} on the worker's own pooled client (as in sdk-loop), agentq's runs/s "
                f"count from submit to the last result"
            ),
        ),
    ]


async def _until_registered(url: str, w: WorkerProc, k: int, timeout_s: float = 90) -> None:
    """Until the command's k worker processes have published their heartbeats."""
    r = Redis.from_url(url)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                pids = [w.pid] if k == 1 else w.children()
                beats = {x.decode() for x in await r.hkeys(keys.WORKERS)}
                if len(pids) == k and all(WorkerProc.id_of(pid) in beats for pid in pids):
                    return
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {w.log_tail()}")
                await asyncio.sleep(0.1)
    finally:
        await r.aclose()


# -- turns ----------------------------------------------------------------------------------

TURNS_ON = {"AGENTQ_CPU_TURNS": "true"}
"""(Set, not left to the default: a shell or .env with it false would compare off with off.)"""
TURNS_OFF = {"AGENTQ_CPU_TURNS": "false"}
TURNS_TARGET = {0: 0.95, 200: 1.1}
"""With turns against without, by Router latency: at 0 ms the worker is short of CPU and takes
no turns (but in a burst's first half second, before its first verdict), so they must cost
nothing beyond the rounds' noise; at 200 ms they are the gain."""


async def turns(b: Bench) -> list[Row]:
    """One worker with CPU turns against one with AGENTQ_CPU_TURNS=false, side by side: two
    queues on one Redis, one simulated Router, C=sdk_concurrency each, the order alternating."""
    rows: list[Row] = []
    c = b.sizes.sdk_concurrency
    for latency in (0, 200):
        await b.flush()
        with ExitStack() as stack:
            sim = stack.enter_context(SimRouterProc(latency))
            apart = {"sim Router": [sim.pid]}
            ws = {
                True: stack.enter_context(
                    b.workers(1, sim, c, "bench:turns-on", extra_env=TURNS_ON)
                ),
                False: stack.enter_context(
                    b.workers(1, sim, c, "bench:turns-off", extra_env=TURNS_OFF)
                ),
            }
            async with (
                b.producer("bench:turns-on") as p_on,
                b.producer("bench:turns-off") as p_off,
            ):
                ps = {True: p_on, False: p_off}
                for p in ps.values():
                    await warm_up(p, 1)
                for kind in ("plain", "tool"):
                    n = b.sizes.sdk_n[(latency, kind)]
                    rate: dict[bool, list[float]] = {True: [], False: []}
                    cpu: dict[bool, list[dict[str, float]]] = {True: [], False: []}
                    sim_ms: dict[bool, list[float]] = {True: [], False: []}
                    for r in range(b.sizes.turns_rounds):
                        for on in (True, False) if r % 2 == 0 else (False, True):
                            jobs = make_jobs(kind, n, prefix=f"turns-{on}-{kind}-{r}-")
                            with CpuSplit(b.agentq_pids(ws[on]), apart=apart) as m:
                                seconds = await run_batch(ps[on], jobs, timeout_for(n))
                            rate[on].append(n / seconds)
                            cpu[on].append(m.ms_per(n))
                            sim_ms[on].append(m.apart_ms_per(n)["sim Router"])
                        b.say(
                            f"{latency}ms {kind} round {r + 1}: turns {rate[True][-1]:.0f} "
                            f"runs/s, no turns {rate[False][-1]:.0f} runs/s"
                        )
                    rows.append(_turns_row(b, latency, kind, n, c, rate, cpu, sim_ms))
    return rows


def _turns_row(
    b: Bench,
    latency: int,
    kind: str,
    n: int,
    c: int,
    rate: dict[bool, list[float]],
    cpu: dict[bool, list[dict[str, float]]],
    sim_ms: dict[bool, list[float]],
) -> Row:
    ratio = median(rate[True]) / median(rate[False])
    per_round = [a / o for a, o in zip(rate[True], rate[False], strict=True)]
    target = TURNS_TARGET[latency]
    mid = {on: median_round(cpu[on]) for on in (True, False)}
    return Row(
        "turns",
        f"{latency}ms {kind} C={c}",
        f"{ratio:.2f}x (turns {median(rate[True]):.0f} vs none {median(rate[False]):.0f} runs/s)",
        f">= {target}x",
        ratio >= target,
        value=round(ratio, 3),
        detail=(
            f"n={n}/side/round, {len(per_round)} rounds; per-round ratios "
            f"{fmt_rounds(per_round)}; CPU per run (the median round by total): with turns "
            f"{fmt_split(mid[True], 'ms/run')}, without {fmt_split(mid[False], 'ms/run')}"
            f"{b.redis_note}; sim Router, on neither side: {median(sim_ms[True]):.2f} vs "
            f"{median(sim_ms[False]):.2f} ms/run; two workers, AGENTQ_CPU_TURNS=true and "
            f"false, on two queues of one Redis and one simulated Router, the order "
            f"alternating; each batch starts after an idle spell, so the turns side takes "
            f"turns for about its first half second whatever the latency"
        ),
        data={"cpu_ms_per_run": {"turns": mid[True], "no turns": mid[False]}},
    )


# -- fair-share -----------------------------------------------------------------------------


async def fair_share(b: Bench) -> list[Row]:
    """One worker (C=20, Router latency 200 ms) busy with a big batch: a 20-job batch submitted
    behind it, then a normal and a high-priority batch submitted back to back."""
    big_n, pair_n, c = b.sizes.fair_big, b.sizes.fair_pair, 20
    await b.flush()
    queue = "bench:fair"
    with SimRouterProc(200) as sim, b.workers(1, sim, c, queue):
        async with b.producer(queue) as p:
            await warm_up(p, 1, kinds=("plain",))
            big = await p.submit(make_jobs("plain", big_n, "big-"))
            await asyncio.sleep(2.0)  # under way at full speed
            before = await p.status(big.id)
            t0 = time.perf_counter()
            small = await p.submit(make_jobs("plain", 20, "small-"))
            st = await p.wait(small.id, timeout=120)
            small_s = time.perf_counter() - t0
            await check_done(p, st, 20)
            after = await p.status(big.id)
            done = lambda s: s.total - s.counts[Status.QUEUED] - s.counts[Status.RUNNING]  # noqa: E731
            rate = (done(after) - done(before) + 20) / small_s  # runs/s of the worker meanwhile
            ahead = before.counts[Status.QUEUED] + before.counts[Status.RUNNING]
            fifo_s = (ahead + 20) / rate
            b.say(
                f"small batch done {small_s:.2f} s after its submit; {ahead} big-batch jobs were "
                f"ahead of it (FIFO: about {fifo_s:.0f} s at the {rate:.0f} runs/s measured)"
            )

            async def timed(batch_id: str) -> float:
                s = await p.wait(batch_id, timeout=timeout_for(big_n))
                await check_done(p, s, pair_n)
                return time.perf_counter() - t1

            t1 = time.perf_counter()
            normal = await p.submit(make_jobs("plain", pair_n, "normal-"))
            high = await p.submit(make_jobs("plain", pair_n, "high-"), priority="high")
            normal_s, high_s = await asyncio.gather(timed(normal.id), timed(high.id))
            b.say(f"{pair_n} normal jobs done after {normal_s:.2f} s, high after {high_s:.2f} s")
            tenant_s, share = await _tenant_share(b, p, pair_n, big.id)
            await p.cancel(big.id)
    return [
        Row(
            "fair-share",
            f"20 jobs behind {big_n:,}",
            f"done {small_s:.1f} s after submit (FIFO: ~{fifo_s:.0f} s)",
            "<= 3 s",
            small_s <= 3.0,
            value=round(small_s, 3),
            detail=(
                f"1 worker, C={c}, Router 200 ms; {ahead} jobs of the big batch were queued or "
                f"running at the submit; the FIFO figure is that many jobs at the {rate:.0f} "
                "runs/s measured meanwhile (an estimate, not a run)"
            ),
        ),
        Row(
            "fair-share",
            f"{pair_n} high vs {pair_n} normal, back to back",
            f"high done in {high_s:.1f} s, normal in {normal_s:.1f} s",
            "high clearly first",
            high_s < 0.8 * normal_s,
            value=round(high_s / normal_s, 3),
            detail=f"both submitted behind the rest of the {big_n:,}-job batch",
        ),
        Row(
            "fair-share",
            f"tenant b's {pair_n} jobs vs tenant a's {TENANT_A_BATCHES} batches",
            f"b got {share:.0%} of the starts while it waited (done in {tenant_s:.1f} s)",
            f">= 25% (a turn each for a, b and the big batch: 33%; by batch: "
            f"{1 / (TENANT_A_BATCHES + 2):.0%})",
            share >= 0.25,
            value=round(share, 3),
            detail=(
                f"tenant a submits {TENANT_A_BATCHES} batches of {pair_n} jobs, then tenant b "
                f"one of {pair_n}, behind the rest of the {big_n:,}-job batch (no tenant); "
                "share = b's jobs / every job started from b's submit to its end"
            ),
        ),
    ]


TENANT_A_BATCHES = 10


async def _tenant_share(b: Bench, p: Producer, n: int, big_id: str) -> tuple[float, float]:
    """Tenant a with TENANT_A_BATCHES batches of n jobs, then tenant b with one: seconds until
    b's batch is done, and b's share of the jobs started meanwhile."""

    def tenant_jobs(tenant: str, prefix: str) -> list[AgentJob]:
        return [
            AgentJob(
                custom_id=f"{prefix}{i}", input=question(i), metadata=JobMetadata(tenant=tenant)
            )
            for i in range(n)
        ]

    a_ids = [(await p.submit(tenant_jobs("a", f"a{k}-"))).id for k in range(TENANT_A_BATCHES)]

    async def started() -> int:
        """Jobs of tenant a's batches and of the big batch that have started (or ended)."""
        total = 0
        for batch_id in [*a_ids, big_id]:
            st = await p.status(batch_id)
            total += st.total - st.counts[Status.QUEUED]
        return total

    before = await started()
    t0 = time.perf_counter()
    tb = await p.submit(tenant_jobs("b", "b-"))
    st = await p.wait(tb.id, timeout=timeout_for(n * (TENANT_A_BATCHES + 2)))
    seconds = time.perf_counter() - t0
    await check_done(p, st, n)
    others = await started() - before
    b.say(f"tenant b: {n} jobs done in {seconds:.2f} s; {others} jobs of a and the big one started")
    for batch_id in a_ids:
        await p.cancel(batch_id)
    return seconds, n / (n + others)


# -- registry -------------------------------------------------------------------------------


CASES: dict[str, tuple[Callable[[Bench], Awaitable[list[Row]]], str]] = {
    "sdk-loop": (sdk_loop, ">= 1.0x"),
    "scale-2v1": (scale_2v1, ">= 1.7x"),
    "latency-500": (latency_500, ">= 90% of C/0.5s"),
    "submit": (submit, ">= 20,000 jobs/s"),
    "visible": (visible, "p50 <= 20, p99 <= 100 ms"),
    "rss": (rss, "<= 300 MB"),
    "e2e-100k": (e2e, "completes, memory flat"),
    "redis-cmds": (redis_cmds, "<= 8 commands/job"),
    "long-run": (long_run, ">= 95% of C/L; <= 150 KB per run in flight"),
    "fair-share": (fair_share, "small batch <= 3 s; high first"),
    "ratelimit": (ratelimit, ">= 80% used, <= 5% 429, 0 failed"),
    "idle": (idle, "<= 5 commands/s, <= 1% CPU, start p50 <= 20 ms, wait <= 0.25 ms/job"),
    "processes": (processes, ">= 1.8x (vs 1), >= 1.6x (vs the plain loop)"),
    "turns": (turns, "with CPU turns vs without: >= 0.95x at 0 ms, >= 1.1x at 200 ms"),
}


def error_row(name: str, exc: BaseException) -> Row:
    print(f"  ! {name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return Row(
        name, "-", "-", CASES[name][1], None, detail=f"{type(exc).__name__}: {exc}", error=True
    )
