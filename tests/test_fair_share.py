"""Fair share between batches and priorities: the order the real scripts give jobs, taken the
way arq takes them (lowest score first). Hypothesis interleaves submits, starts, finishes,
give-backs and retries over several batches of every priority and checks, after each step, that
same-priority batches take turns, a higher priority goes first, and no job is lost, stranded
or run twice."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

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


def jobs(prefix: str, n: int, tenant: str | None = None) -> list[AgentJob]:
    meta = {"tenant": tenant} if tenant else {}
    return [AgentJob(custom_id=f"{prefix}{i}", input="q", metadata=meta) for i in range(n)]


async def start_next(store: Store) -> tuple[str, Claim] | None:
    """What a worker does: take the lowest due entry of arq's queue and claim it. Returns
    (batch id, claim)."""
    head = await store.redis.zrange(QUEUE, 0, 0)
    if not head:
        return None
    jid, _, q = _s(head[0]).partition(".")
    claim = await store.claim(jid, "", "w", q)
    if claim.holds:  # the job run: with a tenant, whichever of its jobs had the turn
        return claim.batch_id, claim
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


async def test_a_cancelled_batch_retried_takes_turns_from_now(store: Store) -> None:
    """A batch's next place is after its own last one only while it has jobs waiting: a
    cancelled batch retried (or given more jobs) went behind every place it ever handed out,
    after every other batch's work up to there."""
    await store.submit_chunk("big", jobs("b", 200))
    await start_order(store, 5)
    ids = [job_id_for("big", f"b{i}") for i in range(200)]
    await store.flag_cancelled("big")
    await store.cancel("big", ids)
    await store.submit_chunk("other", jobs("o", 50))
    assert await store.retry("big", ids[100:101], [Status.CANCELLED]) == 1
    assert "big" in await start_order(store, 2)  # before: after all 50 of "other"


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


