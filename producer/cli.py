"""The `agentq` command line.

Imports are lazy: a command imports what it uses when it runs, so `--help` and the commands
that only read Redis start fast. Only `run`, `worker`, `health` and `models` load the Agents
SDK or the openai client (tests/test_cli_startup.py guards this)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .cli_show import colour_enabled, inert, print_summary, status_dict
from .lazy import defer

defer("jwt")  # redis-py's Entra ID tokens: PyJWT and cryptography load only if used

if TYPE_CHECKING:
    from .client import Producer
    from .models import BatchStatus, ResultRecord
    from .settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_TIMEOUT = 2
WORKER_RESTART_S = 5.0


def _err(msg: str) -> None:
    print(f"agentq: {msg}", file=sys.stderr)


# -- commands -------------------------------------------------------------------------------


def _producer(settings: Settings) -> Producer:
    from .client import Producer

    return Producer.from_env(settings)


def _announce_batch(batch_id: str) -> None:
    print(
        f"batch {batch_id}: enqueueing (if this stops, run the same submit with "
        f"--batch-id {batch_id} to complete it)",
        file=sys.stderr,
        flush=True,
    )


async def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    async with _producer(settings) as p:
        batch = await p.submit_file(
            args.file,
            batch_id=args.batch_id,
            on_batch_id=_announce_batch,
            priority=args.priority,
            tenant=args.tenant,
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
            from .embedded import release_embedded_redis

            with contextlib.suppress(Exception):
                if release_embedded_redis(settings.data_dir):
                    print(f"stopped the embedded server in {settings.data_dir}", file=sys.stderr)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    # The one place the producer starts a worker: in-process, for a whole job on one machine.
    from worker.settings import build_worker

    from .routerinfo import preflight

    problem = await preflight(settings)
    if problem is not None:
        _err(f"{problem}; nothing was enqueued")
        return EXIT_BAD_INPUT
    async with _producer(settings) as p:
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
    from .breakers import describe_open, read_breakers
    from .budgets import describe_waits, read_budgets

    async with _producer(settings) as p:
        st = await p.status(args.batch)
        breakers, now_ms = await read_breakers(p.redis)
        budgets, _ = await read_budgets(p.redis)
    paused = describe_open(breakers, now_ms) if not st.finished else []
    waiting = describe_waits(budgets) if not st.finished else []
    if args.json:
        print(json.dumps({**status_dict(st), "paused": paused, "waiting": waiting}, indent=2))
    else:
        print_summary(st, sys.stdout, colour_enabled())
        for line in paused + waiting:
            print(line)
    return EXIT_OK


async def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    async with _producer(settings) as p:
        try:
            st = await _wait(p, args.batch, args.timeout)
        except TimeoutError:
            st = await p.status(args.batch)
            _err(f"timed out after {args.timeout:g} s: {st.done}/{st.total} jobs done")
            if args.json:
                print(json.dumps(status_dict(st), indent=2))
            return EXIT_TIMEOUT
    _print_summary(st, sys.stderr)
    if args.json:
        print(json.dumps(status_dict(st), indent=2))
    return EXIT_OK if st.all_succeeded else EXIT_FAILED


async def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    from .models import Status

    if args.json and args.format == "csv":
        raise UsageError("--json and --format csv contradict each other: give one")
    if args.follow:
        from .cli_read import follow_results

        return await follow_results(args, settings)
    statuses = {Status.FAILED} if args.failed else None
    async with _producer(settings) as p:
        n = await _write_results(
            lambda: p.results(args.batch, statuses=statuses), args.output, args.format
        )
    if args.output:
        print(f"wrote {n} result records to {args.output}", file=sys.stderr)
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with _producer(settings) as p:
        n = await p.cancel(args.batch)
        st = await p.status(args.batch)
    print(f"cancelled {n} jobs", file=sys.stderr)
    print_summary(st, sys.stdout, colour_enabled())
    return EXIT_OK


async def cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    async with _producer(settings) as p:
        n = await p.retry(args.batch, failed_only=args.failed)
        st = await p.status(args.batch)
    print(f"re-enqueued {n} jobs", file=sys.stderr)
    print_summary(st, sys.stdout, colour_enabled())
    return EXIT_OK


def cmd_embedded(args: argparse.Namespace, settings: Settings) -> int:
    """`agentq embedded status|stop`: the embedded server of this directory."""
    from .embedded import embedded_status, other_clients, stop_embedded_redis
    from .redact import safe_url

    d = Path(settings.data_dir).resolve()
    if args.action == "stop":
        stopped = stop_embedded_redis(d)
        print(f"stopped the embedded server in {d}" if stopped else f"no server runs in {d}")
        return EXIT_OK
    url = embedded_status(d)
    if url is None:
        if args.json:
            print(json.dumps({"running": False, "data_dir": str(d)}))
        else:
            print(f"no embedded server runs in {d}")
        return EXIT_FAILED
    users = other_clients(d)
    if args.json:
        print(
            json.dumps(
                {
                    "running": True,
                    "data_dir": str(d),
                    "url": safe_url(url),
                    "clients": users,
                    "idle_s": settings.embedded_idle_s,
                }
            )
        )
        return EXIT_OK
    print(f"embedded server {safe_url(url)} (data in {d}), {users} clients connected")
    if settings.embedded_idle_s:
        print(f"stops itself after {settings.embedded_idle_s:g} s unused (AGENTQ_EMBEDDED_IDLE_S)")
    return EXIT_OK


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    if args.processes != 1:
        from worker.supervisor import cpu_count, supervise

        n = args.processes or cpu_count()
        if n > 1:
            again = [f"--concurrency={args.concurrency}"] if args.concurrency else []
            again += ["--burst"] if args.burst else []
            return supervise(again, n, metrics_port=settings.metrics_port)

    from redis.exceptions import RedisError

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
    from .breakers import describe_open, read_breakers
    from .budgets import describe_budgets, read_budgets
    from .connect import redis_url
    from .redact import safe_url
    from .routerinfo import RouterInfo, check_router

    ok = True
    info: RouterInfo = await check_router(settings)
    report: dict[str, Any] = {
        "router": {
            "url": safe_url(settings.router_url),
            "ok": info.error is None,
            "models": len(info.models),
            "error": info.error,
        }
    }
    lines = ["=== Checking Hanzo Router Health ==="]
    if info.error is None:
        lines.append(f"✓ Router health check passed ({safe_url(settings.router_url)})")
        lines.append(f"✓ Available models: {len(info.models)} found")
    else:
        ok = False
        lines.append(f"✗ Router health check failed: {info.error}")
    lines.append("=== Checking Redis and workers ===")
    try:
        async with _producer(settings) as p:
            server = await p.redis.info("server")
            version = server.get("redis_version", "?")
            lines.append(f"✓ Redis {version} at {safe_url(redis_url(settings))}")
            workers = await p.workers()
            breakers, now_ms = await read_breakers(p.redis)
            budgets, _ = await read_budgets(p.redis)
    except Exception as exc:
        report["redis"] = {"ok": False, "url": safe_url(redis_url(settings)), "error": str(exc)}
        lines.append(f"✗ Redis unreachable at {safe_url(redis_url(settings))}: {exc}")
        _emit(args, lines, report)
        return EXIT_FAILED
    paused = describe_open(breakers, now_ms)
    report["redis"] = {"ok": True, "url": safe_url(redis_url(settings)), "version": version}
    report["workers"] = workers
    report["paused"] = paused
    lines.append(f"{'✓' if workers else '!'} Workers alive: {len(workers)}")
    for line in paused:
        ok = False
        lines.append(f"✗ {line}")
    report["budgets"] = describe_budgets(budgets)
    for line in report["budgets"]:
        lines.append(f"✓ {line}")
    for wid, beat in sorted(workers.items()):
        lines.append(
            f"    {inert(wid)}  in flight {beat.get('in_flight')}/{beat.get('concurrency')}"
            f"  v{beat.get('version')}"
        )
    report["ok"] = ok
    _emit(args, lines, report)
    return EXIT_OK if ok else EXIT_FAILED


def _emit(args: argparse.Namespace, lines: list[str], data: Any) -> None:
    """The lines for a person, or with --json the data."""
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines))


async def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .routerinfo import check_router

    info = await check_router(settings)
    if info.error is not None:
        _err(info.error)
        return EXIT_FAILED
    _emit(args, [inert(m) for m in info.models], info.models)
    return EXIT_OK


async def cmd_agents(args: argparse.Namespace, settings: Settings) -> int:
    async with _producer(settings) as p:
        workers = await p.workers(queue=settings.queue)
    if not workers:
        _err(f"no live workers on queue {settings.queue}: start one with `agentq worker`")
        return EXIT_FAILED
    tools: set[str] = set()
    agents: dict[str, Any] = {}
    for beat in workers.values():
        tools.update(beat.get("tools", []))
        agents.update(beat.get("agents", {}))
    lines = ["agent profiles:"]
    lines += [f"  {inert(n)}: tools={spec.get('tools', [])}" for n, spec in sorted(agents.items())]
    lines.append("tools:")
    lines += [f"  {inert(t)}" for t in sorted(tools)]
    _emit(args, lines, {"agents": agents, "tools": sorted(tools)})
    return EXIT_OK


def cmd_completion(args: argparse.Namespace) -> int:
    """A bash or zsh completion script, made by shtab from this parser."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))
    return EXIT_OK


