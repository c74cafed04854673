"""Running an in-process arq worker until a batch is done."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from producer import Producer, Settings
from producer.models import BatchStatus, ResultRecord
from worker.settings import build_worker


async def run_batch(
    producer: Producer,
    settings: Settings,
    batch_id: str,
    timeout: float = 60,
    log_file: Path | None = None,
) -> BatchStatus:
    """A burst-mode worker (arq's conftest does the same) drains the queue; then the batch
    must be finished. The worker logs to `log_file` when given."""
    worker = build_worker(settings, burst=True, handle_signals=False, log_file=log_file)
    task = asyncio.ensure_future(worker.async_run())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:  # say where everything is, rather than hang on a cancellation
            for t in asyncio.all_tasks():
                t.print_stack(file=sys.stderr)
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            raise AssertionError(f"the burst worker did not finish in {timeout:g} s")
        task.result()
    finally:  # bounded without awaiting a cancellation (which is what hung, when it did)
        closing = asyncio.ensure_future(worker.close())
        await asyncio.wait({closing}, timeout=30)
    st = await producer.status(batch_id)
    assert st.finished, st
    return st


async def cancel_worker(task: asyncio.Future[object], tries: int = 10) -> None:
    """Cancel an in-process worker's task and wait for it, bounded. A cancel can be swallowed
    (Python 3.11: redis-py's hiredis reader turns a cancel that lands in its zero timeout
    into a timeout, and arq's loop goes on), so it is sent again until the task ends."""
    for _ in range(tries):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        if done:
            return


async def records(producer: Producer, batch_id: str) -> dict[str, ResultRecord]:
    return {r.custom_id: r async for r in producer.results(batch_id)}
