"""The fault-injection suite at CI size (`python -m ops.faults --quick`): every case must pass,
and the table must show what the suite checks (a PASS that could not fail proves nothing)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.procs import run_suite

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    "mixed",
    "redis_outage",
    "zombie",
    "cancel_retry",
    "plugin",
    "submit_restart",
    "redis_crash",
    "router_outage",
]


def test_fault_suite_quick() -> None:
    res = run_suite("ops.faults", timeout=900)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for case in CASES:
        row = re.search(
            rf"^{case}\s+(\d+)\s+.*?\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+yes\s", out, re.M
        )
        assert row, f"no row for {case}:\n{out}"
        jobs, lost, stuck, twice, _explained, unexplained = map(int, row.groups())
        assert jobs > 0 and lost == stuck == twice == unexplained == 0, out
    # the faults happened and were seen
    assert re.search(r"mixed: re-runs explained by \d+ SIGKILL", out), out
    assert "restart Redis at" in out and "SIGTERM worker1" in out, out
    assert re.search(r"the zombie stopped [1-9]\d* runs whose lease was gone", out), out
    assert re.search(r"^redis_outage .* 0\s+0\s+yes", out, re.M), out
