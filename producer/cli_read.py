"""The CLI's reading commands beyond status and results: `results --follow`, `job`, `logs`,
`batches`. Like producer/cli.py, they import only what they use (no SDK, no openai)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping
from contextlib import ExitStack, aclosing
from fnmatch import fnmatchcase
from typing import IO, TYPE_CHECKING, Any

from .cli_show import (
    STATUS_COLOUR,
    age,
    colour_enabled,
    event_line,
    level_at_least,
    one_line,
    paint,
    print_record,
)

if TYPE_CHECKING:
    from .client import Producer
    from .models import ResultRecord
    from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2


def _producer(settings: Settings) -> Producer:
    from .client import Producer

    return Producer.from_env(settings)


def _err(msg: str) -> None:
    print(f"agentq: {msg}", file=sys.stderr)


async def _outcome(p: Producer, batch_id: str) -> int:
    """`wait`'s exit code for a batch that is done."""
    st = await p.status(batch_id)
    return EXIT_OK if st.all_succeeded else EXIT_FAILED


async def follow_results(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq results BATCH --follow`: records as jobs finish, flushed one by one."""
    import contextlib

    from .export import stream_csv, stream_jsonl
    from .models import Status

    statuses = {Status.FAILED} if args.failed else None
    write = stream_csv if args.format == "csv" else stream_jsonl
    async with _producer(settings) as p:
        await p.status(args.batch)  # a batch not found says so before a CSV header is written
        with contextlib.ExitStack() as stack:
            out = _output(stack, args.output)
            try:
                async with asyncio.timeout(args.timeout):
                    n = await write(p.results(args.batch, statuses=statuses, follow=True), out)
            except TimeoutError:
                st = await p.status(args.batch)
                _err(f"timed out after {args.timeout:g} s: {st.done}/{st.total} jobs done")
                return EXIT_TIMEOUT
        if args.output:
            print(f"wrote {n} result records to {args.output}", file=sys.stderr)
        return await _outcome(p, args.batch)


def _output(stack: ExitStack, path: str | None) -> IO[str]:
    """The file given with -o (closed with the stack), else stdout."""
    if path is None:
        return sys.stdout
    return stack.enter_context(open(path, "w", encoding="utf-8", newline=""))


async def cmd_job(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq job BATCH CUSTOM_ID|JOB_ID`: one record, readable (or --json: the record)."""
    async with _producer(settings) as p:
        record = await p.job(args.batch, args.job)
        preview = None if args.json else await p.job_input(record.job_id)
    if args.json:
        print(record.model_dump_json(indent=2))
    else:
        print_record(record, sys.stdout, colour_enabled(), preview)
    return EXIT_OK


def _wanted(event: Mapping[str, Any], names: list[str] | None, level: str | None) -> bool:
    if names and not any(fnmatchcase(str(event.get("event", "")), n) for n in names):
        return False
    return level_at_least(event, level)


async def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq logs BATCH [CUSTOM_ID]`: the log events of the batch's jobs, one line each; with
    --follow, each event as it happens, until the batch (or that job) is done."""
    colour = colour_enabled()
    async with _producer(settings) as p:
        one = await p.job(args.batch, args.custom_id) if args.custom_id else None
        if not args.follow:
            if one is not None:
                _print_events(one, args, colour)
            else:
                async for r in p.results(args.batch):
                    _print_events(r, args, colour)
            return EXIT_OK
        try:
            async with asyncio.timeout(args.timeout):
                return await _follow_logs(p, args, colour, one.job_id if one else None)
        except TimeoutError:
            st = await p.status(args.batch)
            _err(f"timed out after {args.timeout:g} s: {st.done}/{st.total} jobs done")
            return EXIT_TIMEOUT


async def _follow_logs(
    p: Producer, args: argparse.Namespace, colour: bool, only: str | None
) -> int:
    """Live events as they come, and each finished job's events the live channel did not
    bring, a job's events in index order (producer/follow_logs.py); subscribed before the
    records are read."""
    from . import keys
    from .follow_logs import Printed, read_live, run_of

    printed = Printed()

    def live(entry: dict[str, Any]) -> None:
        job_id, event, i = str(entry.get("job_id")), entry["event"], entry.get("i")
        if only is not None and job_id != only:
            return
        # an entry without its index (a worker older than indexes) cannot be placed: as it is
        events = printed.live(job_id, run_of(event), i, event) if isinstance(i, int) else [event]
        for e in events:
            _print_event(e, str(entry.get("custom_id")), job_id, args, colour)
        sys.stdout.flush()

    pubsub = p.redis.pubsub()
    try:
        await pubsub.subscribe(keys.batch_logs(args.batch))
        reader = asyncio.create_task(read_live(pubsub, live))
        try:
            async with aclosing(p.results(args.batch, follow=True)) as records:
                async for r in records:
                    if only is not None and r.job_id != only:
                        continue
                    run = run_of(r.logs[0]) if r.logs else 0
                    for event in printed.record(r.job_id, run, r.logs):
                        _print_event(event, r.custom_id, r.job_id, args, colour)
                    sys.stdout.flush()
                    if only is not None:  # that job is done
                        return EXIT_OK if r.status.value == "succeeded" else EXIT_FAILED
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    finally:
        await pubsub.aclose()
    return await _outcome(p, args.batch)


def _print_events(r: ResultRecord, args: argparse.Namespace, colour: bool) -> None:
    for event in r.logs:
        _print_event(event, r.custom_id, r.job_id, args, colour)
    sys.stdout.flush()


def _print_event(
    event: dict[str, Any], custom_id: str, job_id: str, args: argparse.Namespace, colour: bool
) -> None:
    if not _wanted(event, args.event, args.level):
        return
    if args.json:
        print(json.dumps({"custom_id": custom_id, "job_id": job_id, **event}))
    else:
        print(event_line(event, custom_id, colour))


async def cmd_batches(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq batches`: newest first, with counts, cost and age."""
    from .cli_show import status_dict
    from .models import Status

    active = None if args.status is None else args.status == "active"
    async with _producer(settings) as p:
        found = await p.batches(active=active, limit=args.limit)
    if args.json:
        rows = [{**status_dict(b.status), "active": b.active} for b in found]
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not found:
        print("no batches" + (f" ({args.status})" if args.status else ""), file=sys.stderr)
        return EXIT_OK
    colour = colour_enabled()
    head = ("batch", "status", "done/total", "succeeded", "failed", "cancelled", "cost", "age")
    table = [head]
    for b in found:
        st = b.status
        table.append(
            (
                one_line(st.batch_id),
                "active" if b.active else "done",
                f"{st.done}/{st.total}",
                str(st.counts.get(Status.SUCCEEDED, 0)),
                str(st.counts.get(Status.FAILED, 0)),
                str(st.counts.get(Status.CANCELLED, 0)),
                f"${st.cost_usd:.6f}",
                age(st.created_at),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for n, row in enumerate(table):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        if n == 0:
            cells = [paint(c, "bold", colour) for c in cells]
        else:
            cells[1] = paint(cells[1], STATUS_COLOUR[row[1]], colour)
            if row[4] != "0":
                cells[4] = paint(cells[4], "red", colour)
        print("  ".join(cells).rstrip())
    return EXIT_OK
