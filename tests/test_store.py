"""The state store's Lua transitions, once on fakeredis and once on the real server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from producer import keys
from producer.models import AgentJob, ResultRecord, Status, Usage, job_id_for
from producer.store import RUN_FUNCTION, Claim, Store, arq_job_id, now_iso


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


async def queued_entry(store: Store, jid: str) -> str | None:
    """The job's arq queue entry (its current generation), if it has one."""
    q = (await store.redis.hget(keys.job(jid), "q") or b"0").decode()
    aid = arq_job_id(jid, q)
    return aid if await store.redis.zscore(store.queue, aid) is not None else None


async def lapse(store: Store, *jids: str) -> None:
    """As if the leases' deadlines had passed (their worker stopped renewing)."""
    await store.redis.zadd(keys.LEASES, dict.fromkeys(jids, 1), xx=True)


async def claim(store: Store, jid: str, batch: str, worker: str) -> Claim:
    q = (await store.redis.hget(keys.job(jid), "q") or b"0").decode()
    return await store.claim(jid, batch, worker, q)


async def test_submit_is_idempotent_and_json(store: Store) -> None:
    assert await store.submit_chunk("b1", jobs("a", "b")) == 2
    assert await store.submit_chunk("b1", jobs("b", "c")) == 1  # b exists: enqueued once
    st = await store.batch_status("b1")
    assert st is not None and st.total == 3 and st.counts[Status.QUEUED] == 3
    assert await store.redis.zcard(store.queue) == 3
    jid = job_id_for("b1", "a")
    payload = json.loads(await store.redis.get(keys.ARQ_JOB_PREFIX + arq_job_id(jid, 1)))
    assert payload["f"] == RUN_FUNCTION and payload["a"] == [jid, "b1", "1"]
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
    c = await claim(store, jid, "b1", "host:1")
    assert c.state == "running" and c.job is not None and c.job.custom_id == "a"
    assert c.runs == 1 and c.enqueued_at and c.token.endswith(".1")
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
    assert await store.finish(record, c.token) == 1
    st = await store.batch_status("b1")
    assert st is not None
    assert st.counts[Status.RUNNING] == 0 and st.counts[Status.SUCCEEDED] == 1
    assert st.usage.total_tokens == 12 and st.cost_usd == 0.25 and not st.finished
    (stored,) = await store.records("b1", [jid])
    assert stored.output == "4" and stored.status == Status.SUCCEEDED


async def test_a_stale_run_cannot_write(store: Store) -> None:
    """Fencing: after its lease was reaped, the first run's finish and release change nothing."""
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    first = await claim(store, jid, "b1", "w1")
    assert (await claim(store, jid, "b1", "w2")).state == "busy"  # one run at a time
    await lapse(store, jid)
    assert (await store.reap())[0] == 1  # w1 stopped renewing
    second = await claim(store, jid, "b1", "w2")
    assert second.state == "running" and second.runs == 2 and second.token != first.token
    late = final(store, "b1", "a", Status.FAILED, output="late")
    assert await store.finish(late, first.token) == -1
    assert not await store.release(jid, first.token)
    lost, _ = await store.renew([(jid, first.token)])
    assert lost == [jid]
    assert await store.finish(final(store, "b1", "a", Status.SUCCEEDED, output="ok"), second.token)
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.SUCCEEDED] == 1 and st.counts[Status.FAILED] == 0
    (stored,) = await store.records("b1", [jid])
    assert stored.output == "ok"
    assert (await claim(store, jid, "b1", "w3")).state == "succeeded"


async def test_cancel_ends_queued_jobs_and_dequeues_them(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a", "b", "c"))
    await store.seal("b1")
    ids = [job_id_for("b1", c) for c in "abc"]
    c = await claim(store, ids[0], "b1", "w")
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED), c.token)
    assert await store.cancel("b1", ids) == 2
    assert await store.cancel("b1", ids) == 0
    st = await store.batch_status("b1")
    assert st is not None and st.finished
    assert st.counts[Status.CANCELLED] == 2 and st.counts[Status.SUCCEEDED] == 1
    assert await store.redis.zcard(store.queue) == 0  # claimed or cancelled: none left
    assert await store.redis.zcard(keys.LEASES) == 0
    assert not await store.redis.exists(keys.ARQ_JOB_PREFIX + arq_job_id(ids[1], 1))
    assert (await store.claim(ids[1], "b1", "w", "1")).state == "cancelled"
    recs = await store.records("b1", ids)
    assert [r.status for r in recs] == [Status.SUCCEEDED, Status.CANCELLED, Status.CANCELLED]
    assert recs[1].error is not None and recs[1].error.type == "cancelled"


