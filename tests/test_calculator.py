"""The calculator tool (arithmetic by AST walk, never eval) and the tool/agent registry."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from agents import FunctionTool, function_tool

from worker.tools import (
    AgentProfile,
    CalculatorError,
    Registry,
    calculator,
    default_registry,
    evaluate,
    load_plugins,
)

# --- evaluate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+2", 4),
        ("15 * 23", 345),
        ("(17 + 4) * 3", 63),
        ("7/2", 3.5),
        ("7//2", 3),
        ("2**10", 1024),
        ("-3 + 5", 2),
        ("+4 - 10", -6),
        ("10 % 3", 1),
        ("2^3", 8),
        ("3×4", 12),
        ("1.5 * 4", 6.0),
        ("2 ** -1", 0.5),
        ("2**1000", 2**1000),
    ],
)
def test_evaluate_arithmetic(expression: str, expected: float) -> None:
    result = evaluate(expression)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        pytest.param("x + 1", "unsupported element", id="name"),
        pytest.param("__import__('os').system('echo hi')", "unsupported element", id="call"),
        pytest.param("(1).real", "unsupported element", id="attribute"),
        pytest.param("'a' * 3", "unsupported element", id="string"),
        pytest.param("(lambda: 1)()", "unsupported element", id="lambda"),
        pytest.param("[i for i in (1, 2)]", "unsupported element", id="comprehension"),
        pytest.param("True + 1", "booleans are not numbers", id="boolean"),
        pytest.param("1j * 2", "unsupported element", id="complex-literal"),
        pytest.param("1 < 2", "unsupported element", id="comparison"),
        pytest.param("9**99999", "exponent 99999 is too large (max 1000)", id="huge-exponent"),
        pytest.param("2**-5000", "too large", id="huge-negative-exponent"),
        pytest.param("1/0", "division by zero", id="division-by-zero"),
        pytest.param("5 % 0", "division by zero", id="modulo-by-zero"),
        pytest.param("0 ** -1", "division by zero", id="zero-to-negative-power"),
        pytest.param("1+" * 300 + "1", "longer than 500 characters", id="too-long"),
        pytest.param("2 +", "not an arithmetic expression", id="syntax-error"),
        pytest.param("", "not an arithmetic expression", id="empty"),
        pytest.param("import os", "not an arithmetic expression", id="statement"),
    ],
)
def test_evaluate_rejects(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)


def test_call_is_rejected_without_running_it(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CalculatorError):
        evaluate("__import__('os').system('echo pwned')")
    assert "pwned" not in capfd.readouterr().out


def test_calculator_error_is_a_value_error() -> None:
    assert issubclass(CalculatorError, ValueError)


def test_float_overflow_is_a_calculator_error() -> None:
    with pytest.raises(CalculatorError):
        evaluate("10.0**400")


def test_nested_powers_cannot_build_huge_numbers() -> None:
    with pytest.raises(CalculatorError):
        evaluate("(9**1000)**1000")


def test_fractional_power_of_negative_number_is_rejected() -> None:
    with pytest.raises(CalculatorError):
        evaluate("(-8)**0.5")


# --- the calculator tool function -------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "text"),
    [("15 * 23", "345"), ("6/3", "2"), ("7/2", "3.5"), ("2^3", "8"), ("-3 + 5", "2")],
)
async def test_calculator_returns_text(expression: str, text: str) -> None:
    assert await calculator(expression) == text


async def test_calculator_raises_on_bad_expression() -> None:
    with pytest.raises(CalculatorError, match="division by zero"):
        await calculator("1/0")


# --- registry ---------------------------------------------------------------------------------


def test_default_registry_offers_the_calculator() -> None:
    reg = default_registry()

    assert list(reg.tools) == ["calculator"]
    tool = reg.tools["calculator"]
    assert isinstance(tool, FunctionTool)
    assert tool.name == "calculator"
    assert "expression" in tool.params_json_schema["properties"]
    assert tool.params_json_schema["required"] == ["expression"]

    profile = reg.agents["calculator"]
    assert isinstance(profile, AgentProfile)
    assert profile.spec.name == "Calculator"
    assert profile.spec.tools == ["calculator"]
    assert "calculator" in profile.spec.instructions
    assert profile.model is None


def test_add_tool_wraps_a_sync_function() -> None:
    def word_count(text: str) -> int:
        """Count the words of a text."""
        return len(text.split())

    reg = Registry()
    reg.add_tool(word_count)

    tool = reg.tools["word_count"]
    assert isinstance(tool, FunctionTool)
    assert tool.name == "word_count"
    assert tool.description == "Count the words of a text."
    assert "text" in tool.params_json_schema["properties"]


def test_add_tool_wraps_an_async_function_under_another_name() -> None:
    async def shout(text: str) -> str:
        """Upper-case a text."""
        return text.upper()

    reg = Registry()
    reg.add_tool(shout, name="loud")

    assert list(reg.tools) == ["loud"]
    assert isinstance(reg.tools["loud"], FunctionTool)
    assert reg.tools["loud"].name == "loud"


def test_add_tool_wraps_a_function_tool_once_keeping_its_schema() -> None:
    """Wrapped once, to give its run's CPU turn away while it waits (worker/baton.py)."""
    tool = default_registry().tools["calculator"]
    reg = Registry()
    reg.add_tool(tool)
    assert reg.tools["calculator"] is tool
    plain = function_tool(calculator)
    reg.add_tool(plain)
    kept = reg.tools["calculator"]
    assert (kept.name, kept.params_json_schema) == (plain.name, plain.params_json_schema)
    assert kept.on_invoke_tool is not plain.on_invoke_tool


