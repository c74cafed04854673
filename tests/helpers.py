"""Running an in-process arq worker until a batch is done."""

from __future__ import annotations

import asyncio

from producer import Producer, Settings
from producer.models import BatchStatus, ResultRecord
from worker.settings import build_worker


async def run_batch(
    producer: Producer, settings: Settings, batch_id: str, timeout: float = 60
) -> BatchStatus:
    """A burst-mode worker (arq's conftest does the same) drains the queue; then the batch
    must be finished."""
    worker = build_worker(settings, burst=True, handle_signals=False)
    try:
        await asyncio.wait_for(worker.async_run(), timeout)
    finally:
        await worker.close()
    st = await producer.status(batch_id)
    assert st.finished, st
    return st


async def records(producer: Producer, batch_id: str) -> dict[str, ResultRecord]:
    return {r.custom_id: r async for r in producer.results(batch_id)}
