"""The worker's live log publisher (worker/livelogs.py): events of one flush go out in one
message per batch, through keep_for_job with their index; a slow or absent Redis, or a full
buffer, drops and counts instead of making a job wait."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis

from producer import keys
from worker import livelogs, logs
from worker.livelogs import LiveLogs


async def test_events_are_published_in_one_message_per_batch_with_their_index(
    redis: Redis,
) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.batch_logs("b1"), keys.batch_logs("b2"))
    await pubsub.get_message(timeout=1)
    await pubsub.get_message(timeout=1)
    live = LiveLogs(redis)
    logs.configure(level="info", fmt="json")
    log = structlog.get_logger("t")
    with logs.job_context(live=lambda i, e: live.add("b1", "j1", "c1", i, e), job_id="j1") as ev:
        log.info("one", n=1)
        log.info("two", obj=object())  # not JSON: its repr goes out
    live.add("b2", "j2", "c2", 0, {"event": "x"})
    threading.Thread(target=live.add, args=("b2", "j2", "c2", 1, {"event": "y"})).start()
    got: dict[str, list[dict[str, Any]]] = {}
    while sum(map(len, got.values())) < 4:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert msg is not None, got
        got.setdefault(msg["channel"].decode(), []).extend(json.loads(msg["data"]))
    one = got[keys.batch_logs("b1")]
    assert [(e["job_id"], e["custom_id"], e["i"], e["event"]["event"]) for e in one] == [
        ("j1", "c1", 0, "one"),
        ("j1", "c1", 1, "two"),
    ]
    assert one[0]["event"] == ev[0] and one[1]["event"]["obj"].startswith("<object")
    assert [e["event"]["event"] for e in got[keys.batch_logs("b2")]] == ["x", "y"]
    assert live.sent == 4 and live.dropped == 0
    await pubsub.aclose()


async def test_a_batch_nobody_follows_gets_nothing_until_someone_does(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(livelogs, "FOLLOWERS_TTL_S", 0.0)  # ask Redis at every flush
    spy = redis.pubsub()  # a pattern subscription sees every message but counts as no follower
    await spy.psubscribe(keys.batch_logs("*"))
    await spy.get_message(timeout=1)
    live = LiveLogs(redis)
    live.add("b1", "j1", "c1", 0, {"event": "unheard"})
    live.add("b1", "j1", "c1", 1, {"event": "unheard"})
    await live.flush()
    assert (live.unfollowed, live.sent, live.dropped) == (2, 0, 0)
    follower = redis.pubsub()
    await follower.subscribe(keys.batch_logs("b1"))
    await follower.get_message(timeout=1)
    live.add("b1", "j1", "c1", 2, {"event": "heard"})
    await live.flush()
    assert (live.unfollowed, live.sent, live.dropped) == (2, 1, 0)
    for sub in (spy, follower):  # the first message either sees is the followed flush's
        msg = await sub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert msg is not None and [e["i"] for e in json.loads(msg["data"])] == [2]
        await sub.aclose()


async def test_redis_down_drops_and_counts_without_waiting() -> None:
    down = Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
    live = LiveLogs(down)
    for i in range(3):
        live.add("b", "j", "c", i, {"event": "e"})
    await asyncio.wait_for(live.close(), 5)
    assert live.dropped == 3 and live.sent == 0 and not live.buffer
    await down.aclose()


async def test_slow_redis_is_given_up_and_a_full_buffer_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Hanging:
        def pipeline(self, **_: Any) -> Any:
            return self

        async def __aenter__(self) -> Any:
            return self

        async def __aexit__(self, *_: Any) -> None:
            return None

        def publish(self, *_: Any) -> None:
            pass

        async def pubsub_numsub(self, *channels: str) -> list[tuple[str, int]]:
            return [(c, 1) for c in channels]

        async def execute(self) -> None:
            await asyncio.sleep(3600)

    monkeypatch.setattr(livelogs, "SEND_TIMEOUT_S", 0.1)
    monkeypatch.setattr(livelogs, "MAX_BUFFERED", 2)
    live = LiveLogs(Hanging())
    for i in range(5):
        live.add("b", "j", "c", i, {"event": "e"})  # 3 beyond the bound: dropped at once
    assert live.dropped == 3 and len(live.buffer) == 2
    await asyncio.wait_for(live.close(), 5)
    assert live.dropped == 5 and not live.buffer


def test_the_follower_prints_a_jobs_events_once_and_in_index_order() -> None:
    """Started mid-job, a follower hears events 2 and 3 live: they wait for the record, which
    brings 0 and 1, and 0-4 print in order. A gap (an event the worker dropped) holds what comes
    after it until it is filled. Late live events of a printed run, stragglers of an older run
    and an older run's record print nothing; a retried job's new run starts again at 0."""
    from producer.follow_logs import Printed

    ev = [{"event": f"e{i}"} for i in range(5)]
    p = Printed()
    assert p.live("j", 1, 2, ev[2]) == [] and p.live("j", 1, 3, ev[3]) == []
    assert p.record("j", 1, ev) == ev
    assert p.live("j", 1, 4, ev[4]) == []  # published before the record, heard after it
    assert p.live("k", 1, 0, ev[0]) == [ev[0]] and p.live("k", 1, 1, ev[1]) == [ev[1]]
    assert p.live("k", 1, 1, ev[1]) == []  # heard twice
    assert p.live("k", 1, 3, ev[3]) == []  # 2 was dropped
    assert p.record("k", 1, ev) == [ev[2], ev[3], ev[4]]
    assert p.live("m", 1, 1, ev[1]) == [] and p.live("m", 1, 0, ev[0]) == [ev[0], ev[1]]
    assert p.live("j", 2, 0, ev[0]) == [ev[0]]  # retried: the new run's events
    assert p.live("j", 1, 1, ev[1]) == []  # a straggler of the old run
    assert p.record("j", 1, ev) == []
    assert p.record("j", 2, ev[:2]) == [ev[1]]
    assert p.record("other", 1, ev[:2]) == ev[:2]