async def test_cancel_flag_stops_jobs_the_cancel_did_not_reach(store: Store) -> None:
    """Regression (issue 8): a cancel interrupted between chunks, or a lost pub/sub message,
    let jobs run on. The flag is checked at claim and at renewal."""
    await store.submit_chunk("b1", jobs("a", "b"))
    ja, jb = job_id_for("b1", "a"), job_id_for("b1", "b")
    ca = await claim(store, ja, "b1", "w")
    assert await store.flag_cancelled("b1")
    _, cancelled = await store.renew([(ja, ca.token)])
    assert cancelled == [ja]
    assert (await claim(store, jb, "b1", "w")).state == "cancelled"
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.CANCELLED] == 1 and st.counts[Status.RUNNING] == 1
    # jobs retried after the cancel run normally
    await store.finish(final(store, "b1", "a", Status.CANCELLED), ca.token)
    assert await store.retry("b1", [ja, jb], [Status.CANCELLED]) == 2
    assert (await claim(store, ja, "b1", "w")).state == "running"


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
    c = await claim(store, jid, "b1", "w")
    await store.finish(final(store, "b1", "a", Status.FAILED), c.token)
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
    c = await claim(store, jid, "b1", "w")
    assert await queued_entry(store, jid) is None
    assert not await store.redis.exists(keys.ARQ_JOB_PREFIX + arq_job_id(jid, 1))
    assert await store.redis.zscore(keys.LEASES, jid) is not None
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED), c.token)
    assert await store.redis.zscore(keys.LEASES, jid) is None


async def test_expired_lease_goes_back_to_the_front_of_the_queue(store: Store) -> None:
    """Regression (issue 8): reaped and released jobs went to the back of the queue."""
    await store.submit_chunk("b1", jobs("a", "b"))
    await store.submit_chunk("b1", jobs("c"))
    ja, jc = job_id_for("b1", "a"), job_id_for("b1", "c")
    await claim(store, ja, "b1", "dead-worker")
    await lapse(store, ja)
    assert (await store.reap())[0] == 1
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.RUNNING] == 0 and st.counts[Status.QUEUED] == 3
    front = await store.redis.zrange(store.queue, 0, 0)  # before b, enqueued with a
    assert front == [arq_job_id(ja, 2).encode()]
    assert await queued_entry(store, jc) is not None
    again = await claim(store, ja, "b1", "w2")
    assert again.state == "running" and again.runs == 2


