"""Script calls made together go out as one pipeline, each keeping its own reply."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import fakeredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import (
    ConnectionError,
    DataError,
    InvalidResponse,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer import keys
from producer.autopipeline import MAX_BYTES, AutoPipeline
from producer.connect import Script
from producer.models import Status
from producer.store import Store
from tests.test_store import final, jobs

COUNT = """
-- KEYS[1]: a counter. ARGV[1]: 'fail' to raise an error after counting, else a value
redis.call('INCR', KEYS[1])
if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end
if ARGV[1] == 'r' then return redis.error_reply('READONLY as a replica would') end
return ARGV[1] .. '!'
"""


async def test_calls_made_together_are_one_pipeline_each_with_its_own_reply(
    store_redis: Any,
) -> None:
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    assert await auto.call(script, ["n"], ["first"]) == b"first!"  # alone: loads the script
    replies = await asyncio.gather(
        *(auto.call(script, ["n"], ["fail" if i == 3 else i]) for i in range(40)),
        return_exceptions=True,
    )
    assert (auto.pipelines, auto.alone) == (1, 1)
    assert int(await store_redis.get("n")) == 41  # every call ran once
    assert isinstance(replies[3], ResponseError) and "asked to fail" in str(replies[3])
    assert [r for i, r in enumerate(replies) if i != 3] == [
        f"{i}!".encode() for i in range(40) if i != 3
    ]


async def test_a_call_alone_and_calls_apart_in_time(store_redis: Any) -> None:
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    assert await auto.call(script, ["n"], ["a"]) == b"a!"
    assert await auto.call(script, ["n"], ["b"]) == b"b!"
    assert (auto.pipelines, auto.alone) == (0, 2)  # nothing to gather
    assert int(await store_redis.get("n")) == 2


async def test_a_call_cancelled_before_it_went_out_is_not_sent(store_redis: Any) -> None:
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    calls = [asyncio.ensure_future(auto.call(script, ["n"], [i])) for i in range(5)]
    await asyncio.sleep(0)  # each call is waiting for the pipeline, not yet sent
    calls[2].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert int(await store_redis.get("n")) == 4


async def test_a_call_cancelled_while_no_connection_was_free_is_not_sent(
    redis_url: str,
) -> None:
    """A claim whose run was cancelled while the bounded pool had no connection free must not
    claim the job afterwards: nothing would run it until its lease ran out."""
    client = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=1))
    try:
        auto, script = AutoPipeline(client), Script(client, COUNT)
        await client.delete("n")
        await script(keys=["n"], args=["load"])
        held = await client.connection_pool.get_connection()
        asked = asyncio.Event()
        get_connection = client.connection_pool.get_connection

        async def asking(*args: Any, **kwargs: Any) -> Any:
            asked.set()
            return await get_connection(*args, **kwargs)

        client.connection_pool.get_connection = asking  # type: ignore[method-assign]
        calls = [asyncio.ensure_future(auto.call(script, ["n"], [i])) for i in range(3)]
        await asked.wait()  # the pipeline waits for the connection
        assert not any(c.done() for c in calls)
        calls[1].cancel()
        await client.connection_pool.release(held)
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert done[0] == b"0!" and isinstance(done[1], asyncio.CancelledError)
        assert done[2] == b"2!"
        assert int(await client.get("n")) == 3  # the load's, and two of the three
    finally:
        await client.aclose()


def on_take(client: Any, hook: Callable[[Any], None]) -> None:
    """Call `hook` with each connection the client takes from its pool, before it is used."""
    get_connection = client.connection_pool.get_connection

    async def taking(*args: Any, **kwargs: Any) -> Any:
        conn = await get_connection(*args, **kwargs)
        hook(conn)
        return conn

    client.connection_pool.get_connection = taking


class HeldReplies:
    """Holds replies read on the client's connections until `go` is set: the commands have
    reached Redis and run, and their callers can be cancelled before the replies come back.
    With `broken`, the first reply read raises that instead."""

    def __init__(self, client: Any, broken: Exception | None = None) -> None:
        self.reading, self.go, self.broken = asyncio.Event(), asyncio.Event(), broken
        self.links: list[Any] = []
        on_take(client, self._hold)

    def _hold(self, conn: Any) -> None:
        if "read_response" not in vars(conn):
            conn.read_response = self._held(conn.read_response)
            self.links.append(conn)

    def _held(self, read: Any) -> Any:
        async def read_response(*args: Any, **kwargs: Any) -> Any:
            self.reading.set()
            await self.go.wait()
            if self.broken is not None:
                broken, self.broken = self.broken, None
                raise broken
            return await read(*args, **kwargs)

        return read_response


async def test_a_call_that_ran_after_its_caller_was_cancelled_goes_to_its_orphan(
    redis_url: str,
) -> None:
    client = Redis.from_url(redis_url)
    try:
        auto, script = AutoPipeline(client), Script(client, COUNT)
        await client.delete("n")
        await script(keys=["n"], args=["load"])
        held, orphaned = HeldReplies(client), asyncio.Queue[Any]()
        calls = [
            asyncio.ensure_future(auto.call(script, ["n"], [i], orphan=orphaned.put))
            for i in range(3)
        ]
        await held.reading.wait()  # sent: Redis has run them
        calls[1].cancel()
        held.go.set()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert done[0] == b"0!" and isinstance(done[1], asyncio.CancelledError)
        assert done[2] == b"2!"
        assert await asyncio.wait_for(orphaned.get(), 10) == b"1!"
        assert auto.orphans == 1 and orphaned.empty()
    finally:
        await client.aclose()


async def test_a_claim_that_ran_after_its_run_was_cancelled_gives_the_job_back(
    redis_url: str,
) -> None:
    """The claim reached Redis, then its run was cancelled (arq's timeout, a shutdown) before
    the reply came back, or redis-py sent it again after a dropped link: nothing would run the
    job until its lease ran out, and the run would count towards max_runs."""
    client = Redis.from_url(redis_url)
    try:
        await client.flushdb()
        store = Store(client, queue="agentq:queue", result_ttl_s=3600)
        await store.submit_chunk("b1", jobs("a"))
        (jid,) = await _job_ids(store, "b1")
        q = (await client.hget(keys.job(jid), "q")).decode()
        await _load_scripts(store)
        held = HeldReplies(client)
        claiming = asyncio.ensure_future(store.claim(jid, "b1", "w1", q))
        await held.reading.wait()  # Redis ran the claim: the job is leased
        async with Redis.from_url(redis_url) as probe:  # (this client's replies are held)
            assert await probe.hget(keys.job(jid), "status") == b"running"
        claiming.cancel()
        held.go.set()
        async with asyncio.timeout(10):  # the claim's reply, and what it led to
            while sending := store._batched._sending:
                await asyncio.wait(set(sending))
        assert await client.hget(keys.job(jid), "status") == b"queued"
        assert await client.hget(keys.job(jid), "runs") == b"0"
        q = (await client.hget(keys.job(jid), "q")).decode()
        assert (await store.claim(jid, "b1", "w2", q)).state == "running"
    finally:
        await client.aclose()


async def test_a_reply_that_breaks_fails_every_call_and_sends_none_again(
    redis_url: str,
) -> None:
    """An error while reading the replies (a protocol error) comes after the pipeline ran:
    sent again alone, every call would run twice."""
    client = Redis.from_url(redis_url)
    try:
        auto, script = AutoPipeline(client), Script(client, COUNT)
        await client.delete("n")
        await script(keys=["n"], args=["load"])
        held = HeldReplies(client, broken=InvalidResponse("a broken reply"))
        held.go.set()
        replies = await asyncio.gather(
            *(auto.call(script, ["n"], [i]) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, InvalidResponse) for r in replies), replies
        # closed: its other replies, unread, would be the next command's
        assert [link.is_connected for link in held.links] == [False]
        assert int(await client.get("n")) == 4  # the load's, and each call once
        assert auto.alone == 0
    finally:
        await client.aclose()


async def test_a_readonly_reply_closes_its_link_and_the_other_calls_keep_their_replies(
    redis_url: str,
) -> None:
    """A READONLY reply (a failover: the link reaches a replica now) closes the link, after the
    replies are handed out: a close that fails (it timed out, the old primary unreachable)
    cannot fail the calls that ran, and the pool's next user gets a link of its own."""
    client = Redis(connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=1))
    try:
        auto, script = AutoPipeline(client), Script(client, COUNT)
        await client.delete("n")
        await script(keys=["n"], args=["load"])
        closed = []

        def closing_fails(conn: Any) -> None:
            disconnect = conn.disconnect

            async def failing(*args: Any, **kwargs: Any) -> None:
                closed.append(conn)
                await disconnect(*args, **kwargs)
                raise RedisTimeoutError("Timed out closing connection")

            conn.disconnect = failing

        on_take(client, closing_fails)
        done = await asyncio.gather(
            *(auto.call(script, ["n"], [a]) for a in "rbc"), return_exceptions=True
        )
        assert isinstance(done[0], ReadOnlyError) and done[1:] == [b"b!", b"c!"]
        assert closed  # (the READONLY call went again on a fresh link, READONLY each time)
        assert await client.set("other", "ok")
    finally:
        await client.aclose()