async def test_a_batch_given_more_jobs_at_another_priority_keeps_the_turns(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job moves the fleet's virtual time by its place less its own priority's offset. It
    was its batch's latest offset: a low batch completed at normal priority (submit again with
    the same batch id, --priority forgotten) moved it by the whole offset when an earlier low
    job started, and every batch submitted after that waited behind all queued work."""
    monkeypatch.setitem(store_module._PRIORITY_OFFSET, Priority.LOW, 1000)
    await store.submit_chunk("big", jobs("b", 50))
    await store.submit_chunk("x", jobs("l", 2), Priority.LOW)
    await store.submit_chunk("x", jobs("n", 1))  # the rest of the file, priority forgotten
    assert (await store.claim(job_id_for("x", "l0"), "x", "w", "1")).holds
    await store.submit_chunk("new", jobs("s", 5))
    assert "new" in await start_order(store, 4)  # before: all 50 of "big" first


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


async def test_jobs_queued_by_an_older_agentq_take_turns_once_reconciled(store: Store) -> None:
    """An older agentq placed jobs at clock times, which come after every place: on a busy
    fleet (new batches keep coming) they never started. The reconciler gives them places of
    their batch, as `agentq retry` would, so they take turns with the batches placed since."""
    await store.submit_chunk("old", jobs("o", 5))
    for i in range(5):  # as an agentq before fair share wrote them; o4 given back to the front
        jid = job_id_for("old", f"o{i}")
        await store.redis.hset(keys.job(jid), "score", 1_700_000_000_000 + i)
        await store.redis.zadd(QUEUE, {f"{jid}.1": 1_700_000_000_000 + i - 1e13 * (i == 4)})
    await store.redis.hdel(keys.batch("old"), "vnext", "poff")
    await store.submit_chunk("new", jobs("n", 4))
    for _ in range(4):  # a step a batch, whichever it starts with
        await store.reconcile(interval_s=0.001)
        await asyncio.sleep(0.005)
    scores = [s for _, s in await store.redis.zrange(QUEUE, 0, -1, withscores=True)]
    assert len(scores) == 9 and all(s < 1e12 for s in scores)
    started = await start_next(store)
    assert started is not None and started[1].custom_id == "o4"  # still at the front
    order = await start_order(store, 8)
    assert sorted(order) == ["new"] * 4 + ["old"] * 4
    assert order[:4].count("old") == 2, order  # turns (before: every "new" job came first)


async def test_a_job_arq_deferred_gets_its_place_back_once_due(store: Store) -> None:
    """arq defers a job whose claim met a Redis error to a clock time, after every place: on a
    busy fleet it never started again. Once due, the reconciler puts it back at its place."""
    await store.submit_chunk("a", jobs("a", 1))
    jid = job_id_for("a", "a0")
    sec, usec = await store.redis.time()
    await store.redis.zadd(QUEUE, {f"{jid}.1": sec * 1000 + usec // 1000 - 1})  # due now
    await store.submit_chunk("b", jobs("b", 3))
    for _ in range(2):  # a step a batch, whichever it starts with
        await store.reconcile(interval_s=0.001)
        await asyncio.sleep(0.005)
    assert (await start_order(store, 4))[0] == "a"  # before: after every job of "b"


# -- tenants -----------------------------------------------------------------------------------


def _flow(batch: str) -> str:
    """The tenant the tests below give a batch: its name up to the digit ("a1" -> "a"); a
    batch "u…" has none."""
    return batch.rstrip("0123456789")


async def test_tenants_take_turns_above_batches(store: Store) -> None:
    """Tenant a's three batches get a's turns between them, one turn each a round with tenant
    b and with each batch without a tenant (before: five batches, five equal turns, so a
    tenant got as many turns as it submitted batches)."""
    for batch in ("a1", "a2", "a3"):
        await store.submit_chunk(batch, jobs(batch, 60, tenant="a"))
    await store.submit_chunk("b1", jobs("b1", 60, tenant="b"))
    await store.submit_chunk("u1", jobs("u1", 60))
    order = await start_order(store, 90)
    flows = [_flow(b) for b in order]
    for i in range(1, 91):  # tenants a, b and batch u1 take turns
        counts = [flows[:i].count(f) for f in ("a", "b", "u")]
        assert max(counts) - min(counts) <= 1, (i, flows)
    mine = [b for b in order if _flow(b) == "a"]
    for i in range(1, len(mine) + 1):  # and a's batches take turns within a's
        counts = [mine[:i].count(b) for b in ("a1", "a2", "a3")]
        assert max(counts) - min(counts) <= 1, (i, mine)


async def test_a_tenants_small_batch_behind_its_big_one_takes_turns(store: Store) -> None:
    await store.submit_chunk("a1", jobs("a1", 200, tenant="a"))
    await store.submit_chunk("b1", jobs("b1", 200, tenant="b"))
    assert set(await start_order(store, 10)) == {"a1", "b1"}
    await store.submit_chunk("a2", jobs("a2", 10, tenant="a"))
    order = await start_order(store, 40)
    mine = [b for b in order if _flow(b) == "a"]
    assert mine.count("a2") == 10 and order.count("b1") == 20, order
    for i in range(1, 21):
        assert abs(mine[:i].count("a1") - mine[:i].count("a2")) <= 1, mine


async def test_a_tenants_jobs_of_one_batch_start_in_input_order(store: Store) -> None:
    await store.submit_chunk("a1", jobs("j", 20, tenant="a"))
    await store.submit_chunk("a1", jobs("k", 5, tenant="a"))
    cids = []
    for _ in range(25):
        started = await start_next(store)
        assert started is not None
        cids.append(started[1].custom_id)
    assert cids == [f"j{i}" for i in range(20)] + [f"k{i}" for i in range(5)]


async def test_a_claim_sent_again_gets_the_run_the_tenants_turn_gave(store: Store) -> None:
    """The claim of a tenant's queue entry may run another of its jobs; the same claim sent
    again (its reply lost) must get that run, not 'stale' (which would leave the run to its
    lease, a run counted for nothing)."""
    await store.submit_chunk("a1", jobs("x", 2, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 1, tenant="a"))
    # the tenant's places, in order: x0, x1, y0; among its batches y0 comes before x1
    entries = [_s(e) for e in await store.redis.zrange(QUEUE, 0, -1)]
    assert len(entries) == 3
    first = await start_next(store)
    assert first is not None and first[1].custom_id == "x0"
    # a worker takes the next entry (x1's): the turn is y0's
    jid, _, q = entries[1].partition(".")
    assert jid == job_id_for("a1", "x1")
    args = [jid, q, "w", now_iso(), "nonce-1"]
    one = await store._run("claim", args)
    again = await store._run("claim", args)
    assert _s(one[5]) == _s(again[5]) == job_id_for("a2", "y0")
    assert _s(one[4]) == _s(again[4])  # the same run: the same fencing token
    st = await store.batch_status("a1")
    assert st is not None and st.counts[Status.QUEUED] == 1  # x1 waits at y0's old place
    started = await start_next(store)
    assert started is not None and started[1].custom_id == "x1"


async def test_a_tenants_job_given_back_starts_first_again(store: Store) -> None:
    await store.submit_chunk("a1", jobs("x", 3, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 3, tenant="a"))
    first = await start_next(store)
    assert first is not None
    claim = first[1]
    assert await store.release(claim.job_id, claim.token)
    again = await start_next(store)
    assert again is not None and again[1].job_id == claim.job_id


async def test_a_cancelled_tenant_batch_leaves_its_tenants_turns(store: Store) -> None:
    await store.submit_chunk("a1", jobs("x", 30, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 5, tenant="a"))
    ids = [job_id_for("a1", f"x{i}") for i in range(30)]
    await store.flag_cancelled("a1")
    await store.cancel("a1", ids)
    members = {_s(m) for m in await store.redis.zrange(keys.TENANT_QUEUE_PREFIX + "0:a", 0, -1)}
    assert members == {job_id_for("a2", f"y{i}") for i in range(5)}
    assert await start_order(store, 5) == ["a2"] * 5


async def test_a_claim_sent_again_gets_its_run_after_the_moved_job_was_taken(
    store: Store,
) -> None:
    """The turn ran y0 on x1's entry and moved x1 to y0's place, where another worker may
    take it before the first claim is sent again: the resent claim must still get y0's run
    (before: 'busy', and y0 waited out its lease with nobody running it, a run counted)."""
    await store.submit_chunk("a1", jobs("x", 2, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 1, tenant="a"))
    entries = [_s(e) for e in await store.redis.zrange(QUEUE, 0, -1)]
    first = await start_next(store)
    assert first is not None and first[1].custom_id == "x0"
    jid, _, q = entries[1].partition(".")
    args = [jid, q, "w", now_iso(), "nonce-1"]
    one = await store._run("claim", args)
    assert _s(one[5]) == job_id_for("a2", "y0")
    other = await start_next(store)  # another worker takes x1 at y0's old place
    assert other is not None and other[1].holds and other[1].custom_id == "x1"
    again = await store._run("claim", args)
    assert _s(again[0]) == "running" and _s(again[5]) == job_id_for("a2", "y0")
    assert _s(again[4]) == _s(one[4])  # the same run: the same fencing token


async def test_a_tenants_batch_given_jobs_at_another_priority_takes_turns_there(
    store: Store,
) -> None:
    """A batch's place among its tenant's batches is counted per priority, as the tenant's
    own virtual time is: a1's normal jobs queued must not push its high ones behind a2's
    (before: a1's high jobs came after all of a2's, placed from a1's normal count)."""
    await store.submit_chunk("a1", jobs("n", 20, tenant="a"))
    await store.submit_chunk("a1", jobs("h", 3, tenant="a"), Priority.HIGH)
    await store.submit_chunk("a2", jobs("k", 10, tenant="a"), Priority.HIGH)
    order = await start_order(store, 6)
    assert order.count("a1") == 3, order


async def test_a_tenants_cancelled_batch_leaves_no_gap_in_its_turns(store: Store) -> None:
    """Cancelling a tenant's big batch gives its places to the tenant's other jobs: a2 takes
    a's turns with b at once (before: a2 sat at the places after all of a1's, and b ran 30
    times first)."""
    await store.submit_chunk("a1", jobs("x", 30, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 5, tenant="a"))
    await store.submit_chunk("b1", jobs("z", 30, tenant="b"))
    await store.flag_cancelled("a1")
    await store.cancel("a1", [job_id_for("a1", f"x{i}") for i in range(30)])
    flows = [_flow(b) for b in await start_order(store, 10)]
    assert flows.count("a") == 5, flows


async def test_a_tenants_place_left_by_an_older_cancel_does_not_keep_the_gap(
    store: Store,
) -> None:
    """A job an agentq without places by tenant took out of the queue stays in the tenant's
    places set: it is passed over, and the gap a cancel leaves still closes."""
    await store.submit_chunk("a1", jobs("x", 30, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 5, tenant="a"))
    await store.submit_chunk("b1", jobs("z", 30, tenant="b"))
    await store.redis.zadd(keys.TENANT_PLACES_PREFIX + "0:a", {"gone": 1e6})
    await store.cancel("a1", [job_id_for("a1", f"x{i}") for i in range(30)])
    flows = [_flow(b) for b in await start_order(store, 10)]
    assert flows.count("a") == 5, flows
    assert not await store.redis.zscore(keys.TENANT_PLACES_PREFIX + "0:a", "gone")


async def test_a_tenants_jobs_cancelled_at_claim_leave_its_turns(store: Store) -> None:
    """A cancel interrupted after its flag: the rest of a1 is cancelled as workers take it.
    Each of those claims took a turn of tenant a, so a2 got every other one of a's turns
    while b got all of its own (a batch without a tenant loses no other batch's turns)."""
    await store.submit_chunk("a1", jobs("x", 30, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 5, tenant="a"))
    await store.submit_chunk("b1", jobs("z", 30, tenant="b"))
    await store.flag_cancelled("a1")
    runs: list[str] = []
    while len(runs) < 10:
        started = await start_next(store)
        assert started is not None
        if started[1].holds:
            runs.append(started[0])
    assert runs.count("a2") == 5, runs


async def test_a_job_moved_to_a_given_back_place_keeps_its_own_turn_in_its_tenant(
    store: Store,
) -> None:
    """A claim of a tenant's entry taken before a run of the tenant was given back runs that
    one, its job moving to the given-back place at the front. That job's turn among its
    tenant's batches stays its own (before: it became a given-back run there too, and ran on
    the tenant's next turn ahead of a job of an earlier turn)."""
    await store.submit_chunk("a1", jobs("x", 3, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 2, tenant="a"))
    entries = {
        _s(e).partition(".")[0]: _s(e).partition(".")[2]
        for e in await store.redis.zrange(QUEUE, 0, -1)
    }
    first = await start_next(store)
    assert first is not None and first[1].holds
    gave = first[1]
    assert await store.release(gave.job_id, gave.token)  # back at the front
    y1 = job_id_for("a2", "y1")  # its entry, taken before the give-back, claimed now
    taken = await store.claim(y1, "a2", "w", entries[y1])
    assert taken.holds and taken.job_id == gave.job_id
    nxt = await start_next(store)  # the front place, y1's now: the tenant's next turn
    assert nxt is not None and nxt[1].holds
    lscore = await store.redis.hget(keys.job(nxt[1].job_id), "lscore")
    assert _s(lscore) == "1", nxt[1].custom_id  # x0 or y0, whichever had not run


@pytest.mark.parametrize("missing", ["x1", "y0"])
async def test_a_tenants_turn_with_a_job_missing_its_place_runs_without_error(
    store: Store, missing: str
) -> None:
    """A job hash without its 'score' (odd data) must not make the claim of a tenant's entry
    fail halfway (before: a Lua error after both jobs had left arq's queue, and each retry of
    the claim the same)."""
    await store.submit_chunk("a1", jobs("x", 2, tenant="a"))
    await store.submit_chunk("a2", jobs("y", 1, tenant="a"))
    first = await start_next(store)
    assert first is not None and first[1].custom_id == "x0"
    batch = "a1" if missing.startswith("x") else "a2"
    await store.redis.hdel(keys.job(job_id_for(batch, missing)), "score")
    started = await start_next(store)
    assert started is not None and started[1].holds
    rest = await start_next(store)
    assert rest is not None and rest[1].holds
    assert {started[1].custom_id, rest[1].custom_id} == {"x1", "y0"}


def test_a_blank_or_non_string_tenant_is_refused() -> None:
    for bad in ("  ", 7, ""):
        with pytest.raises(ValueError, match="tenant"):
            AgentJob.model_validate({"custom_id": "a", "input": "q", "metadata": {"tenant": bad}})


async def test_an_unknown_priority_is_refused_before_anything_is_enqueued(producer: Any) -> None:
    with pytest.raises(ValueError, match="one of high, normal, low"):
        await producer.submit(jobs("x", 1), batch_id="p", priority="urgent")
    assert not await producer.redis.exists(keys.batch("p"))


MACHINE_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
"""Both state machines below: 100 runs of 40 steps each."""


# -- the state machine ------------------------------------------------------------------------

BATCHES = {"h1": Priority.HIGH, "n1": Priority.NORMAL, "n2": Priority.NORMAL, "l1": Priority.LOW}


class _StoreMachine(RuleBasedStateMachine):
    """What both machines share: a store on a flushed database, the runs started, finished
    and given back."""

    url = ""
    batches: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Any = Redis.from_url(self.url)
        self.store = Store(self.redis, queue=QUEUE, result_ttl_s=3600, lease_s=30, max_runs=100)
        self.next_id = dict.fromkeys(self.batches, 0)
        self.running: dict[str, str] = {}  # job id -> token
        self.finals: dict[str, int] = {}
        self.queued: dict[str, set[str]] = {b: set() for b in self.batches}
        self.batch_of: dict[str, str] = {}
        self.front: set[str] = set()
        """Runs given back: they start again before any other job, whatever its priority."""
        self.run(self.redis.flushdb())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

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

    def mark_pairs(self) -> None:
        raise NotImplementedError

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


class FairShareMachine(_StoreMachine):
    batches = BATCHES

    def __init__(self) -> None:
        super().__init__()
        self.since: dict[tuple[str, str], tuple[int, int, int]] = {}
        """For two batches of one priority, both waiting: their starts when both began to."""
        self.starts = dict.fromkeys(BATCHES, 0)

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

    def waiting(self) -> set[str]:
        return {b for b, q in self.queued.items() if q}

    def head(self, batch: str) -> float | None:
        """The lowest place a batch's waiting jobs hold (runs given back aside: they go first
        in any case); None if it has no other."""
        jids = self.queued[batch] - self.front
        return min(float(self.job_field(j, "score")) for j in jids) if jids else None

    def job_field(self, jid: str, name: str) -> str:
        return _s(self.run(self.redis.hget(keys.job(jid), name)))

    def mark_pairs(self) -> None:
        """Start counting turns for every same-priority pair that both wait now. Their heads
        may be some rounds apart then (one batch had already had its turn in the round the
        other still waits in): each round between them is one turn more for the one behind."""
        w = self.waiting()
        for a in w:
            for b in w:
                if a < b and BATCHES[a] == BATCHES[b] and (a, b) not in self.since:
                    ha, hb = self.head(a), self.head(b)
                    if ha is not None and hb is not None:
                        self.since[(a, b)] = (self.starts[a], self.starts[b], abs(ha - hb))
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
        for (a, b), (sa, sb, gap) in self.since.items():
            da, db = self.starts[a] - sa, self.starts[b] - sb
            assert abs(da - db) <= 1 + gap, (a, da, b, db, gap)

    @invariant()
    def waiting_batches_of_one_priority_are_within_a_round(self) -> None:
        """Whoever waits is at most one round behind another of its priority: no batch is
        queued behind another's whole backlog."""
        for p in Priority:
            mine = [self.head(b) for b in self.waiting() if BATCHES[b] == p]
            heads = [h for h in mine if h is not None]
            assert not heads or max(heads) - min(heads) <= 1, (p, heads)

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
        settings=MACHINE_SETTINGS,
    )


