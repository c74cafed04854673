"""Batch ids cannot name other keys, and a script that meets a key of the wrong type writes
nothing (issue 9, finding 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer import AgentJob, Producer, keys
from producer.models import InvalidBatchId, check_batch_id, job_id_for
from producer.store import Store

_ids = st.text("ab:orde_.-", min_size=1, max_size=10)  # small alphabet: collisions are likely


def _accepted(batch_id: str) -> bool:
    try:
        check_batch_id(batch_id)
    except InvalidBatchId:
        return False
    return True


@example("a", "a:order")
@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(_ids, _ids)
def test_key_names_are_injective(a: str, b: str) -> None:
    """Distinct (kind, batch id) pairs of accepted ids name distinct keys, none of them a fixed
    key; channel names (a namespace of their own) are distinct per batch id."""
    assume(_accepted(a) and _accepted(b))
    named = {
        (kind, i): f(i)
        for kind, f in (("batch", keys.batch), ("order", keys.batch_order))
        for i in (a, b)
    }
    assert len(set(named.values())) == len(named)
    fixed = {v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)}
    assert not fixed & set(named.values())
    assert (keys.batch_events(a) == keys.batch_events(b)) == (a == b)


async def snapshot(redis: Any) -> dict[str, Any]:
    """Every key with its type and contents."""
    out: dict[str, Any] = {}
    for raw in sorted(await redis.keys("*")):
        key = raw.decode()
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            value: Any = await redis.hgetall(key)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        else:
            value = await redis.get(key)
        out[key] = (kind, value)
    return out


async def settled_snapshot(redis: Any) -> dict[str, Any]:
    """snapshot() once the progress throttle keys a submit sets (PROGRESS_THROTTLE_MS long) are
    gone: with them, comparing it with a later one depends on how fast this machine is."""
    throttles = keys.batch_progress_throttle("*")
    for _ in range(500):
        if not await redis.keys(throttles):
            break
        await asyncio.sleep(0.01)
    return await snapshot(redis)


async def test_colliding_batch_id_is_refused_end_to_end(producer: Producer, redis: Redis) -> None:
    """Batch "a:order" would be the order list of batch "a": refused before anything is
    written, with what to do; reading it is refused the same way."""
    await producer.submit([AgentJob(custom_id=f"j{i}", input="x") for i in range(2)], batch_id="a")
    before = await settled_snapshot(redis)
    for bad in ("a:order", "a:b"):
        with pytest.raises(InvalidBatchId, match="':' is reserved for agentq's key names"):
            await producer.submit([AgentJob(custom_id="k", input="y")], batch_id=bad)
    with pytest.raises(InvalidBatchId, match=r"letters, digits and _ \. -"):
        await producer.status("a:order")
    assert await snapshot(redis) == before
    assert (await producer.status("a")).total == 2


async def test_submit_script_checks_before_it_writes(store: Store) -> None:
    """Past the producer's check (another client, an older producer): the submit script
    refuses batch keys of the wrong type before its first write."""
    await store.submit_chunk("a", [AgentJob(custom_id="j", input="x")])
    before = await settled_snapshot(store.redis)
    with pytest.raises(ResponseError, match=r"hold other data.*nothing was written"):
        await store.submit_chunk("a:order", [AgentJob(custom_id="k", input="y")])
    assert await snapshot(store.redis) == before


async def test_claim_checks_before_it_writes(store: Store) -> None:
    """A batch hash overwritten by something else: the claim fails whole, and the job stays
    queued with its queue entry (nothing half-moved)."""
    await store.submit_chunk("b1", [AgentJob(custom_id="j", input="x")])
    await store.redis.delete(keys.batch("b1"))
    await store.redis.set(keys.batch("b1"), "not a hash")
    before = await settled_snapshot(store.redis)
    with pytest.raises(ResponseError, match="hold other data"):
        await store.claim(job_id_for("b1", "j"), "b1", "w1", "1")
    assert await snapshot(store.redis) == before


async def test_arq_payload_is_json_encoded(store: Store) -> None:
    """The queue payload is built with cjson.encode: a batch id that got past the producer's
    check (another client, an older producer) cannot break or extend it."""
    import json

    from worker.payload import load_job

    odd = 'x","evil'
    await store.submit_chunk(odd, [AgentJob(custom_id="j", input="x")])
    (key,) = await store.redis.keys(keys.ARQ_JOB_PREFIX + "*")
    raw = await store.redis.get(key)
    assert json.loads(raw)["a"] == [job_id_for(odd, "j"), odd, "1"]
    assert load_job(raw)["a"] == [job_id_for(odd, "j"), odd, "1"]
