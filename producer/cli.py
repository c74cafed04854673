"""The `agentq` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import IO, Any

from redis.exceptions import RedisError

from .breakers import describe_open, read_breakers
from .budgets import describe_budgets, describe_waits, read_budgets
from .client import BatchNotFound, Producer
from .connect import redis_url
from .embedded import (
    EmbeddedRedisError,
    embedded_status,
    other_clients,
    release_embedded_redis,
    stop_embedded_redis,
)
from .export import Records, write_csv, write_jsonl
from .jobfile import JobFileError
from .models import BatchStatus, InvalidBatchId, ResultRecord, Status
from .progress import Progress
from .redact import safe_url
from .routerinfo import RouterInfo, check_router, preflight
from .settings import ConfigError, Settings, load_settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_TIMEOUT = 2
WORKER_RESTART_S = 5.0


def _err(msg: str) -> None:
    print(f"agentq: {msg}", file=sys.stderr)


# -- commands -------------------------------------------------------------------------------


def _announce_batch(batch_id: str) -> None:
    print(
        f"batch {batch_id}: enqueueing (if this stops, run the same submit with "
        f"--batch-id {batch_id} to complete it)",
        file=sys.stderr,
        flush=True,
    )


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        batch = await p.submit_file(
            args.file, batch_id=args.batch_id, on_batch_id=_announce_batch, priority=args.priority
        )
        print(f"submitted {batch.jobs} jobs ({batch.enqueued} new)", file=sys.stderr)
        print(batch.id)
        sys.stdout.flush()
        if args.wait:
            st = await _wait(p, batch.id, None)
            return EXIT_OK if st.all_succeeded else EXIT_FAILED
    return EXIT_OK


async def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return await _run(args, settings)
    finally:
        # An embedded server this command started for itself goes when it is done (unless
        # another agentq process uses it meanwhile).
        if settings.redis_url is None:
            with contextlib.suppress(Exception):
                if release_embedded_redis(settings.data_dir):
                    print(f"stopped the embedded server in {settings.data_dir}", file=sys.stderr)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    # The one place the producer starts a worker: in-process, for a whole job on one machine.
    from worker.settings import build_worker

    problem = await preflight(settings)
    if problem is not None:
        _err(f"{problem}; nothing was enqueued")
        return EXIT_BAD_INPUT
    async with Producer.from_env(settings) as p:
        batch = await p.submit_file(args.file, batch_id=args.batch_id)
        print(f"batch {batch.id}: {batch.jobs} jobs", file=sys.stderr)
        log_path = Path(settings.data_dir) / "logs" / f"{batch.id}.jsonl"
        worker = build_worker(settings, handle_signals=False, log_file=log_path)
        worker_task = asyncio.create_task(worker.async_run())
        try:
            st = await _wait(p, batch.id, None, worker_task)
        finally:
            await _stop_worker(worker, worker_task)
        while await p.store.sweep():  # the records' TTLs, which the stopped worker would arm
            pass
        if args.output:
            n = await _write_results(lambda: p.results(batch.id), args.output, "jsonl")
            print(f"wrote {n} result records to {args.output}", file=sys.stderr)
        else:
            await _print_table(p.results(batch.id))
        _print_summary(st, sys.stderr)
        print(f"worker logs: {log_path}", file=sys.stderr)
        return EXIT_OK if st.all_succeeded else EXIT_FAILED


async def _stop_worker(worker: Any, task: asyncio.Task[Any], grace_s: float = 10.0) -> None:
    """Stop an in-process arq worker: take no more jobs, let arq finish its bookkeeping of
    the jobs it ran, then close."""
    worker.allow_pick_jobs = False
    pending = [t for t in worker.tasks.values() if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace_s)
    with contextlib.suppress(asyncio.CancelledError):
        await worker.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        st = await p.status(args.batch)
        breakers, now_ms = await read_breakers(p.redis)
        budgets, _ = await read_budgets(p.redis)
    paused = describe_open(breakers, now_ms) if not st.finished else []
    waiting = describe_waits(budgets) if not st.finished else []
    if args.json:
        print(json.dumps({**_status_dict(st), "paused": paused, "waiting": waiting}, indent=2))
    else:
        _print_summary(st, sys.stdout)
        for line in paused + waiting:
            print(line)
    return EXIT_OK


async def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        try:
            st = await _wait(p, args.batch, args.timeout)
        except TimeoutError:
            st = await p.status(args.batch)
            _err(f"timed out after {args.timeout:g} s: {st.done}/{st.total} jobs done")
            return EXIT_TIMEOUT
    _print_summary(st, sys.stderr)
    return EXIT_OK if st.all_succeeded else EXIT_FAILED


async def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    statuses = {Status.FAILED} if args.failed else None
    async with Producer.from_env(settings) as p:
        n = await _write_results(
            lambda: p.results(args.batch, statuses=statuses), args.output, args.format
        )
    if args.output:
        print(f"wrote {n} result records to {args.output}", file=sys.stderr)
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        n = await p.cancel(args.batch)
        st = await p.status(args.batch)
    print(f"cancelled {n} jobs", file=sys.stderr)
    _print_summary(st, sys.stdout)
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        n = await p.retry(args.batch, failed_only=args.failed)
        st = await p.status(args.batch)
    print(f"re-enqueued {n} jobs", file=sys.stderr)
    _print_summary(st, sys.stdout)
    return EXIT_OK


def cmd_embedded(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq embedded status|stop`: the embedded server of this directory."""
    d = Path(settings.data_dir).resolve()
    if args.action == "stop":
        stopped = stop_embedded_redis(d)
        print(f"stopped the embedded server in {d}" if stopped else f"no server runs in {d}")
        return EXIT_OK
    url = embedded_status(d)
    if url is None:
        print(f"no embedded server runs in {d}")
        return EXIT_FAILED
    users = other_clients(d)
    print(f"embedded server {safe_url(url)} (data in {d}), {users} clients connected")
    if settings.embedded_idle_s:
        print(f"stops itself after {settings.embedded_idle_s:g} s unused (AGENTQ_EMBEDDED_IDLE_S)")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.settings import build_worker

    if args.concurrency:
        settings = settings.model_copy(update={"concurrency": args.concurrency})
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    stop = threading.Event()  # SIGTERM/SIGINT: drain and exit, never restart
    while True:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            worker = build_worker(settings, burst=args.burst)
            worker.take_signals(stop)
            worker.run()
            return EXIT_OK
        except (RedisError, OSError) as exc:
            if stop.is_set():
                _err(f"lost Redis ({exc}) while stopping; exiting")
                return EXIT_OK
            # Redis stayed away longer than the client's retries: start over, don't die.
            # Running jobs' leases lapse meanwhile and other workers take them over.
            _err(f"lost Redis ({exc}); restarting the worker in {WORKER_RESTART_S:g} s")
            if stop.wait(WORKER_RESTART_S):
                return EXIT_OK
        finally:
            with contextlib.suppress(Exception):
                loop.close()


