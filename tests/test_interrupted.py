"""A test run stopped by SIGTERM (`timeout`, a cancelled CI job) stops what it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from ops.procs import local_redis_pid
from tests.procs import ROOT, until
from worker.supervisor import die_with_parent

HANGS = """
import time
from pathlib import Path


def test_hangs(redis_url):
    Path(__file__).with_name("url").write_text(redis_url)
    time.sleep(600)
"""


def test_sigterm_stops_the_session_valkey(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(HANGS)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}  # its own Valkey
    env["PYTHONPATH"] = str(ROOT)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
    proc = subprocess.Popen(
        [sys.executable, *args, str(tmp_path / "test_hangs.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    url = tmp_path / "url"
    pid = None
    try:
        until(lambda: url.exists() and url.read_text().startswith("redis"), 120, "the test")
        pid = local_redis_pid(url.read_text())
        assert pid is not None
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        until(lambda: not Path(f"/proc/{pid}").exists(), 30, "its Valkey to stop")
    finally:
        proc.terminate()  # (this test failed early) as the fix would: its Valkey stops too
        try:
            proc.wait(30)
        finally:
            proc.kill()
            proc.wait()
        if pid is not None and "valkey" in _comm(pid):  # left behind: stop it here
            os.kill(pid, signal.SIGKILL)


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text()
    return ""
