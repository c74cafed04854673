"""Job files: every valid line becomes an AgentJob, every bad line is reported with its number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.jobfile import MAX_REPORTED, JobFileError, LineError, iter_jobs, validate_file
from producer.models import AgentJob, ChatMessage, job_id_for


def write_lines(tmp_path: Path, lines: list[str], name: str = "jobs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def job(custom_id: str, **fields: object) -> str:
    return json.dumps({"custom_id": custom_id, "input": f"question {custom_id}", **fields})


def only_error(path: Path) -> LineError:
    with pytest.raises(JobFileError) as info:
        validate_file(path)
    assert info.value.total == 1
    assert len(info.value.errors) == 1
    return info.value.errors[0]


# --- valid files ------------------------------------------------------------------------------


def test_valid_file_counts_jobs_and_streams_them_in_order(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            job("q1"),
            job("q2", model="gpt-4o", fallbacks=["gpt-3.5-turbo"], max_turns=3),
            job(
                "q3", agent={"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
            ),
        ],
    )

    assert validate_file(path) == 3
    jobs = list(iter_jobs(path))

    assert all(isinstance(j, AgentJob) for j in jobs)
    assert [j.custom_id for j in jobs] == ["q1", "q2", "q3"]
    assert jobs[0].input == "question q1"
    assert jobs[1].model == "gpt-4o"
    assert jobs[1].fallbacks == ["gpt-3.5-turbo"]
    assert jobs[1].max_turns == 3
    assert jobs[2].agent is not None and not isinstance(jobs[2].agent, str)
    assert jobs[2].agent.tools == ["calculator"]


def test_design_examples_are_valid(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            '{"custom_id": "q1", "input": "What is 2+2?"}',
            '{"custom_id": "q2", "input": "What is 15 * 23?", "agent": {"name": "Calc", '
            '"instructions": "Use tools.", "tools": ["calculator"]}, "model": "gpt-4o", '
            '"fallbacks": ["claude-3-sonnet-20240229", "gpt-3.5-turbo"], '
            '"metadata": {"user_id": "u-42"}}',
        ],
    )
    assert validate_file(path) == 2
    second = list(iter_jobs(path))[1]
    assert second.metadata.user_id == "u-42"
    assert second.fallbacks == ["claude-3-sonnet-20240229", "gpt-3.5-turbo"]


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_lines(tmp_path, ["", job("a"), "   ", "", job("b"), "\t"])
    assert validate_file(path) == 2
    assert [j.custom_id for j in iter_jobs(path)] == ["a", "b"]


def test_chat_message_input_is_valid(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    path = write_lines(tmp_path, [json.dumps({"custom_id": "chat", "input": messages})])

    assert validate_file(path) == 1
    (parsed,) = iter_jobs(path)
    assert isinstance(parsed.input, list)
    assert all(isinstance(m, ChatMessage) for m in parsed.input)
    assert [m.role for m in parsed.input] == ["system", "user"]


# --- one bad line at a time -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "reason_parts"),
    [
        pytest.param('{"custom_id": "x", "input": ', ["malformed JSON"], id="malformed-json"),
        pytest.param("[1, 2, 3]", ["expected a JSON object", "list"], id="json-array"),
        pytest.param("42", ["expected a JSON object", "int"], id="json-number"),
        pytest.param(
            '{"input": "hi"}', ["missing required field 'custom_id'"], id="missing-custom-id"
        ),
        pytest.param('{"custom_id": "x"}', ["missing required field 'input'"], id="missing-input"),
        pytest.param(
            '{"custom_id": "x", "input": ""}', ["input: empty: give the question"], id="empty-input"
        ),
        pytest.param(
            '{"custom_id": "x", "input": "   "}',
            ["input: empty: give the question"],
            id="whitespace-input",
        ),
        pytest.param(
            '{"custom_id": "x", "input": []}', ["input: empty list"], id="empty-input-list"
        ),
        pytest.param(
            '{"custom_id": "x", "inptu": "hi"}',
            ["unknown field 'inptu'", "missing required field 'input'"],
            id="unknown-field",
        ),
        pytest.param(
            '{"custom_id": "x", "input": "hi", "max_turns": "ten"}',
            ["max_turns", "valid integer"],
            id="wrong-type",
        ),
        pytest.param(
            '{"custom_id": "x", "input": "hi", "model": "  "}', ["model is blank"], id="blank-model"
        ),
        pytest.param(
            '{"custom_id": "x", "input": "hi", "agent": {"name": "A", "toolz": ["calculator"]}}',
            ["unknown field", "toolz"],
            id="agent-spec-unknown-key",
        ),
        pytest.param(
            '{"custom_id": "x", "input": [{"role": "robot", "content": "hi"}]}',
            ["role"],
            id="unknown-role",
        ),
        pytest.param(
            '{"custom_id": "x", "input": "hi", "fallbacks": ["gpt-4", " "]}',
            ["fallbacks contains a blank model name"],
            id="blank-fallback",
        ),
    ],
)
def test_bad_line_is_reported_with_number_and_reason(
    tmp_path: Path, line: str, reason_parts: list[str]
) -> None:
    path = write_lines(tmp_path, [job("ok-1"), line, job("ok-2")])

    error = only_error(path)

    assert error.line == 2
    for part in reason_parts:
        assert part in error.reason
    assert str(error) == f"line 2: {error.reason}"


def test_duplicate_custom_id_names_the_first_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [job("a"), job("b"), "", job("a")])

    error = only_error(path)

    assert error.line == 4
    assert error.reason == "duplicate custom_id 'a' (first on line 1)"


def test_every_bad_line_is_listed_with_its_number(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        [
            job("a"),  # 1
            "",  # 2: blank, counted but skipped
            "{not json",  # 3
            job("b"),  # 4
            '{"custom_id": "c"}',  # 5
            "   ",  # 6: blank
            job("a"),  # 7: duplicate of line 1
            '{"custom_id": "d", "input": "hi", "max_turns": 0}',  # 8
        ],
    )

    with pytest.raises(JobFileError) as info:
        validate_file(path)
    err = info.value

    assert err.total == 4
    assert [e.line for e in err.errors] == [3, 5, 7, 8]
    assert err.errors[0].reason.startswith("malformed JSON")
    assert err.errors[1].reason == "missing required field 'input'"
    assert err.errors[2].reason == "duplicate custom_id 'a' (first on line 1)"
    assert "max_turns" in err.errors[3].reason
    message = str(err)
    assert message.startswith(f"{path}: 4 bad lines; nothing was enqueued.")
    for e in err.errors:
        assert f"  line {e.line}: {e.reason}" in message
    assert "more" not in message


def test_more_bad_lines_than_reported_says_how_many_more(tmp_path: Path) -> None:
    bad = MAX_REPORTED + 7
    path = write_lines(tmp_path, [job("ok")] + ["{broken"] * bad)

    with pytest.raises(JobFileError) as info:
        validate_file(path)
    err = info.value

    assert err.total == bad
    assert len(err.errors) == MAX_REPORTED
    assert [e.line for e in err.errors] == list(range(2, MAX_REPORTED + 2))
    assert f"{bad} bad lines" in str(err)
    assert str(err).endswith("  ... and 7 more")


# --- whole-file problems ----------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"], ids=["empty", "only-blank"])
def test_file_without_jobs_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(content, encoding="utf-8")

    error = only_error(path)

    assert "no jobs" in error.reason


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="job file not found"):
        validate_file(tmp_path / "nope.jsonl")


def test_directory_is_not_a_job_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path)


def test_non_utf8_file_is_a_job_file_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"custom_id": "a", "input": "caf\xe9 \xff"}\n')

    error = only_error(path)

    assert "not UTF-8" in error.reason


# --- the models -------------------------------------------------------------------------------


def test_input_text_of_a_string_input() -> None:
    assert AgentJob(custom_id="a", input="What is 2+2?").input_text() == "What is 2+2?"


def test_input_text_joins_message_contents() -> None:
    parsed = AgentJob.model_validate(
        {
            "custom_id": "a",
            "input": [
                {"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "x"}]},
                {"role": "user", "content": "2+2?"},
            ],
        }
    )
    assert parsed.input_text() == "Be brief.\nWhat is\n\n2+2?"


def test_job_id_is_deterministic_and_distinct() -> None:
    first = job_id_for("b_1", "q1")

    assert first == job_id_for("b_1", "q1")
    assert len(first) == 32
    int(first, 16)  # hex
    assert len({first, job_id_for("b_1", "q2"), job_id_for("b_2", "q1")}) == 3


def test_job_id_is_distinct_when_ids_contain_the_separator() -> None:
    assert job_id_for("x", "y:z") != job_id_for("x:y", "z")
