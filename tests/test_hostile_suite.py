"""The hostile-job suite at CI size (`python -m ops.hostile --quick`): every hostile job is
refused or fails as it should, nothing is fetched, the key is nowhere (issue 9)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.procs import run_suite

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
CASES = [
    "remote $ref",
    "file:// $ref",
    "lookaround pattern",
    "deep JSON",
    "2 MB line",
    "batch id naming a key",
    "stored job: remote $ref",
    "stored job: deep JSON",
    "queue payload: deep JSON",
    "backtracking reply",
    "non-JSON tool logs",
    "prompt injection: the key",
    "markup and escapes: agentq run",
    "formulas: results --format csv",
]


def test_hostile_suite_quick() -> None:
    res = run_suite("ops.hostile", timeout=600)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    for case in CASES:
        assert re.search(rf"^{re.escape(case)}\s+.*\sok$", out, re.M), f"{case}:\n{out}"
    assert "FAIL" not in out and out.rstrip().endswith("PASS"), out
    assert "fetched from the internal service: 0" in out, out
    assert "Router key found in Redis, logs, results: nowhere" in out, out
    assert re.search(r"^metric model labels: (\d+) ", out, re.M), out
