"""Script calls made in the same turn of the event loop, sent to Redis as one pipeline.

Runs of equal latency start together and end together: a worker that takes fifty jobs at once
sends fifty claims, and fifty finishes a Router round trip later. Sent one by one, each call
costs the worker 0.32 M instructions of client work (a pooled connection, a write, a read and
its wake-up); in a pipeline of fifty, 0.07 M (callgrind, redis-py 5.3 against a local Redis 7).
Redis reads them in one go too. redis-py has no automatic pipelining (ioredis's
`enableAutoPipelining` does this for Node), so here it is, for agentq's scripts only.

Each call keeps its own reply or error, as if sent alone: a pipeline is not a transaction,
every script is atomic on its own, and a call the pipeline could not send as a whole (its
arguments would not encode) is sent again alone. A call whose caller was cancelled before the
pipeline had its connection is not sent; one that ran all the same (it went out before the
cancel, or redis-py sent it again after a dropped link) has its reply handed to the caller's
`orphan` (a claim gives its job back). The scripts sent are idempotent or refused when
repeated (see connect.RETRY_ON), so redis-py re-sending a pipeline after a dropped link is
safe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import DataError, NoScriptError, ReadOnlyError, RedisError

from .connect import RETRY_ON, Script

MAX_CALLS = 256
"""At most this many calls a pipeline (its replies are read in one go)."""

MAX_BYTES = 4 << 20
"""At most about this many bytes of arguments a pipeline; a call with more than a quarter of it
(a finish with a huge record) is sent alone, so a link Redis drops for it fails it alone."""

Orphan = Callable[[Any], Coroutine[Any, Any, None]]
"""Given the reply of a call that ran after its caller was cancelled."""

LOAD_TRIES = 3
"""Pipelines sent again after loading scripts Redis did not have (a restart, a failover)."""


@dataclass
class _Call:
    script: Script
    keys: list[Any]
    args: list[Any]
    size: int
    orphan: Orphan | None
    reply: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AutoPipeline:
    """Calls of `call()` made before the event loop's next turn go out together."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._waiting: list[_Call] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.pipelines = 0
        """Pipelines sent (for tests and curiosity)."""
        self.alone = 0
        """Calls sent alone: one that had no company, a big one, or one a pipeline could not
        send."""
        self.orphans = 0
        """Calls that ran after their caller was cancelled (handed to their `orphan`)."""

    async def call(
        self,
        script: Script,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        orphan: Orphan | None = None,
    ) -> Any:
        """Run `script` as `script(keys, args)` would, in the next pipeline. If the caller is
        cancelled and the call runs all the same, `orphan` gets its reply."""
        size = sum(len(a) if isinstance(a, str | bytes) else 8 for a in (*keys, *args))
        call = _Call(script, list(keys), list(args), size, orphan)
        loop = asyncio.get_running_loop()
        if not self._waiting or self._loop is not loop:  # (a loop closed with calls waiting)
            self._waiting, self._loop = [], loop
            loop.call_soon(self._flush, self._waiting)
        self._waiting.append(call)
        return await call.reply

    def _flush(self, calls: list[_Call]) -> None:
        if calls is self._waiting:
            self._waiting = []
        batch: list[_Call] = []
        size = 0
        for c in calls:
            if c.reply.done():  # its caller was cancelled: not sent
                continue
            if c.size > MAX_BYTES // 4:
                self._start(self._alone([c]), [c])
                continue
            if batch and (len(batch) >= MAX_CALLS or size + c.size > MAX_BYTES):
                self._start(self._send(batch), batch)
                batch, size = [], 0
            batch.append(c)
            size += c.size
        if batch:
            self._start(self._send(batch) if len(batch) > 1 else self._alone(batch), batch)

    def _start(self, work: Coroutine[Any, Any, None], calls: list[_Call]) -> None:
        self._spawn(_settled(work, list(calls)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _answer(self, call: _Call, reply: Any) -> None:
        if not call.reply.done():
            call.reply.set_result(reply)
        elif call.reply.cancelled() and call.orphan is not None:  # it ran after all
            self.orphans += 1
            self._spawn(call.orphan(reply))

    async def _send(self, calls: list[_Call]) -> None:
        for attempt in range(LOAD_TRIES + 1):
            try:
                calls = await self._pipeline(calls)
                if calls and attempt < LOAD_TRIES:  # refused unrun: load what Redis lacks
                    for script in {id(c.script): c.script for c in calls}.values():
                        await self.redis.script_load(script.script.script)
            except DataError:  # arguments that do not encode: nothing went out; each call alone
                break
            except Exception as exc:  # Redis away past the client's retries, or a broken reply
                for c in calls:  # (sent again alone, calls that ran would run twice)
                    _fail(c, exc)
                return
            if not calls:
                return
        await self._alone(calls)  # each call alone, as Script sends it

    async def _pipeline(self, calls: list[_Call]) -> list[_Call]:
        """Send the calls (but those cancelled meanwhile) as one pipeline; returns those Redis
        refused unrun: a script it did not have, or a replica's READONLY."""
        async with self.redis.pipeline(transaction=False) as pipe:
            # The connection first: a caller cancelled while the pool had none free is not sent.
            conn = pipe.connection = await self.redis.connection_pool.get_connection()
            calls[:] = [c for c in calls if not c.reply.done()]
            if not calls:
                return []
            for c in calls:
                # EVALSHA itself, not redis-py's Script on a pipeline: that asks Redis whether
                # the scripts exist (SCRIPT EXISTS) before every pipeline
                sha = c.script.script.sha
                pipe.execute_command("EVALSHA", sha, len(c.keys), *c.keys, *c.args)
            self.pipelines += 1
            try:
                replies = await pipe.execute(raise_on_error=False)  # releases the connection
            except Exception:
                # redis-py closes the link for a connection error only: after any other (a
                # reply it could not parse) replies may be left unread on it, for the pool's
                # next user to take for its own.
                await _close(conn)
                raise
        unrun = []
        for c, reply in zip(calls, replies, strict=True):
            if isinstance(reply, (NoScriptError, *RETRY_ON)):
                if not c.reply.done():
                    unrun.append(c)
            elif isinstance(reply, Exception):
                _fail(c, reply)
            else:
                self._answer(c, reply)
        if any(isinstance(r, ReadOnlyError) for r in replies):
            # A link to a server that is a replica now: the next command on it connects afresh
            # (redis-py does this for an error raised, not for one in a reply). The pool has it
            # back already; the replies are handed out first, so a close that fails cannot fail
            # calls that ran.
            await _close(conn)
        return unrun

    async def _alone(self, calls: list[_Call]) -> None:
        """Send each call on its own, as Script does (it loads a script Redis lacks)."""
        await asyncio.gather(*(self._one(c) for c in calls if not c.reply.done()))

    async def _one(self, call: _Call) -> None:
        self.alone += 1
        try:
            reply = await call.script(keys=call.keys, args=call.args)
        except Exception as exc:
            _fail(call, exc)
        except BaseException:
            call.reply.cancel()
            raise
        else:
            self._answer(call, reply)


async def _settled(work: Coroutine[Any, Any, None], calls: list[_Call]) -> None:
    """Run `work`; then no caller of `calls` is left waiting, whatever happened."""
    try:
        await work
    finally:
        for c in calls:
            if c.reply.done():
                continue
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the loop is closing
                c.reply.cancel()
            else:
                c.reply.set_exception(RuntimeError("agentq: a pipelined Redis call got no reply"))


async def _close(conn: Any) -> None:
    """Close a link the pool has back already. nowait: no await before it is closed, so no
    other task takes it first; a close that fails leaves it to the pool's next check."""
    with contextlib.suppress(RedisError, OSError):
        await conn.disconnect(nowait=True)


def _fail(call: _Call, exc: Exception) -> None:
    if not call.reply.done():
        call.reply.set_exception(exc)