async def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    ok = True
    info: RouterInfo = await check_router(settings)
    print("=== Checking Hanzo Router Health ===")
    if info.error is None:
        print(f"✓ Router health check passed ({safe_url(settings.router_url)})")
        print(f"✓ Available models: {len(info.models)} found")
    else:
        ok = False
        print(f"✗ Router health check failed: {info.error}")
    print("=== Checking Redis and workers ===")
    try:
        async with Producer.from_env(settings) as p:
            server = await p.redis.info("server")
            print(f"✓ Redis {server.get('redis_version', '?')} at {safe_url(redis_url(settings))}")
            workers = await p.workers()
            breakers, now_ms = await read_breakers(p.redis)
            budgets, _ = await read_budgets(p.redis)
    except Exception as exc:
        print(f"✗ Redis unreachable at {safe_url(redis_url(settings))}: {exc}")
        return EXIT_FAILED
    print(f"{'✓' if workers else '!'} Workers alive: {len(workers)}")
    for line in describe_open(breakers, now_ms):
        ok = False
        print(f"✗ {line}")
    for line in describe_budgets(budgets):
        print(f"✓ {line}")
    for wid, beat in sorted(workers.items()):
        print(
            f"    {wid}  in flight {beat.get('in_flight')}/{beat.get('concurrency')}"
            f"  v{beat.get('version')}"
        )
    return EXIT_OK if ok else EXIT_FAILED


