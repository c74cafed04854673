"""Fair share between batches and priorities: the order the real scripts give jobs, taken the
way arq takes them (lowest score first). Hypothesis interleaves submits, starts, finishes,
give-backs and retries over several batches of every priority and checks, after each step, that
same-priority batches take turns, a higher priority goes first, and no job is lost, stranded
or run twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from redis.asyncio import Redis

from producer import keys
from producer import store as store_module
from producer.models import AgentJob, Priority, ResultRecord, Status, job_id_for
from producer.store import Claim, Store, now_iso

QUEUE = "agentq:queue"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def jobs(prefix: str, n: int) -> list[AgentJob]:
    return [AgentJob(custom_id=f"{prefix}{i}", input="q") for i in range(n)]


async def start_next(store: Store) -> tuple[str, Claim] | None:
    """What a worker does: take the lowest due entry of arq's queue and claim it. Returns
    (batch id, claim)."""
    head = await store.redis.zrange(QUEUE, 0, 0)
    if not head:
        return None
    jid, _, q = _s(head[0]).partition(".")
    claim = await store.claim(jid, "", "w", q)
    batch_id, _ = await store.job_owner(jid)
    return batch_id or "", claim


async def start_order(store: Store, n: int) -> list[str]:
    """The batches of the next `n` jobs started, in start order."""
    order = []
    for _ in range(n):
        started = await start_next(store)
        if started is None:
            break
        order.append(started[0])
    return order


async def test_jobs_of_a_batch_start_in_input_order(store: Store) -> None:
    await store.submit_chunk("a", jobs("j", 30))
    await store.submit_chunk("a", jobs("k", 5))  # a second chunk comes after the first
    cids = []
    for _ in range(35):
        started = await start_next(store)
        assert started is not None
        cids.append(started[1].custom_id)
    assert cids == [f"j{i}" for i in range(30)] + [f"k{i}" for i in range(5)]


async def test_a_small_batch_behind_a_big_one_takes_turns(store: Store) -> None:
    await store.submit_chunk("big", jobs("b", 200))
    assert await start_order(store, 30) == ["big"] * 30
    await store.submit_chunk("small", jobs("s", 10))
    order = await start_order(store, 20)
    # FIFO would start 170 more jobs of "big" first; fair share alternates
    assert order.count("small") == 10
    for i in range(1, 21):
        prefix = order[:i]
        assert abs(prefix.count("big") - prefix.count("small")) <= 1, order


async def test_a_retried_job_takes_its_batch_turn(store: Store) -> None:
    await store.submit_chunk("big", jobs("b", 100))
    await store.submit_chunk("other", jobs("o", 1))
    while True:  # run until the other batch's job has started, and fail it
        started = await start_next(store)
        assert started is not None
        if started[0] == "other":
            claim = started[1]
            break
    record = ResultRecord(
        custom_id="o0", job_id=job_id_for("other", "o0"), batch_id="other", status=Status.FAILED
    )
    assert await store.finish(record.model_copy(update={"finished_at": now_iso()}), claim.token)
    assert await store.retry("other", [job_id_for("other", "o0")], [Status.FAILED]) == 1
    assert "other" in await start_order(store, 2)  # not behind the rest of "big"


async def test_high_priority_starts_before_batches_already_queued(store: Store) -> None:
    await store.submit_chunk("big", jobs("b", 100))
    await start_order(store, 3)
    await store.submit_chunk("normal", jobs("n", 20))
    await store.submit_chunk("urgent", jobs("u", 20), Priority.HIGH)
    assert await start_order(store, 20) == ["urgent"] * 20
    st = await store.batch_status("urgent")
    assert st is not None and st.priority == Priority.HIGH
    rest = await start_order(store, 40)
    assert rest.count("normal") == 20  # then the normal ones take turns again


async def test_low_priority_waits_but_is_never_starved(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = 5
    monkeypatch.setitem(store_module._PRIORITY_OFFSET, Priority.LOW, rounds)
    await store.submit_chunk("first", jobs("f", 2))
    await store.submit_chunk("low", jobs("l", 3), Priority.LOW)
    # normal work keeps coming, more of it than the workers start
    order: list[str] = []
    for i in range(30):
        await store.submit_chunk(f"n{i}", jobs("n", 3))
        order += await start_order(store, 2)
        if "low" in order:
            break
    assert "low" in order, order
    # it waited its rounds: every normal batch queued at its submit went first
    assert order.index("low") >= 2


async def test_normal_work_goes_before_a_low_batch_that_runs_alone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(store_module._PRIORITY_OFFSET, Priority.LOW, 1000)
    await store.submit_chunk("low", jobs("l", 50), Priority.LOW)
    assert await start_order(store, 10) == ["low"] * 10  # alone: it runs at once
    await store.submit_chunk("normal", jobs("n", 10))
    assert await start_order(store, 10) == ["normal"] * 10


async def test_a_place_is_never_a_real_time(store: Store) -> None:
    """Places stay below Redis's clock (due at once), and a job arq defers to a real time
    after a Redis error does not move the fleet's virtual time."""
    await store.submit_chunk("a", jobs("a", 3), Priority.LOW)
    scores = [s for _, s in await store.redis.zrange(QUEUE, 0, -1, withscores=True)]
    assert all(s < 1e12 for s in scores)
    jid = job_id_for("a", "a0")
    await store.redis.hset(keys.job(jid), "score", 1_800_000_000_000)  # as before this change
    await store.claim(jid, "a", "w", "1")
    vclock = await store.redis.get(keys.VCLOCK)
    assert vclock is None or float(vclock) < 1e12


