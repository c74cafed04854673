"""Loops that read pub/sub until cancelled stop when cancelled, even when the cancel comes out
of get_message as its own read timeout (it then returns None instead of raising): before,
a worker's control listener ran on and kept a test's event loop from closing."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from producer.follow_logs import read_live
from worker.settings import Settings as AgentqSettings
from worker.settings import _listen, build_worker


class SwallowingPubSub:
    """get_message that turns a cancel into "no message", as redis-py's may."""

    def __init__(self) -> None:
        self.reads = 0
        self.reading = asyncio.Event()
        """Set once the loop has read a few times."""
        self.give_up = False
        """Set by the test once it has its answer: the next read raises for real."""

    async def subscribe(self, *channels: str) -> None:
        pass

    async def get_message(self, **_: Any) -> None:
        self.reads += 1
        if self.reads >= 3:
            self.reading.set()
        if self.give_up:
            raise asyncio.CancelledError
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            return None
        return None

    async def aclose(self) -> None:
        pass


async def _stops_when_cancelled(pubsub: SwallowingPubSub, loop: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.ensure_future(loop)
    await asyncio.wait_for(pubsub.reading.wait(), 10)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    pubsub.give_up = True  # (stops a loop that ran on, so the test ends either way)
    await asyncio.wait({task}, timeout=5)
    assert done, "the loop ran on after it was cancelled"
    assert task.cancelled()


async def test_the_workers_control_listener_stops_when_cancelled() -> None:
    pubsub = SwallowingPubSub()
    rt = SimpleNamespace(store=SimpleNamespace(redis=SimpleNamespace(pubsub=lambda: pubsub)))
    await _stops_when_cancelled(pubsub, _listen(rt))  # type: ignore[arg-type]


async def test_the_workers_wake_listener_stops_when_cancelled(tmp_path: Path) -> None:
    config = AgentqSettings(
        redis_url="redis://127.0.0.1:1/0", data_dir=str(tmp_path), log_format="json"
    )
    worker = build_worker(config, handle_signals=False)
    pubsub = SwallowingPubSub()
    worker._pool = SimpleNamespace(pubsub=lambda: pubsub)
    worker.wake_channel = "agentq:wake:test"
    await _stops_when_cancelled(pubsub, worker._listen_wake())


async def test_the_live_log_reader_stops_when_cancelled() -> None:
    pubsub = SwallowingPubSub()
    await _stops_when_cancelled(pubsub, read_live(pubsub, lambda entry: None))