async def test_renew_keeps_live_leases(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    c = await claim(store, jid, "b1", "w")
    lost, _ = await store.renew([(jid, c.token), ("not-leased", "1")])
    assert lost == ["not-leased"]
    assert (await store.reap())[0] == 0
    assert await store.redis.zscore(keys.LEASES, "not-leased") is None


async def test_an_outage_longer_than_the_lease_re_runs_nothing(store: Store) -> None:
    """Regression (issue 8): after a Redis outage longer than the lease, the first worker back
    reaped every live job. A gap in renewals now extends the leases instead."""
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    store.configure(lease_ms=2_000)
    c = await claim(store, jid, "b1", "w1")
    await store.renew([(jid, c.token)])
    # Nobody renewed for 10 s, five leases (as if Redis had been down): move the last renewal
    # and its deadline 10 s into the past.
    last = int(await store.redis.get(keys.CLOCK)) - 10_000
    await store.redis.set(keys.CLOCK, last)
    await store.redis.zadd(keys.LEASES, {jid: last + 2_000})
    reaped, gap = await store.reap()  # another worker came back first
    assert reaped == 0 and gap >= 10_000
    lost, _ = await store.renew([(jid, c.token)])
    assert lost == []


async def test_max_runs_exhausted(store: Store) -> None:
    store.configure(max_runs=2)
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    for _ in range(2):
        assert (await claim(store, jid, "b1", "w")).state == "running"
        await lapse(store, jid)
        assert (await store.reap())[0] == 1
    third = await claim(store, jid, "b1", "w3")
    assert third.state == "exhausted" and third.runs == 3 and third.job is not None
    assert await store.finish(final(store, "b1", "a", Status.FAILED), third.token) == 1


async def test_release_puts_job_back_without_counting_the_run(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    c = await claim(store, jid, "b1", "w")
    assert await store.release(jid, c.token)
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.QUEUED] == 1 and st.counts[Status.RUNNING] == 0
    assert await queued_entry(store, jid) is not None
    assert await store.redis.zscore(keys.LEASES, jid) is None
    c2 = await claim(store, jid, "b1", "w")
    assert c2.runs == 1
    await store.finish(final(store, "b1", "a", Status.SUCCEEDED), c2.token)
    assert not await store.release(jid, c2.token)  # final stays final


async def test_retry_requeues_failed_jobs_as_new_attempts(store: Store) -> None:
    await store.submit_chunk("b1", jobs("a", "b", "c"))
    await store.seal("b1")
    ids = {c: job_id_for("b1", c) for c in "abc"}
    for c, status in [("a", Status.FAILED), ("b", Status.SUCCEEDED)]:
        cl = await claim(store, ids[c], "b1", "w")
        await store.finish(final(store, "b1", c, status), cl.token)
    await store.cancel("b1", [ids["c"]])
    assert await store.retry("b1", ids.values(), [Status.FAILED]) == 1
    st = await store.batch_status("b1")
    assert st is not None and not st.finished
    assert st.counts[Status.QUEUED] == 1 and st.counts[Status.FAILED] == 0
    assert st.counts[Status.CANCELLED] == 1 and st.counts[Status.SUCCEEDED] == 1
    aid = await queued_entry(store, ids["a"])
    assert aid == arq_job_id(ids["a"], 2)
    payload = json.loads(await store.redis.get(keys.ARQ_JOB_PREFIX + aid))
    assert payload["a"] == [ids["a"], "b1", "2"]
    (rec,) = await store.records("b1", [ids["a"]])
    assert rec.status == Status.QUEUED and rec.output is None
    assert await store.retry("b1", ids.values(), [Status.FAILED, Status.CANCELLED]) == 1


async def test_arq_cleanup_of_an_earlier_run_cannot_lose_a_retry(store: Store) -> None:
    """Regression (issue 8, 1): retry re-queued the same arq id, and arq's finish_job for the
    earlier (failed or cancelled) run then deleted its payload and queue entry."""
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    c = await claim(store, jid, "b1", "w")
    await store.finish(final(store, "b1", "a", Status.FAILED), c.token)
    assert await store.retry("b1", [jid], [Status.FAILED]) == 1
    old = arq_job_id(jid, 1)  # what arq's finish_job of the first run deletes, late
    await store.redis.delete(keys.ARQ_JOB_PREFIX + old, keys.ARQ_IN_PROGRESS_PREFIX + old)
    await store.redis.zrem(store.queue, old)
    aid = await queued_entry(store, jid)
    assert aid is not None and await store.redis.exists(keys.ARQ_JOB_PREFIX + aid)
    assert (await store.claim(jid, "b1", "w", "1")).state == "stale"
    assert (await claim(store, jid, "b1", "w")).state == "running"


async def test_reconciler_rebuilds_lost_queue_entries_and_leases(store: Store) -> None:
    """Whatever deleted arq's keys or a lease, the next sweep gives the job back a way to run."""
    await store.submit_chunk("b1", jobs("a", "b", "c"))
    ja, jb, jc = (job_id_for("b1", x) for x in "abc")
    await claim(store, jc, "b1", "w")
    await store.redis.delete(keys.ARQ_JOB_PREFIX + arq_job_id(ja, 1))  # payload gone
    await store.redis.zrem(store.queue, arq_job_id(jb, 1))  # queue entry gone
    await store.redis.zrem(keys.LEASES, jc)  # lease gone (Redis lost a second of writes)
    assert await store.reconcile(interval_s=0.001) == (3, 3)
    for jid in (ja, jb, jc):
        aid = await queued_entry(store, jid)
        assert aid is not None and await store.redis.exists(keys.ARQ_JOB_PREFIX + aid)
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.QUEUED] == 3 and st.counts[Status.RUNNING] == 0
    await asyncio.sleep(0.01)
    assert await store.reconcile(interval_s=0.001) == (3, 0)  # nothing left to repair


