"""The state store's Lua transitions, once on fakeredis and once on the real server."""

from __future__ import annotations

import json
from typing import Any

from producer import keys
from producer.models import AgentJob, ResultRecord, Status, Usage, job_id_for
from producer.store import RUN_FUNCTION, Store, now_iso


def jobs(*ids: str) -> list[AgentJob]:
    return [AgentJob(custom_id=i, input=f"question {i}") for i in ids]


def final(store: Store, batch_id: str, custom_id: str, status: Status, **kw: Any) -> ResultRecord:
    return ResultRecord(
        custom_id=custom_id,
        job_id=job_id_for(batch_id, custom_id),
        batch_id=batch_id,
        status=status,
        finished_at=now_iso(),
        **kw,
    )


async def test_submit_is_idempotent_and_json(store: Store) -> None:
    assert await store.submit_chunk("b1", jobs("a", "b")) == 2
    assert await store.submit_chunk("b1", jobs("b", "c")) == 1  # b exists: enqueued once
    st = await store.batch_status("b1")
    assert st is not None and st.total == 3 and st.counts[Status.QUEUED] == 3
    assert await store.redis.zcard(store.queue) == 3
    jid = job_id_for("b1", "a")
    payload = json.loads(await store.redis.get(keys.ARQ_JOB_PREFIX + jid))
    assert payload["f"] == RUN_FUNCTION and payload["a"] == [jid, "b1"]
    assert [
        r.custom_id for r in await store.records("b1", [job_id_for("b1", c) for c in "abc"])
    ] == ["a", "b", "c"]


async def test_same_custom_id_in_other_batch_is_another_job(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    assert await store.submit_chunk("b2", jobs("a")) == 1
    assert job_id_for("b1", "a") != job_id_for("b2", "a")


async def test_claim_and_finish_move_counters(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a", "b"))
    await store.seal("b1")
    jid = job_id_for("b1", "a")
    claim = await store.claim(jid, "b1", "host:1")
    assert claim.state == "running" and claim.job is not None and claim.job.custom_id == "a"
    assert claim.runs == 1 and claim.enqueued_at
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.QUEUED] == 1 and st.counts[Status.RUNNING] == 1
    record = final(
        store,
        "b1",
        "a",
        Status.SUCCEEDED,
        output="4",
        usage=Usage(requests=1, input_tokens=10, output_tokens=2, total_tokens=12),
        cost_usd=0.25,
    )
    assert await store.finish(record)
    st = await store.batch_status("b1")
    assert st is not None
    assert st.counts[Status.RUNNING] == 0 and st.counts[Status.SUCCEEDED] == 1
    assert st.usage.total_tokens == 12 and st.cost_usd == 0.25 and not st.finished
    (stored,) = await store.records("b1", [jid])
    assert stored.output == "4" and stored.status == Status.SUCCEEDED


async def test_rerun_after_crash_counts_once_and_keeps_success(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    await store.claim(jid, "b1", "w1")
    again = await store.claim(jid, "b1", "w2")  # w1 died; arq started the job elsewhere
    assert again.state == "running" and again.runs == 2
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.RUNNING] == 1 and st.counts[Status.QUEUED] == 0
    assert await store.finish(final(store, "b1", "a", Status.SUCCEEDED, output="first"))
    # A late writer (the "dead" worker after all) cannot overwrite or double-count.
    assert not await store.finish(final(store, "b1", "a", Status.FAILED, output="late"))
    st = await store.batch_status("b1")
    assert st is not None
    assert st.counts[Status.SUCCEEDED] == 1 and st.counts[Status.FAILED] == 0
    (stored,) = await store.records("b1", [jid])
    assert stored.output == "first"
    assert (await store.claim(jid, "b1", "w3")).state == "succeeded"


async def test_cancel_ends_queued_jobs_and_dequeues_them(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a", "b", "c"))
    await store.seal("b1")
    ids = [job_id_for("b1", c) for c in "abc"]
    await store.claim(ids[0], "b1", "w")
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED))
    assert await store.cancel("b1", ids) == 2
    assert await store.cancel("b1", ids) == 0
    st = await store.batch_status("b1")
    assert st is not None and st.finished
    assert st.counts[Status.CANCELLED] == 2 and st.counts[Status.SUCCEEDED] == 1
    assert await store.redis.zcard(store.queue) == 0  # claimed or cancelled: none left
    assert await store.redis.zcard(keys.LEASES) == 0
    assert not await store.redis.exists(keys.ARQ_JOB_PREFIX + ids[1])
    assert (await store.claim(ids[1], "b1", "w")).state == "cancelled"
    recs = await store.records("b1", ids)
    assert [r.status for r in recs] == [Status.SUCCEEDED, Status.CANCELLED, Status.CANCELLED]
    assert recs[1].error is not None and recs[1].error.type == "cancelled"


