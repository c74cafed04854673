"""The job state machine, model-checked: Hypothesis interleaves every transition of the real Lua
scripts on the real Redis server (submit, claim, renew, finish, release, reap, reconcile, retry,
cancel, arq's own clean-up, TTL expiry, lease expiry, clock jumps, a stale run's late writes)
and checks the invariants after each step; at the end the batch is driven to completion."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from producer import keys
from producer.models import AgentJob, Priority, ResultRecord, Status, Usage, job_id_for
from producer.store import Store, arq_job_id, now_iso

BATCH = "model"
CUSTOM_IDS = ["a", "b", "c", "d"]
JOB_IDS = {c: job_id_for(BATCH, c) for c in CUSTOM_IDS}
FINAL = {Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELLED.value}
QUEUE = "agentq:queue"
OTHER = "agentq:queue:other"


@dataclass
class Run:
    """A run a worker believes it holds."""

    job_id: str
    custom_id: str
    token: str


def _s(v: Any) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


class JobStateMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Any = Redis.from_url(self.url)
        self.store = Store(self.redis, queue=QUEUE, result_ttl_s=3600, lease_s=30, max_runs=3)
        self.other = Store(self.redis, queue=OTHER, result_ttl_s=3600, lease_s=30, max_runs=3)
        """Another queue's workers on the same Redis: they never touch this queue's jobs."""
        self.runs: list[Run] = []
        self.finals: dict[str, int] = dict.fromkeys(JOB_IDS.values(), 0)
        """Final transitions seen per job since its last retry (must stay <= 1)."""
        self.damaged: set[str] = set()
        """Jobs whose arq entry or lease a fault deleted, until a full reconcile pass."""
        self.submitted: set[str] = set()
        self.expired = False
        self.run(self.redis.flushdb())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            if not self.expired:
                self.drive_to_completion()
        finally:
            self.run(self.redis.aclose())
            self.loop.close()

    # -- helpers -----------------------------------------------------------------------------

    def job(self, jid: str) -> dict[str, str]:
        raw = self.run(self.redis.hgetall(keys.job(jid)))
        return {_s(k) or "": _s(v) or "" for k, v in raw.items()}

    def record(self, run: Run, status: Status) -> ResultRecord:
        return ResultRecord(
            custom_id=run.custom_id,
            job_id=run.job_id,
            batch_id=BATCH,
            status=status,
            usage=Usage(requests=1, input_tokens=3, output_tokens=2, total_tokens=5),
            cost_usd=0.5,
            finished_at=now_iso(),
        )

    def snapshot(self, jid: str) -> tuple[Any, ...]:
        return (
            self.job(jid),
            self.run(self.redis.hgetall(keys.batch(BATCH))),
            self.run(self.redis.zrange(QUEUE, 0, -1, withscores=True)),
            self.run(self.redis.zscore(keys.LEASES, jid)),
        )

    def is_stale(self, run: Run) -> bool:
        h = self.job(run.job_id)
        return h.get("status") != "running" or h.get("fence") != run.token

    def reconcile_all(self) -> None:
        """Full passes of the repair sweep (the lock cleared: as if the interval passed)."""
        for _ in range(3):
            self.run(self.redis.delete(keys.RECONCILE_LOCK))
            self.run(self.store.reconcile(limit=100, interval_s=0.001))
        self.damaged.clear()

    def drive_to_completion(self) -> None:
        """Whatever happened, the batch completes with one final record per job."""
        self.reconcile_all()
        for _ in range(50):
            jobs = [self.job(j) for j in self.submitted]
            if all(h.get("status") in FINAL for h in jobs if h):
                break
            entries = self.run(self.redis.zrange(QUEUE, 0, -1))
            for aid in entries:
                jid, _, q = _s(aid).partition(".")  # type: ignore[union-attr]
                claim = self.run(self.store.claim(jid, BATCH, "driver", q))
                if claim.holds:
                    run = Run(jid, claim.custom_id, claim.token)
                    assert (
                        self.run(self.store.finish(self.record(run, Status.SUCCEEDED), run.token))
                        == 1
                    )
                    self.finals[jid] += 1
                self.run(self.redis.zrem(QUEUE, aid))  # arq's own clean-up after the run
            self.run(self.redis.zadd(keys.LEASES, {j: 1 for j in self.submitted}, xx=True))
            self.run(self.store.reap())
            self.reconcile_all()
        self.check_counters()
        for jid in self.submitted:
            h = self.job(jid)
            assert not h or h["status"] in FINAL, f"job {jid} never ended: {h}"
        st = self.run(self.store.batch_status(BATCH))
        assert st is None or st.counts[Status.QUEUED] + st.counts[Status.RUNNING] == 0

    # -- transitions ---------------------------------------------------------------------------

    @initialize(ids=st.lists(st.sampled_from(CUSTOM_IDS), min_size=1, unique=True))
    def submit_first(self, ids: list[str]) -> None:
        self.submit(ids, Priority.NORMAL)

    @rule(
        ids=st.lists(st.sampled_from(CUSTOM_IDS), min_size=1, unique=True),
        priority=st.sampled_from(list(Priority)),
    )
    def submit(self, ids: list[str], priority: Priority) -> None:
        jobs = [AgentJob(custom_id=c, input="q") for c in ids]
        self.run(self.store.submit_chunk(BATCH, jobs, priority))
        if BATCH in self.store.revived:  # as Producer.submit does
            self.store.revived.discard(BATCH)
            self.run(self.store.keep_records(BATCH))
        self.submitted |= {JOB_IDS[c] for c in ids if self.job(JOB_IDS[c])}
        self.expired = False

    @rule(i=st.integers(0, 20))
    def arq_starts_a_job(self, i: int) -> None:
        """What arq does: take an entry from the queue, read its payload, call the function."""
        entries = self.run(self.redis.zrange(QUEUE, 0, -1))
        if not entries:
            return
        aid = _s(entries[i % len(entries)]) or ""
        jid, _, q = aid.partition(".")
        before = self.job(jid)
        claim = self.run(self.store.claim(jid, BATCH, "w", q))
        if claim.holds:
            assert before["status"] == "queued" and before.get("q", "0") == q
            self.runs.append(Run(jid, claim.custom_id, claim.token))
        elif claim.state == "cancelled":
            self.finals[jid] += 1
        elif claim.state == "stale":
            assert before.get("q", "0") != q

    @rule(i=st.integers(0, 20), status=st.sampled_from([Status.SUCCEEDED, Status.FAILED]))
    def finish(self, i: int, status: Status) -> None:
        if not self.runs:
            return
        run = self.runs.pop(i % len(self.runs))
        stale = self.is_stale(run)
        before = self.snapshot(run.job_id)
        result = self.run(self.store.finish(self.record(run, status), run.token))
        if stale:
            assert result != 1 and self.snapshot(run.job_id) == before, "a stale run wrote"
        else:
            assert result == 1
            self.finals[run.job_id] += 1

    @rule(i=st.integers(0, 20))
    def release(self, i: int) -> None:
        if not self.runs:
            return
        run = self.runs.pop(i % len(self.runs))
        stale = self.is_stale(run)
        before = self.snapshot(run.job_id)
        released = self.run(self.store.release(run.job_id, run.token))
        if stale:
            assert not released and self.snapshot(run.job_id) == before, "a stale run released"
        else:
            assert released

    @rule()
    def renew(self) -> None:
        lost, _ = self.run(self.store.renew([(r.job_id, r.token) for r in self.runs]))
        stale = [r for r in self.runs if self.is_stale(r)]
        assert sorted(lost) == sorted(r.job_id for r in stale)
        self.runs = [r for r in self.runs if r not in stale]

    @rule(jid=st.sampled_from(list(JOB_IDS.values())))
    def lease_expires(self, jid: str) -> None:
        self.run(self.redis.zadd(keys.LEASES, {jid: 1}, xx=True))

    @rule(ms=st.integers(20_000, 10_000_000))
    def clock_jumps(self, ms: int) -> None:
        """Nobody renewed for `ms` (an outage, or Redis's clock jumped)."""
        last = self.run(self.redis.get(keys.CLOCK))
        if last is not None:
            self.run(self.redis.set(keys.CLOCK, int(last) - ms))

    @rule()
    def reap(self) -> None:
        self.run(self.store.reap())

    @rule()
    def reconcile_step(self) -> None:
        self.run(self.redis.delete(keys.RECONCILE_LOCK))
        self.run(self.store.reconcile(limit=2, interval_s=0.001))

    @rule()
    def another_queue_reaps_and_repairs(self) -> None:
        self.run(self.other.reap())
        self.run(self.redis.delete(keys.of_queue(keys.RECONCILE_LOCK, OTHER)))
        self.run(self.other.reconcile(limit=2, interval_s=0.001))

    @rule()
    def batch_from_before_queues(self) -> None:
        """The batch hash as an agentq before per-queue keys wrote it: no queue named."""
        self.run(self.redis.hdel(keys.batch(BATCH), "queue"))

    @rule()
    def reconcile_full(self) -> None:
        self.reconcile_all()

    @rule(failed_only=st.booleans())
    def retry(self, failed_only: bool) -> None:
        statuses = [Status.FAILED] if failed_only else [Status.FAILED, Status.CANCELLED]
        n = 0  # as Producer.retry: retry what is allowed, then keep the other records
        for jid in JOB_IDS.values():
            if self.run(self.store.retry(BATCH, [jid], statuses)):
                self.finals[jid] = 0
                n += 1
        if n:
            self.run(self.store.keep_records(BATCH))

    @rule(reach=st.lists(st.sampled_from(list(JOB_IDS.values())), unique=True))
    def cancel(self, reach: list[str]) -> None:
        """`agentq cancel`: the flag, then the jobs; interrupted after `reach` of them."""
        self.run(self.store.flag_cancelled(BATCH))
        for jid in reach:
            if self.run(self.store.cancel(BATCH, [jid])):
                self.finals[jid] += 1

    @rule(jid=st.sampled_from(list(JOB_IDS.values())), k=st.integers(0, 50))
    def arq_cleans_up_an_earlier_run(self, jid: str, k: int) -> None:
        """arq's finish_job for an earlier generation, arriving late. (What is drawn must not
        depend on Redis's state, which Redis's clock makes differ between runs.)"""
        q = int(self.job(jid).get("q", "0") or 0)
        if q < 2:
            return
        old = arq_job_id(jid, 1 + k % (q - 1))
        self.run(self.redis.delete(keys.ARQ_JOB_PREFIX + old, keys.ARQ_IN_PROGRESS_PREFIX + old))
        self.run(self.redis.zrem(QUEUE, old))

    @rule(jid=st.sampled_from(list(JOB_IDS.values())), what=st.sampled_from(["arq", "lease"]))
    def a_fault_deletes_derived_state(self, jid: str, what: str) -> None:
        """Redis lost a write (kill -9 before fsync), arq expired a payload, an operator..."""
        if what == "arq":
            aid = arq_job_id(jid, self.job(jid).get("q", "0"))
            self.run(self.redis.delete(keys.ARQ_JOB_PREFIX + aid))
            self.run(self.redis.zrem(QUEUE, aid))
        else:
            self.run(self.redis.zrem(keys.LEASES, jid))
        self.damaged.add(jid)

    @rule()
    def sweep(self) -> None:
        self.run(self.store.sweep(limit=2))

    @rule()
    def time_passes_beyond_the_ttl(self) -> None:
        """Days pass: sweeps have long run, and every key with a TTL is gone."""
        while self.run(self.store.sweep()):
            pass
        for key in self.run(self.redis.keys("*")):
            if self.run(self.redis.ttl(key)) > 0:
                self.run(self.redis.delete(key))
        for jid in JOB_IDS.values():
            if not self.job(jid):  # gone: a later submit makes a new job of that id
                self.finals[jid] = 0
                self.submitted.discard(jid)
                self.runs = [r for r in self.runs if r.job_id != jid]
        if not self.run(self.redis.exists(keys.batch(BATCH))):
            self.expired = True
        else:  # a queued job's arq payload expires too: the repair sweep rebuilds it
            self.reconcile_all()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def check_counters(self) -> None:
        raw = self.run(self.redis.hgetall(keys.batch(BATCH)))
        text = ("created_at", "queue")
        h = {_s(k): int(float(_s(v) or 0)) for k, v in raw.items() if _s(k) not in text}
        jobs = {jid: self.job(jid) for jid in JOB_IDS.values()}
        existing = {jid: j for jid, j in jobs.items() if j}
        if not raw:
            assert not existing, "job records outlived their batch"
            return
        counts = {s.value: h.get(s.value, 0) for s in Status}
        assert all(v >= 0 for v in counts.values()), counts
        assert sum(counts.values()) == h.get("total", 0) == len(existing), (counts, h)
        for s in Status:
            actual = sum(1 for j in existing.values() if j["status"] == s.value)
            assert counts[s.value] == actual, (
                s,
                counts,
                {k: j["status"] for k, j in existing.items()},
            )

    @invariant()
    def no_job_is_in_another_queue(self) -> None:
        assert not self.run(self.redis.zcard(OTHER))

    @invariant()
    def no_job_is_final_twice(self) -> None:
        assert all(n <= 1 for n in self.finals.values()), self.finals

    @invariant()
    def every_open_job_can_run(self) -> None:
        """A queued job has its current arq entry and payload; a running one has a lease; a
        final one has neither. (Jobs a fault damaged: until the next full reconcile.)"""
        leases = {_s(m) for m in self.run(self.redis.zrange(keys.LEASES, 0, -1))}
        queue = {_s(m) for m in self.run(self.redis.zrange(QUEUE, 0, -1))}
        for jid in JOB_IDS.values():
            h = self.job(jid)
            if not h or jid in self.damaged:
                continue
            aid = arq_job_id(jid, h.get("q", "0"))
            if h["status"] == "queued":
                assert aid in queue and self.run(self.redis.exists(keys.ARQ_JOB_PREFIX + aid))
                assert jid not in leases
            elif h["status"] == "running":
                assert jid in leases and aid not in queue
            else:
                assert jid not in leases and aid not in queue
            ttl = self.run(self.redis.ttl(keys.job(jid)))
            assert h["status"] in FINAL or ttl == -1, "an open job may expire"

    @invariant()
    def nothing_outlives_its_batch_without_a_ttl(self) -> None:
        if self.run(self.redis.exists(keys.batch(BATCH))):
            return
        for jid in JOB_IDS.values():
            assert self.run(self.redis.ttl(keys.job(jid))) != -1


def test_job_state_machine(redis_url: str) -> None:
    JobStateMachine.url = redis_url
    run_state_machine_as_test(
        JobStateMachine,
        settings=settings(
            max_examples=150,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
        ),
    )
