"""A fleet under one Router budget: 2 real worker processes (50 runs in flight each) against
the simulated Router, as its own process, limited to 20 requests/s across all callers; the
budget is 95% of that. Without it these workers would send about 100 calls at once: most would
be answered 429 and, after their tries, jobs would fail `rate_limited`."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import redis as redis_sync

from tests.procs import KEY, agentq, base_env, start_sim, start_worker, stop, until
from tests.test_faults import results, submit
from tests.test_outage import finished

pytestmark = pytest.mark.e2e

N = 240


def sim_stats(router_url: str) -> dict[str, object]:
    req = urllib.request.Request(
        router_url.removesuffix("/v1") + "/sim/stats", headers={"Authorization": f"Bearer {KEY}"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=10).read())  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_workers_share_one_budget(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--rate-limit-rps", "20", "--latency-ms", "50")
    port = free_port()
    env = base_env(
        redis_url, url, AGENTQ_RATE_LIMITS='{"*": {"rpm": 1140}}', AGENTQ_LOG_FORMAT="json"
    )
    workers = [
        start_worker({**env, "AGENTQ_METRICS_PORT": str(port)}, tmp_path / "w0.log"),
        start_worker(env, tmp_path / "w1.log"),
    ]
    try:
        batch_id, expected = submit(env, tmp_path, N)

        def waiting() -> bool:
            out = agentq("status", batch_id, env=env).stdout
            return "rate limited: budget * (1,140 rpm) in full use: calls wait" in out

        until(waiting, 60, "`agentq status` to show calls waiting for their turn")
        health = agentq("health", env=env).stdout
        line = r"✓ Budget \* \(1,140 rpm\): in full use, calls wait [\d.]+s for their turn; "
        assert re.search(line + r"[\d,]+ calls \(\d+%\) in the last minute", health), health
        until(lambda: finished(env, batch_id) >= N, 120, "the batch to finish")

        recs = results(env, batch_id)
        assert {r["custom_id"]: r["status"] for r in recs} == dict.fromkeys(expected, "succeeded")
        assert {r["custom_id"]: r["output"] for r in recs} == expected
        waited = [r for r in recs if any(e["event"] == "ratelimit.wait" for e in r["logs"])]  # type: ignore[union-attr]
        assert len(waited) > N // 2, "most jobs should have waited for their turn"
        outcomes = sim_stats(url)["by_outcome"]
        assert isinstance(outcomes, dict)
        assert outcomes["ok"] == N + N // 2  # plain jobs make one call, tool jobs two
        # Without the budget most calls are answered 429 (86% in `python -m ops.bench --only
        # ratelimit`); with it a few are, when calls reach the Router later than their turn.
        assert outcomes["429"] <= 0.2 * outcomes["ok"], outcomes
        print("simulated Router:", outcomes)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        m = re.search(r'^agentq_ratelimit_wait_seconds_count\{budget="\*"\} (\S+)$', text, re.M)
        assert m and float(m.group(1)) > 0, text[-2000:]
    finally:
        stop(*workers, sim)
