"""Fair share and priorities end to end: `agentq submit` into a real Redis, a real worker
process, the simulated Router with 200 ms calls. What is asserted is order (what was still
waiting when a batch finished), never time."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis as redis_sync

from producer import AgentJob, Producer, Settings, keys
from producer.models import job_id_for
from tests.procs import KEY, agentq, base_env, start_sim, start_worker, stop, until

pytestmark = pytest.mark.e2e


def write_jobs(path: Path, prefix: str, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{prefix}{i}", "input": f"{prefix} {i}"}) + "\n")
    return path


def submit(env: dict[str, str], path: Path, *extra: str) -> str:
    res = agentq("submit", str(path), *extra, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def counts(env: dict[str, str], batch_id: str) -> dict[str, int]:
    h = redis_sync.Redis.from_url(env["REDIS_URL"]).hgetall(keys.batch(batch_id))
    return {s: int(h.get(s.encode(), 0)) for s in ("queued", "running", "succeeded", "failed")}


def done(env: dict[str, str], batch_id: str) -> bool:
    c = counts(env, batch_id)
    return c["queued"] + c["running"] == 0 and c["succeeded"] + c["failed"] > 0


def test_a_small_batch_is_not_stuck_behind_a_big_one(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "200")
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="10")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        big = submit(env, write_jobs(tmp_path / "big.jsonl", "b", 600))
        until(lambda: counts(env, big)["succeeded"] >= 20, 120, "the big batch under way")
        small = submit(env, write_jobs(tmp_path / "small.jsonl", "s", 20))
        ahead = counts(env, big)["queued"]
        assert ahead >= 100, "the big batch ran out before the test could submit (too slow?)"
        until(lambda: done(env, small), 120, "the small batch to finish")
        # FIFO would have started every job of the big batch first. Fair share alternates: at
        # most 20 of its jobs (and the 10 just taken) started alongside the small batch's 20.
        assert counts(env, big)["queued"] >= ahead - 40, (ahead, counts(env, big))
        assert counts(env, small)["succeeded"] == 20
        until(lambda: done(env, big), 300, "the big batch to finish")
        assert counts(env, big)["succeeded"] == 600
    finally:
        stop(worker, sim)


def test_a_high_priority_batch_finishes_first(redis_url: str, tmp_path: Path) -> None:
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "200")
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="10")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        big = submit(env, write_jobs(tmp_path / "big.jsonl", "b", 400))
        until(lambda: counts(env, big)["succeeded"] >= 10, 120, "the big batch under way")
        normal, high = asyncio.run(submit_back_to_back(redis_url, url))
        until(lambda: done(env, high), 120, "the high-priority batch to finish")
        assert counts(env, normal)["queued"] > 0, "the normal batch went first"
        assert counts(env, high)["succeeded"] == 100
        until(lambda: done(env, normal), 120, "the normal batch to finish")
        assert counts(env, big)["queued"] > 0, "the normal batch did not share with the big one"
    finally:
        stop(worker, sim)


async def submit_back_to_back(redis_url: str, router_url: str) -> tuple[str, str]:
    """Two 100-job batches, the second high: submitted within milliseconds of each other (the
    CLI's start-up would let the first one run meanwhile)."""
    settings = Settings(redis_url=redis_url, router_url=router_url, api_key=KEY)  # type: ignore[arg-type]
    async with Producer.from_env(settings) as p:
        jobs = [AgentJob(custom_id=f"j{i}", input=f"j {i}") for i in range(100)]
        normal = await p.submit(jobs, batch_id="normal-one")
        high = await p.submit(jobs, batch_id="high-one", priority="high")
    return normal.id, high.id


def test_a_tenant_with_many_batches_gets_one_turn_a_round(redis_url: str, tmp_path: Path) -> None:
    """Tenant a has five batches queued, tenant b submits one (`agentq submit --tenant b`):
    they take turns, so while b's 30 jobs run about 30 of a's do (by batch, b would get one
    turn in six: about 150 of a's)."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "200")
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="10")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        a_ids = asyncio.run(submit_tenant_batches(redis_url, url, "a", 5, 100))
        until(lambda: counts(env, a_ids[0])["succeeded"] >= 5, 120, "tenant a under way")
        a_started = lambda: sum(100 - counts(env, b)["queued"] for b in a_ids)  # noqa: E731
        path = write_jobs(tmp_path / "b.jsonl", "b", 30)
        with ThreadPoolExecutor(1) as pool:  # counted from when b's jobs are queued, not
            # from the CLI's start-up (tenant a's jobs keep starting meanwhile)
            cli = pool.submit(submit, env, path, "--tenant", "b", "--batch-id", "tenant-b")
            rd = redis_sync.Redis.from_url(redis_url)
            until(lambda: rd.hexists(keys.batch("tenant-b"), "total"), 120, "b's jobs queued")
            before = a_started()
            b_id = cli.result()
        until(lambda: done(env, b_id), 120, "tenant b's batch to finish")
        during = a_started() - before
        job = redis_sync.Redis.from_url(redis_url).hget(keys.job(job_id_for(b_id, "b0")), "tenant")
        assert job == b"b", "agentq submit --tenant b gave b's jobs that tenant"
        # turns: ~30 of a's, plus the 10 in flight at the submit and some slack
        assert during <= 60, (during, [counts(env, b) for b in a_ids])
        assert counts(env, b_id)["succeeded"] == 30
        per_batch = [100 - counts(env, b)["queued"] for b in a_ids]
        # a's batches share a's turns (the first may have filled the 10 slots alone)
        assert max(per_batch) - min(per_batch) <= 12, per_batch
        # the runs a's turns gave to other jobs of a than the one taken: each job ran once
        for b in a_ids:
            until(lambda b=b: done(env, b), 300, f"{b} to finish")
        rd = redis_sync.Redis.from_url(redis_url)
        for b in a_ids:
            assert counts(env, b)["succeeded"] == 100
            runs = [rd.hget(keys.job(job_id_for(b, f"j{i}")), "runs") for i in range(100)]
            assert runs == [b"1"] * 100, (b, runs)
    finally:
        stop(worker, sim)


async def submit_tenant_batches(
    redis_url: str, router_url: str, tenant: str, batches: int, n: int
) -> list[str]:
    settings = Settings(redis_url=redis_url, router_url=router_url, api_key=KEY)  # type: ignore[arg-type]
    ids = []
    async with Producer.from_env(settings) as p:
        for k in range(batches):
            jobs = [AgentJob(custom_id=f"j{i}", input=f"j {i}") for i in range(n)]
            ids.append((await p.submit(jobs, batch_id=f"{tenant}-{k}", tenant=tenant)).id)
    return ids
