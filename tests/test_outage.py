"""Router and model outages pause the batch instead of failing it (the circuit breakers of
worker/breaker.py). Real worker processes, the simulated Router as its own process (stopped
and started again on its port), real Redis."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis as redis_sync

from producer import keys
from tests.procs import KEY, agentq, base_env, start_sim, start_worker, stop, until
from tests.test_faults import results, submit

pytestmark = pytest.mark.e2e


def finished(env: dict[str, str], batch_id: str) -> int:
    h = redis_sync.Redis.from_url(env["REDIS_URL"]).hgetall(keys.batch(batch_id))
    return sum(int(h.get(s.encode(), 0)) for s in ("succeeded", "failed", "cancelled"))


def sim_post(router_url: str, path: str, body: dict[str, object]) -> None:
    base = router_url.removesuffix("/v1")
    req = urllib.request.Request(
        base + path,
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    urllib.request.urlopen(req, timeout=10).read()


def test_router_outage_pauses_the_batch_and_it_resumes(redis_url: str, tmp_path: Path) -> None:
    """The Router stopped mid-batch for 10 s (backoff is capped at 0.5 s here: without the
    breaker every job in flight would spend its three tries in about a second): every job
    succeeds, `agentq status` says the batch is paused meanwhile, the job logs show the wait."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "100")
    port = urlparse(url).port
    assert port is not None
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="10")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        batch_id, expected = submit(env, tmp_path, 150)
        until(lambda: finished(env, batch_id) >= 20, 90, "20 jobs done")
        stop(sim)
        down_at = time.monotonic()

        def paused() -> bool:
            out = agentq("status", batch_id, env=env).stdout
            return "paused: Router default unreachable since" in out

        until(paused, 60, "status to say the batch is paused")
        assert finished(env, batch_id) < 150
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
        sim, _ = start_sim("--latency-ms", "100", port=port)
        until(lambda: finished(env, batch_id) >= 150, 120, "the batch to finish")
        recs = results(env, batch_id)
        assert {r["custom_id"]: r["status"] for r in recs} == dict.fromkeys(expected, "succeeded")
        assert {r["custom_id"]: r["output"] for r in recs} == expected
        waited = [r for r in recs if any(e["event"] == "breaker.wait" for e in r["logs"])]  # type: ignore[union-attr]
        assert waited, "no job log recorded a wait for the breaker"
        for r in waited:
            events = [e["event"] for e in r["logs"]]  # type: ignore[union-attr]
            assert "breaker.resumed" in events
        log = (tmp_path / "worker.log").read_text()
        assert '"breaker.opened"' in log and '"breaker.closed"' in log
        assert "paused" not in agentq("status", batch_id, env=env).stdout
    finally:
        stop(worker, sim)


def test_a_failing_model_pauses_its_jobs_only(redis_url: str, tmp_path: Path) -> None:
    """gpt-4o answers 503 until told otherwise: jobs with a fallback move to it, jobs of other
    models run on, jobs that need gpt-4o wait (parked, not holding the worker's slots) and
    succeed once it is back."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "50")
    sim_post(url, "/sim/outage", {"model": "gpt-4o", "fault": "503", "seconds": 600})
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="5")
    lines = []
    for i in range(10):
        lines.append({"custom_id": f"wait{i}", "input": f"What is {i} + 1?", "model": "gpt-4o"})
        for kind, extra in (
            ("fb", {"model": "gpt-4o", "fallbacks": ["gpt-4o-mini"]}),
            ("other", {"model": "gpt-4"}),
        ):
            for j in range(2):
                lines.append({"custom_id": f"{kind}{i}.{j}", "input": f"What is {i} + 1?", **extra})
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = agentq("submit", str(tmp_path / "jobs.jsonl"), env=env)
    assert res.returncode == 0, res.stderr
    batch_id = res.stdout.strip().splitlines()[-1]
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        until(lambda: finished(env, batch_id) >= 40, 120, "the other models' jobs")
        recs = {r["custom_id"]: r for r in results(env, batch_id)}
        done = {c for c, r in recs.items() if r["status"] != "queued" and r["status"] != "running"}
        assert {c for c in done if c.startswith("wait")} == set()
        assert len(done) == 40
        for c in done:
            assert recs[c]["status"] == "succeeded", recs[c]
            assert recs[c]["model"] == ("gpt-4o-mini" if c.startswith("fb") else "gpt-4")
        paused = agentq("status", batch_id, env=env).stdout
        assert "paused: model gpt-4o on Router default failing since" in paused
        sim_post(url, "/sim/outage", {"model": "gpt-4o", "fault": "503", "seconds": 0})
        until(lambda: finished(env, batch_id) >= 50, 60, "the waiting jobs")
        recs = {r["custom_id"]: r for r in results(env, batch_id)}
        for i in range(10):
            r = recs[f"wait{i}"]
            assert (r["status"], r["model"], r["output"]) == ("succeeded", "gpt-4o", str(i + 1))
        log = (tmp_path / "worker.log").read_text()
        assert '"breaker.opened"' in log and '"breaker.closed"' in log
    finally:
        stop(worker, sim)


def test_run_checks_the_router_first(redis_url: str, tmp_path: Path) -> None:
    """`agentq run` stops with one message, exit 2 and nothing enqueued when the Router is
    unreachable or refuses the key."""
    r = redis_sync.Redis.from_url(redis_url)
    r.flushdb()
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"custom_id": "a", "input": "What is 1 + 1?"}\n')
    down = base_env(redis_url, "http://127.0.0.1:9/v1")
    res = agentq("run", str(jobs), env=down)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Cannot connect to Router at http://127.0.0.1:9/v1" in res.stderr
    assert "nothing was enqueued" in res.stderr
    sim, url = start_sim()
    try:
        res = agentq("run", str(jobs), env={**base_env(redis_url, url), "HANZO_API_KEY": "sk-no"})
        assert res.returncode == 2, res.stdout + res.stderr
        assert "401 from Router" in res.stderr and "invalid HANZO_API_KEY" in res.stderr
        assert r.zcard(keys.BATCHES) == 0 and not r.keys("agentq:job:*")
        res = agentq("run", str(jobs), env=base_env(redis_url, url))
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        stop(sim)
