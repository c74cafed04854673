"""Producer-side work in a process of its own, so its peak memory can be read cleanly:

    python -m ops.bench.client submit --redis-url URL --queue Q --file jobs.jsonl
    python -m ops.bench.client results --redis-url URL --batch B

Each prints one JSON line: how many, seconds, rate, and the peak RSS growth of this process
during the work: ru_maxrss after it minus RSS before it (after imports and client set-up, with
the peak reset there through /proc/self/clear_refs so the import-time peak hides nothing)."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

from producer import Producer
from producer.models import Status
from producer.settings import Settings


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux: /proc/self/clear_refs "5"),
    so the import-time peak does not hide growth; returns ru_maxrss afterwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return maxrss_mb()


def producer(redis_url: str, queue: str) -> Producer:
    settings = Settings(redis_url=redis_url, queue=queue)  # type: ignore[call-arg]
    return Producer.from_env(settings)


async def submit(args: argparse.Namespace) -> dict[str, Any]:
    async with producer(args.redis_url, args.queue) as p:
        await p.redis.ping()
        before = reset_peak()
        t0 = time.perf_counter()
        batch = await p.submit_file(args.file, batch_id=args.batch_id)
        seconds = time.perf_counter() - t0
        after = maxrss_mb()
    return {
        "batch_id": batch.id,
        "jobs": batch.jobs,
        "enqueued": batch.enqueued,
        "seconds": round(seconds, 4),
        "jobs_per_s": round(batch.jobs / seconds, 1),
        "maxrss_before_mb": round(before, 1),
        "maxrss_after_mb": round(after, 1),
        "delta_mb": round(after - before, 1),
    }


async def results(args: argparse.Namespace) -> dict[str, Any]:
    async with producer(args.redis_url, args.queue) as p:
        await p.redis.ping()
        before = reset_peak()
        t0 = time.perf_counter()
        n = succeeded = 0
        in_order = True
        last = -1
        async for record in p.results(args.batch):
            n += 1
            succeeded += record.status == Status.SUCCEEDED
            index = int(record.custom_id.lstrip("abcdefghijklmnopqrstuvwxyz") or -1)
            in_order = in_order and index > last
            last = index
        seconds = time.perf_counter() - t0
        after = maxrss_mb()
    return {
        "records": n,
        "succeeded": succeeded,
        "in_order": in_order,
        "seconds": round(seconds, 4),
        "records_per_s": round(n / seconds, 1) if seconds else None,
        "maxrss_before_mb": round(before, 1),
        "maxrss_after_mb": round(after, 1),
        "delta_mb": round(after - before, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.bench.client", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("--file", required=True)
    s.add_argument("--batch-id")
    r = sub.add_parser("results")
    r.add_argument("--batch", required=True)
    for p in (s, r):
        p.add_argument("--redis-url", required=True)
        p.add_argument("--queue", default="agentq:queue")
    args = ap.parse_args(argv)
    fn = submit if args.command == "submit" else results
    print(json.dumps(asyncio.run(fn(args))), flush=True)


if __name__ == "__main__":
    main()