# -- helpers ----------------------------------------------------------------------------------


class UsageError(Exception):
    """Options that don't go together; the message says what to give instead."""


async def _wait(
    p: Producer, batch_id: str, timeout: float | None, guard: asyncio.Task[Any] | None = None
) -> BatchStatus:
    """Wait with a progress display; `guard` is a task (an in-process worker) whose early
    end is an error."""
    from .progress import Progress

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


def _print_summary(st: BatchStatus, out: IO[str]) -> None:
    print_summary(st, out)


async def _write_results(records: Any, output: str | None, fmt: str) -> int:
    from .export import write_csv, write_jsonl

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

    from .models import Status

    table = Table(show_lines=False)
    for col in ("custom_id", "status", "model", "output / error"):
        table.add_column(col, overflow="fold")
    async for r in records:
        # Every cell but the status came from a job or a model: Text, never markup, and no
        # terminal control sequences.
        shown = r.output if r.error is None else f"[{r.error.type}] {r.error.message}"
        style = "green" if r.status == Status.SUCCEEDED else "red"
        table.add_row(
            Text(inert(r.custom_id)),
            Text(r.status.value, style=style),
            Text(inert(r.model or "")),
            Text(inert((shown or "")[:300])),
        )
    # No colour (nor any other escape) under NO_COLOR or into a file or a pipe.
    Console(emoji=False, highlight=False, color_system="auto" if colour_enabled() else None).print(
        table
    )


