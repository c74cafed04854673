"""`agentq worker --processes N`: one command that uses every core.

A worker process runs its agent loop on one core (the Agents SDK's CPU per run is the ceiling).
The supervisor starts N of them, each `python -m producer.cli worker ...`, and:

- restarts one that dies (with backoff), and gives up, stopping the others, when a worker keeps
  dying soon after it starts (a broken plugin, a bad setting): restarting would only spin;
- forwards SIGTERM and SIGINT to every worker, which drains as `agentq worker` does, and exits
  once they have all exited: 0 when every worker exited 0, else the first other code;
- on a second signal, forwards it too (workers then exit at once) and exits at once.

Workers run in a process group of their own, so a terminal's Ctrl-C reaches them once, through
the supervisor, not twice (a second signal means "exit now"). They get SIGTERM if the
supervisor itself dies (Linux), so they never outlive it unnoticed. Worker i serves /metrics on
AGENTQ_METRICS_PORT + i when that is set."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

TICK_S = 0.1
"""How often the supervisor looks at its workers (and how soon it forwards a signal)."""

RESTART_MIN_S, RESTART_MAX_S = 0.5, 10.0
"""Backoff before restarting a worker that died, doubling while it keeps dying early."""

HEALTHY_S = 10.0
"""A worker that ran this long after it was ready (its start-up done) before it died was not
failing at start-up: its backoff starts over. A worker that died before it was ready died
early, however long its start-up took (a loaded machine may take many seconds)."""

READY_FD_ENV = "AGENTQ_READY_FD"
"""The worker writes a byte to this file descriptor (a pipe from the supervisor) once its
start-up is done (worker/settings.py on_startup)."""

GIVE_UP_AFTER = 5
"""Early deaths in a row of one worker slot after which the supervisor gives up."""

_PR_SET_PDEATHSIG = 1


def cpu_count(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup v2
    CPU quota (a container's --cpus), not the machine's count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    return n


def die_with_parent() -> None:
    """preexec_fn: in the child, before exec, ask for SIGTERM when the parent dies (Linux
    prctl PR_SET_PDEATHSIG; elsewhere nothing), so a parent killed by SIGKILL leaves no
    child behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_prctl: Any = None
"""libc's prctl, looked up here in the parent (not in the forked child); None elsewhere."""
with contextlib.suppress(OSError, AttributeError):
    _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _code(returncode: int) -> int:
    """A Popen return code as a shell shows it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    early_deaths: int = 0
    ready_fd: int | None = None
    """Read end of the worker's ready pipe, until it said it was ready or ended."""
    ready_at: float | None = None
    code: int | None = None
    """Exit code of its last worker, once it ended for good (stopped, finished, given up)."""


@dataclass
class Supervisor:
    command: Sequence[str]
    """The worker's command line (without --processes)."""
    processes: int
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    metrics_port: int = 0
    slots: list[Slot] = field(default_factory=list)
    stopping: int | None = None
    """The signal that asked us to stop."""
    forwarded: bool = False

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.slots = [Slot(i) for i in range(self.processes)]
        try:
            for slot in self.slots:
                self._start(slot)
            while True:
                time.sleep(TICK_S)
                if self.stopping is not None and not self.forwarded:
                    self._forward(self.stopping)
                    self.forwarded = True
                self._note_ready()
                given_up = self._reap()
                if given_up is not None:
                    return given_up
                if all(s.proc is None and s.restart_at is None for s in self.slots):
                    return next((s.code for s in self.slots if s.code), 0)
                self._restart_due()
        finally:
            self._stop_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = signum  # forwarded by the loop, which also stops restarts
            return
        self._forward(signum)
        os.write(2, f"agentq: second {signal.Signals(signum).name}: exiting now\n".encode())
        os._exit(128 + signum)

    def _forward(self, signum: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.proc.pid, signum)
            slot.restart_at = None

    def _start(self, slot: Slot) -> None:
        env = dict(self.env)
        if self.metrics_port:
            env["AGENTQ_METRICS_PORT"] = str(self.metrics_port + slot.index)
        self._close_ready(slot)
        r, w = os.pipe()
        os.set_blocking(r, False)
        env[READY_FD_ENV] = str(w)
        try:
            slot.proc = subprocess.Popen(
                list(self.command),
                env=env,
                process_group=0,
                preexec_fn=die_with_parent,
                pass_fds=(w,),
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        slot.ready_fd, slot.ready_at = r, None
        slot.started, slot.restart_at = time.monotonic(), None
        _say(f"worker {slot.index} started (pid {slot.proc.pid})")

    def _note_ready(self) -> None:
        for slot in self.slots:
            if slot.ready_fd is None:
                continue
            try:
                said = os.read(slot.ready_fd, 1)
            except BlockingIOError:
                continue
            if said:
                slot.ready_at = time.monotonic()
            self._close_ready(slot)  # said it, or ended without saying it

    @staticmethod
    def _close_ready(slot: Slot) -> None:
        if slot.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(slot.ready_fd)
            slot.ready_fd = None

    def _reap(self) -> int | None:
        """Note the workers that ended; schedule restarts. Returns an exit code when giving
        up."""
        for slot in self.slots:
            if slot.proc is None or slot.proc.poll() is None:
                continue
            code, pid = _code(slot.proc.returncode), slot.proc.pid
            now = time.monotonic()
            ran = now - slot.started
            slot.proc = None
            self._close_ready(slot)
            if self.stopping is not None or code == 0:
                # stopped (by us or by someone else), or finished (--burst): not restarted
                slot.code = code
                if self.stopping is None:
                    _say(f"worker {slot.index} (pid {pid}) exited with code {code}")
                continue
            early = slot.ready_at is None or now - slot.ready_at < HEALTHY_S
            slot.early_deaths = slot.early_deaths + 1 if early else 1
            if slot.early_deaths >= GIVE_UP_AFTER:
                _say(
                    f"worker {slot.index} (pid {pid}) died {slot.early_deaths} times in a row "
                    f"during its start-up or within {HEALTHY_S:g} s of it (last exit code "
                    f"{code}); giving up — see its output above, fix the cause and start again"
                )
                return 1
            delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (slot.early_deaths - 1))
            slot.restart_at = time.monotonic() + delay
            _say(
                f"worker {slot.index} (pid {pid}) exited with code {code} after {ran:.1f} s; "
                f"restarting it in {delay:g} s"
            )
        return None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and self.stopping is None:
                self._start(slot)

    def _stop_all(self) -> None:
        """On the way out (given up, or an error here): every worker still running drains."""
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in running:
            proc.wait()


def _say(msg: str) -> None:
    print(f"agentq supervisor: {msg}", file=sys.stderr, flush=True)


def supervise(worker_args: Sequence[str], processes: int, *, metrics_port: int = 0) -> int:
    """Run `agentq worker <worker_args>` in `processes` processes until they are done."""
    command = [sys.executable, "-m", "producer.cli", "worker", *worker_args]
    _say(f"starting {processes} worker processes")
    return Supervisor(command, processes, metrics_port=metrics_port).run()
