"""What a benchmark case measures besides time: CPU seconds per process, counting every process
agentq adds (workers, Redis, the submitter and waiter), and true peak memory (VmHWM) from a
stated baseline.

CPU of other processes is read from /proc/<pid>/stat; the bench process itself submits and
waits, so its own CPU is time.process_time() over the same span (it does nothing else then).
The simulated Router's CPU is measured apart: it belongs to neither side of a comparison."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ops import procs

BENCH = "submit+wait (bench process)"
"""The label of this process's own CPU: it submits the jobs and waits for them."""
TOTAL = "total"


@dataclass
class CpuSplit:
    """CPU seconds of named process groups over a span of wall time (a context manager)."""

    agentq: Mapping[str, Sequence[int]]
    """agentq's cost: label -> pids (e.g. "worker": [pid], "Redis": [pid])."""
    apart: Mapping[str, Sequence[int]] = field(default_factory=dict)
    """Measured, but in neither side's total (e.g. "sim Router")."""
    count_self: bool = True
    """Add this process's CPU as BENCH (it submits and waits during the span)."""
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _c0: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        out = {
            label: sum(procs.cpu_s(pid) for pid in pids)
            for label, pids in {**self.agentq, **self.apart}.items()
        }
        if self.count_self:
            out[BENCH] = time.process_time()
        return out

    def __enter__(self) -> CpuSplit:
        self._t0, self._c0 = time.perf_counter(), self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        now = self._read()
        self.seconds = time.perf_counter() - self._t0
        self.cpu = {label: now[label] - self._c0[label] for label in now}

    def _scaled(self, labels: Sequence[str], factor: float) -> dict[str, float]:
        parts = {label: self.cpu[label] * factor for label in labels}
        return {**parts, TOTAL: sum(parts.values())}

    def ms_per(self, n: int) -> dict[str, float]:
        """agentq's CPU ms per job, per process group and their TOTAL."""
        labels = [*self.agentq, *([BENCH] if self.count_self else [])]
        return self._scaled(labels, 1000 / n)

    def apart_ms_per(self, n: int) -> dict[str, float]:
        return {label: self.cpu[label] * 1000 / n for label in self.apart}

    def cores(self) -> dict[str, float]:
        """agentq's CPU seconds per wall second (cores busy), per group and TOTAL."""
        labels = [*self.agentq, *([BENCH] if self.count_self else [])]
        return self._scaled(labels, 1 / self.seconds if self.seconds else 0.0)

    def apart_cores(self) -> dict[str, float]:
        return {k: self.cpu[k] / self.seconds if self.seconds else 0.0 for k in self.apart}


def median_round(rounds: Sequence[dict[str, float]]) -> dict[str, float]:
    """The round whose TOTAL is the (lower) median: its parts still add up to its total."""
    return sorted(rounds, key=lambda r: r[TOTAL])[(len(rounds) - 1) // 2]


def fmt_split(split: Mapping[str, float], unit: str, spec: str = ".2f") -> str:
    """Format as "worker 7.80 + Redis 1.10 + ... = 9.80 ms/run" (one part: no sum)."""
    parts = [f"{label} {format(v, spec)}" for label, v in split.items() if label != TOTAL]
    if len(parts) == 1:
        return f"{parts[0]} {unit}"
    return f"{' + '.join(parts)} = {format(split[TOTAL], spec)} {unit}"


@dataclass
class PeakMem:
    """Peak RSS of processes from a baseline: start() resets each one's peak (clear_refs) and
    records its RSS then; read() gives the peak since then (VmHWM) and the RSS now, in MB. A
    process whose peak cannot be reset reports its peak since it started, and says so (`since`).

    VmHWM for this process too, not ru_maxrss: ru_maxrss also keeps the peak of any thread that
    exited before the reset (the kernel folds it into the process's signal struct), so it
    cannot be reset; VmHWM is the same figure when no thread has exited."""

    pids: Mapping[str, int]
    baseline: dict[str, float] = field(default_factory=dict)
    since: dict[str, str] = field(default_factory=dict)

    def start(self, when: str) -> PeakMem:
        """when: where growth is measured from, e.g. "after warm-up"."""
        for label, pid in self.pids.items():
            ok = procs.reset_peak(pid)
            self.baseline[label] = procs.mem_mb(pid)["VmRSS"]
            self.since[label] = when if ok else "process start (peak not resettable)"
        return self

    def read(self) -> dict[str, dict[str, float | str]]:
        """label -> {baseline_mb, peak_mb, rss_mb, growth_mb, since}."""
        out: dict[str, dict[str, float | str]] = {}
        for label, pid in self.pids.items():
            mem = procs.mem_mb(pid)
            peak = mem["VmHWM"]
            base = self.baseline[label]
            out[label] = {
                "baseline_mb": round(base, 1),
                "peak_mb": round(peak, 1),
                "rss_mb": round(mem["VmRSS"], 1),
                "growth_mb": round(peak - base, 1),
                "since": self.since[label],
            }
        return out


def fmt_mem(mem: Mapping[str, Mapping[str, float | str]]) -> str:
    """Format as "worker-0 142 -> peak 143 MB (+1.0 from after warm-up), ..."."""
    return ", ".join(
        f"{label} {m['baseline_mb']:.0f} -> peak {m['peak_mb']:.0f} MB "
        f"({m['growth_mb']:+.1f} from {m['since']})"
        for label, m in mem.items()
    )
