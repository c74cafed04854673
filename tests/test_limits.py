"""Every job field a submitter controls is bounded at submit, with the field, the limit and the
line; the worker's caches are bounded by size (issue 9, finding 6)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from producer import AgentJob, JobFileError, Producer, Settings, limits
from producer.models import AgentSpec
from worker import agents_build
from worker.agents_build import plan
from worker.tools import Registry

BIG = 1 << 20


def _line(custom_id: str, **fields: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "input": "x", **fields}


OVERSIZED: list[tuple[dict[str, Any], str]] = [
    (
        _line("instr", agent={"instructions": "i" * 200_000}),
        "agent.instructions: 200000 characters, over the limit of "
        f"{limits.MAX_INSTRUCTIONS_CHARS}: make it shorter",
    ),
    (
        _line("model", model="m" * 1000),
        f"model: 1000 characters, over the limit of {limits.MAX_NAME_CHARS}",
    ),
    (
        _line("fb-count", fallbacks=[f"m{i}" for i in range(50)]),
        f"fallbacks: 50 items, over the limit of {limits.MAX_FALLBACKS}",
    ),
    (
        _line("fb-name", fallbacks=["ok", "f" * 500]),
        f"fallbacks.1: 500 characters, over the limit of {limits.MAX_NAME_CHARS}",
    ),
    (
        _line("meta", metadata={"blob": "b" * 100_000}),
        f"metadata: 100036 characters as JSON, over the limit of {limits.MAX_METADATA_CHARS}",
    ),
    (
        _line(
            "schema",
            agent={"output_schema": {"properties": {f"p{i}": {} for i in range(20_000)}}},
        ),
        f"over the limit of {limits.MAX_SCHEMA_CHARS}",
    ),
    (
        _line("settings", agent={"model_settings": {"temperature": 0, "x": "s" * 20_000}}),
        f"agent.model_settings: 20024 characters as JSON, over the limit of "
        f"{limits.MAX_MODEL_SETTINGS_CHARS}",
    ),
    (
        _line("tools", agent={"tools": [f"t{i}" for i in range(100)]}),
        f"agent.tools: 100 items, over the limit of {limits.MAX_NAMES}",
    ),
    (
        _line("name", agent={"name": "n" * 300}),
        f"agent.name: 300 characters, over the limit of {limits.MAX_NAME_CHARS}",
    ),
]


async def test_each_oversized_field_is_named_with_its_limit_and_line(
    settings: Settings, redis: Redis, tmp_path: Path
) -> None:
    f = tmp_path / "jobs.jsonl"
    lines = [_line("fine")] + [line for line, _ in OVERSIZED]
    f.write_text("".join(json.dumps(line) + "\n" for line in lines))
    async with Producer.from_env(settings) as p:
        with pytest.raises(JobFileError) as err:
            await p.submit_file(f)
    text = str(err.value)
    assert f"{len(OVERSIZED)} bad lines; nothing was enqueued" in text
    for n, (_, reason) in enumerate(OVERSIZED, 2):
        line = next(x for x in text.splitlines() if x.strip().startswith(f"line {n}:"))
        assert reason in line, (n, line)
    assert await redis.dbsize() == 0


async def test_a_long_line_is_never_read_whole(settings: Settings, tmp_path: Path) -> None:
    """A 64 MB line with no newline: refused by its size, read in bounded pieces."""
    f = tmp_path / "jobs.jsonl"
    with f.open("w") as out:
        out.write('{"custom_id": "a", "input": "ok"}\n{"custom_id": "b", "input": "')
        for _ in range(64):
            out.write("z" * BIG)
    tracemalloc.start()
    try:
        async with Producer.from_env(settings) as p:
            with pytest.raises(
                JobFileError,
                match=r"line 2: the line is 67108893 bytes, over the limit of 1048576 "
                r"\(AGENTQ_MAX_LINE_BYTES\): make its fields smaller",
            ):
                await p.submit_file(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * BIG


async def test_a_job_from_python_is_bounded_as_json(settings: Settings, redis: Redis) -> None:
    small = settings.model_copy(update={"max_line_bytes": 2000})
    job = AgentJob(custom_id="a", input="q" * 3000)
    async with Producer.from_env(small) as p:
        with pytest.raises(JobFileError, match=r"job 1: the job is 3\d\d\d bytes as JSON, over"):
            await p.submit([job])
    assert await redis.dbsize() == 0


def test_router_passthrough_settings_are_refused() -> None:
    for key in ("metadata", "store"):
        with pytest.raises(ValueError, match=f"agent.model_settings may not set {key}"):
            AgentJob.model_validate(
                {"custom_id": "a", "input": "x", "agent": {"model_settings": {key: {}}}}
            )


def test_the_agent_cache_is_bounded_by_size() -> None:
    """Jobs with large instructions, all different: the cache keeps what fits its budget
    (before, up to 1024 agents with their specs: 200 MB for 100 jobs of 1 MB instructions)."""
    agents_build._AGENTS.clear()
    registry, settings = Registry(), Settings()
    tracemalloc.start()
    try:
        for i in range(500):
            spec = AgentSpec(instructions=f"{i} " + "i" * (limits.MAX_INSTRUCTIONS_CHARS - 8))
            plan(AgentJob(custom_id="a", input="x", agent=spec), registry, settings)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        agents_build._AGENTS.clear()
    # 500 x 100 kB instructions, twice (the agent's and its cache key): 100 MB before
    assert held < 48 * BIG  # the 32 MB budget, and the rest of what a plan holds


def test_an_output_error_quotes_a_bounded_part_of_the_output() -> None:
    """jsonschema quotes the whole value in its message; the job's error keeps 500 characters
    of it (before: the whole reply, again, in the record and the logs)."""
    from agents.exceptions import ModelBehaviorError

    from worker.agents_build import JsonSchemaOutput

    out = JsonSchemaOutput({"properties": {"s": {"type": "string"}, "p": {"pattern": "^a"}}})
    for reply in ({"s": list(range(100_000))}, {"p": "b" * 100_000}):
        with pytest.raises(ModelBehaviorError) as err:
            out.validate_json(json.dumps(reply))
        assert len(str(err.value)) < 600, len(str(err.value))