async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    info = await check_router(settings)
    if info.error is not None:
        _err(info.error)
        return EXIT_FAILED
    for m in info.models:
        print(m)
    return EXIT_OK


async def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    async with Producer.from_env(settings) as p:
        workers = await p.workers()
    if not workers:
        _err("no live workers: start one with `agentq worker`")
        return EXIT_FAILED
    tools: set[str] = set()
    agents: dict[str, Any] = {}
    for beat in workers.values():
        tools.update(beat.get("tools", []))
        agents.update(beat.get("agents", {}))
    print("agent profiles:")
    for name, spec in sorted(agents.items()):
        print(f"  {name}: tools={spec.get('tools', [])}")
    print("tools:")
    for t in sorted(tools):
        print(f"  {t}")
    return EXIT_OK


# -- helpers ----------------------------------------------------------------------------------


async def _wait(
    p: Producer, batch_id: str, timeout: float | None, guard: asyncio.Task[Any] | None = None
) -> BatchStatus:
    """Wait with a progress display; `guard` is a task (an in-process worker) whose early
    end is an error."""
    with Progress(batch_id) as progress:
        waiter = asyncio.create_task(p.wait(batch_id, timeout=timeout, on_progress=progress.update))
        if guard is None:
            return await waiter
        done, _ = await asyncio.wait({waiter, guard}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            return waiter.result()
        waiter.cancel()
        exc = guard.exception() if not guard.cancelled() else None
        raise RuntimeError(f"the worker stopped before the batch finished: {exc!r}")


def _status_dict(st: BatchStatus) -> dict[str, Any]:
    return {
        "batch_id": st.batch_id,
        "total": st.total,
        "done": st.done,
        "finished": st.finished,
        "counts": {s.value: n for s, n in st.counts.items()},
        "usage": st.usage.model_dump(),
        "cost_usd": st.cost_usd,
        "created_at": st.created_at,
        "models": {m: u.model_dump() for m, u in st.models.items()},
    }


def _print_summary(st: BatchStatus, out: IO[str]) -> None:
    counts = ", ".join(f"{s.value} {st.counts.get(s, 0)}" for s in Status)
    pct = 100.0 * st.done / st.total if st.total else 0.0
    print(f"batch {st.batch_id}: {st.done}/{st.total} done ({pct:.0f}%) — {counts}", file=out)
    print(
        f"tokens {st.usage.total_tokens} (in {st.usage.input_tokens}, out "
        f"{st.usage.output_tokens}), model requests {st.usage.requests}, "
        f"cost ${st.cost_usd:.6f}",
        file=out,
    )
    for model, u in st.models.items():  # jobs name models freely
        print(
            f"  {_inert(model)}: {u.jobs} jobs, tokens in {u.input_tokens} out {u.output_tokens}, "
            f"cost ${u.cost_usd:.6f}",
            file=out,
        )


async def _write_results(records: Records, output: str | None, fmt: str) -> int:
    with contextlib.ExitStack() as stack:
        out: IO[str] = (
            stack.enter_context(open(output, "w", encoding="utf-8", newline=""))
            if output
            else sys.stdout
        )
        return await (write_csv if fmt == "csv" else write_jsonl)(records, out)


async def _print_table(records: AsyncIterator[ResultRecord]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False)
    for col in ("custom_id", "status", "model", "output / error"):
        table.add_column(col, overflow="fold")
    async for r in records:
        # Every cell but the status came from a job or a model: Text, never markup, and no
        # terminal control sequences.
        shown = r.output if r.error is None else f"[{r.error.type}] {r.error.message}"
        style = "green" if r.status == Status.SUCCEEDED else "red"
        table.add_row(
            Text(_inert(r.custom_id)),
            Text(r.status.value, style=style),
            Text(_inert(r.model or "")),
            Text(_inert((shown or "")[:300])),
        )
    Console(emoji=False, highlight=False).print(table)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}


