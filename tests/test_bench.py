"""The benchmark harness runs: `python -m ops.bench --quick` exits 0 and prints a table line
for every target. Benchmarks, not timed tests: no number is checked here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ops.bench.cases import CASES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_every_target(tmp_path: Path) -> None:
    # Always its own embedded Valkey: the harness flushes the database it is given, and the
    # test session's REDIS_URL database must not be flushed under other tests.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYTHONPATH"] = str(ROOT)
    out_json = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "ops.bench", "--quick", "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    table = res.stdout.split("== results", 1)[1]
    for name in CASES:
        assert re.search(rf"^{re.escape(name)}\s+\|.*\|\s*(PASS|SHORT)\s*$", table, re.M), (
            f"no table line for {name}:\n{table}"
        )
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["name"] for r in rows} == set(CASES)
    assert all(r["status"] in ("PASS", "SHORT", "INFO") for r in rows)
