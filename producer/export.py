"""Writing result records: JSONL, one record a line; or CSV, with output_json flattened into
columns (output_json.city, output_json.address.zip, ...) so structured outputs load straight
into a table. Both stream: CSV reads the records twice (columns first) instead of holding them.

CSV cells are neutralised as OWASP recommends for formula injection: a string that starts with
= + - @ tab, CR (or NUL, per ASVS 1.2.10) gets a leading single quote, so a spreadsheet shows
it as text instead of running it. Numbers (token counts, costs, numeric JSON values) stay
numbers; a number-looking string from a model is still a string and is quoted."""

from __future__ import annotations

import csv
import json
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

from .models import ResultRecord

Records = Callable[[], AsyncIterator[ResultRecord]]

BASE_COLUMNS = [
    "custom_id",
    "status",
    "model",
    "output",
    "error_type",
    "error_message",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "job_id",
    "batch_id",
    "started_at",
    "finished_at",
    "worker",
]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\0")


def neutralise(value: Any) -> Any:
    """A CSV cell a spreadsheet won't evaluate: strings that could start a formula get a
    leading single quote; other values are returned as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"p.a.b": 1, "p.c": "[1, 2]"}; lists stay JSON."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    if isinstance(value, list):
        return {prefix: json.dumps(value)}
    return {prefix: value}


def csv_row(r: ResultRecord) -> dict[str, Any]:
    row = {
        "custom_id": r.custom_id,
        "status": r.status.value,
        "model": r.model,
        "output": r.output,
        "error_type": r.error.type if r.error else None,
        "error_message": r.error.message if r.error else None,
        "input_tokens": r.usage.input_tokens,
        "output_tokens": r.usage.output_tokens,
        "total_tokens": r.usage.total_tokens,
        "cost_usd": r.cost_usd,
        "job_id": r.job_id,
        "batch_id": r.batch_id,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "worker": r.worker,
    }
    if r.output_json is not None:
        row.update(flatten(r.output_json, "output_json"))
    return row


async def write_jsonl(records: Records, out: IO[str]) -> int:
    n = 0
    async for r in records():
        out.write(r.model_dump_json() + "\n")
        n += 1
    return n


async def write_csv(records: Records, out: IO[str]) -> int:
    extra: dict[str, None] = {}  # ordered set of output_json columns
    async for r in records():
        if r.output_json is not None:
            extra.update(dict.fromkeys(flatten(r.output_json, "output_json")))
    writer = csv.DictWriter(out, [*BASE_COLUMNS, *extra])
    writer.writeheader()
    n = 0
    async for r in records():
        writer.writerow({k: neutralise(v) for k, v in csv_row(r).items()})
        n += 1
    return n


FOLLOW_COLUMNS = [*BASE_COLUMNS, "output_json"]
"""CSV columns of `results --follow`: records come one by one, so the columns cannot be read
from the records first; output_json is one cell of JSON."""


async def stream_jsonl(records: AsyncIterator[ResultRecord], out: IO[str]) -> int:
    """JSONL as records come, each line flushed (a reader of a pipe sees it at once)."""
    n = 0
    async for r in records:
        out.write(r.model_dump_json() + "\n")
        out.flush()
        n += 1
    return n


async def stream_csv(records: AsyncIterator[ResultRecord], out: IO[str]) -> int:
    """CSV as records come (FOLLOW_COLUMNS), each row flushed; cells neutralised as above."""
    writer = csv.DictWriter(out, FOLLOW_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    out.flush()
    n = 0
    async for r in records:
        row = csv_row(r)
        row["output_json"] = None if r.output_json is None else json.dumps(r.output_json)
        writer.writerow({k: neutralise(v) for k, v in row.items()})
        out.flush()
        n += 1
    return n
