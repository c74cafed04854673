"""The fault-injection suite runs at CI size: 300 jobs through a failing simulated Router while
a worker is SIGKILLed, another SIGTERMed and replaced, and Redis restarts; none is lost or
stored twice (the command exits non-zero otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_fault_suite_quick() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "ops.faults", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"stored duplicates \(must be 0\)\s+0\n", out), out
    assert re.search(r"lost \(must be 0\)\s+0\n", out), out
    assert re.search(r"batch counters add up\s+yes", out), out
    assert "SIGKILL worker0 at" in out and "restart Redis at" in out, out
    assert re.search(r"jobs re-run after a worker died\s+[1-9]", out), out
