"""The worker's pooled Router client: a connection outlives the job that opened it, so it must
not keep that job's context (asyncio gives a socket's reader callback a copy of the context the
connection was opened in)."""

from __future__ import annotations

import asyncio
import inspect
from contextvars import Context, ContextVar

import aiohttp
import pytest

from ops.simrouter import SimRouter
from tests.conftest import ROUTER_KEY
from worker.provider import FreshContextConnector, router_client

_job_object: ContextVar[object] = ContextVar("test_job_object")


class _JobState:
    """Stands for what a job's context holds: its meter, its log events, the SDK's run."""


async def _call(client: object) -> None:
    await client.chat.completions.create(  # type: ignore[attr-defined]
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )


def _client_reader_contexts(port: int) -> list[Context]:
    """The contexts the event loop's reader callbacks for sockets connected to `port` run in
    (and keep alive): the client's side of its connections to the simulated Router."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    contexts = []
    for key in selector.get_map().values():
        reader = key.data[0]
        transport = getattr(reader._callback, "__self__", None) if reader else None
        if not isinstance(transport, asyncio.BaseTransport):  # the loop's own, a server's
            continue
        peer = transport.get_extra_info("peername")
        if peer and peer[1] == port:
            contexts.append(reader._context)
    return contexts


async def test_pooled_connections_do_not_keep_the_jobs_that_opened_them(sim: SimRouter) -> None:
    jobs = 6
    client = router_client(sim.url, ROUTER_KEY, jobs, 5)
    try:
        opened = asyncio.Barrier(jobs)

        async def job() -> None:
            _job_object.set(_JobState())
            await opened.wait()  # all at once: each call opens a connection of its own
            await _call(client)

        await asyncio.gather(*(asyncio.create_task(job()) for _ in range(jobs)))
        contexts = _client_reader_contexts(sim.port)
        assert len(contexts) == jobs, "the calls' connections are not pooled"
        kept = sum(_job_object in ctx for ctx in contexts)
        assert kept == 0, f"{kept} pooled Router connections keep the context of a finished job"
        await _call(client)  # the pool still serves the next job
    finally:
        await client.close()


async def test_the_router_is_reached_through_a_proxy_named_by_the_environment(
    sim: SimRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured: the call goes to the proxy (here the simulated Router itself,
    which serves the proxy's absolute-form request), never to the Router's own host."""
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", sim.url.rsplit("/v1", 1)[0])
    client = router_client("http://router.invalid/v1", ROUTER_KEY, 2, 5)
    try:
        await _call(client)
    finally:
        await client.close()


def test_aiohttp_connector_internal_the_fix_overrides() -> None:
    """FreshContextConnector overrides TCPConnector._create_connection: fail loudly if an
    aiohttp upgrade renames it or changes what it takes."""
    params = list(inspect.signature(aiohttp.TCPConnector._create_connection).parameters)
    assert params == ["self", "req", "traces", "timeout"]
    assert FreshContextConnector._create_connection is not aiohttp.TCPConnector._create_connection
