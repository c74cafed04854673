"""A job's output_schema is the submitter's: it may not make anyone fetch anything (issue 9)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ops.hostile import Internal
from producer import AgentJob, JobFileError, Producer
from producer.models import AgentSpec, job_id_for
from producer.schema import SchemaRefused, check_output_schema, output_validator
from producer.store import Store
from worker.agents_build import JsonSchemaOutput
from worker.errors import InvalidJob


@pytest.fixture
def internal() -> Iterator[tuple[str, list[str]]]:
    """An "internal" HTTP service: its URL, and the paths anyone fetched from it."""
    hits: list[str] = []
    handler = type("Handler", (Internal,), {"hits": hits})  # the suite's, with its own log
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/internal/admin", hits
    finally:
        server.shutdown()
        server.server_close()


def _remote_schemas(url: str) -> list[dict[str, Any]]:
    return [
        {"$ref": url},
        {"type": "object", "properties": {"x": {"items": {"$ref": url}}}},
        {"$ref": "file:///etc/passwd"},
        {"$defs": {"a": {"$dynamicRef": url}}},
        {"$ref": "other.json"},
    ]


async def test_remote_refs_refused_at_submit(
    producer: Producer, redis: Redis, tmp_path: Path, internal: tuple[str, list[str]]
) -> None:
    url, hits = internal
    f = tmp_path / "jobs.jsonl"
    lines = [{"custom_id": "ok", "input": "x", "agent": {"output_schema": {"type": "object"}}}]
    lines += [
        {"custom_id": f"r{i}", "input": "x", "agent": {"output_schema": s}}
        for i, s in enumerate(_remote_schemas(url))
    ]
    f.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(JobFileError) as err:
        await producer.submit_file(f)
    text = str(err.value)
    assert "5 bad lines; nothing was enqueued" in text
    for n in range(2, 7):
        assert f"line {n}: agent.output_schema: " in text
    assert "points outside the schema; workers never fetch schemas" in text
    assert "put the referenced schema under $defs" in text
    assert hits == []
    assert await redis.zcard("agentq:queue") == 0


def test_local_refs_are_fine_and_must_resolve() -> None:
    schema = {
        "$defs": {"name": {"type": "string", "$anchor": "nm"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/name"}, "b": {"$ref": "#nm"}},
        # data that merely looks like a reference is not one
        "examples": [{"$ref": "http://example.invalid/"}],
    }
    check_output_schema(schema)
    assert not list(output_validator(schema).iter_errors({"a": "x", "b": "y"}))
    assert list(output_validator(schema).iter_errors({"a": 1}))
    with pytest.raises(SchemaRefused, match="'#/\\$defs/nope' points nowhere in the schema"):
        check_output_schema({"$ref": "#/$defs/nope"})


def test_worker_validation_fetches_nothing(internal: tuple[str, list[str]]) -> None:
    """A schema that skipped the submit check (an older producer, a hand-written record): the
    worker refuses it, and its validator resolves nothing remote either."""
    url, hits = internal
    for schema in _remote_schemas(url):
        with pytest.raises(InvalidJob, match="points outside the schema"):
            JsonSchemaOutput(schema)
        with pytest.raises(Exception, match="Unresolvable"):
            list(output_validator({"properties": {"a": {"$ref": url}}}).iter_errors({"a": 1}))
    assert hits == []


async def test_stored_job_with_remote_ref_fails_at_claim(
    store: Store, internal: tuple[str, list[str]]
) -> None:
    """A job record already in Redis whose schema reaches out: the claim cannot read it (the
    runner fails it as invalid_job) and nothing is fetched."""
    url, hits = internal
    spec = AgentSpec.model_construct(output_schema={"$ref": url})
    job = AgentJob.model_construct(custom_id="a", input="x", agent=spec)
    await store.submit_chunk("b1", [job])
    claim = await store.claim(job_id_for("b1", "a"), "b1", "w1", "1")
    assert claim.holds and claim.job is None
    assert claim.spec_error and "points outside the schema" in claim.spec_error
    assert hits == []