async def test_batch_keys_expire_only_after_the_batch_is_done(store: Store) -> None:
    """Regression (issue 8, 6): TTLs counted from submit; a batch running longer lost its
    queued jobs, and a retry near the end lost the batch hash."""
    await store.submit_chunk("b1", jobs("a", "b"))
    ja, jb = job_id_for("b1", "a"), job_id_for("b1", "b")
    for key in (keys.job(ja), keys.batch("b1"), keys.batch_order("b1")):
        assert await store.redis.ttl(key) == -1  # active: nothing expires
    c = await claim(store, ja, "b1", "w")
    await store.finish(final(store, "b1", "a", Status.FAILED), c.token)
    assert await store.redis.ttl(keys.batch("b1")) == -1  # b still queued
    await store.cancel("b1", [jb])
    assert 0 < await store.redis.ttl(keys.batch("b1")) <= store.ttl
    while await store.sweep():
        pass
    assert 0 < await store.redis.ttl(keys.job(ja)) <= store.ttl
    assert await store.retry("b1", [ja, jb], [Status.FAILED]) == 1
    for key in (keys.job(ja), keys.job(jb), keys.batch("b1"), keys.batch_order("b1")):
        assert await store.redis.ttl(key) == -1  # active again: the whole batch is kept


async def test_trim_index_drops_expired_batches(store: Store) -> None:
    await store.redis.zadd(keys.BATCHES, {"old": 1, "kept": 2})
    await store.redis.hset(keys.batch("kept"), "total", 0)
    assert await store.trim_index() == 1
    assert await store.redis.zrange(keys.BATCHES, 0, -1) == [b"kept"]


async def test_a_claim_sent_again_after_a_lost_reply_is_the_same_run(store: Store) -> None:
    """redis-py resends a script whose reply was lost: the second delivery must return the
    run the first one started, not 'busy' (which left the job running with nobody on it)."""
    await store.submit_chunk("b1", jobs("a"))
    jid = job_id_for("b1", "a")
    first = _reply(await store._run("claim", [jid, "1", "w", now_iso(), "nonce-1"]))
    again = _reply(await store._run("claim", [jid, "1", "w", now_iso(), "nonce-1"]))
    other = _reply(await store._run("claim", [jid, "1", "w2", now_iso(), "nonce-2"]))
    assert first[0] == again[0] == "running" and first[4] == again[4]
    assert other == ["busy"]
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.RUNNING] == 1 and st.counts[Status.QUEUED] == 0


def _reply(raw: Any) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]


async def test_a_job_queued_with_a_metadata_tenant_that_is_no_name_still_runs(
    store: Store,
) -> None:
    """metadata was free-form before tenants: a job queued by an older agentq may carry a
    "tenant" that is not a name (a number, blank, an object). A newer worker runs it as a job
    without a tenant (before: it could not read the job, which failed as invalid_job)."""
    odd: list[Any] = [7, "", " ", {"id": 3}, "t" * 300]
    await store.submit_chunk("b", [AgentJob(custom_id=f"c{i}", input="q") for i in range(5)])
    for i, tenant in enumerate(odd):
        jid = job_id_for("b", f"c{i}")
        spec = {"custom_id": f"c{i}", "input": "q", "metadata": {"tenant": tenant}}
        await store.redis.hset(keys.job(jid), "spec", json.dumps(spec))
        claim = await store.claim(jid, "b", "w", "1")
        assert claim.holds and claim.spec_error is None, claim.spec_error
        assert claim.job is not None and claim.job.tenant is None