async def test_unknown_batch_and_job(store: Store) -> None:
    assert await store.batch_status("nope") is None
    assert (await store.claim("nope", "nope", "w")).state == "missing"
    assert await store.records("nope", ["nope"]) == []


async def test_changes_are_published(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    pubsub = store.redis.pubsub()
    await pubsub.subscribe(keys.batch_events("b1"))
    await pubsub.get_message(timeout=1)  # subscribe confirmation
    jid = job_id_for("b1", "a")
    await store.claim(jid, "b1", "w")
    await store.finish(final(store, "b1", "a", Status.FAILED))
    got = []
    for _ in range(2):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        assert msg is not None
        got.append(msg["data"].decode())
    assert got == [f"{jid} running", f"{jid} failed"]
    await pubsub.aclose()


async def test_records_stream_in_input_order(store: Store) -> None:
    ids = [f"j{i:04d}" for i in range(1200)]
    await store.submit_chunk("b1", jobs(*ids))
    seen = []
    async for chunk in store.job_ids("b1", chunk=500):
        seen.extend(r.custom_id for r in await store.records("b1", chunk))
    assert seen == ids


async def test_claim_moves_job_from_queue_to_lease(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    await store.claim(jid, "b1", "w")
    assert await store.redis.zscore(store.queue, jid) is None
    assert await store.redis.zscore(keys.LEASES, jid) is not None
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED))
    assert await store.redis.zscore(keys.LEASES, jid) is None


async def test_expired_lease_goes_back_to_queue(store: Store) -> None:
    store.lease_ms = 0  # every lease is already over
    await store.submit_chunk("b1", jobs("a", "b"))
    ja, jb = job_id_for("b1", "a"), job_id_for("b1", "b")
    await store.claim(ja, "b1", "dead-worker")
    await store.redis.set(keys.ARQ_IN_PROGRESS_PREFIX + ja, b"1")
    assert await store.reap() == 1
    assert await store.redis.zscore(store.queue, ja) is not None
    assert not await store.redis.exists(keys.ARQ_IN_PROGRESS_PREFIX + ja)
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.RUNNING] == 1  # still running until re-claimed
    again = await store.claim(ja, "b1", "w2")
    assert again.state == "running" and again.runs == 2
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.RUNNING] == 1 and st.counts[Status.QUEUED] == 1
    assert await store.redis.zscore(store.queue, jb) is not None


async def test_renew_keeps_live_leases(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    store.lease_ms = 0
    await store.claim(jid, "b1", "w")
    store.lease_ms = 60_000
    await store.renew([jid, "not-leased"])
    assert await store.reap() == 0
    assert await store.redis.zscore(keys.LEASES, "not-leased") is None


async def test_max_runs_exhausted(store: Store) -> None:
    store.max_runs = 2
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    assert (await store.claim(jid, "b1", "w1")).state == "running"
    assert (await store.claim(jid, "b1", "w2")).state == "running"
    third = await store.claim(jid, "b1", "w3")
    assert third.state == "exhausted" and third.runs == 2 and third.job is not None


async def test_release_puts_job_back_without_counting_the_run(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    await store.claim(jid, "b1", "w")
    assert await store.release(jid, "b1")
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.QUEUED] == 1 and st.counts[Status.RUNNING] == 0
    assert await store.redis.zscore(store.queue, jid) is not None
    assert await store.redis.zscore(keys.LEASES, jid) is None
    assert (await store.claim(jid, "b1", "w")).runs == 1
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED))
    assert not await store.release(jid, "b1")  # final stays final


async def test_retry_requeues_failed_jobs_as_new_attempts(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a", "b", "c"))
    await store.seal("b1")
    ids = {c: job_id_for("b1", c) for c in "abc"}
    for c, status in [("a", Status.FAILED), ("b", Status.SUCCEEDED)]:
        await store.claim(ids[c], "b1", "w")
        await store.finish(final(store, "b1", c, status))
    await store.cancel("b1", [ids["c"]])
    assert await store.retry("b1", ids.values(), [Status.FAILED]) == 1
    st = await store.batch_status("b1")
    assert st is not None and not st.finished
    assert st.counts[Status.QUEUED] == 1 and st.counts[Status.FAILED] == 0
    assert st.counts[Status.CANCELLED] == 1 and st.counts[Status.SUCCEEDED] == 1
    assert await store.redis.zscore(store.queue, ids["a"]) is not None
    payload = json.loads(await store.redis.get(keys.ARQ_JOB_PREFIX + ids["a"]))
    assert payload["a"] == [ids["a"], "b1"]
    (rec,) = await store.records("b1", [ids["a"]])
    assert rec.status == Status.QUEUED and rec.output is None
    assert await store.retry("b1", ids.values(), [Status.FAILED, Status.CANCELLED]) == 1
