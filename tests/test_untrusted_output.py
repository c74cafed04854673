"""Text that came from a job or a model is shown as it is: never read as console markup,
never written as a live spreadsheet formula."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import pytest

from producer.cli import _print_table
from producer.export import write_csv
from producer.models import JobError, ResultRecord, Status

HOSTILE = "[/bold] [link=http://evil.example]click[/link] [red]x"


def _record(custom_id: str, **kw: object) -> ResultRecord:
    base: dict[str, object] = {
        "custom_id": custom_id,
        "job_id": f"j-{custom_id}",
        "batch_id": "b1",
        "status": Status.SUCCEEDED,
    }
    return ResultRecord.model_validate(base | kw)


async def _aiter(records: list[ResultRecord]) -> AsyncIterator[ResultRecord]:
    for r in records:
        yield r


async def test_table_prints_markup_from_outputs_and_errors_literally(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    records = [
        _record("[bold]id", output=HOSTILE, model="[/]m"),
        _record(
            "e",
            status=Status.FAILED,
            error=JobError(type="output_invalid", message=f"bad reply {HOSTILE}"),
        ),
    ]
    await _print_table(_aiter(records))  # raised rich.errors.MarkupError before
    out = capsys.readouterr().out
    assert HOSTILE in out
    assert "[bold]id" in out and "[/]m" in out
    assert f"[output_invalid] bad reply {HOSTILE}" in out


FORMULAS = [
    '=HYPERLINK("http://evil.example","x")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1)",
    "\t=1",
    "\r=1",
]


async def test_csv_cells_that_could_start_a_formula_are_quoted_numbers_stay_numbers() -> None:
    records = [
        _record(
            f"=id{i}",
            output=f,
            output_json={"v": f, "n": -3, "cost": 1.5, "nested": {"w": "@x"}},
            error=JobError(type="output_invalid", message=f),
        )
        for i, f in enumerate(FORMULAS)
    ]
    out = io.StringIO()
    assert await write_csv(lambda: _aiter(records), out) == len(FORMULAS)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    for f, row in zip(FORMULAS, rows, strict=True):
        for col in ("output", "error_message", "output_json.v"):
            assert row[col] == "'" + f, col
        assert row["custom_id"].startswith("'=id")
        assert row["output_json.nested.w"] == "'@x"
        assert row["output_json.n"] == "-3"  # a JSON number is a number, not a formula
        assert row["output_json.cost"] == "1.5"
        assert row["status"] == "succeeded"


async def test_table_shows_terminal_escapes_from_outputs_instead_of_sending_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    link = "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\"
    await _print_table(_aiter([_record("x\x1b[2J", output=f"\x1b[31mred\x07 {link}")]))
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out  # capsys is no terminal: rich adds none
    assert "\\x1b[31mred\\x07" in out and "x\\x1b[2J" in out


def test_summary_shows_control_characters_in_model_names_escaped() -> None:
    from producer.cli import _print_summary
    from producer.models import BatchStatus, ModelUsage

    st = BatchStatus(batch_id="b1", models={"gpt\x1b[2J": ModelUsage(jobs=1)})
    out = io.StringIO()
    _print_summary(st, out)
    assert "\x1b" not in out.getvalue() and "gpt\\x1b[2J: 1 jobs" in out.getvalue()
