"""Queues share one Redis but not their jobs: a batch stays in the queue it was submitted to.
Leases, the repair sweep, fair share's clock and tenant turns are kept per queue, so one
queue's workers never reap, repair or place another queue's jobs (into their own queue, where
workers with other tools or models would run them). Once on fakeredis, once on the server."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import redis as redis_sync

from producer import keys
from producer.cli_show import print_summary, status_dict
from producer.client import Producer
from producer.models import AgentJob, Status, job_id_for
from producer.settings import ConfigError, load_settings
from producer.store import Store
from tests.procs import agentq, base_env, start_sim, start_worker, stop, until
from tests.test_store import claim, final, jobs, queued_entry

OTHER = "agentq:queue:b"


@pytest.fixture
def other(store: Store) -> Store:
    """A store of another queue on the same Redis."""
    return Store(store.redis, queue=OTHER, result_ttl_s=3600)


def ids(batch: str, *custom_ids: str) -> list[str]:
    return [job_id_for(batch, c) for c in custom_ids]


async def entries(store: Store) -> int:
    return int(await store.redis.zcard(store.queue))


async def reconcile_all(store: Store) -> None:
    """Steps of the store's repair sweep until it went round the active batches."""
    for _ in range(10):
        await store.redis.delete(keys.of_queue(keys.RECONCILE_LOCK, store.queue))
        await store.reconcile(interval_s=0.001)


async def test_key_names_of_a_queue() -> None:
    assert keys.of_queue(keys.LEASES, keys.DEFAULT_QUEUE) == keys.LEASES
    assert keys.of_queue(keys.LEASES, OTHER) == f"{keys.LEASES}@{OTHER}|"
    # a prefix keeps ':' last, and no default-queue key (any tenant name) starts like it
    tq = keys.of_queue(keys.TENANT_QUEUE_PREFIX, OTHER)
    assert tq.endswith(":") and not tq.startswith(keys.TENANT_QUEUE_PREFIX)
    with pytest.raises(ConfigError, match=r"AGENTQ_QUEUE: .*may not hold"):
        load_settings(queue="a|b")
    with pytest.raises(ValueError, match="may not hold"):
        Store(None, queue="a|b", result_ttl_s=60)  # type: ignore[arg-type]


async def test_repair_sweep_leaves_other_queues_batches(store: Store, other: Store) -> None:
    """The default queue's sweep found the other queue's jobs "without a queue entry" (in its
    own queue) and enqueued them there: its workers ran them."""
    await other.submit_chunk("bb", jobs("a", "b", "c"))
    await store.submit_chunk("ba", jobs("x"))
    await reconcile_all(store)
    assert await entries(store) == 1
    assert await entries(other) == 3
    for jid in ids("bb", "a", "b", "c"):
        assert await queued_entry(other, jid) is not None
    # its own queue's sweep still repairs it
    await other.redis.delete(*[e async for e in other.redis.scan_iter(f"{keys.ARQ_JOB_PREFIX}*")])
    await reconcile_all(other)
    for jid in ids("bb", "a", "b", "c"):
        assert await queued_entry(other, jid) is not None
    assert await entries(store) == 1


async def lose_entry(store: Store, batch: str, custom_id: str) -> None:
    entry = await queued_entry(store, ids(batch, custom_id)[0])
    await store.redis.delete(f"{keys.ARQ_JOB_PREFIX}{entry}")


async def step(store: Store) -> int:
    """One step of the store's repair sweep; the jobs it repaired."""
    await store.redis.delete(keys.of_queue(keys.RECONCILE_LOCK, store.queue))
    return int((await store.reconcile(interval_s=0.001))[1])


async def seventy_then_mine(store: Store, other: Store) -> None:
    """70 batches of the other queue, then one of this queue whose job lost its payload; their
    places in the active set in that order."""
    for i in range(70):
        await other.submit_chunk(f"b{i:02}", jobs("a"))
        await store.redis.zadd(keys.ACTIVE, {f"b{i:02}": i}, xx=True)
    await store.submit_chunk("mine", jobs("a"))
    await store.redis.zadd(keys.ACTIVE, {"mine": 1000}, xx=True)
    await lose_entry(store, "mine", "a")


async def test_skips_64_foreign_batches_a_step(store: Store, other: Store) -> None:
    await seventy_then_mine(store, other)
    assert await step(store) == 0  # 64 skipped: parked at the 65th
    assert await step(store) == 1
    assert await entries(store) == 1 and await entries(other) == 70


async def test_the_sweep_goes_on_after_its_batch_is_gone(store: Store, other: Store) -> None:
    """Parked at a batch that then ends, the sweep goes on from the next, not from the first
    (with many long batches of other queues in front it would never reach its own)."""
    await seventy_then_mine(store, other)
    assert await step(store) == 0
    await store.redis.zrem(keys.ACTIVE, "b64")
    assert await step(store) == 1


