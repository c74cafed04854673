"""output_schema patterns run in linear time, so a backtracking pattern and a reply made to
trip it cannot stall a worker (issue 9, finding 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from agents.exceptions import ModelBehaviorError

from producer import JobFileError, Producer
from producer.schema import SchemaRefused, check_output_schema
from tests.procs import ROOT, agentq, base_env, start_sim, start_worker, stop
from worker.agents_build import JsonSchemaOutput

EVIL = "^(a+)+$"
TRAP = "a" * 34 + "!"  # about 20 minutes of backtracking in Python's re


_VALIDATE = """
import json, sys
from agents.exceptions import ModelBehaviorError
from worker.agents_build import JsonSchemaOutput
for schema, reply in json.load(sys.stdin):
    try:
        JsonSchemaOutput(schema).validate_json(reply)
        print("valid")
    except ModelBehaviorError as exc:
        print(exc)
"""


def test_backtracking_patterns_fail_fast() -> None:
    """pattern, patternProperties (and additionalProperties, which matches them again) and
    propertyNames against the trap: each reply is refused with the usual message. In a child
    process, so a regression fails the test (at the timeout) rather than hang it for hours."""
    cases = [
        ({"properties": {"s": {"pattern": EVIL}}}, json.dumps({"s": TRAP})),
        (
            {"patternProperties": {EVIL: {"type": "integer"}}, "additionalProperties": False},
            json.dumps({TRAP: 1}),
        ),
        ({"propertyNames": {"pattern": EVIL}}, json.dumps({TRAP: 1})),
    ]
    lines = _validate_in_child(cases)  # the fixed code takes milliseconds; the old one hours
    assert "does not match '^(a+)+$'" in lines[0]
    assert "does not match any of the regexes: '^(a+)+$'" in lines[1]
    assert "does not match '^(a+)+$'" in lines[2]


def _validate_in_child(cases: list[tuple[dict[str, Any], str]]) -> list[str]:
    """Validate replies in a child process: a regression fails the test at the timeout
    instead of hanging it. One line a reply: "valid", or why not."""
    res = subprocess.run(
        [sys.executable, "-c", _VALIDATE],
        input=json.dumps(cases),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == len(cases), res.stdout
    return lines


def test_long_unique_arrays_are_checked_in_linear_time() -> None:
    """uniqueItems compared every pair of objects: 34 s for 6,000 (minutes for a long reply)."""
    distinct = json.dumps([{"a": i} for i in range(20_000)])
    repeated = json.dumps([{"a": i} for i in range(20_000)] + [{"a": 7.0}])
    unique = {"type": "array", "uniqueItems": True}
    lines = _validate_in_child(
        [
            (unique, distinct),
            (unique, repeated),
            (unique, json.dumps([True, 1, False, 0, {"a": [1]}, {"a": [True]}])),
        ]
    )
    assert lines[0] == "valid" and lines[2] == "valid", lines
    assert "has non-unique elements" in lines[1]


def test_a_costly_schema_and_reply_stop_at_the_budget() -> None:
    """Validation costs up to the schema's size times the reply's: each output gets a time
    budget, and going over it fails the job (output_invalid) instead of stalling the worker."""
    branches = [{"properties": {"a": {"const": i}}, "required": ["a"]} for i in range(2000)]
    schema = {"type": "array", "items": {"anyOf": branches}}
    (line,) = _validate_in_child([(schema, json.dumps([{"a": 1999}] * 20_000))])
    assert "took over 1 s (the budget of one output)" in line


def test_patterns_keep_their_meaning() -> None:
    schema = {
        "type": "object",
        "properties": {"code": {"pattern": r"^\d{3}-[a-z]+$"}, "name": {"pattern": r"^\p{L}+$"}},
        "patternProperties": {"^x-": {"type": "string"}},
        "additionalProperties": False,
    }
    out = JsonSchemaOutput(schema)
    assert out.validate_json('{"code": "123-abc", "name": "Zoë", "x-a": "b"}')["name"] == "Zoë"
    for bad in ('{"code": "12-abc"}', '{"name": "Zoë1"}', '{"x-a": 1}', '{"other": 1}'):
        with pytest.raises(ModelBehaviorError):
            out.validate_json(bad)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"pattern": "(?=a)b"}, "cannot run on the linear-time matcher"),
        ({"patternProperties": {r"(a)\1": {}}}, "lookarounds and backreferences"),
        ({"pattern": "a{1000}{1000}"}, "cannot run on the linear-time matcher"),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, "leave $schema out"),
        (
            {"properties": {"a": {"$schema": "https://json-schema.org/draft/2020-12/schema"}}},
            "$schema is allowed only at the top",
        ),
        (
            {"patternProperties": {"^a": {}}, "unevaluatedProperties": False},
            "use additionalProperties",
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused(schema: dict[str, Any], reason: str) -> None:
    with pytest.raises(SchemaRefused, match=reason.replace("$", r"\$")):
        check_output_schema(schema)


async def test_refused_at_submit_with_the_line(producer: Producer, tmp_path: Path) -> None:
    f = tmp_path / "jobs.jsonl"
    lines = [
        {"custom_id": "ok", "input": "x", "agent": {"output_schema": {"pattern": EVIL}}},
        {"custom_id": "look", "input": "x", "agent": {"output_schema": {"pattern": "(?!a)"}}},
    ]
    f.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(JobFileError, match=r"line 2: agent.output_schema: pattern '\(\?!a\)'"):
        await producer.submit_file(f)


@pytest.mark.e2e
def test_a_reply_made_to_backtrack_does_not_stall_the_worker(
    redis_url: str, tmp_path: Path
) -> None:
    """The simulated model copies the input into the schema's string: a prompt-injected reply.
    The job fails output_invalid and the worker's other jobs finish (before, the worker's event
    loop was stuck in re.search for about 20 minutes)."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    sim, url = start_sim()
    env = base_env(redis_url, url)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}}
        jobs = [{"custom_id": "trap", "input": TRAP, "agent": {"output_schema": schema}}]
        jobs += [{"custom_id": f"n{i}", "input": f"What is {i} + 1?"} for i in range(5)]
        f = tmp_path / "jobs.jsonl"
        f.write_text("".join(json.dumps(j) + "\n" for j in jobs))
        res = agentq("submit", str(f), env=env)
        assert res.returncode == 0, res.stderr
        batch_id = res.stdout.strip().splitlines()[-1]
        waited = agentq("wait", batch_id, "--timeout", "90", env=env)
        assert "timed out" not in waited.stderr, waited.stderr
        out = agentq("results", batch_id, env=env)
        assert out.returncode == 0, out.stderr
        records = {r["custom_id"]: r for r in map(json.loads, out.stdout.splitlines())}
        assert records["trap"]["status"] == "failed"
        assert records["trap"]["error"]["type"] == "output_invalid"
        assert "does not match" in records["trap"]["error"]["message"]
        assert all(records[f"n{i}"]["status"] == "succeeded" for i in range(5))
    finally:
        stop(worker, sim)