def test_add_agent_with_a_known_tool() -> None:
    reg = default_registry()
    reg.add_agent("math", model="gpt-4o", instructions="Do maths.", tools=["calculator"])

    profile = reg.agents["math"]
    assert profile.model == "gpt-4o"
    assert profile.spec.name == "math"
    assert profile.spec.instructions == "Do maths."


def test_add_agent_with_an_unknown_tool_is_refused() -> None:
    reg = default_registry()
    with pytest.raises(ValueError, match=r"agent profile 'web' names unknown tools \['browser'\]"):
        reg.add_agent("web", tools=["calculator", "browser"])
    assert "web" not in reg.agents


# --- plugins ----------------------------------------------------------------------------------


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")


def test_load_plugins_calls_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(
        tmp_path,
        "agentq_test_plugin_ok",
        '''
        def reverse(text: str) -> str:
            """Reverse a text."""
            return text[::-1]


        def register(registry):
            registry.add_tool(reverse)
            registry.add_agent("reverser", instructions="Reverse things.", tools=["reverse"])
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = default_registry()

    load_plugins(reg, ["agentq_test_plugin_ok"])

    assert sorted(reg.tools) == ["calculator", "reverse"]
    assert reg.tools["reverse"].name == "reverse"
    assert reg.agents["reverser"].spec.tools == ["reverse"]
    assert "calculator" in reg.agents


def test_plugin_without_register_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(tmp_path, "agentq_test_plugin_noreg", "VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(RuntimeError, match="has no register"):
        load_plugins(Registry(), ["agentq_test_plugin_noreg"])


def test_missing_plugin_module_mentions_the_setting() -> None:
    with pytest.raises(RuntimeError, match="AGENTQ_PLUGINS") as info:
        load_plugins(Registry(), ["agentq_no_such_plugin_module"])
    assert "'agentq_no_such_plugin_module'" in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)


def test_no_plugins_changes_nothing() -> None:
    reg = default_registry()
    load_plugins(reg, [])
    assert list(reg.tools) == ["calculator"]
    assert list(reg.agents) == ["calculator"]