async def test_an_unknown_priority_is_refused_before_anything_is_enqueued(producer: Any) -> None:
    with pytest.raises(ValueError, match="one of high, normal, low"):
        await producer.submit(jobs("x", 1), batch_id="p", priority="urgent")
    assert not await producer.redis.exists(keys.batch("p"))


# -- the state machine ------------------------------------------------------------------------

BATCHES = {"h1": Priority.HIGH, "n1": Priority.NORMAL, "n2": Priority.NORMAL, "l1": Priority.LOW}


class FairShareMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Any = Redis.from_url(self.url)
        self.store = Store(self.redis, queue=QUEUE, result_ttl_s=3600, lease_s=30, max_runs=100)
        self.next_id = dict.fromkeys(BATCHES, 0)
        self.running: dict[str, str] = {}  # job id -> token
        self.finals: dict[str, int] = {}
        self.queued: dict[str, set[str]] = {b: set() for b in BATCHES}
        self.since: dict[tuple[str, str], tuple[int, int]] = {}
        """For two batches of one priority, both waiting: their starts when both began to."""
        self.starts = dict.fromkeys(BATCHES, 0)
        self.batch_of: dict[str, str] = {}
        self.front: set[str] = set()
        """Runs given back: they start again before any other job, whatever its priority."""
        self.run(self.redis.flushdb())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:  # everything submitted ends, each job once
            while (started := self.run(start_next(self.store))) is not None:
                batch, claim = started
                self.running[job_id_for(batch, claim.custom_id)] = claim.token
            for jid, token in list(self.running.items()):
                self.run(self._finish_id(jid, token))
            for b in BATCHES:
                st = self.run(self.store.batch_status(b))
                if st is not None:
                    assert st.counts[Status.QUEUED] + st.counts[Status.RUNNING] == 0, st
            assert all(n == 1 for n in self.finals.values()), self.finals
        finally:
            self.run(self.redis.aclose())
            self.loop.close()

    async def _finish_id(self, jid: str, token: str) -> None:
        batch_id, cid = await self.store.job_owner(jid)
        record = ResultRecord(
            custom_id=cid or "",
            job_id=jid,
            batch_id=batch_id or "",
            status=Status.SUCCEEDED,
            finished_at=now_iso(),
        )
        assert await self.store.finish(record, token) == 1
        self.running.pop(jid, None)
        self.finals[jid] = self.finals.get(jid, 0) + 1

    def waiting(self) -> set[str]:
        return {b for b, q in self.queued.items() if q}

    def mark_pairs(self) -> None:
        """Start counting turns for every same-priority pair that both wait now."""
        w = self.waiting()
        for a in w:
            for b in w:
                if a < b and BATCHES[a] == BATCHES[b] and (a, b) not in self.since:
                    self.since[(a, b)] = (self.starts[a], self.starts[b])
        for pair in list(self.since):
            if not set(pair) <= w:
                del self.since[pair]

    @rule(batch=st.sampled_from(sorted(BATCHES)), n=st.integers(1, 6))
    def submit(self, batch: str, n: int) -> None:
        k = self.next_id[batch]
        new = [AgentJob(custom_id=f"{batch}-{i}", input="q") for i in range(k, k + n)]
        self.next_id[batch] += n
        assert self.run(self.store.submit_chunk(batch, new, BATCHES[batch])) == n
        ids = {job_id_for(batch, j.custom_id) for j in new}
        self.queued[batch] |= ids
        self.batch_of |= dict.fromkeys(ids, batch)
        self.mark_pairs()

    @rule()
    def start(self) -> None:
        w = self.waiting()
        started = self.run(start_next(self.store))
        if started is None:
            assert not w, "jobs wait with nothing in arq's queue"
            return
        batch, claim = started
        assert claim.holds
        jid = job_id_for(batch, claim.custom_id)
        assert jid in self.queued[batch] and jid not in self.running, "started twice"
        self.queued[batch].discard(jid)
        self.running[jid] = claim.token
        if jid in self.front:  # its old place: not a new turn
            self.front.discard(jid)
        else:
            # a higher priority goes first (batches here are smaller than PRIORITY_ROUNDS)
            rank = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
            assert all(rank[BATCHES[b]] >= rank[BATCHES[batch]] for b in w), (batch, w)
            self.starts[batch] += 1
        self.mark_pairs()

    @rule(i=st.integers(0, 50))
    def finish(self, i: int) -> None:
        if self.running:
            jid = sorted(self.running)[i % len(self.running)]
            self.run(self._finish_id(jid, self.running[jid]))

    @rule(i=st.integers(0, 50))
    def give_back(self, i: int) -> None:
        """A worker shutting down gives a run back: it goes to the front again."""
        if not self.running:
            return
        jid = sorted(self.running)[i % len(self.running)]
        assert self.run(self.store.release(jid, self.running.pop(jid)))
        self.queued[self.batch_of[jid]].add(jid)
        self.front.add(jid)
        self.mark_pairs()

    @rule(batch=st.sampled_from(sorted(BATCHES)))
    def retry(self, batch: str) -> None:
        done = [j for j, n in self.finals.items() if n and self.batch_of[j] == batch]
        for jid in done:
            if self.run(self.store.retry(batch, [jid], [Status.SUCCEEDED])):
                self.finals[jid] = 0
                self.queued[batch].add(jid)
        self.mark_pairs()

    @invariant()
    def batches_of_one_priority_take_turns(self) -> None:
        for (a, b), (sa, sb) in self.since.items():
            da, db = self.starts[a] - sa, self.starts[b] - sb
            assert abs(da - db) <= 1, (a, da, b, db)

    @invariant()
    def every_waiting_job_is_in_arq_queue(self) -> None:
        entries = {_s(e).partition(".")[0] for e in self.run(self.redis.zrange(QUEUE, 0, -1))}
        waiting = set().union(*self.queued.values())
        assert waiting == entries
        assert all(n <= 1 for n in self.finals.values()), self.finals


def test_fair_share_state_machine(redis_url: str) -> None:
    FairShareMachine.url = redis_url
    run_state_machine_as_test(
        FairShareMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
