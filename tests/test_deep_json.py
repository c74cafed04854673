"""Deeply nested JSON is refused with the line that has it, and never crashes a parser
(issue 9, finding 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agents.exceptions import ModelBehaviorError

from producer import AgentJob, JobFileError, Producer, Settings, Status, keys
from producer.limits import MAX_DEPTH, json_depth
from producer.models import job_id_for
from producer.schema import SchemaRefused, check_output_schema
from producer.store import arq_job_id
from tests.helpers import records, run_batch
from worker.agents_build import JsonSchemaOutput
from worker.payload import load_job

DEEP = 100_000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_depth_is_counted_outside_strings() -> None:
    assert json_depth('{"a": [1, {"b": "[[[{{"}], "c": "\\"]"}') == 3
    assert json_depth(nested(DEEP)) == DEEP
    assert json_depth("") == 0


async def test_deep_lines_reported(producer: Producer, tmp_path: Path) -> None:
    f = tmp_path / "jobs.jsonl"
    f.write_text(
        '{"custom_id": "ok", "input": "x"}\n'
        f'{{"custom_id": "deep", "input": "x", "metadata": {{"x": {nested(DEEP)}}}}}\n'
        f'{{"custom_id": "just", "input": "x", "metadata": {{"x": {nested(MAX_DEPTH - 2)}}}}}\n'
        f'{{"custom_id": "broken", "input": {"[" * DEEP}\n'
    )
    with pytest.raises(JobFileError) as err:
        await producer.submit_file(f)
    text = str(err.value)
    assert "2 bad lines; nothing was enqueued" in text
    assert (
        f"line 2: the line nests JSON arrays and objects {DEEP + 2} levels deep, over the limit "
        f"of {MAX_DEPTH}: flatten it"
    ) in text
    assert f"line 4: the line nests JSON arrays and objects {DEEP + 1} levels deep" in text


async def test_deep_job_from_python_refused(producer: Producer) -> None:
    deep: object = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    job = AgentJob.model_validate({"custom_id": "a", "input": "x", "metadata": {"x": deep}})
    with pytest.raises(JobFileError, match="job 1: the job nests JSON arrays and objects"):
        await producer.submit([job])


def test_load_job_refuses_deep_payload() -> None:
    payload = b'{"f": "run_agent_job", "a": ' + nested(DEEP).encode() + b', "k": {}}'
    d = load_job(payload)
    assert d["a"] == [] and "nests JSON arrays and objects" in d["k"]["invalid_payload"]


async def test_worker_fails_deep_stored_jobs_as_invalid(
    producer: Producer, settings: Settings
) -> None:
    """A deep queue payload and a deep stored job (written past the producer's checks) each fail
    their job as invalid_job; the worker carries on with the rest."""
    batch = await producer.submit(
        [AgentJob(custom_id=c, input="What is 1 + 1?") for c in ("payload", "spec", "fine")]
    )
    r = producer.redis
    await r.set(
        keys.ARQ_JOB_PREFIX + arq_job_id(job_id_for(batch.id, "payload"), 1),
        '{"f": "run_agent_job", "a": ' + nested(DEEP) + "}",
    )
    spec = {"custom_id": "spec", "input": "x", "metadata": {"x": json.loads(nested(500))}}
    await r.hset(keys.job(job_id_for(batch.id, "spec")), "spec", json.dumps(spec))
    await run_batch(producer, settings, batch.id)
    out = await records(producer, batch.id)
    for cid in ("payload", "spec"):
        error = out[cid].error
        assert out[cid].status == Status.FAILED and error is not None
        assert error.type == "invalid_job" and "nests JSON arrays and objects" in error.message
    assert out["fine"].status == Status.SUCCEEDED
    assert await r.zcard(settings.queue) == 0


def test_deep_output_and_looping_schema() -> None:
    out = JsonSchemaOutput({"type": "array"})
    with pytest.raises(ModelBehaviorError, match="the output nests JSON"):
        out.validate_json(nested(DEEP))
    with pytest.raises(SchemaRefused, match="loop without end"):
        check_output_schema({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})