# -- the state machine, with tenants ------------------------------------------------------------

TENANT_BATCHES = {
    "a1": ("a", Priority.NORMAL),
    "a2": ("a", Priority.NORMAL),
    "ah": ("a", Priority.HIGH),
    "b1": ("b", Priority.NORMAL),
    "u1": (None, Priority.NORMAL),
}
"""Tenant a has two normal batches and a high one, tenant b one; u1 has no tenant."""


def _top(batch: str) -> str:
    """What takes turns with what at the top: a tenant (per priority), or a batch without."""
    tenant, prio = TENANT_BATCHES[batch]
    return f"{tenant}:{prio.value}" if tenant else batch


class TenantShareMachine(_StoreMachine):
    """Submits, starts, finishes, give-backs, retries and cancels over tenants' batches and
    batches without a tenant. After each step: tenants and batches without a tenant take turns,
    a tenant's batches take turns within its turns, a higher priority goes first, every waiting
    job has exactly one entry in arq's queue and one in its tenant's set, none runs twice."""

    batches = TENANT_BATCHES

    def __init__(self) -> None:
        super().__init__()
        self.starts: dict[str, int] = {}
        """Starts (not of runs given back) per top flow and per batch."""
        self.since: dict[tuple[str, str], tuple[int, int, float]] = {}

    def teardown(self) -> None:
        try:
            while (started := self.run(start_next(self.store))) is not None:
                _, claim = started
                if claim.holds:
                    self.running[claim.job_id] = claim.token
            for jid, token in list(self.running.items()):
                self.run(self._finish_id(jid, token))
            assert all(n == 1 for n in self.finals.values()), self.finals
            assert not self.run(self.redis.keys(keys.TENANT_QUEUE_PREFIX + "*"))
            assert not self.run(self.redis.keys(keys.TENANT_PLACES_PREFIX + "*"))
        finally:
            self.run(self.redis.aclose())
            self.loop.close()

    def field(self, jid: str, name: str) -> float:
        return float(_s(self.run(self.redis.hget(keys.job(jid), name))))

    def waiting_jobs(self, batches: list[str]) -> set[str]:
        return set().union(*(self.queued[b] for b in batches)) - self.front

    def heads(self) -> dict[str, float]:
        """Each flow that waits (not counting runs given back): its lowest place, among all
        flows' ('score') for a top flow, among its tenant's batches ('lscore') for a batch of
        a tenant."""
        out: dict[str, float] = {}
        tops: dict[str, list[str]] = {}
        for b in TENANT_BATCHES:
            tops.setdefault(_top(b), []).append(b)
        for top, batches in tops.items():
            jids = self.waiting_jobs(batches)
            if jids:
                out[top] = min(self.field(j, "score") for j in jids)
        for b, (tenant, _) in TENANT_BATCHES.items():
            jids = self.waiting_jobs([b])
            if tenant and jids:
                out[b] = min(self.field(j, "lscore") for j in jids)
        return out

    def peers(self) -> list[tuple[str, str]]:
        """Pairs that take turns: top flows of one priority; batches of one tenant and
        priority."""
        tops = sorted({_top(b) for b in TENANT_BATCHES})
        prio = {_top(b): p for b, (_, p) in TENANT_BATCHES.items()}
        pairs = [(x, y) for x in tops for y in tops if x < y and prio[x] == prio[y]]
        tenanted = sorted(b for b, (t, _) in TENANT_BATCHES.items() if t)
        pairs += [(x, y) for x in tenanted for y in tenanted if x < y and _top(x) == _top(y)]
        return pairs

    def mark_pairs(self) -> None:
        heads = self.heads()
        for x, y in self.peers():
            if x in heads and y in heads:
                if (x, y) not in self.since:
                    gap = abs(heads[x] - heads[y])
                    self.since[(x, y)] = (self.starts.get(x, 0), self.starts.get(y, 0), gap)
            else:
                self.since.pop((x, y), None)

    @rule(batch=st.sampled_from(sorted(TENANT_BATCHES)), n=st.integers(1, 6))
    def submit(self, batch: str, n: int) -> None:
        tenant, prio = TENANT_BATCHES[batch]
        k = self.next_id[batch]
        self.next_id[batch] += n
        new = jobs(f"{batch}-", k + n, tenant)[k:]
        assert self.run(self.store.submit_chunk(batch, new, prio)) == n
        ids = {job_id_for(batch, j.custom_id) for j in new}
        self.queued[batch] |= ids
        self.batch_of |= dict.fromkeys(ids, batch)
        self.mark_pairs()

    @rule()
    def start(self) -> None:
        waiting = {b for b, q in self.queued.items() if q}
        started = self.run(start_next(self.store))
        if started is None:
            assert not waiting, "jobs wait with nothing in arq's queue"
            return
        batch, claim = started
        assert claim.holds, claim.state
        jid = claim.job_id
        assert jid in self.queued[batch] and jid not in self.running, "started twice"
        self.queued[batch].discard(jid)
        self.running[jid] = claim.token
        if jid in self.front:
            self.front.discard(jid)
        else:
            rank = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
            mine = rank[TENANT_BATCHES[batch][1]]
            assert all(rank[TENANT_BATCHES[b][1]] >= mine for b in waiting), (batch, waiting)
            for flow in {_top(batch), batch}:
                self.starts[flow] = self.starts.get(flow, 0) + 1
        self.mark_pairs()

    @rule(batch=st.sampled_from(sorted(TENANT_BATCHES)))
    def retry(self, batch: str) -> None:
        for jid in [j for j, n in self.finals.items() if n and self.batch_of[j] == batch]:
            if self.run(self.store.retry(batch, [jid], [Status.SUCCEEDED])):
                self.finals[jid] = 0
                self.queued[batch].add(jid)
        self.mark_pairs()

    @rule(batch=st.sampled_from(sorted(TENANT_BATCHES)))
    def cancel(self, batch: str) -> None:
        """`agentq cancel`'s cancel script over the batch's jobs (not the flag: jobs
        submitted in the same millisecond would count as before it)."""
        ids = sorted(j for j, b in self.batch_of.items() if b == batch)
        self.run(self.store.cancel(batch, ids))
        for jid in ids:
            if jid in self.queued[batch] or jid in self.running:
                self.queued[batch].discard(jid)
                self.running.pop(jid, None)
                self.front.discard(jid)
                self.finals[jid] = self.finals.get(jid, 0) + 1
        self.mark_pairs()

    @invariant()
    def peers_take_turns(self) -> None:
        for (x, y), (sx, sy, gap) in self.since.items():
            dx, dy = self.starts.get(x, 0) - sx, self.starts.get(y, 0) - sy
            assert abs(dx - dy) <= 1 + gap, (x, dx, y, dy, gap)

    @invariant()
    def every_waiting_job_has_one_entry_in_the_queue_and_its_tenants_set(self) -> None:
        entries = [_s(e).partition(".")[0] for e in self.run(self.redis.zrange(QUEUE, 0, -1))]
        waiting = set().union(*self.queued.values())
        assert sorted(entries) == sorted(waiting)
        sets: dict[str, set[str]] = {}
        for jid in waiting:
            tenant, prio = TENANT_BATCHES[self.batch_of[jid]]
            if tenant:
                offset = store_module._PRIORITY_OFFSET[prio]
                sets.setdefault(f"{keys.TENANT_QUEUE_PREFIX}{offset}:{tenant}", set()).add(jid)
        for prefix in (keys.TENANT_QUEUE_PREFIX, keys.TENANT_PLACES_PREFIX):
            stored = {
                keys.TENANT_QUEUE_PREFIX + _s(k)[len(prefix) :]: {
                    _s(m) for m in self.run(self.redis.zrange(k, 0, -1))
                }
                for k in self.run(self.redis.keys(prefix + "*"))
            }
            assert stored == sets, prefix
        assert all(n <= 1 for n in self.finals.values()), self.finals


def test_tenant_share_state_machine(redis_url: str) -> None:
    TenantShareMachine.url = redis_url
    run_state_machine_as_test(
        TenantShareMachine,
        settings=MACHINE_SETTINGS,
    )
