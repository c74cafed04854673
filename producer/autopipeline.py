"""Script calls made in the same turn of the event loop, sent to Redis as one pipeline.

Runs of equal latency start together and end together: a worker that takes fifty jobs at once
sends fifty claims, and fifty finishes a Router round trip later. Sent one by one, each call
costs the worker about 100 µs of CPU (a pooled connection, a write, a read and its wake-up;
redis-py 5.3 against Redis 7, `ops/bench` rows of the README); in one pipeline about 20 µs.
Redis reads them in one go too. redis-py has no automatic pipelining (ioredis's
`enableAutoPipelining` does this for Node), so here it is, for agentq's scripts only.

Each call keeps its own reply or error, as if sent alone: a pipeline is not a transaction,
every script is atomic on its own, and the scripts sent are idempotent or refused when repeated
(see connect.RETRY_ON), so the pipeline's retries after a dropped link are safe."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError

from .connect import RETRY_ON, Script

MAX_CALLS = 256
"""At most this many calls a pipeline (its replies are read in one go)."""


@dataclass
class _Call:
    script: Script
    keys: list[Any]
    args: list[Any]
    reply: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AutoPipeline:
    """Calls of `call()` made before the event loop's next turn go out together."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._waiting: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0
        """Pipelines sent (for tests and curiosity)."""

    async def call(self, script: Script, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        """Run `script` as `script(keys, args)` would, in the next pipeline."""
        call = _Call(script, list(keys), list(args))
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self._flush)
        self._waiting.append(call)
        return await call.reply

    def _flush(self) -> None:
        # a caller cancelled before its call went out: it is not sent
        calls = [c for c in self._waiting if not c.reply.done()]
        self._waiting = []
        for start in range(0, len(calls), MAX_CALLS):
            task = asyncio.get_running_loop().create_task(
                self._send(calls[start : start + MAX_CALLS])
            )
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[_Call]) -> None:
        if len(calls) == 1:  # nothing to gather: the plain call (no pipeline's bookkeeping)
            await _settle(calls[0])
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for c in calls:
                    # EVALSHA itself, not redis-py's Script on a pipeline: that asks Redis
                    # whether the scripts exist (SCRIPT EXISTS) before every pipeline
                    sha = c.script.script.sha
                    pipe.execute_command("EVALSHA", sha, len(c.keys), *c.keys, *c.args)
                self.pipelines += 1
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for c in calls:
                _fail(c, exc)
            return
        except BaseException:
            for c in calls:
                c.reply.cancel()
            raise
        again = []
        for c, reply in zip(calls, replies, strict=True):
            if isinstance(reply, (NoScriptError, *RETRY_ON)):
                # nothing ran (a script not loaded, a replica's READONLY): sent again alone,
                # which loads the script and retries as every call does
                if not c.reply.done():
                    again.append(_settle(c))
            elif isinstance(reply, Exception):
                _fail(c, reply)
            elif not c.reply.done():
                c.reply.set_result(reply)
        if again:
            await asyncio.gather(*again)


async def _settle(call: _Call) -> None:
    """Send one call alone."""
    try:
        reply = await call.script(keys=call.keys, args=call.args)
    except Exception as exc:
        _fail(call, exc)
    except BaseException:
        call.reply.cancel()
        raise
    else:
        if not call.reply.done():
            call.reply.set_result(reply)


def _fail(call: _Call, exc: Exception) -> None:
    if not call.reply.done():
        call.reply.set_exception(exc)