async def test_scripts_redis_lacks_are_loaded_and_the_pipeline_sent_again(
    store_redis: Any,
) -> None:
    """A script Redis does not have (never sent, or lost in a restart or failover): Redis
    refuses every call of the pipeline unrun; the script is loaded and the calls go again."""
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    await store_redis.script_flush()
    replies = await asyncio.gather(*(auto.call(script, ["n"], [i]) for i in range(10)))
    assert replies == [f"{i}!".encode() for i in range(10)]
    assert (auto.pipelines, auto.alone) == (2, 0)
    assert int(await store_redis.get("n")) == 10


async def test_a_pipeline_that_cannot_go_out_sends_each_call_alone(store_redis: Any) -> None:
    """One call's arguments do not encode: that call fails, the others are answered."""
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    bad: Any = {"not": "encodable"}
    replies = await asyncio.gather(
        *(auto.call(script, ["n"], [bad if i == 2 else i]) for i in range(5)),
        return_exceptions=True,
    )
    assert isinstance(replies[2], DataError)
    assert [r for i, r in enumerate(replies) if i != 2] == [b"0!", b"1!", b"3!", b"4!"]
    assert int(await store_redis.get("n")) == 4


async def test_a_big_call_goes_alone(store_redis: Any) -> None:
    auto, script = AutoPipeline(store_redis), Script(store_redis, COUNT)
    await script(keys=["n"], args=["load"])
    big = "x" * (MAX_BYTES // 4 + 1)
    replies = await asyncio.gather(*(auto.call(script, ["n"], [a]) for a in ["a", big, "b"]))
    assert replies == [b"a!", (big + "!").encode(), b"b!"]
    assert (auto.pipelines, auto.alone) == (1, 1)


async def test_redis_away_fails_every_call_of_the_pipeline() -> None:
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens
    auto, script = AutoPipeline(dead), Script(dead, COUNT)
    try:
        replies = await asyncio.gather(
            *(auto.call(script, ["n"], [i]) for i in range(3)), return_exceptions=True
        )
    finally:
        await dead.aclose()
    assert all(isinstance(r, ConnectionError) for r in replies), replies


async def test_runs_that_start_and_end_together_claim_and_finish_in_one_round_trip(
    store: Store,
) -> None:
    """A worker takes fifty jobs at once: their claims are one pipeline, and so are their
    finishes (before, each was a round trip of its own: about 100 µs of worker CPU a call)."""
    names = [f"j{i}" for i in range(50)]
    await store.submit_chunk("b1", jobs(*names))
    await _load_scripts(store)
    await store.seal("b1")
    auto = store._batched
    ids = await _job_ids(store, "b1")
    generations = [(await store.redis.hget(keys.job(jid), "q")).decode() for jid in ids]
    claims = await asyncio.gather(
        *(store.claim(jid, "b1", "w1", q) for jid, q in zip(ids, generations, strict=True))
    )
    assert (auto.pipelines, auto.alone) == (1, 0)
    assert sorted(c.state for c in claims) == ["running"] * 50
    assert {c.job_id for c in claims} == set(ids)
    stored = await asyncio.gather(
        *(
            store.finish(final(store, "b1", c.custom_id, Status.SUCCEEDED, output="ok"), c.token)
            for c in claims
        )
    )
    assert (auto.pipelines, auto.alone) == (2, 0) and stored == [1] * 50
    st = await store.batch_status("b1")
    assert st is not None and st.counts[Status.SUCCEEDED] == 50 and st.finished


async def _job_ids(store: Store, batch_id: str) -> list[str]:
    return [jid async for chunk in store.job_ids(batch_id) for jid in chunk]


async def test_a_claim_sent_twice_in_one_pipeline_is_one_run(store: Store) -> None:
    """Two workers' claims of one job in the same pipeline: one runs it, the other is told
    it is busy (the scripts stay atomic one by one)."""
    await store.submit_chunk("b1", jobs("a"))
    (jid,) = await _job_ids(store, "b1")
    q = (await store.redis.hget(keys.job(jid), "q")).decode()
    await _load_scripts(store)
    claims = await asyncio.gather(*(store.claim(jid, "b1", f"w{i}", q) for i in range(2)))
    assert (store._batched.pipelines, store._batched.alone) == (1, 0)
    assert sorted(c.state for c in claims) == ["busy", "running"]


async def _load_scripts(store: Store) -> None:
    """As after the first pipeline of each script (test the pipelines that follow it)."""
    for source in store._sources.values():
        await store.redis.script_load(source)


Plan = list[tuple[int, list[tuple[bool, bool]]]]


@st.composite
def _plans(draw: st.DrawFn) -> Plan:
    """Groups of calls made in one turn of the loop: (loop turns waited after the group,
    [(the call fails, its caller is cancelled before it goes out)])."""
    call = st.tuples(st.booleans(), st.booleans())
    group = st.tuples(st.integers(0, 2), st.lists(call, min_size=1, max_size=12))
    return draw(st.lists(group, min_size=1, max_size=5))


@settings(max_examples=60, deadline=None)
@given(plan=_plans())
def test_every_caller_gets_its_own_reply_whatever_the_mix(plan: Plan) -> None:
    """Calls made over a few turns of the loop, some failing, some cancelled before they go
    out: every call not cancelled runs once and its caller gets its own reply or error; no
    cancelled call runs."""

    async def scenario() -> None:
        client = fakeredis.FakeAsyncRedis()
        auto, script = AutoPipeline(client), Script(client, COUNT)
        try:
            calls, expected = [], []
            for gap, group in plan:
                made = []
                for fails, cancel in group:
                    i = len(calls)
                    args = ["fail" if fails else i]
                    made.append(asyncio.ensure_future(auto.call(script, ["n"], args)))
                    calls.append(made[-1])
                    expected.append(None if cancel else ResponseError if fails else f"{i}!")
                await asyncio.sleep(0)  # each call of the group waits for its pipeline
                for task, (_, cancel) in zip(made, group, strict=True):
                    if cancel:
                        task.cancel()
                for _ in range(gap):
                    await asyncio.sleep(0)
            replies = await asyncio.gather(*calls, return_exceptions=True)
            for reply, want in zip(replies, expected, strict=True):
                if want is None:
                    assert isinstance(reply, asyncio.CancelledError), reply
                elif want is ResponseError:
                    assert isinstance(reply, ResponseError), reply
                else:
                    assert reply == str(want).encode(), (reply, want)
            ran = sum(1 for want in expected if want is not None)
            assert int(await client.get("n") or 0) == ran
        finally:
            await client.aclose()

    asyncio.run(scenario())