async def test_a_batch_from_before_queues_is_the_default_queue(store: Store, other: Store) -> None:
    """A batch hash without its queue (written before batches named it) is repaired by the
    default queue's sweep only, and the first claim from a queue names it."""
    await store.submit_chunk("old", jobs("a", "b"))
    await store.redis.hdel(keys.batch("old"), "queue")
    await lose_entry(store, "old", "a")
    await reconcile_all(other)
    assert await entries(other) == 0
    await reconcile_all(store)
    assert await queued_entry(store, ids("old", "a")[0]) is not None
    await claim(store, ids("old", "b")[0], "old", "host:1")
    assert await store.redis.hget(keys.batch("old"), "queue") == keys.DEFAULT_QUEUE.encode()


async def test_a_batch_from_before_stays_in_its_queue(store: Store, other: Store) -> None:
    """The default queue's sweep does not pull a batch from before into the default queue
    because its jobs' entries are not there (they are in their own queue)."""
    await other.submit_chunk("old", jobs("a", "b", "c"))
    await store.redis.hdel(keys.batch("old"), "queue")
    await reconcile_all(store)
    assert await entries(store) == 0 and await entries(other) == 3
    for jid in ids("old", "a", "b", "c"):
        assert await queued_entry(other, jid) is not None


async def test_a_queue_keeps_its_own_clock(store: Store, other: Store) -> None:
    """Seeded from the fleet-wide clock, a queue's clock is its own from then on: a busy
    default queue does not push its new batches behind its older ones."""
    await store.redis.set(keys.VCLOCK, 1000)
    await other.submit_chunk("first", jobs("a", "b", "c"))
    await store.redis.set(keys.VCLOCK, 5000)  # the default queue runs on
    await claim(other, ids("first", "a")[0], "first", "host:1")
    await other.submit_chunk("second", jobs("x"))

    async def score(jid: str) -> float:
        return float(await store.redis.hget(keys.job(jid), "score"))

    assert await score(ids("second", "x")[0]) < await score(ids("first", "c")[0])


async def test_a_new_queue_places_after_the_fleet_clock(store: Store, other: Store) -> None:
    """Jobs an older agentq placed on the fleet-wide clock do not wait behind a queue's new
    ones: a queue without a clock of its own goes on from it."""
    await store.redis.set(keys.VCLOCK, 50_000)
    await other.submit_chunk("bb", jobs("a"))
    score = float(await store.redis.hget(keys.job(ids("bb", "a")[0]), "score"))
    assert score > 50_000


async def test_reap_puts_a_job_back_in_its_own_queue(store: Store, other: Store) -> None:
    await other.submit_chunk("bb", jobs("a"))
    (jid,) = ids("bb", "a")
    await claim(other, jid, "bb", "host:1")
    await store.reap()  # the default queue's workers neither see nor reap it
    await store.redis.zadd(keys.of_queue(keys.LEASES, OTHER), {jid: 1}, xx=True)
    assert await store.reap() == (0, 0)
    assert (await store.records("bb", [jid]))[0].status is Status.RUNNING
    assert (await other.reap())[0] == 1
    assert await queued_entry(other, jid) is not None
    assert await entries(store) == 0


async def test_lost_lease_repair_stays_in_the_queue(store: Store, other: Store) -> None:
    await other.submit_chunk("bb", jobs("a"))
    (jid,) = ids("bb", "a")
    await claim(other, jid, "bb", "host:1")
    await other.redis.zrem(keys.of_queue(keys.LEASES, OTHER), jid)  # lease lost
    await reconcile_all(store)
    assert (await store.records("bb", [jid]))[0].status is Status.RUNNING
    await reconcile_all(other)
    assert await queued_entry(other, jid) is not None and await entries(store) == 0


async def test_more_jobs_for_a_batch_of_another_queue_are_refused(
    store: Store, other: Store
) -> None:
    await other.submit_chunk("bb", jobs("a"))
    with pytest.raises(ValueError, match=f"submitted to queue {OTHER}.*AGENTQ_QUEUE={OTHER}"):
        await store.submit_chunk("bb", jobs("b"))
    st = await store.batch_status("bb")
    assert st is not None and st.total == 1 and await entries(store) == 0


async def test_retry_and_cancel_act_in_the_batch_queue(store: Store, other: Store) -> None:
    """A producer of the default queue retries and cancels a batch of another queue there."""
    await other.submit_chunk("bb", jobs("a", "b"))
    await other.seal("bb")
    a = ids("bb", "a")[0]
    c = await claim(other, a, "bb", "host:1")
    await other.finish(final(other, "bb", "a", Status.FAILED), c.token)
    p = Producer(store.redis, load_settings())
    assert await p.retry("bb") == 1
    assert await queued_entry(other, a) is not None and await entries(store) == 0
    assert await p.cancel("bb") == 2
    assert await entries(other) == 0
    st = await p.status("bb")
    assert st.counts[Status.CANCELLED] == 2


