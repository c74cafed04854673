"""Agent jobs that use MCP tools, end to end: a real `agentq worker` process connects to the
example MCP server (stdio) at start-up, and jobs naming it call its tool through the simulated
Router."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import redis as redis_sync

from tests.procs import ROOT, agentq, base_env, start_sim, start_worker, stop, until

pytestmark = pytest.mark.e2e

SERVER = ROOT / "examples" / "mcp_words_server.py"


def test_mcp_jobs_through_a_worker_process(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim()
    mcp = json.dumps({"words": {"command": sys.executable, "args": [str(SERVER), "stdio"]}})
    env = base_env(redis_url, url, AGENTQ_MCP_SERVERS=mcp)
    log = tmp_path / "w.log"
    worker = start_worker(env, log)
    try:
        until(lambda: '"worker.started"' in log.read_text(), what="worker up")
        sub = agentq("submit", str(ROOT / "examples" / "mcp.jsonl"), env=env)
        assert sub.returncode == 0, sub.stderr
        batch_id = sub.stdout.strip().splitlines()[-1]
        assert agentq("wait", batch_id, "--timeout", "60", env=env).returncode == 0
        recs = {
            r["custom_id"]: r
            for r in map(json.loads, agentq("results", batch_id, env=env).stdout.splitlines())
        }
        assert recs["m1"]["output"] == "7 words", recs["m1"]
        assert recs["m2"]["output"] == "4 words", recs["m2"]
        tool = next(e for e in recs["m1"]["logs"] if e["event"] == "tool_call")
        assert tool["tool"] == "word_count" and tool["output"]
        # submit checks MCP server names against what live workers publish
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"custom_id": "x", "input": "hi", "agent": {"mcp_servers": ["web"]}}\n')
        res = agentq("submit", str(bad), env=env)
        assert res.returncode == 2
        assert "unknown MCP servers ['web']; the workers offer: words" in res.stderr
    finally:
        stop(worker, sim)
