"""agentq benchmarks: `python -m ops.bench [--quick] [--only NAME ...] [--redis-url URL]`.

Runs each comparison side by side in one run on this machine (same simulated Router process,
A/B alternating, medians of rounds) and prints a table: name | case | measured | target |
PASS/SHORT. These are benchmarks, not tests: SHORT does not fail the command; an error does
(exit 1). `--quick` runs everything at a small size, only to prove the harness works.

Without --redis-url an embedded Valkey server is started in a scratch directory. With it, that
database is FLUSHED before each case and at the end (use a spare one, e.g. redis://.../14)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import redis as redis_sync

from ops import procs

from .cases import CASES, FULL, QUICK, Bench, Row, error_row

CASE_TIMEOUT_S = {"full": 1800.0, "quick": 90.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m ops.bench",
        description=(__doc__ or "").splitlines()[0],
        epilog="targets: " + ", ".join(CASES),
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (CI: proves it works)")
    ap.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=list(CASES),
        metavar="NAME",
        help=f"run only these targets: {', '.join(CASES)}",
    )
    ap.add_argument("--redis-url", help="Redis to use (its database is flushed!)")
    ap.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (worker logs)")
    return ap.parse_args(argv)


def render(rows: list[Row]) -> str:
    head = ("name", "case", "measured", "target", "result")
    cells = [(r.name, r.case, r.measured, r.target, r.status) for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

    def line(c: tuple[str, ...]) -> str:
        return " | ".join(x.ljust(w) for x, w in zip(c, widths, strict=True)).rstrip()

    out = [line(head), "-+-".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    out.append("")
    out += [f"{r.name} [{r.case}]: {r.detail}" for r in rows if r.detail]
    return "\n".join(out)


async def run_cases(bench: Bench, names: list[str], case_timeout_s: float) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        fn, _ = CASES[name]
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(case_timeout_s):
                new = await fn(bench)
        except Exception as exc:
            new = [error_row(name, exc)]
        finally:
            procs.stop_all()  # whatever a failed case left running
        for r in new:
            print(f"  {r.name} [{r.case}]: {r.measured} (target {r.target}) {r.status}", flush=True)
        print(f"  ({name} took {time.perf_counter() - t0:.0f} s)", flush=True)
        rows += new
    return rows


def flush_db(url: str) -> None:
    client = redis_sync.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in CASES if not args.only or n in args.only]
    sizes = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="agentq-bench-"))
    embedded: procs.EmbeddedRedis | None = None
    rows: list[Row] = []
    t0 = time.perf_counter()
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            embedded = procs.EmbeddedRedis(tmp / "valkey")
            url = embedded.start()
        redis_sync.Redis.from_url(url, socket_timeout=10).ping()
        redis_pid = procs.local_redis_pid(url)
        counted = (
            f"pid {redis_pid}, its CPU and memory counted as agentq's"
            if redis_pid is not None
            else "not a local process: its CPU and memory are not counted"
        )
        print(
            f"agentq bench ({'quick' if args.quick else 'full'}): {', '.join(names)}\n"
            f"  Redis {url} ({'embedded Valkey' if embedded else 'given'}; {counted}), "
            f"{os.cpu_count()} cores, python {sys.version.split()[0]}, scratch {tmp}",
            flush=True,
        )
        bench = Bench(redis_url=url, sizes=sizes, tmp=tmp, redis_pid=redis_pid)
        timeout = CASE_TIMEOUT_S["quick" if args.quick else "full"]
        rows = asyncio.run(run_cases(bench, names, timeout))
    finally:
        procs.stop_all()
        if args.redis_url:
            try:
                flush_db(args.redis_url)
            except Exception as exc:
                print(f"could not flush {args.redis_url}: {exc}", file=sys.stderr)
        if embedded is not None:
            embedded.stop()
        failed = any(r.error for r in rows) or not rows
        if args.keep or (failed and rows):
            print(f"\nscratch dir kept (worker logs): {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n== results (all cases took {time.perf_counter() - t0:.0f} s)\n")
    print(render(rows), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "mode": "quick" if args.quick else "full",
                    "cores": os.cpu_count(),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "rows": [r.as_dict() for r in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