# -- entry point ------------------------------------------------------------------------------


_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files"}
"""shtab's FILE completion (without importing shtab for every command)."""

EXAMPLES = {
    "run": "agentq run examples/quickstart.jsonl -o results.jsonl",
    "submit": "agentq submit jobs.jsonl --wait",
    "status": "agentq status b_1234abcd --json",
    "wait": "agentq wait b_1234abcd --timeout 600",
    "results": "agentq results b_1234abcd --follow --failed --format csv > failed.csv",
    "job": "agentq job b_1234abcd q1",
    "logs": "agentq logs b_1234abcd --follow --event model_call --level info",
    "batches": "agentq batches --status active --limit 5",
    "cancel": "agentq cancel b_1234abcd",
    "retry": "agentq retry b_1234abcd --failed",
    "worker": "agentq worker --concurrency 100",
    "health": "agentq health --json",
    "models": "agentq models",
    "agents": "agentq agents --json",
    "embedded": "agentq embedded status",
    "completion": 'eval "$(agentq completion bash)"   # in ~/.bashrc',
}


class _Version(argparse.Action):
    """--version, read from the installed package only when asked (importlib.metadata is
    not free at start-up)."""

    def __init__(self, option_strings: list[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print agentq's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("agentq")
        except PackageNotFoundError:
            v = "unknown (not installed: pip install -e .)"
        print(f"agentq {v}")
        parser.exit()


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _processes(value: str) -> int:
    """--processes: a count, or 0 for auto."""
    if value == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="agentq",
        description="Run large batches of LLM agent jobs through Redis workers.",
        epilog="example:\n  agentq submit jobs.jsonl && agentq wait b_1234abcd\n\n"
        "`agentq COMMAND --help` shows a command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action=_Version)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a whole job file on this machine, print the results")
    run.add_argument("file").complete = _FILE  # type: ignore[attr-defined]
    run.add_argument("-o", "--output", help="write result records (JSONL) here")
    run.add_argument("--batch-id")

    submit = sub.add_parser("submit", help="enqueue a job file; prints the batch id last")
    submit.add_argument("file").complete = _FILE  # type: ignore[attr-defined]
    submit.add_argument("--batch-id", help="complete an interrupted submit of this batch")
    submit.add_argument("--wait", action="store_true", help="then wait as `agentq wait` does")
    submit.add_argument(
        "--priority",
        choices=["high", "normal", "low"],
        default="normal",
        help="start this batch's jobs before (high) or after (low) other batches' "
        "(default: normal; active batches of one priority take turns)",
    )
    submit.add_argument(
        "--tenant",
        help="the tenant of every job that names none in its metadata (tenants share the "
        "workers in turns, above batches)",
    )

    status = sub.add_parser("status", help="counts by status, tokens, cost")
    status.add_argument("batch")
    _json_flag(status)

    wait = sub.add_parser(
        "wait", help="wait until a batch is done: exit 0 all succeeded, 1 some failed, 2 timeout"
    )
    wait.add_argument("batch")
    wait.add_argument("--timeout", type=float, help="give up after this many seconds (exit 2)")
    _json_flag(wait)

    results = sub.add_parser(
        "results", help="result records, in input order (--follow: as jobs finish)"
    )
    results.add_argument("batch")
    results.add_argument("-o", "--output").complete = _FILE  # type: ignore[attr-defined]
    results.add_argument("--failed", action="store_true", help="only failed jobs")
    results.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    results.add_argument(
        "--follow",
        action="store_true",
        help="stream records as jobs finish, until the batch is done; exit codes as `wait`",
    )
    results.add_argument("--timeout", type=float, help="with --follow: give up after this long")
    results.add_argument("--json", action="store_true", help="JSON lines (the default format)")

    job = sub.add_parser("job", help="one job's record for a person: status, usage, error, log")
    job.add_argument("batch")
    job.add_argument("job", metavar="CUSTOM_ID|JOB_ID")
    _json_flag(job)

    logs = sub.add_parser("logs", help="log events of a batch's jobs, one line each")
    logs.add_argument("batch")
    logs.add_argument("custom_id", nargs="?", metavar="CUSTOM_ID|JOB_ID", help="only this job")
    logs.add_argument(
        "--follow", action="store_true", help="print events as they happen, until the batch is done"
    )
    logs.add_argument(
        "--event",
        action="append",
        metavar="NAME",
        help="only these events (repeatable; shell patterns such as 'job.*')",
    )
    logs.add_argument(
        "--level", choices=["debug", "info", "warning", "error"], help="only this level and above"
    )
    logs.add_argument("--timeout", type=float, help="with --follow: give up after this long")
    _json_flag(logs)

    batches = sub.add_parser("batches", help="batches, newest first, with counts, cost and age")
    batches.add_argument("--status", choices=["active", "done"], help="only active or done ones")
    batches.add_argument("--limit", type=_positive_int, default=20, help="at most N (20)")
    _json_flag(batches)

    cancel = sub.add_parser("cancel", help="cancel the jobs of a batch not finished yet")
    cancel.add_argument("batch")

    retry = sub.add_parser("retry", help="re-enqueue failed (and cancelled) jobs")
    retry.add_argument("batch")
    retry.add_argument("--failed", action="store_true", help="only failed jobs, not cancelled")

    worker = sub.add_parser("worker", help="run a worker process")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument(
        "--processes",
        type=_processes,
        default=1,
        metavar="N|auto",
        help="run N worker processes under a supervisor (auto: one per CPU this may use)",
    )

    _json_flag(sub.add_parser("health", help="Router, Redis and workers"))
    _json_flag(sub.add_parser("models", help="models the Router offers"))
    _json_flag(sub.add_parser("agents", help="agent profiles and tools the workers offer"))
    embedded = sub.add_parser("embedded", help="the embedded server of this directory")
    embedded.add_argument("action", choices=["status", "stop"])
    _json_flag(embedded)
    completion = sub.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"])

    for name, p in sub.choices.items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = f"example:\n  {EXAMPLES[name]}"
    return ap


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, got {text!r}")
    return n


def _read_command(name: str) -> Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]]:
    from . import cli_read

    return getattr(cli_read, f"cmd_{name}")


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
READ_COMMANDS = ("job", "logs", "batches")
"""Commands in producer/cli_read.py."""


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "completion":
        sys.exit(cmd_completion(args))
    settings = None
    try:
        from .settings import load_settings

        settings = load_settings()
        if args.command == "worker":
            code = cmd_worker(args, settings)
        elif args.command == "embedded":
            code = cmd_embedded(args, settings)
        elif args.command in READ_COMMANDS:
            code = asyncio.run(_read_command(args.command)(args, settings))
        else:
            code = asyncio.run(COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = EXIT_OK
    except Exception as exc:
        code = _exit_code(exc, settings)
    sys.exit(code)


def _exit_code(exc: Exception, settings: Settings | None) -> int:
    """A known error's message and exit code; anything else is a bug and shows its traceback.
    The error classes are imported here, not at start-up: a module that raised one is loaded
    already."""
    from redis.exceptions import RedisError

    from .client import BatchNotFound, JobNotFound
    from .embedded import EmbeddedRedisError
    from .jobfile import JobFileError
    from .models import InvalidBatchId
    from .redact import safe_url
    from .settings import ConfigError

    bad_input = (
        ConfigError,
        JobFileError,
        FileNotFoundError,
        InvalidBatchId,
        BatchNotFound,
        JobNotFound,
        UsageError,
    )
    if isinstance(exc, bad_input):
        _err(str(exc))
        return EXIT_BAD_INPUT
    if isinstance(exc, EmbeddedRedisError):  # says what went wrong and what to do
        _err(str(exc))
        return EXIT_FAILED
    if isinstance(exc, RedisError):
        url = safe_url(settings.redis_url) if settings and settings.redis_url else None
        _err(
            f"Redis at {url or 'the embedded server'}: {exc} — check REDIS_URL "
            "(host, port, password, TLS)"
        )
        return EXIT_FAILED
    raise exc


if __name__ == "__main__":
    main()
