"""What one job costs in Redis: the take reads the payload, so arq's transaction before the run
is skipped; a claim removes every arq key of its enqueue, so arq's own clean-up transaction
after the run is skipped too; and nothing is left behind."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from producer import AgentJob, Producer, Settings, keys
from producer.models import job_id_for
from producer.store import Store, arq_job_id
from tests.helpers import run_batch
from worker.settings import build_worker


async def _arq_keys(redis: Any, aid: str) -> list[str]:
    """Which of arq's keys for this arq id exist (the queue entry counted as "queue")."""
    found = [
        prefix
        for prefix in (keys.ARQ_JOB_PREFIX, keys.ARQ_IN_PROGRESS_PREFIX, keys.ARQ_RETRY_PREFIX)
        if await redis.exists(prefix + aid)
    ]
    if await redis.zscore("agentq:queue", aid) is not None:
        found.append("queue")
    return found


async def test_a_claim_removes_every_arq_key_of_its_enqueue(store: Store) -> None:
    await store.submit_chunk("b1", [AgentJob(custom_id="c1", input="hi")])
    jid = job_id_for("b1", "c1")
    aid = arq_job_id(jid, 1)
    # what arq itself writes before the job's function runs: in progress, and a try counted
    await store.redis.set(keys.ARQ_IN_PROGRESS_PREFIX + aid, "1")
    await store.redis.incr(keys.ARQ_RETRY_PREFIX + aid)
    assert sorted(await _arq_keys(store.redis, aid)) == sorted(
        [keys.ARQ_JOB_PREFIX, keys.ARQ_IN_PROGRESS_PREFIX, keys.ARQ_RETRY_PREFIX, "queue"]
    )
    claim = await store.claim(jid, "b1", "w1", "1")
    assert claim.holds
    assert await _arq_keys(store.redis, aid) == []


async def test_arq_clean_up_is_skipped_only_for_claimed_runs(
    settings: Settings, monkeypatch: Any
) -> None:
    calls: list[tuple[str, bool]] = []

    async def arq_finish(self: Any, job_id: str, finish: bool, *rest: Any) -> None:
        calls.append((job_id, finish))

    monkeypatch.setattr("arq.worker.Worker.finish_job", arq_finish)
    worker = build_worker(settings, burst=True, handle_signals=False)
    worker.claimed.add("j.1")
    await worker.finish_job("j.1", True, None, 0, False, None, None)  # claimed: skipped
    await worker.finish_job("j.2", True, None, 0, False, None, None)  # never claimed
    worker.claimed.add("j.3")
    await worker.finish_job("j.3", False, None, 0, False, 5000, None)  # a Retry
    await worker.finish_job("j.1", True, None, 0, False, None, None)  # once only
    assert calls == [("j.2", True), ("j.3", False), ("j.1", True)]
    assert worker.claimed == set()


async def test_a_batch_leaves_no_arq_keys_and_no_transaction(
    producer: Producer, settings: Settings, redis: Redis
) -> None:
    """arq's MULTI before the run (payload, try count) and its clean-up MULTI after it are
    both gone (before: one MULTI a job, reading the payload the take had just looked at)."""
    n = 12
    before = (await redis.info("commandstats")).get("cmdstat_multi", {}).get("calls", 0)
    batch = await producer.submit([AgentJob(custom_id=f"c{i}", input="hi") for i in range(n)])
    st = await run_batch(producer, settings, batch.id)
    assert st.all_succeeded and st.total == n
    after = (await redis.info("commandstats")).get("cmdstat_multi", {}).get("calls", 0)
    assert after - before == 0
    prefixes = (keys.ARQ_JOB_PREFIX, keys.ARQ_IN_PROGRESS_PREFIX, keys.ARQ_RETRY_PREFIX)
    left = [k for p in prefixes async for k in redis.scan_iter(p + "*")]
    assert left == []
