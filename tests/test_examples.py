"""Every example file runs against the simulated Router and gives the outputs the README shows."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from producer import Producer, Settings, Status
from producer.export import write_csv
from tests.helpers import records, run_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def run_file(producer: Producer, settings: Settings, name: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    batch = await producer.submit_file(EXAMPLES / name)
    await run_batch(producer, settings, batch.id)
    return batch.id, await records(producer, batch.id)


async def test_quickstart(producer: Producer, settings: Settings) -> None:
    _, out = await run_file(producer, settings, "quickstart.jsonl")
    assert all(r.status == Status.SUCCEEDED for r in out.values())
    assert out["q1"].output == "4"
    assert out["q2"].output == "The result of 15 * 23 is 345."
    assert out["q3"].output == "The result of (17 + 4) * 3 is 63."
    assert out["q5"].output == "12"


async def test_structured_extraction_to_csv(producer: Producer, settings: Settings) -> None:
    batch_id, out = await run_file(producer, settings, "structured.jsonl")
    assert all(r.status == Status.SUCCEEDED for r in out.values()), out
    for r in out.values():
        assert set(r.output_json) == {"city", "country", "population"}
        assert isinstance(r.output_json["population"], int)
    buf = io.StringIO()
    n = await write_csv(lambda: producer.results(batch_id), buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert n == 3 and [r["custom_id"] for r in rows] == ["paris", "tokyo", "lagos"]
    assert {"output_json.city", "output_json.country", "output_json.population"} <= set(rows[0])
    assert rows[0]["output_json.population"] == str(out["paris"].output_json["population"])


async def test_conversations(producer: Producer, settings: Settings) -> None:
    _, out = await run_file(producer, settings, "conversation.jsonl")
    assert all(r.status == Status.SUCCEEDED for r in out.values()), out
    assert out["budget"].output == "The result of 40 * 3 is 120."
    assert out["trip"].output and "What should I see first" in out["trip"].output