async def test_tenant_turns_are_per_queue(store: Store, other: Store) -> None:
    """A tenant's jobs in two queues: each queue's claims run that queue's jobs in turn, and
    leave the other queue's turns alone."""

    def tenant_jobs(*cs: str) -> list[AgentJob]:
        return [AgentJob(custom_id=c, input="q", metadata={"tenant": "t"}) for c in cs]

    await other.submit_chunk("bb", tenant_jobs("a", "b", "c"))
    await store.submit_chunk("ba", tenant_jobs("x", "y"))
    tq_other = keys.of_queue(keys.TENANT_QUEUE_PREFIX, OTHER) + "0:t"
    assert await store.redis.zcard(tq_other) == 3
    ran: list[str] = []
    for jid in ids("ba", "x", "y"):
        got = await claim(store, jid, "ba", "host:1")
        ran.append(got.job_id)
    assert sorted(ran) == sorted(ids("ba", "x", "y"))
    assert await store.redis.zcard(tq_other) == 3
    assert await entries(other) == 3


async def test_status_names_the_batch_queue(store: Store, other: Store) -> None:
    await other.submit_chunk("bb", jobs("a"))
    st = await store.batch_status("bb")
    assert st is not None and st.queue == OTHER
    out = io.StringIO()
    print_summary(st, out)
    assert f"queue {OTHER}" in out.getvalue() and status_dict(st)["queue"] == OTHER
    await store.submit_chunk("ba", jobs("a"))
    st = await store.batch_status("ba")
    assert st is not None and st.queue == keys.DEFAULT_QUEUE
    out = io.StringIO()
    print_summary(st, out)
    assert "\nqueue " not in out.getvalue()  # the default queue goes unsaid


async def test_depth_counts_the_queue_own_leases(store: Store, other: Store) -> None:
    await other.submit_chunk("bb", jobs("a", "b"))
    await claim(other, ids("bb", "a")[0], "bb", "host:1")
    assert await store.depth() == (0, 0)
    assert await other.depth() == (1, 1)


async def test_submit_checks_the_queue_own_workers(store: Store) -> None:
    """Only the queue's workers run its jobs: a tool that only another queue's workers have
    is refused at submit."""
    now = time.time()
    beats = {
        "a:1": {"queue": keys.DEFAULT_QUEUE, "tools": ["calculator"], "seen_at": now},
        "b:1": {"queue": OTHER, "tools": [], "seen_at": now},
    }
    await store.redis.hset(keys.WORKERS, mapping={k: json.dumps(v) for k, v in beats.items()})
    job = AgentJob(custom_id="j", input="1 + 1", agent={"tools": ["calculator"]})
    here = await Producer(store.redis, load_settings()).checker()
    there = await Producer(store.redis, load_settings(queue=OTHER)).checker()
    assert here(job) is None
    assert "unknown tools ['calculator']" in (there(job) or "")
    # a worker too old to name its queue serves any
    beats["old:1"] = {"tools": ["calculator"], "seen_at": now}
    await store.redis.hset(keys.WORKERS, "old:1", json.dumps(beats["old:1"]))
    assert (await Producer(store.redis, load_settings(queue=OTHER)).checker())(job) is None


@pytest.mark.e2e
def test_workers_run_only_their_queue_jobs(redis_url: str, tmp_path: Path) -> None:
    """Real workers on two queues, jobs submitted to one: all run on that queue's worker. (The
    other's repair sweep, every second here, used to move them into its own queue.)"""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim("--latency-ms", "200")
    env = base_env(redis_url, url, AGENTQ_CONCURRENCY="4", AGENTQ_LEASE_S="3")
    env_b = {**env, "AGENTQ_QUEUE": OTHER}
    mine, theirs = start_worker(env, tmp_path / "a.log"), start_worker(env_b, tmp_path / "b.log")
    try:
        path = tmp_path / "jobs.jsonl"
        path.write_text(
            "".join(f'{{"custom_id": "j{i}", "input": "{i} + 1"}}\n' for i in range(40))
        )
        res = agentq("submit", str(path), env=env_b)
        assert res.returncode == 0, res.stderr
        batch = res.stdout.strip().splitlines()[-1]
        r = redis_sync.Redis.from_url(redis_url)
        until(lambda: int(r.hget(keys.batch(batch), "succeeded") or 0) == 40, 120, "the batch")
        ran_on = {r.hget(keys.job(j), "worker") for j in ids(batch, *(f"j{i}" for i in range(40)))}
        assert {w.decode().rpartition(":")[2] for w in ran_on} == {str(theirs.pid)}
        assert r.zcard(keys.DEFAULT_QUEUE) == 0
    finally:
        stop(mine, theirs, sim)