def _inert(text: str) -> str:
    """`text` with control characters shown as \\xNN: an ESC from a model output must not
    reach the terminal (colours, hyperlinks, cursor moves, title changes)."""
    return text.translate(_CONTROL)


# -- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="agentq", description="Run large batches of LLM agent jobs through Redis workers."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole job file on this machine, print the results")
    run.add_argument("file")
    run.add_argument("-o", "--output", help="write result records (JSONL) here")
    run.add_argument("--batch-id")

    submit = sub.add_parser("submit", help="enqueue a job file; prints the batch id last")
    submit.add_argument("file")
    submit.add_argument("--batch-id")
    submit.add_argument("--wait", action="store_true")
    submit.add_argument(
        "--priority",
        choices=["high", "normal", "low"],
        default="normal",
        help="start this batch's jobs before (high) or after (low) other batches' "
        "(default: normal; active batches of one priority take turns)",
    )

    status = sub.add_parser("status", help="counts by status, tokens, cost")
    status.add_argument("batch")
    status.add_argument("--json", action="store_true")

    wait = sub.add_parser("wait", help="wait until a batch is done")
    wait.add_argument("batch")
    wait.add_argument("--timeout", type=float)

    results = sub.add_parser("results", help="result records, in input order")
    results.add_argument("batch")
    results.add_argument("-o", "--output")
    results.add_argument("--failed", action="store_true", help="only failed jobs")
    results.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")

    cancel = sub.add_parser("cancel", help="cancel the jobs of a batch not finished yet")
    cancel.add_argument("batch")

    retry = sub.add_parser("retry", help="re-enqueue failed (and cancelled) jobs")
    retry.add_argument("batch")
    retry.add_argument("--failed", action="store_true", help="only failed jobs, not cancelled")

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")

    sub.add_parser("health", help="Router, Redis and workers")
    sub.add_parser("models", help="models the Router offers")
    sub.add_parser("agents", help="agent profiles and tools the workers offer")
    embedded = sub.add_parser("embedded", help="the embedded server of this directory")
    embedded.add_argument("action", choices=["status", "stop"])
    return ap


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]] = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "wait": cmd_wait,
    "results": cmd_results,
    "cancel": cmd_cancel,
    "retry": cmd_retry,
    "health": cmd_health,
    "models": cmd_models,
    "agents": cmd_agents,
}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    settings = None
    try:
        settings = load_settings()
        if args.command == "worker":
            code = cmd_worker(args, settings)
        elif args.command == "embedded":
            code = cmd_embedded(args, settings)
        else:
            code = asyncio.run(COMMANDS[args.command](args, settings))
    except (ConfigError, JobFileError, FileNotFoundError, InvalidBatchId) as exc:
        _err(str(exc))
        code = EXIT_BAD_INPUT
    except BatchNotFound as exc:
        _err(str(exc))
        code = EXIT_BAD_INPUT
    except EmbeddedRedisError as exc:  # says what went wrong and what to do
        _err(str(exc))
        code = EXIT_FAILED
    except RedisError as exc:
        url = safe_url(settings.redis_url) if settings and settings.redis_url else None
        _err(
            f"Redis at {url or 'the embedded server'}: {exc} — check REDIS_URL "
            "(host, port, password, TLS)"
        )
        code = EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = EXIT_OK
    sys.exit(code)


if __name__ == "__main__":
    main()
